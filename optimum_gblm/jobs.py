"""Whole jobs built from the library's parts: the one prune-and-save flow that `optimum-gblm prune`,
`optimum-cli gblm prune` and `examples/run_prune.py` all run, so that they cannot drift apart."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import check_output_dir, save_pretrained_atomically
from .config import GBLMConfig, PruningRuntime
from .data import default_calibration_path, get_evaluation_tokens
from .evaluation import PerplexityResult, perplexity, record_evaluation
from .hub import push_folder_to_hub
from .modeling import load_model
from .pruner import GBLMPruner

logger = logging.getLogger(__name__)


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


def resolve_device(requested: str | torch.device | None) -> torch.device:
    """The requested device, else the first GPU when there is one: pruning on a CPU is slow but works."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype: use float32, bfloat16 or float16.")
    return value


def prune_and_save(
    model_name_or_path: str | os.PathLike | None,
    config: GBLMConfig,
    output_dir: str | os.PathLike,
    runtime: PruningRuntime | None = None,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    eval_data: Sequence[str] = (),
    eval_seqlen: int = 2048,
    eval_max_tokens: int | None = None,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    trust_remote_code: bool = False,
    overwrite_fix: str = "pass overwrite=True",
) -> PruneResult:
    """Load a model, measure its perplexity, prune it, measure again (recorded in the checkpoint), save it
    atomically and optionally push it to the Hub.

    `model_name_or_path=None` loads the default model. Without `overwrite` a non-empty `output_dir` is refused,
    both before the (long) run and again at the save, so that files that appeared meanwhile are never deleted;
    `overwrite_fix` is the advice in that error (a CLI says which flag to pass). A `config.dataset` of None means
    the calibration text shipped with the package; the recipe keeps None, so the checkpoint stays reproducible
    anywhere.
    """
    runtime = runtime or PruningRuntime()
    output = Path(output_dir)
    check_output_dir(output, overwrite, fix=overwrite_fix)  # refuse before hours of work, not after
    model, tokenizer = load_model(
        model_name_or_path, gguf_file=gguf_file, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )
    model = model.to(resolve_device(device))

    texts = {name: get_evaluation_tokens(name, tokenizer) for name in eval_data}
    show = runtime.show_progress
    dense = {n: perplexity(model, tokens, eval_seqlen, eval_max_tokens, show_progress=show) for n, tokens in texts.items()}

    calibration = config.dataset if config.dataset is not None else str(default_calibration_path())
    pruner = GBLMPruner(
        config,
        cache_dir=runtime.cache_dir,
        use_cache=runtime.use_cache,
        show_progress=runtime.show_progress,
        gradient_checkpointing=runtime.gradient_checkpointing,
    )
    pruner.prune(model, calibration, tokenizer=tokenizer)

    pruned: dict[str, PerplexityResult] = {}
    for name, tokens in texts.items():
        pruned[name] = perplexity(model, tokens, eval_seqlen, eval_max_tokens, show_progress=show)
        record_evaluation(model, name, pruned[name], dense[name])
        logger.info("%s: dense %s -> pruned %s", name, dense[name], pruned[name])

    # Checked again: the folder may have gained files during the run, and only `overwrite` may replace them.
    check_output_dir(output, overwrite, fix=overwrite_fix)
    saved = save_pretrained_atomically(model, output, tokenizer=tokenizer, overwrite=overwrite)
    logger.info("saved to %s (weights, config.json, masks, model card)", saved)
    result = PruneResult(saved, model.config.quantization_config, dense, pruned)
    if push_to_hub:
        result.commit = push_folder_to_hub(saved, push_to_hub)
        result.pushed_to = push_to_hub
        logger.info("pushed %s to %s", saved, push_to_hub)
    return result
