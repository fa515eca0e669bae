"""Quality and cost side by side on a large model: each (method, pattern, seed) row prunes in a fresh process, with
the gradient stage computed (no cache), and reports validation and test perplexity, the stage seconds and the
process's peak RSS during the prune (the loaded model included), against SparseGPT's row of the same pattern and
seed. Fresh processes keep one row's peak from carrying into the next, and hold one copy of the model only (the
in-process scripts keep a dense copy beside it to restore from, which a 1.5B fp32 model cannot afford in 24 GiB).

    python benchmarks/large_model.py --data-dir ../shared/data --model /path/to/Qwen2.5-Coder-1.5B \
        --label Qwen2.5-Coder-1.5B --num-samples 16 --eval-tokens 2048 --patterns 2:4 \
        --methods sparsegpt,wanda,gblm-obs-g4,gblm-obs-block-g4 --output benchmarks/results/large_qwen2.5_1.5b.md

Texts and method labels are reconstruction.py's (calibration from three Austen novels, (val) texts choose, (test)
texts claim). Rows are saved to the JSON beside the report as they finish; a rerun with the same settings skips
them. Run it on an otherwise idle machine: its seconds are the cost claims.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import common
import psutil
import reconstruction
from common import PeakRSS, gib

TABLE_START = 7  # report()'s first table row
SETTINGS = ("model", "num_samples", "seqlen", "eval_seqlen", "eval_tokens", "sparsity", "dtype")


def worker(args: argparse.Namespace, label: str, pattern: str, seed: int) -> dict:
    from optimum_gblm import GBLMConfig, GBLMPruner, get_calibration_data, load_model
    from optimum_gblm.data import window_start_token

    model, tokenizer = load_model(args.model, dtype=args.dtype)
    common.read_every_weight(model)  # every row starts with the whole model resident
    loaded_rss = psutil.Process().memory_info().rss
    row = {"parameters": sum(p.numel() for p in model.parameters()), "dtype": str(next(model.parameters()).dtype)[6:]}
    if label != "dense":
        texts = common.read_texts(args.data_dir, common.SWEEP_CALIBRATION_FILES)
        calibration = get_calibration_data(texts, tokenizer, args.num_samples, args.seqlen, seed)
        config = GBLMConfig.from_dict(
            dict(reconstruction.METHODS[label]), pattern=pattern, sparsity=common.pattern_sparsity(pattern, args.sparsity),
            num_samples=args.num_samples, seqlen=args.seqlen, seed=seed,
        )
        with PeakRSS() as rss:
            GBLMPruner(config, use_cache=False, show_progress=False).prune(model, calibration)
        timings = model.config.quantization_config.record.timings_seconds
        row.update(gradients_s=timings["gradients"], prune_s=timings["prune"], total_s=timings["total"],
                   loaded_rss=loaded_rss, peak_rss=rss.peak)
    tokens = common.evaluation_tokens(args.data_dir, tokenizer, args.eval_tokens, reconstruction.TEXTS)
    row["ppl"] = common.perplexities(model, tokens, args.eval_seqlen, start_token=window_start_token(tokenizer))
    return row


def report(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    texts = list(reconstruction.TEXTS)
    lines = [
        f"# Quality and cost on {args.label}",
        "",
        f"- model: {args.label} ({args.model}), {args.dtype}; calibration {args.num_samples} x {args.seqlen} tokens from "
        f"{', '.join(common.SWEEP_CALIBRATION_FILES)}; evaluation {args.eval_tokens} tokens per text, windows of "
        f"{args.eval_seqlen}",
        f"- machine: {common.machine()}, {os.cpu_count()} cores; one row at a time, each in a fresh process, gradient "
        "cache off; peak: RSS during the prune, the whole loaded model included (paged in first)",
        "",
        "| method | pattern | seed | " + " | ".join(f"ppl {t}" for t in texts)
        + " | gradients s | prune s | total s | x SparseGPT time | peak RSS GiB | x SparseGPT peak |",
        "|" + "---|" * (9 + len(texts)),
    ]
    reference = {(r["pattern"], r["seed"]): r for r in rows if r["method"] == "sparsegpt"}
    for r in rows:
        base = reference.get((r["pattern"], r["seed"]))
        cost = ["-"] * 6
        if "total_s" in r:
            cost = [f"{r['gradients_s']:.0f}", f"{r['prune_s']:.0f}", f"{r['total_s']:.0f}",
                    f"{r['total_s'] / base['total_s']:.2f}" if base else "-", gib(r["peak_rss"]),
                    f"{r['peak_rss'] / base['peak_rss']:.2f}" if base else "-"]
        lines.append(f"| {r['method']} | {r['pattern']} | {r['seed']} | " + " | ".join(f"{r['ppl'][t]:.2f}" for t in texts)
                     + " | " + " | ".join(cost) + " |")
    candidates = tuple(dict.fromkeys(r["method"] for r in rows if r["method"].startswith("gblm-obs")))
    return lines + reconstruction.target_lines(rows, candidates)


def main() -> None:
    args = common.argument_parser(
        __doc__, "data_dir", "model", "num_samples", "seqlen", "seeds", "eval_seqlen", "patterns", "sparsity",
        label=dict(default=None, help="the model's name in the report (default: the folder's name)"),
        dtype=dict(default="float32", help="dtype the model is loaded in (float32, bfloat16)"),
        methods=dict(default="sparsegpt,wanda,gblm-obs-joint-mu0.5-scale-refit10,gblm-obs-block",
                     help="comma-separated labels of reconstruction.py's METHODS"),
        num_samples=dict(type=int, default=16),
        eval_tokens=dict(type=int, default=2048, help="tokens evaluated per text"),
        output=dict(default="benchmarks/results/large_model.md"),
        worker=dict(nargs=3, metavar=("METHOD", "PATTERN", "SEED"), help=argparse.SUPPRESS),
    ).parse_args()
    args.label = args.label or Path(args.model or "SmolLM2-135M").name
    if args.worker:
        label, pattern, seed = args.worker
        print(json.dumps(worker(args, label, pattern, int(seed))))
        return
    results_path = Path(args.output).with_suffix(".json")
    # "weights": rows measured before the model was paged in first (a mapped lm_head outside RSS) are not comparable
    settings = {**{name: getattr(args, name) for name in SETTINGS}, "weights": "resident"}
    rows: list[dict] = common.load_resumable(results_path, settings, empty={"rows": []})["rows"]
    todo = [("dense", "-", "-")] + [
        (label, pattern, seed) for seed in common.comma_list(args.seeds, int) for pattern in common.comma_list(args.patterns)
        for label in common.comma_list(args.methods)
    ]
    for label, pattern, seed in todo:
        if any((r["method"], r["pattern"], r["seed"]) == (label, pattern, seed) for r in rows):
            continue
        result = common.run_worker(
            __file__, *sys.argv[1:], "--worker", label, pattern, 0 if seed == "-" else seed, what=(label, pattern, seed)
        )
        rows.append({"method": label, "pattern": pattern, "seed": seed, **result})
        common.write_json(results_path, {"settings": settings, "rows": rows})
        common.atomic_write_text(args.output, "\n".join(report(args, rows)) + "\n")
        print(report(args, rows[-1:])[TABLE_START], flush=True)
    print("\n".join(report(args, rows)))


if __name__ == "__main__":
    main()
