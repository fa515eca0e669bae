"""Compare dense, magnitude, Wanda and GBLM (l1, l2) on the default real model; print and save a markdown table.

Calibrates on Austen novels and evaluates on two other texts (an Austen novel never used for calibration, and the
Debian handbook: a different domain). Sized for a 2-core machine by default (about 50 minutes):

    python benchmarks/compare.py --data-dir ../shared/data --output benchmarks/results/compare_smollm2.md
    python benchmarks/compare.py --seeds 0,1,2 --methods wanda,gblm-l1,sparsegpt --patterns unstructured,2:4

Rows are kept in a JSON next to the table (`--output` with .json) as they finish; a rerun with the same settings
skips finished rows, so a long multi-seed run can be stopped and resumed. Magnitude uses no calibration data, so
it runs once, not once per seed.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import common
import psutil
import torch

from optimum_gblm import GBLMConfig, GBLMPruner, get_calibration_data
from optimum_gblm.gradients import cached_gradient_norms
from optimum_gblm.structure import prunable_modules

# method label -> GBLMConfig settings
METHODS = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "gblm-l1": {"method": "gblm", "gradient_norm": "l1"},
    "gblm-l2": {"method": "gblm", "gradient_norm": "l2"},
    "gblm-auto": {"method": "gblm", "gradient_norm": "l1", "alpha": "auto"},
    "sparsegpt": {"method": "sparsegpt"},
    "wanda-owl": {"method": "wanda", "sparsity_profile": "owl"},
    "gblm-owl": {"method": "gblm", "gradient_norm": "l1", "sparsity_profile": "owl"},
}
DEFAULT_METHODS = "magnitude,wanda,gblm-l1,gblm-l2"
SETTINGS = ("model", "gguf_file", "num_samples", "seqlen", "eval_seqlen", "eval_tokens", "sparsity")


def report_lines(rows: list[dict], labels: list[str]) -> list[str]:
    """Everything below the header: one row per run and, with several seeds, each method's mean and spread over
    them against Wanda's on the same seeds (the seed-spread rule: `common.compare_over_seeds`)."""
    lines = [
        "| method | pattern | seed | " + " | ".join(f"ppl {l}" for l in labels) + " | prune s | gradient s | gradient peak RSS GiB |",
        "|" + "---|" * (6 + len(labels)),
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['seed']} | "
            + " | ".join(f"{r['ppl'][l]:.2f}" for l in labels)
            + f" | {r['prune_s']:.1f} | {r['gradient_s']} | {r['gradient_rss']} |"
        )
    seeds = sorted({r["seed"] for r in rows if r["seed"] != "-"})
    if len(seeds) < 2:
        return lines
    lines += ["", f"## Mean and spread over seeds {', '.join(map(str, seeds))}", ""]
    lines.append("| method | pattern | n | " + " | ".join(f"ppl {l} mean +- std (min..max)" for l in labels) + " |")
    lines.append("|" + "---|" * (3 + len(labels)))
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["seed"] != "-":
            groups.setdefault((r["method"], r["pattern"]), []).append(r)
    for (method, pattern), group in groups.items():
        cells = []
        for l in labels:
            values = [r["ppl"][l] for r in group]
            mean, std = common.mean_std(values)
            cell = f"{mean:.2f} +- {std:.2f} ({min(values):.2f}..{max(values):.2f})"
            wanda = {r["seed"]: r["ppl"][l] for r in groups.get(("wanda", pattern), [])}
            paired = common.compare_over_seeds({r["seed"]: r["ppl"][l] for r in group}, wanda)
            if method != "wanda" and paired and paired.n > 1:
                verdict = f" **{paired.verdict}**" if paired.verdict else ""
                cell += f" {paired.change:+.1f}% vs Wanda (n={paired.n}){verdict}"
            cells.append(cell)
        lines.append(f"| {method} | {pattern} | {len(group)} | " + " | ".join(cells) + " |")
    return lines + ["", "% vs Wanda: same pattern, same seeds; **better** / **worse** only when the difference of the "
                    "means exceeds the larger of the two standard deviations over the seeds both have (n); otherwise no claim."]


def main() -> None:
    args = common.argument_parser(
        __doc__, "data_dir", "model", "gguf_file", "num_samples", "seqlen", "seeds", "eval_seqlen", "eval_tokens",
        methods=dict(default=DEFAULT_METHODS, help=f"comma-separated, from {','.join(METHODS)}"),
        patterns=dict(default="unstructured,2:4,4:8"), sparsity={},
        output=dict(default="benchmarks/results/compare_smollm2.md"),
    ).parse_args()
    logging.basicConfig(level=logging.WARNING)

    model, tokenizer, restore = common.load_dense(args.model, args.gguf_file)
    modules = prunable_modules(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prunable_bytes = sum(m.weight.numel() * 4 for m in modules.values())
    calibration_text = common.read_texts(args.data_dir, common.CALIBRATION_FILES)
    eval_tokens = common.evaluation_tokens(args.data_dir, tokenizer, args.eval_tokens, common.EVALUATION_FILES)

    settings = {name: getattr(args, name) for name in SETTINGS}  # a resumed run must match them
    results_path = Path(args.output).with_suffix(".json")
    rows: list[dict] = common.load_resumable(results_path, settings, empty={"rows": []})["rows"]
    if rows:
        print(f"resuming: {len(rows)} rows already in {results_path}", flush=True)
    header_lines = [
        "# Pruning comparison on SmolLM2-135M-Instruct",
        "",
        f"- model: {args.model or common.DEFAULT_MODEL_LABEL}",
        f"- calibration: {args.num_samples} x {args.seqlen} tokens drawn from {', '.join(common.CALIBRATION_FILES)}; seeds as in the table",
        f"- evaluation: first {args.eval_tokens} tokens of each text, non-overlapping windows of {args.eval_seqlen} "
        f"({args.eval_tokens // args.eval_seqlen} windows); texts never used for calibration",
        f"- machine: {psutil.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{common.machine()}",
        f"- fp32 weights {common.gib(weight_bytes)} GiB (prunable linears {common.gib(prunable_bytes)} GiB)",
        "- prune s: the layer-wise stage (scores + masks, gradients already cached); gradient s: stage 1 alone",
        "- gradient peak RSS: whole-process peak during stage 1, and in brackets its growth over the process before "
        "any gradient stage (which holds the model and a pristine copy of its weights for restoring)",
        "",
    ]

    def add_row(row: dict) -> None:
        rows.append(row)
        done.add((row["method"], row["pattern"], row["seed"]))
        common.atomic_write_text(args.output, "\n".join(header_lines + report_lines(rows, list(eval_tokens))) + "\n")
        common.write_json(results_path, {"settings": settings, "rows": rows})
        print(report_lines(rows[-1:], list(eval_tokens))[-1], flush=True)  # the row just added

    start = time.perf_counter()
    baseline_rss = psutil.Process().memory_info().rss  # model + pristine copy + texts, before any gradient stage

    def pattern_label(pattern: str) -> str:
        return pattern if pattern != "unstructured" else f"{args.sparsity:g} unstructured"

    done = {(r["method"], r["pattern"], r["seed"]) for r in rows}
    if ("dense", "-", "-") not in done:
        ppl = common.perplexities(model, eval_tokens, args.eval_seqlen)
        add_row({"method": "dense", "pattern": "-", "seed": "-", "ppl": ppl, "prune_s": 0.0, "gradient_s": "-", "gradient_rss": "-"})
    methods, patterns = args.methods.split(","), args.patterns.split(",")

    def config_for(label: str, pattern: str, seed: int) -> GBLMConfig | ValueError:
        """The run's config, or the error for a combination the config refuses (e.g. OWL with N:M): such
        combinations are skipped and never computed for."""
        try:
            return GBLMConfig.from_dict(
                {**METHODS[label]}, pattern=pattern, sparsity=common.pattern_sparsity(pattern, args.sparsity),
                num_samples=args.num_samples, seqlen=args.seqlen, seed=seed,
            )
        except ValueError as error:
            return error

    def row_seed(label: str, seed: int) -> int | str:
        return "-" if METHODS[label]["method"] == "magnitude" else seed  # magnitude never sees calibration data

    with tempfile.TemporaryDirectory(prefix="gblm-bench-cache-") as cache_dir:
        for seed in common.comma_list(args.seeds, int):
            calibration = get_calibration_data(calibration_text, tokenizer, args.num_samples, args.seqlen, seed)
            gradient_stage = {}
            configs = {(m, p): config_for(m, p, seed) for m in methods for p in patterns}
            missing = [m for (m, p), config in configs.items()
                       if (m, pattern_label(p), row_seed(m, seed)) not in done and isinstance(config, GBLMConfig)]
            for norm in sorted({METHODS[m].get("gradient_norm", "l1") for m in missing if METHODS[m]["method"] == "gblm"}):
                # Stage 1 once per norm; every pattern below reuses it through the cache.
                restore()
                with common.PeakRSS() as rss:
                    tick = time.perf_counter()
                    cached_gradient_norms(model, calibration, modules, norm=norm, cache_dir=cache_dir, show_progress=False)
                    seconds = time.perf_counter() - tick
                gradient_stage[norm] = (f"{seconds:.1f}", f"{common.gib(rss.peak)} (+{common.gib(rss.peak - baseline_rss)})")
            for pattern in patterns:
                for label in methods:
                    if (label, pattern_label(pattern), row_seed(label, seed)) in done:
                        continue
                    config = configs[(label, pattern)]
                    if not isinstance(config, GBLMConfig):
                        print(f"skipping {label} at {pattern}: {config}", flush=True)
                        continue
                    restore()
                    GBLMPruner(config, cache_dir=cache_dir, show_progress=False).prune(model, calibration)
                    norm = METHODS[label].get("gradient_norm", "l1")
                    grad_s, grad_rss = gradient_stage.get(norm, ("-", "-")) if config.method == "gblm" else ("-", "-")
                    add_row({
                        "method": label,
                        "pattern": pattern_label(pattern),
                        "seed": row_seed(label, seed),
                        "ppl": common.perplexities(model, eval_tokens, args.eval_seqlen),
                        "prune_s": model.config.quantization_config.record.timings_seconds["prune"],
                        "gradient_s": grad_s,
                        "gradient_rss": grad_rss,
                    })
    print(f"total {time.perf_counter() - start:.0f}s; written to {args.output}")


if __name__ == "__main__":
    main()
