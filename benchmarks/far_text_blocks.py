"""Which blocks' updates lose the far text: prune one range of blocks at a time, with a mask alone and with an
update, and read both validation texts' perplexity.

    python benchmarks/far_text_blocks.py --data-dir ../shared/data --model /path/to/Qwen2.5-Coder-1.5B \
        --output benchmarks/results/far_text_blocks_qwen2.5_1.5b.md

At 1.5B every recipe that updates weights loses the Debian handbook against the masks alone, although layer by layer
(from dense inputs) gblm_obs's update is closer to the dense outputs on the handbook than Wanda's mask is
(`far_text_layers.py`). This prunes only the blocks of one range (`target_modules` as a regex; the other blocks run
dense), as the package prunes (inputs propagated through the pruned blocks), and measures Northanger Abbey and the
Debian handbook (validation texts, first `--eval-tokens` tokens each). Recipes are reconstruction.py's labels
(default: Wanda's mask and gblm_obs's update with Wanda's score, which needs no gradient stage). Each row runs in a
fresh process; rows are saved and a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common
import reconstruction

SETTINGS = ("model", "num_samples", "seqlen", "eval_tokens", "sparsity")


def worker(args: argparse.Namespace, label: str, first: int, last: int) -> dict:
    from optimum_gblm import GBLMConfig, GBLMPruner, get_calibration_data, load_model
    from optimum_gblm.data import window_start_token

    model, tokenizer = load_model(args.model, dtype="float32")
    if label != "dense":
        texts = common.read_texts(args.data_dir, common.SWEEP_CALIBRATION_FILES)
        calibration = get_calibration_data(texts, tokenizer, args.num_samples, args.seqlen, 0)
        blocks = "|".join(str(b) for b in range(first, last + 1))
        config = GBLMConfig.from_dict(
            dict(reconstruction.METHODS[label]), sparsity=args.sparsity, num_samples=args.num_samples,
            seqlen=args.seqlen, seed=0, target_modules=[rf"model\.layers\.({blocks})\.(self_attn|mlp)\.\w+_proj"],
        )
        GBLMPruner(config, use_cache=False, show_progress=False).prune(model, calibration)
    tokens = common.evaluation_tokens(args.data_dir, tokenizer, args.eval_tokens, common.VALIDATION_FILES)
    return common.perplexities(model, tokens, 512, start_token=window_start_token(tokenizer))


def report(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    texts = list(common.VALIDATION_FILES)
    dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    lines = [
        f"# Which blocks' updates lose the far text: {args.model}", "",
        f"- {args.sparsity:.0%} unstructured on the listed blocks only; calibration {args.num_samples} x {args.seqlen} "
        f"tokens (seed 0); validation texts, {args.eval_tokens} tokens each, windows of 512; machine: {common.machine()}",
        "- change: the rise of ppl over the dense model's, in %", "",
        "| blocks | method | " + " | ".join(texts) + " | " + " | ".join(f"{t} change" for t in texts) + " |",
        "|" + "---|" * (2 + 2 * len(texts)),
    ]
    for r in rows:
        changes = [f"{100 * (r['ppl'][t] / dense[t] - 1):+.1f}" if dense else "-" for t in texts]
        lines.append(f"| {r['blocks']} | {r['method']} | " + " | ".join(f"{r['ppl'][t]:.2f}" for t in texts)
                     + " | " + " | ".join(changes) + " |")
    return lines


def main() -> None:
    args = common.argument_parser(
        __doc__, "data_dir", "num_samples", "output",
        model=dict(required=True, help="a local folder with a Llama/Qwen layout (model.model.layers)"),
        num_samples=dict(type=int, default=16),
        seqlen=dict(type=int, default=512),
        sparsity=dict(type=float, default=0.5),
        eval_tokens=dict(type=int, default=2048, help="tokens evaluated per text"),
        ranges=dict(default="21-27,14-20,7-13,0-6", help="block ranges, each pruned alone"),
        methods=dict(default="wanda,gblm-obs-wanda-refit5", help="reconstruction.py labels"),
        output=dict(default="benchmarks/results/far_text_blocks_qwen2.5_1.5b.md"),
        worker=dict(nargs=3, metavar=("METHOD", "FIRST", "LAST"), help=argparse.SUPPRESS),
    ).parse_args()
    if args.worker:
        label, first, last = args.worker
        print(json.dumps(worker(args, label, int(first), int(last))))
        return
    results_path = Path(args.output).with_suffix(".json")
    settings = {name: getattr(args, name) for name in SETTINGS}
    rows: list[dict] = common.load_resumable(results_path, settings, empty={"rows": []})["rows"]
    ranges = [tuple(map(int, r.split("-"))) for r in common.comma_list(args.ranges)]
    todo = [("dense", "-", 0, -1)] + [
        (label, f"{first}-{last}", first, last) for first, last in ranges for label in common.comma_list(args.methods)
    ]
    for label, blocks, first, last in todo:
        if any((r["method"], r["blocks"]) == (label, blocks) for r in rows):
            continue
        ppl = common.run_worker(__file__, *sys.argv[1:], "--worker", label, first, last, what=(label, blocks))
        rows.append({"method": label, "blocks": blocks, "ppl": ppl})
        common.write_json(results_path, {"settings": settings, "rows": rows})
        common.atomic_write_text(args.output, "\n".join(report(args, rows)) + "\n")
        print(report(args, rows)[-1], flush=True)
    print("\n".join(report(args, rows)))


if __name__ == "__main__":
    main()
