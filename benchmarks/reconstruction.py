"""gblm_obs (GBLM mask + OBS update on a regularised Hessian) against Wanda, GBLM and SparseGPT: validation texts for
choices, test texts for claims; the mu sweep (in-domain against off-domain perplexity) and attribution rows.

    python benchmarks/reconstruction.py --data-dir ../shared/data --seeds 0 --num-samples 64
    python benchmarks/reconstruction.py --methods gblm-obs-mu0,gblm-obs-mu0.1,gblm-obs-mu1,gblm-obs-mu10 --seeds 0

Calibration: windows of Emma, Mansfield Park and Pride and Prejudice (Sense and Sensibility stays out: it is a test
text). Validation: the first tokens of Northanger Abbey and of the Debian handbook. Test: the first tokens of Sense
and Sensibility (like the calibration text) and the Debian handbook's second half (far from it). Rows are kept in a
JSON beside the table as they finish; a rerun with the same settings skips them.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import common
import compare

from optimum_gblm import GBLMConfig, GBLMPruner, get_calibration_data
from optimum_gblm.config import parse_pattern
from optimum_gblm.data import window_start_token
from optimum_gblm.engine import prunable_modules
from optimum_gblm.gradients import cached_gradient_norms
from optimum_gblm.registry import get_method

MU_SWEEP = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
# Labels spell their options out, so a label keeps its meaning when gblm_obs's defaults change (rows resume by label).
SCORE, JOINT = {"selection": "score"}, {"selection": "joint"}
METHODS = {
    "wanda": {"method": "wanda"},
    "gblm-auto": {"method": "gblm", "alpha": "auto"},
    "sparsegpt": {"method": "sparsegpt"},
    # gblm_obs's default recipe (joint selection, mu 1, gradient term) is gblm-obs-joint-mu1
    "gblm-obs": {"method": "gblm_obs", "alpha": "auto", "method_options": {**SCORE, "mu": "auto"}},
    "gblm-obs-joint": {"method": "gblm_obs", "alpha": "auto", "method_options": {**JOINT, "mu": "auto"}},
    # the mu sweep; mu0 is "GBLM's mask with SparseGPT's update" (attribution)
    **{f"gblm-obs-mu{mu:g}": {"method": "gblm_obs", "alpha": "auto", "method_options": {**SCORE, "mu": mu}} for mu in MU_SWEEP},
    **{
        f"gblm-obs-joint-mu{mu:g}": {"method": "gblm_obs", "alpha": "auto", "method_options": {**JOINT, "mu": mu}}
        for mu in MU_SWEEP
    },
    # attribution of the default: no gradient term (SparseGPT's sweep on H + Diag(H), the "one-line damping change"),
    # its mask with SparseGPT's update (mu 0), and SparseGPT's mask with its update (mu 1)
    "sparsegpt-mu1": {"method": "gblm_obs", "method_options": {**JOINT, "score": "wanda", "mu": 1.0}},
    "gblm-obs-joint-mu1-update0": {"method": "gblm_obs", "alpha": "auto", "method_options": {**JOINT, "mu": 1.0, "update_mu": 0.0}},
    "sparsegpt-update1": {"method": "gblm_obs", "method_options": {**JOINT, "score": "wanda", "mu": 0.0, "update_mu": 1.0}},
}
TEXTS = {
    **{f"{label} (val)": spec for label, spec in common.VALIDATION_FILES.items()},
    **{f"{label} (test)": spec for label, spec in common.TEST_FILES.items()},
}
IN_DOMAIN, OFF_DOMAIN = "Sense and Sensibility (test)", "Debian handbook, 2nd half (test)"
# The target for the method: % change of test ppl, in-domain vs SparseGPT, off-domain vs the better of the two.
TARGETS = {"unstructured": (0.0, -3.0), "2:4": (-5.0, -10.0)}
SETTINGS = ("model", "gguf_file", "num_samples", "seqlen", "eval_seqlen", "eval_tokens", "sparsity")


def target_lines(rows: list[dict], candidates: tuple[str, ...] = ("gblm-obs-joint-mu1",)) -> list[str]:
    """Each candidate against the issue's target, per pattern, on the seeds it shares with the baselines: the paired
    per-seed % changes, the change of the means and the seed-spread rule's verdict (`common.compare_over_seeds`)."""
    by = {}
    for r in rows:
        if r["seed"] != "-":
            by.setdefault((r["method"], r["pattern"]), {})[r["seed"]] = r["ppl"]
    lines = ["", "## Against the target (test texts; % change of ppl; verdict by the seed-spread rule)", "",
             "| method | pattern | text | baseline | per seed | mean change | verdict | target | reached |", "|" + "---|" * 9]
    for candidate in candidates:
        for pattern, (in_target, off_target) in TARGETS.items():
            mine = by.get((candidate, pattern))
            if not mine:
                continue
            for text, target, baselines in ((IN_DOMAIN, in_target, ("sparsegpt",)), (OFF_DOMAIN, off_target, ("wanda", "sparsegpt"))):
                seeds = sorted(set(mine).intersection(*(by.get((b, pattern), {}) for b in baselines)))
                if not seeds:
                    continue
                # "the better of the two": the baseline with the lower mean on these seeds
                baseline = min(baselines, key=lambda b: sum(by[(b, pattern)][s][text] for s in seeds))
                base = {s: by[(baseline, pattern)][s][text] for s in seeds}
                values = {s: mine[s][text] for s in seeds}
                result = common.compare_over_seeds(values, base)
                per_seed = ", ".join(f"{100 * (values[s] / base[s] - 1):+.1f}" for s in seeds)
                on_mean = result.change <= target
                reached = ("yes, beyond the spread" if on_mean and result.verdict == "better" else
                           "on the mean only (within the spread)" if on_mean else "no")
                lines.append(f"| {candidate} | {pattern} | {text} | {baseline} | {per_seed} | {result.change:+.1f}% "
                             f"(n={result.n}) | {result.verdict or 'no claim'} | <= {target:+.0f}% | {reached} |")
    return lines


def main() -> None:
    args = common.argument_parser(
        __doc__, "data_dir", "model", "gguf_file", "num_samples", "seqlen", "seeds", "eval_seqlen", "patterns", "sparsity",
        methods=dict(default="wanda,gblm-auto,sparsegpt,gblm-obs", help=f"comma-separated, from {','.join(METHODS)}"),
        eval_tokens=dict(type=int, default=4096, help="tokens evaluated per text"),
        output=dict(default="benchmarks/results/reconstruction_smollm2.md"),
    ).parse_args()
    logging.basicConfig(level=logging.WARNING)
    model, tokenizer, restore = common.load_dense(args.model, args.gguf_file)
    modules = prunable_modules(model)
    calibration_text = common.read_texts(args.data_dir, common.SWEEP_CALIBRATION_FILES)
    eval_tokens = common.evaluation_tokens(args.data_dir, tokenizer, args.eval_tokens, TEXTS)
    start_token = window_start_token(tokenizer)  # BOS per window for Gemma; None for SmolLM2 (its tokenizer adds none)
    settings = {name: getattr(args, name) for name in SETTINGS}
    results_path = Path(args.output).with_suffix(".json")
    rows: list[dict] = common.load_resumable(results_path, settings, empty={"rows": []})["rows"]
    header = [
        "# gblm_obs against Wanda, GBLM and SparseGPT",
        "",
        f"- model: {args.model or common.DEFAULT_MODEL_LABEL}",
        f"- calibration: {args.num_samples} x {args.seqlen} tokens from {', '.join(common.SWEEP_CALIBRATION_FILES)}",
        f"- evaluation: {args.eval_tokens} tokens per text, windows of {args.eval_seqlen}; (val) texts choose, (test) texts "
        f"claim; 'Debian handbook, 2nd half' starts at the handbook's middle token",
        f"- machine: {common.machine()}; prune s is the layer-wise stage with gradients cached",
        "",
    ]
    done = {(r["method"], r["pattern"], r["seed"]) for r in rows}

    def add_row(row: dict) -> None:
        rows.append(row)
        done.add((row["method"], row["pattern"], row["seed"]))
        common.atomic_write_text(args.output, "\n".join(header + compare.report_lines(rows, list(eval_tokens)) + target_lines(rows)) + "\n")
        common.write_json(results_path, {"settings": settings, "rows": rows})
        print(compare.report_lines(rows[-1:], list(eval_tokens))[-1], flush=True)

    if ("dense", "-", "-") not in done:
        add_row({"method": "dense", "pattern": "-", "seed": "-", "ppl": common.perplexities(model, eval_tokens, args.eval_seqlen, start_token=start_token),
                 "prune_s": 0.0, "gradient_s": "-", "gradient_rss": "-"})
    with tempfile.TemporaryDirectory(prefix="gblm-obs-bench-") as cache_dir:
        for seed in common.comma_list(args.seeds, int):
            calibration = get_calibration_data(calibration_text, tokenizer, args.num_samples, args.seqlen, seed)
            gradient_s = "-"
            for pattern in common.comma_list(args.patterns):
                nm = parse_pattern(pattern)
                for label in common.comma_list(args.methods):
                    if (label, pattern, seed) in done:
                        continue
                    config = GBLMConfig(
                        **METHODS[label], pattern=pattern, sparsity=args.sparsity if nm is None else nm[0] / nm[1],
                        num_samples=args.num_samples, seqlen=args.seqlen, seed=seed,
                    )
                    restore()
                    if gradient_s == "-" and get_method(config.method).gradients_needed(config):
                        # Stage 1 once per seed (l1, stored without alpha): every method and pattern reuses it.
                        tick = time.perf_counter()
                        cached_gradient_norms(model, calibration, modules, norm="l1", cache_dir=cache_dir, show_progress=False)
                        gradient_s = f"{time.perf_counter() - tick:.1f}"
                        restore()
                    GBLMPruner(config, cache_dir=cache_dir, show_progress=False).prune(model, calibration)
                    record = model.config.quantization_config.record
                    mus = record.layer_settings.get("mu")
                    add_row({
                        "method": label, "pattern": pattern, "seed": seed,
                        "ppl": common.perplexities(model, eval_tokens, args.eval_seqlen, start_token=start_token),
                        "prune_s": record.timings_seconds["prune"],
                        "gradient_s": gradient_s if get_method(config.method).gradients_needed(config) else "-",
                        "gradient_rss": "-",
                        **({"mu": mus} if mus else {}),
                    })


if __name__ == "__main__":
    main()
