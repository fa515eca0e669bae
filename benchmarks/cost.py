"""Wall time and peak memory of a whole prune, gradients included, per method, over models and calibration sizes.

Each (model, method, pattern, calibration size) runs in a fresh subprocess, one at a time, so that peaks and
allocator state do not carry over; run it on an otherwise idle machine. Per row: the record's stage seconds
(gradients: the model loss's backward pass, or the block-local gradients inside the layer pass; prune: the layer
pass without them), their total, and the peak RSS of the process during the prune (the loaded model included) and
its growth over the loaded model. Calibration is random token ids: cost does not depend on what the tokens say.
The gradient cache is off, so every gradient stage is computed.

    python benchmarks/cost.py --num-samples 16,32 --output benchmarks/results/cost_smollm2.md
    python benchmarks/cost.py --model FOLDER --label "Qwen2.5-Coder-1.5B" --num-samples 16 \
        --output benchmarks/results/cost_qwen2.5_1.5b.md

Rows are saved to the JSON beside the report and skipped when rerun, so a stopped run resumes; the report holds
every model measured into the same file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common
import psutil
from common import PeakRSS, gib

METHODS = {
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "gblm-obs": {"method": "gblm_obs"},  # gblm_obs's default: the model loss's gradients, one full backward
    "gblm-obs-block": {"method": "gblm_obs", "method_options": {"gradient_loss": "block"}},
    "gblm-obs-by-block": {"method": "gblm_obs", "method_options": {"gradient_loss": "model_by_block"}},
    "gblm-auto-block": {"method": "gblm", "method_options": {"alpha": "auto", "gradient_loss": "block"}},
}


def worker(model_path: str | None, gguf_file: str | None, label: str, pattern: str, num_samples: int, seqlen: int) -> dict:
    import torch

    from optimum_gblm import GBLMConfig, GBLMPruner, load_model

    model, _ = load_model(model_path, gguf_file=gguf_file)
    loaded_rss = psutil.Process().memory_info().rss
    ids = torch.randint(0, model.config.vocab_size, (num_samples, seqlen), generator=torch.Generator().manual_seed(0))
    config = GBLMConfig.from_dict(
        dict(METHODS[label]), pattern=pattern, sparsity=common.pattern_sparsity(pattern, 0.5), num_samples=num_samples,
        seqlen=seqlen,
    )
    tick = time.perf_counter()
    with PeakRSS() as rss:
        GBLMPruner(config, use_cache=False, show_progress=False).prune(model, ids)
    timings = model.config.quantization_config.record.timings_seconds
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "gradients_s": timings["gradients"], "prune_s": timings["prune"], "total_s": timings["total"],
        "wall_s": round(time.perf_counter() - tick, 1),
        "loaded_rss": loaded_rss, "peak_rss": rss.peak,
    }


def report(rows: list[dict]) -> list[str]:
    lines = [
        "# Cost of a whole prune, gradients included",
        "",
        f"- machine: {common.machine()}; one row at a time, each in a fresh process; gradient cache off",
        "- gradients s: the model loss's backward (gblm-obs) or the block-local gradients inside the layer pass "
        "(-block); prune s: the layer pass without them; peak: RSS during the prune, loaded model included; "
        "x SparseGPT: against the SparseGPT row of the same model, pattern and calibration size",
        "",
        "| model | params | dtype | pattern | calibration | method | gradients s | prune s | total s | x SparseGPT time | "
        "peak RSS GiB | growth over model GiB | x SparseGPT peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reference = {(r["model"], r["pattern"], r["num_samples"], r["seqlen"]): r for r in rows if r["method"] == "sparsegpt"}
    for r in sorted(rows, key=lambda r: (r["parameters"], r["pattern"], r["num_samples"], list(METHODS).index(r["method"]))):
        base = reference.get((r["model"], r["pattern"], r["num_samples"], r["seqlen"]))
        time_ratio = f"{r['total_s'] / base['total_s']:.2f}" if base else "-"
        peak_ratio = f"{r['peak_rss'] / base['peak_rss']:.2f}" if base else "-"
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.0f}M | {r['dtype']} | {r['pattern']} | {r['num_samples']} x "
            f"{r['seqlen']} | {r['method']} | {r['gradients_s']:.1f} | {r['prune_s']:.1f} | {r['total_s']:.1f} | "
            f"{time_ratio} | {gib(r['peak_rss'])} | {gib(r['peak_rss'] - r['loaded_rss'])} | {peak_ratio} |"
        )
    return lines


def main() -> None:
    args = common.argument_parser(
        __doc__, "model", "gguf_file", "seqlen",
        label=dict(default=None, help="the model's name in the report (default: SmolLM2-135M, or the folder's name)"),
        methods=dict(default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}"),
        patterns=dict(default="2:4"),
        num_samples=dict(default="16", help="comma-separated calibration sizes (sequences of --seqlen tokens)"),
        output=dict(default="benchmarks/results/cost_smollm2.md"),
        worker=dict(nargs=3, metavar=("METHOD", "PATTERN", "NUM_SAMPLES"), help=argparse.SUPPRESS),
    ).parse_args()
    if args.worker:
        label, pattern, num_samples = args.worker
        print(json.dumps(worker(args.model, args.gguf_file, label, pattern, int(num_samples), args.seqlen)))
        return
    model_label = args.label or (Path(args.model).name if args.model else "SmolLM2-135M")
    results_path = Path(args.output).with_suffix(".json")
    saved = json.loads(results_path.read_text()) if results_path.exists() else {"rows": []}
    rows = saved["rows"]
    for num_samples in common.comma_list(args.num_samples, int):
        for pattern in common.comma_list(args.patterns):
            for label in common.comma_list(args.methods):
                key = (model_label, label, pattern, num_samples, args.seqlen)
                if any((r["model"], r["method"], r["pattern"], r["num_samples"], r["seqlen"]) == key for r in rows):
                    continue
                argv = ["--worker", label, pattern, num_samples, "--seqlen", args.seqlen]
                if args.model:
                    argv += ["--model", args.model] + (["--gguf-file", args.gguf_file] if args.gguf_file else [])
                row = {"model": model_label, "method": label, "pattern": pattern, "num_samples": num_samples,
                       "seqlen": args.seqlen, **common.run_worker(__file__, *argv, what=key)}
                rows.append(row)
                common.write_json(results_path, {"rows": rows})
                common.atomic_write_text(args.output, "\n".join(report(rows)) + "\n")
                print(report([row])[-1], flush=True)
    print("\n".join(report(rows)))


if __name__ == "__main__":
    main()
