"""Perplexity against sparsity (like the GBLM paper's Figure 2): magnitude, Wanda, SparseGPT and GBLM from 10% to
70% unstructured on the default model; writes a PNG plot and a markdown table into benchmarks/results/.

    python benchmarks/sparsity_curve.py --data-dir ../shared/data          # about 2.5 hours on 2 cores
    python benchmarks/sparsity_curve.py --sparsities 0.3,0.5,0.7 --eval-tokens 8192 --num-samples 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from optimum_gblm import GBLMConfig, GBLMPruner, get_calibration_data, load_model, perplexity
from optimum_gblm.data import read_text, tokenize
from optimum_gblm.integration import restore_dense
from results_files import atomic_savefig, atomic_write_text, load_resumable

CALIBRATION_FILES = ["austen_emma.txt", "austen_mansfieldpark.txt", "austen_prideprejudice.txt", "austen_sensesensibility.txt"]
METHODS = ["magnitude", "wanda", "sparsegpt", "gblm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--eval-file", default="austen_northangerabbey.txt", help="text in --data-dir, never calibrated on")
    parser.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--output", default="benchmarks/results/sparsity_curve_smollm2")
    args = parser.parse_args()

    data_dir = Path(args.data_dir)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One JSON of finished points, rewritten atomically after each: a stopped run resumes where it was, and a
    # point measured under other settings is never mixed in (the settings are part of the file).
    settings = {k: getattr(args, k) for k in ("eval_file", "num_samples", "seqlen", "eval_seqlen", "eval_tokens")}
    results_path = out.with_suffix(".json")
    results = load_resumable(results_path, settings, empty={"settings": settings, "dense": None, "points": {}})

    model, tokenizer = load_model()
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calibration = get_calibration_data(
        [read_text(data_dir / f) for f in CALIBRATION_FILES], tokenizer, args.num_samples, args.seqlen, seed=0
    )
    tokens = tokenize(read_text(data_dir / args.eval_file), tokenizer)[: args.eval_tokens]
    if results["dense"] is None:
        dense = perplexity(model, tokens, args.eval_seqlen, show_progress=False)
        results["dense"] = {"perplexity": dense.perplexity, "num_tokens": dense.num_tokens}
    sparsities = [float(s) for s in args.sparsities.split(",")]
    methods = args.methods.split(",")
    start = time.perf_counter()
    # GBLM's gradient norms go to the library's default cache: computed once, reused by every sparsity and rerun.
    # Sparsity outermost: a run stopped early still has every method at the sparsities it reached.
    for sparsity in sparsities:
        for method in methods:
            key = f"{method}|{sparsity:g}"
            if key in results["points"]:
                continue
            restore_dense(model, pristine)
            tick = time.perf_counter()
            config = GBLMConfig(method=method, sparsity=sparsity, num_samples=args.num_samples, seqlen=args.seqlen)
            GBLMPruner(config, show_progress=False).prune(model, calibration)
            seconds = time.perf_counter() - tick
            ppl = perplexity(model, tokens, args.eval_seqlen, show_progress=False).perplexity
            results["points"][key] = {"method": method, "sparsity": sparsity, "perplexity": ppl, "prune_s": round(seconds, 1)}
            atomic_write_text(results_path, json.dumps(results, indent=1))
            write_report(results, out)
            print(f"{method} {sparsity:.0%}: ppl {ppl:.2f} ({seconds:.0f}s)", flush=True)
    write_report(results, out)
    print(f"total {time.perf_counter() - start:.0f}s; wrote {out.with_suffix('.png')} and {out.with_suffix('.md')}")


def write_report(results: dict, out: Path) -> None:
    """Markdown table and PNG plot of every finished point (ppl on a log axis, like the paper's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, dense = results["settings"], results["dense"]
    points = list(results["points"].values())
    methods = list(dict.fromkeys(p["method"] for p in points))
    sparsities = sorted({p["sparsity"] for p in points})
    protocol = (
        f"SmolLM2-135M-Instruct; calibration {settings['num_samples']} x {settings['seqlen']} tokens of Austen (seed 0); "
        f"{settings['eval_file']}: {dense['num_tokens']} tokens, seqlen {settings['eval_seqlen']}"
    )
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for method in methods:
        mine = sorted((p["sparsity"], p["perplexity"]) for p in points if p["method"] == method)
        axes.plot([s * 100 for s, _ in mine], [v for _, v in mine], marker="o", label=method)
    axes.axhline(dense["perplexity"], color="grey", linestyle="--", label="dense")
    axes.set_yscale("log")
    axes.set_xlabel("unstructured sparsity (%)")
    axes.set_ylabel("perplexity (log scale)")
    axes.set_title(protocol, fontsize=7)
    axes.legend()
    figure.tight_layout()
    atomic_savefig(figure, out.with_suffix(".png"), dpi=120)
    plt.close(figure)
    by_key = {(p["method"], p["sparsity"]): p["perplexity"] for p in points}
    lines = [f"# Perplexity vs sparsity\n\n{protocol}; dense ppl {dense['perplexity']:.2f}\n",
             "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |", "|---|" + "---|" * len(sparsities)]
    lines += [f"| {m} | " + " | ".join(f"{by_key[(m, s)]:.2f}" if (m, s) in by_key else "-" for s in sparsities) + " |"
              for m in methods]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
