"""Perplexity against sparsity (like the GBLM paper's Figure 2): magnitude, Wanda, SparseGPT and GBLM from 10% to
70% unstructured on the default model; writes a PNG plot and a markdown table into benchmarks/results/.

    python benchmarks/sparsity_curve.py --data-dir ../shared/data          # about 2.5 hours on 2 cores
    python benchmarks/sparsity_curve.py --sparsities 0.3,0.5,0.7 --eval-tokens 8192 --num-samples 16
"""

from __future__ import annotations

import time
from pathlib import Path

import common

from optimum_gblm import GBLMConfig, GBLMPruner, get_calibration_data, perplexity

METHODS = ["magnitude", "wanda", "sparsegpt", "gblm"]
SETTINGS = ("eval_file", "num_samples", "seqlen", "eval_seqlen", "eval_tokens")


def main() -> None:
    args = common.argument_parser(
        __doc__, "data_dir",
        eval_file=dict(default="austen_northangerabbey.txt", help="text in --data-dir, never calibrated on"),
        sparsities=dict(default="0.1,0.2,0.3,0.4,0.5,0.6,0.7"), methods=dict(default=",".join(METHODS)),
        num_samples={}, seqlen={}, eval_seqlen={}, eval_tokens=dict(help=None),
        output=dict(default="benchmarks/results/sparsity_curve_smollm2"),
    ).parse_args()

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One JSON of finished points, rewritten atomically after each: a stopped run resumes where it was, and a
    # point measured under other settings is never mixed in (the settings are part of the file).
    settings = {name: getattr(args, name) for name in SETTINGS}
    results_path = out.with_suffix(".json")
    results = common.load_resumable(results_path, settings, empty={"settings": settings, "dense": None, "points": {}})

    model, tokenizer, restore = common.load_dense()
    calibration = get_calibration_data(
        common.read_texts(args.data_dir, common.CALIBRATION_FILES), tokenizer, args.num_samples, args.seqlen, seed=0
    )
    tokens = common.evaluation_tokens(args.data_dir, tokenizer, args.eval_tokens, {"eval": args.eval_file})["eval"]
    if results["dense"] is None:
        dense = perplexity(model, tokens, args.eval_seqlen, show_progress=False)
        results["dense"] = {"perplexity": dense.perplexity, "num_tokens": dense.num_tokens}
    start = time.perf_counter()
    # GBLM's gradient norms go to the library's default cache: computed once, reused by every sparsity and rerun.
    # Sparsity outermost: a run stopped early still has every method at the sparsities it reached.
    for sparsity in common.comma_list(args.sparsities, float):
        for method in args.methods.split(","):
            key = f"{method}|{sparsity:g}"
            if key in results["points"]:
                continue
            restore()
            tick = time.perf_counter()
            config = GBLMConfig(method=method, sparsity=sparsity, num_samples=args.num_samples, seqlen=args.seqlen)
            GBLMPruner(config, show_progress=False).prune(model, calibration)
            seconds = time.perf_counter() - tick
            ppl = common.perplexities(model, {"eval": tokens}, args.eval_seqlen)["eval"]
            results["points"][key] = {"method": method, "sparsity": sparsity, "perplexity": ppl, "prune_s": round(seconds, 1)}
            common.write_json(results_path, results)
            write_report(results, out)
            print(f"{method} {sparsity:.0%}: ppl {ppl:.2f} ({seconds:.0f}s)", flush=True)
    write_report(results, out)
    print(f"total {time.perf_counter() - start:.0f}s; wrote {out.with_suffix('.png')} and {out.with_suffix('.md')}")


def protocol(results: dict) -> str:
    settings, dense = results["settings"], results["dense"]
    return (
        f"SmolLM2-135M-Instruct; calibration {settings['num_samples']} x {settings['seqlen']} tokens of Austen (seed 0); "
        f"{settings['eval_file']}: {dense['num_tokens']} tokens, seqlen {settings['eval_seqlen']}"
    )


def report_markdown(results: dict) -> str:
    """The table of every finished point: methods by sparsity, "-" where a point is missing."""
    points = list(results["points"].values())
    methods = list(dict.fromkeys(p["method"] for p in points))
    sparsities = sorted({p["sparsity"] for p in points})
    by_key = {(p["method"], p["sparsity"]): p["perplexity"] for p in points}
    lines = [f"# Perplexity vs sparsity\n\n{protocol(results)}; dense ppl {results['dense']['perplexity']:.2f}\n",
             "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |", "|---|" + "---|" * len(sparsities)]
    lines += [f"| {m} | " + " | ".join(f"{by_key[(m, s)]:.2f}" if (m, s) in by_key else "-" for s in sparsities) + " |"
              for m in methods]
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: Path) -> None:
    """Markdown table and PNG plot of every finished point (ppl on a log axis, like the paper's Figure 2)."""
    points = list(results["points"].values())
    with common.saved_figure(out.with_suffix(".png"), figsize=(6.4, 4.4), dpi=120) as (_, axes):
        ax = axes[0][0]
        for method in dict.fromkeys(p["method"] for p in points):
            mine = sorted((p["sparsity"], p["perplexity"]) for p in points if p["method"] == method)
            ax.plot([s * 100 for s, _ in mine], [v for _, v in mine], marker="o", label=method)
        ax.axhline(results["dense"]["perplexity"], color="grey", linestyle="--", label="dense")
        ax.set_yscale("log")
        common.label_axes(ax, "unstructured sparsity (%)", "perplexity (log scale)", protocol(results), title_size=7, grid=False)
        ax.legend()
    common.atomic_write_text(out.with_suffix(".md"), report_markdown(results))


if __name__ == "__main__":
    main()
