"""The model's structure as the layer-wise pass sees it: which module list holds the decoder blocks, which linears
inside them can be pruned (never an embedding or a weight tied to one), and every weight as a (d_out, d_in) matrix
(GPT-2's Conv1D stores it transposed). Reads a model, never changes one.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

PRUNABLE_TYPES = (nn.Linear, Conv1D)


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def replay_arguments(args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """What a decoder block was called with besides its hidden states (`args[1:]`, the keywords: attention mask,
    position ids or embeddings ...), detached, for calling it again on other hidden states: captured by a forward
    pre-hook once, replayed per sequence. A replayed block must never grow a KV cache."""
    extra_kwargs = _detached(kwargs)
    if "use_cache" in extra_kwargs:
        extra_kwargs["use_cache"] = False
    return _detached(tuple(args[1:])), extra_kwargs


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The `nn.ModuleList` of decoder blocks (e.g. `model.layers`, `transformer.h`, `gpt_neox.layers`).

    Among module lists whose every entry holds a linear layer, the one with the most parameters wins.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(any(isinstance(m, PRUNABLE_TYPES) for m in block.modules()) for block in module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no recognisable decoder blocks: the engine needs the transformer layers as "
            f"an nn.ModuleList of blocks holding nn.Linear layers (as in LLaMA's model.layers or GPT-2's "
            f"transformer.h). Pass a decoder-only causal LM from transformers."
        )
    return best[1], best[2]


def module_matches(name: str, targets: list[str] | None, full_name: str | None = None) -> bool:
    r"""Whether module `name` is one of `targets` (None: every module). A target is a module-name suffix ("q_proj",
    "mlp.down_proj") or a regex matching the whole of `name` or of `full_name` (PEFT's convention: with full names,
    r"model\.layers\.(2[4-7])\..*" picks blocks)."""
    if targets is None:
        return True
    names = (name,) if full_name is None else (name, full_name)
    return any(name == t or name.endswith("." + t) or any(re.fullmatch(t, n) for n in names) for t in targets)


def block_layers(block: nn.Module, targets: list[str] | None = None, prefix: str | None = None) -> dict[str, nn.Module]:
    """The prunable linears of one block, by their name inside the block; `prefix` is the block's own module name
    (such as model.layers.3), against which regex targets are matched too."""
    return {
        n: m for n, m in block.named_modules()
        if isinstance(m, PRUNABLE_TYPES) and module_matches(n, targets, f"{prefix}.{n}" if prefix else None)
    }


def prunable_modules(model: nn.Module, targets: list[str] | None = None) -> dict[str, nn.Module]:
    """Every prunable linear inside the decoder blocks, by full module name. Embeddings and lm_head never qualify."""
    modules = {name: module for layers in layers_by_block(model, targets) for name, module in layers.items()}
    if not modules:
        prefix, blocks = find_decoder_blocks(model)
        names = sorted(block_layers(blocks[0]))
        raise ValueError(
            f"no prunable layer matched target_modules={targets!r} inside {prefix}; names look like "
            f"{names[:6]} within a block, {prefix}.0.{names[0] if names else ''} in full."
        )
    return modules


def layers_by_block(model: nn.Module, targets: list[str] | None = None) -> list[dict[str, nn.Module]]:
    """The prunable linears of each block in order, by full module name; a linear whose weight is tied to an embedding
    is left out (pruning it would prune the embedding), here and so in every pass of the engine."""
    prefix, blocks = find_decoder_blocks(model)
    tied = {
        id(getattr(get(), "weight", None))
        for get in (getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None))
        if get is not None and get() is not None
    }
    return [
        {f"{prefix}.{i}.{n}": m for n, m in block_layers(block, targets, f"{prefix}.{i}").items() if id(m.weight) not in tied}
        for i, block in enumerate(blocks)
    ]


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as a (d_out, d_in) view: GPT-2's Conv1D stores it transposed."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def as_matrix(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """Any tensor stored in the weight's own layout (gradient norms, masks) as a (d_out, d_in) view."""
    return tensor.t() if isinstance(module, Conv1D) else tensor
