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

import json
import logging
import time
from pathlib import Path

import common
import torch
from common import TEST_FILES, VALIDATION_FILES, mean_std

from optimum_gblm import GBLMConfig, GBLMPruner, get_calibration_data
from optimum_gblm.config import parse_alpha
from optimum_gblm.gradients import cached_gradient_norms
from optimum_gblm.structure import prunable_modules

WANDA, AUTO = ("-", 0), ("l1", "auto")  # (norm, alpha) of the rows the calibration-size section compares


def alpha_label(alpha: float | str) -> str:
    return "auto" if alpha == "auto" else f"{alpha:g}"


def row_key(num_samples: int, seed: int, pattern: str, norm: str, alpha: float | str) -> str:
    # alpha 0 is Wanda whatever the norm: one row serves both.
    norm = "-" if alpha == 0 else norm
    return f"n={num_samples}|seed={seed}|{pattern}|{norm}|alpha={alpha_label(alpha)}"


def section_of(text: str) -> str:
    return "validation" if text in VALIDATION_FILES else "test"


def by_seed(group: list[dict], text: str) -> dict:
    """seed -> perplexity on `text`, for the rows of `group` that measured it."""
    return {r["seed"]: r[section_of(text)][text] for r in group if text in r.get(section_of(text), {})}


def text_headers(labels: list[str], test_labels: list[str]) -> str:
    return " | ".join(f"{t}{' (test)' if t in test_labels else ''}" for t in labels)


def write_report(results: dict, args, path: Path, plot_path: Path | None) -> None:
    rows = list(results.values())
    texts_val = list(VALIDATION_FILES)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["num_samples"], r["pattern"], r["norm"], r["alpha"]), []).append(r)
    test_labels = sorted({t for r in rows for t in r.get("test", {})}, key=lambda t: (t not in TEST_FILES, t))
    labels = texts_val + test_labels
    lines = [
        "# GBLM alpha sweep on SmolLM2-135M-Instruct",
        "",
        "score = |W| (||X||/sqrt(N) + alpha G); alpha 0 = Wanda; auto = per-layer median(||X||/sqrt(N)) / median(G).",
        f"- calibration: windows of {args.seqlen} tokens from {', '.join(common.SWEEP_CALIBRATION_FILES)}; seeds as listed",
        f"- validation: first {args.eval_tokens} tokens of {', '.join(texts_val)} (used to read the sweep)",
        f"- test: first {args.eval_tokens} tokens of {', '.join(test_labels) or '-'} (never used for choosing)",
        f"- perplexity with non-overlapping windows of {args.eval_seqlen} tokens; mean +- std over seeds (n)",
        "",
    ]
    for (n, pattern) in sorted({(k[0], k[1]) for k in groups}, key=lambda x: (x[0], x[1] != "unstructured", x[1])):
        lines += [f"## {pattern}, {n} calibration sequences", ""]
        lines.append("| norm | alpha | n | " + text_headers(labels, test_labels) + " |")
        lines.append("|" + "---|" * (3 + len(labels)))
        wanda = groups.get((n, pattern, *WANDA))
        keys = sorted(
            (k for k in groups if k[0] == n and k[1] == pattern),
            key=lambda k: (k[2] != "-", k[2], k[3] == "auto", 0 if k[3] == "auto" else k[3]),
        )
        for key in keys:
            cells = []
            for t in labels:
                values = by_seed(groups[key], t)
                if not values:
                    cells.append("-")
                    continue
                cell = "{:.2f} +- {:.2f}".format(*mean_std(list(values.values())))
                # Paired: Wanda on the same seeds (same calibration windows), never a mean over other draws.
                paired = common.compare_over_seeds(values, by_seed(wanda, t)) if wanda and key[2] != "-" else None
                if paired:
                    cell += f" ({paired.change:+.1f}%{' **better**' if paired.verdict == 'better' else ''})"
                cells.append(cell)
            lines.append(f"| {key[2]} | {alpha_label(key[3])} | {len(groups[key])} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Percentages are against Wanda (alpha 0) on the same seeds (same calibration windows); **better** marks a lower",
        "mean perplexity by more than the larger of the two seed standard deviations (needs >= 2 shared seeds).",
        "",
    ]
    sizes = calibration_size_changes(groups, labels)
    if len({n for n, _, _ in sizes}) > 1:
        lines += [
            "## Calibration size: GBLM alpha auto (l1) against Wanda",
            "",
            "Each cell: Wanda -> GBLM auto perplexity (% change), over the seeds that every size has (same windows for",
            "both methods); the per-size sections above give every seed with its spread.",
            "",
            "| pattern | sequences | seeds | " + text_headers(labels, test_labels) + " |",
            "|" + "---|" * (3 + len(labels)),
        ]
        for (n, pattern, seeds), cells in sizes.items():
            row = [f"{w:.2f} -> {a:.2f} ({100 * (a / w - 1):+.1f}%)" if w else "-" for w, a in (cells.get(t, (None, None)) for t in labels)]
            lines.append(f"| {pattern} | {n} | {','.join(map(str, seeds))} | " + " | ".join(row) + " |")
        lines.append("")
        if plot_path is not None:
            plot_calibration_sizes(sizes, labels, plot_path.with_name(plot_path.stem + "_calibration.png"), args.seqlen)
    common.atomic_write_text(path, "\n".join(lines))
    if plot_path is not None:
        plot(groups, texts_val, plot_path)


def calibration_size_changes(groups: dict, texts: list[str]) -> dict:
    """(sequences, pattern, seeds) -> {text: (Wanda mean, GBLM auto l1 mean)} over the seeds both have."""
    sizes = {}
    cases = sorted({(k[0], k[1]) for k in groups}, key=lambda x: (x[1] != "unstructured", x[1], x[0]))
    wanda = {case: {r["seed"]: r for r in groups.get((*case, *WANDA), [])} for case in cases}
    auto = {case: {r["seed"]: r for r in groups.get((*case, *AUTO), [])} for case in cases}
    paired_seeds = {case: set(wanda[case]) & set(auto[case]) for case in cases}
    for case in cases:
        # Only seeds every size has: sizes compared on the same draws, not a 3-seed mean against one seed.
        per_size = [seeds for (m, p), seeds in paired_seeds.items() if p == case[1] and seeds]
        seeds = sorted(paired_seeds[case].intersection(*per_size))
        if not seeds:
            continue
        cells = {}
        for text in texts:
            base = by_seed([wanda[case][s] for s in seeds], text)
            mine = by_seed([auto[case][s] for s in seeds], text)
            paired = [s for s in seeds if s in base and s in mine]
            if paired:
                cells[text] = (mean_std([base[s] for s in paired])[0], mean_std([mine[s] for s in paired])[0])
        sizes[(*case, tuple(seeds))] = cells
    return sizes


def plot_calibration_sizes(sizes: dict, texts: list[str], path: Path, seqlen: int) -> None:
    patterns = list(dict.fromkeys(pattern for _, pattern, _ in sizes))
    title = "SmolLM2-135M: gradient term's effect against calibration size (below 0 = GBLM better)"
    with common.saved_figure(path, 1, len(patterns), (5.2 * len(patterns), 3.8), suptitle=title, title_size=9) as (_, axes):
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
            common.label_axes(ax, f"calibration sequences (x {seqlen} tokens)", "GBLM auto vs Wanda, % perplexity", pattern)
        axes[0][0].legend(fontsize=7)


def plot(groups: dict, texts: list[str], path: Path) -> None:
    cases = sorted({(k[0], k[1]) for k in groups}, key=lambda x: (x[0], x[1] != "unstructured", x[1]))
    cases = [c for c in cases if any(k[0] == c[0] and k[1] == c[1] and k[3] not in (0, "auto") for k in groups)]
    if not cases:
        return
    colours = {"l1": "tab:blue", "l2": "tab:orange"}
    title = "SmolLM2-135M: GBLM alpha sweep (validation perplexity, lower is better)"
    with common.saved_figure(path, len(texts), len(cases), (5 * len(cases), 3.6 * len(texts)), suptitle=title) as (_, axes):
        for col, (n, pattern) in enumerate(cases):
            for row, text in enumerate(texts):
                ax = axes[row][col]
                wanda = groups.get((n, pattern, *WANDA))
                if wanda:
                    mean, std = mean_std([r["validation"][text] for r in wanda])
                    ax.axhline(mean, color="black", lw=1.2, label="Wanda (alpha 0)")
                    ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
                for norm, colour in colours.items():
                    points = sorted(k[3] for k in groups if k[:3] == (n, pattern, norm) and k[3] != "auto")
                    if points:
                        means_stds = [mean_std([r["validation"][text] for r in groups[(n, pattern, norm, a)]]) for a in points]
                        ax.errorbar(points, [m for m, _ in means_stds], yerr=[s for _, s in means_stds], color=colour,
                                    marker="o", capsize=3, label=f"GBLM {norm}")
                    auto = groups.get((n, pattern, norm, "auto"))
                    if auto:
                        ax.axhline(mean_std([r["validation"][text] for r in auto])[0], color=colour, ls="--", lw=1,
                                   label=f"GBLM {norm}, alpha auto")
                ax.set_xscale("log")
                common.label_axes(ax, "alpha", "perplexity", f"{text}: {pattern}, {n} x calibration")
        axes[0][0].legend(fontsize=7)


def main() -> None:
    args = common.argument_parser(
        __doc__, "data_dir", "model", "gguf_file",
        num_samples=dict(type=str, default="32", help="comma-separated calibration sizes"),
        seqlen={}, seeds=dict(help=None), alphas=dict(default="0,1,10,100,1000,10000,auto"), norms=dict(default="l1,l2"),
        patterns={}, sparsity={}, eval_seqlen={}, eval_tokens=dict(default=4096),
        test_alphas=dict(default="", help="alphas also evaluated on the test texts, e.g. 0,100,auto"),
        extra_test=dict(action="append", default=[], metavar="LABEL=PATH", help="another test text"),
        gradients_only=dict(action="store_true", help="fill the gradient cache and stop"),
        results=dict(default="benchmarks/results/alpha_sweep_smollm2.json"),
        output=dict(default="benchmarks/results/alpha_sweep_smollm2.md"),
        plot=dict(default="benchmarks/results/alpha_sweep_smollm2.png"),
    ).parse_args()
    logging.basicConfig(level=logging.WARNING)

    results_path = Path(args.results)
    results: dict = json.loads(results_path.read_text()) if results_path.exists() else {}
    model, tokenizer, restore = common.load_dense(args.model, args.gguf_file)
    modules = prunable_modules(model)
    calibration_text = common.read_texts(args.data_dir, common.SWEEP_CALIBRATION_FILES)
    # An --extra-test PATH is read as given (a path joined to --data-dir stays itself when absolute).
    extra = {label: (str(Path(path).resolve()), "start") for label, _, path in (t.partition("=") for t in args.extra_test)}
    validation = common.evaluation_tokens(args.data_dir, tokenizer, args.eval_tokens, VALIDATION_FILES)
    test = common.evaluation_tokens(args.data_dir, tokenizer, args.eval_tokens, {**TEST_FILES, **extra})
    test_alphas = set(common.comma_list(args.test_alphas, parse_alpha))

    def save() -> None:
        common.write_json(results_path, results, sort_keys=True)
        write_report(results, args, Path(args.output), Path(args.plot) if args.plot else None)

    alphas = common.comma_list(args.alphas, parse_alpha)
    norms = args.norms.split(",")
    start = time.perf_counter()
    for num_samples in common.comma_list(args.num_samples, int):
        for seed in common.comma_list(args.seeds, int):
            calibration = get_calibration_data(calibration_text, tokenizer, num_samples, args.seqlen, seed)
            gradient_norms = {}
            for norm in norms:
                if any(a != 0 for a in alphas):
                    restore()
                    tick = time.perf_counter()
                    # Without alpha (scale 1): the cache serves every alpha.
                    gradient_norms[norm] = cached_gradient_norms(model, calibration, modules, norm=norm, scale=1.0, show_progress=False)
                    print(f"gradients n={num_samples} seed={seed} {norm}: {time.perf_counter() - tick:.0f}s", flush=True)
            if args.gradients_only:
                continue
            for pattern in args.patterns.split(","):
                sparsity = common.pattern_sparsity(pattern, args.sparsity)
                for norm in norms:
                    for alpha in alphas:
                        key = row_key(num_samples, seed, pattern, norm, alpha)
                        row = results.get(key)
                        wants_test = alpha in test_alphas
                        if row is not None and (not wants_test or set(test) <= set(row.get("test", {}))):
                            continue
                        # Pruning is deterministic: a row that now also needs test numbers is pruned again.
                        restore()
                        tick = time.perf_counter()
                        recipe = {"method": "wanda"} if alpha == 0 else {"method": "gblm", "gradient_norm": norm, "alpha": alpha}
                        config = GBLMConfig.from_dict(recipe, sparsity=sparsity, pattern=pattern, num_samples=num_samples, seqlen=args.seqlen, seed=seed)
                        GBLMPruner(config, show_progress=False).prune(model, calibration, gradient_norms=gradient_norms.get(norm) if alpha != 0 else None)
                        if row is None:
                            layer_alpha = model.config.quantization_config.record.layer_settings.get("alpha")
                            row = {
                                "num_samples": num_samples, "seed": seed, "pattern": pattern, "norm": "-" if alpha == 0 else norm,
                                "alpha": alpha, "prune_s": round(time.perf_counter() - tick, 1),
                                "validation": common.perplexities(model, validation, args.eval_seqlen, digits=4),
                                "median_layer_alpha": float(torch.tensor(list(layer_alpha.values())).median()) if layer_alpha else None,
                            }
                            results[key] = row
                            save()
                        if wants_test:
                            row.setdefault("test", {}).update(common.perplexities(model, test, args.eval_seqlen, digits=4))
                            save()
                        print(key, row["validation"], row.get("test", ""), flush=True)
    print(f"total {time.perf_counter() - start:.0f}s; results in {args.results}, table {args.output}", flush=True)


if __name__ == "__main__":
    main()
