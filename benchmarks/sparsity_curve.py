"""Perplexity against sparsity (like the GBLM paper's Figure 2): magnitude, Wanda, SparseGPT and GBLM from 10% to
70% unstructured on the default model; writes a PNG plot and a markdown table into benchmarks/results/.

    python benchmarks/sparsity_curve.py --data-dir ../shared/data          # about 2.5 hours on 2 cores
    python benchmarks/sparsity_curve.py --sparsities 0.3,0.5,0.7 --eval-tokens 8192 --num-samples 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


from optimum_gblm.integration import restore_dense
from optimum_gblm import GBLMConfig, GBLMPruner, get_calibration_data, load_model, perplexity
from optimum_gblm.data import read_text, tokenize

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

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data_dir = Path(args.data_dir)
    model, tokenizer = load_model()
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calibration = get_calibration_data(
        [read_text(data_dir / f) for f in CALIBRATION_FILES], tokenizer, args.num_samples, args.seqlen, seed=0
    )
    tokens = tokenize(read_text(data_dir / args.eval_file), tokenizer)[: args.eval_tokens]
    dense = perplexity(model, tokens, args.eval_seqlen, show_progress=False)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    curves: dict[str, list[float]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gblm-curve-cache-") as cache_dir:  # GBLM's gradients computed once
        for method in args.methods.split(","):
            curves[method] = []
            for sparsity in sparsities:
                restore_dense(model, pristine)
                config = GBLMConfig(method=method, sparsity=sparsity, num_samples=args.num_samples, seqlen=args.seqlen)
                GBLMPruner(config, cache_dir=cache_dir, show_progress=False).prune(model, calibration)
                curves[method].append(perplexity(model, tokens, args.eval_seqlen, show_progress=False).perplexity)
                print(f"{method} {sparsity:.0%}: ppl {curves[method][-1]:.2f}", flush=True)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    protocol = (
        f"SmolLM2-135M-Instruct; calibration {args.num_samples} x {args.seqlen} tokens of Austen (seed 0); "
        f"{args.eval_file}: {dense.num_tokens} tokens, seqlen {args.eval_seqlen}"
    )
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for method, values in curves.items():
        axes.plot([s * 100 for s in sparsities], values, marker="o", label=method)
    axes.axhline(dense.perplexity, color="grey", linestyle="--", label="dense")
    axes.set_yscale("log")
    axes.set_xlabel("unstructured sparsity (%)")
    axes.set_ylabel("perplexity (log scale)")
    axes.set_title(protocol, fontsize=7)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=120)
    lines = [f"# Perplexity vs sparsity\n\n{protocol}; dense ppl {dense.perplexity:.2f}\n",
             "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |", "|---|" + "---|" * len(sparsities)]
    lines += [f"| {m} | " + " | ".join(f"{v:.2f}" for v in values) + " |" for m, values in curves.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"total {time.perf_counter() - start:.0f}s; wrote {out.with_suffix('.png')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
