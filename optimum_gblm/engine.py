"""The layer-wise pass: find the decoder blocks of any causal LM, capture what enters block 0, and for each block
collect input statistics with hooks, let a `LayerPruner` prune the block's linears, re-run the block and hand its
pruned outputs to the next one. The engine knows nothing about scores; only one block's activations are held.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

PRUNABLE_TYPES = (nn.Linear, Conv1D)


# -- model structure --------------------------------------------------------------------------------------------
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


def _matches(name: str, targets: list[str] | None) -> bool:
    if targets is None:
        return True
    # A target is a module-name suffix ("q_proj", "mlp.down_proj") or a full regex over the name within the block.
    return any(name == t or name.endswith("." + t) or re.fullmatch(t, name) for t in targets)


def block_layers(block: nn.Module, targets: list[str] | None = None) -> dict[str, nn.Module]:
    """The prunable linears of one block, by their name inside the block."""
    return {n: m for n, m in block.named_modules() if isinstance(m, PRUNABLE_TYPES) and _matches(n, targets)}


def prunable_modules(model: nn.Module, targets: list[str] | None = None) -> dict[str, nn.Module]:
    """Every prunable linear inside the decoder blocks, by full module name. Embeddings and lm_head never qualify."""
    prefix, blocks = find_decoder_blocks(model)
    modules = {
        f"{prefix}.{i}.{name}": module
        for i, block in enumerate(blocks)
        for name, module in block_layers(block, targets).items()
    }
    output_weight = getattr(model.get_output_embeddings(), "weight", None) if hasattr(model, "get_output_embeddings") else None
    input_weight = getattr(model.get_input_embeddings(), "weight", None) if hasattr(model, "get_input_embeddings") else None
    modules = {n: m for n, m in modules.items() if m.weight is not output_weight and m.weight is not input_weight}
    if not modules:
        raise ValueError(
            f"no prunable layer matched target_modules={targets!r} inside {prefix}; names look like "
            f"{sorted(block_layers(blocks[0]))[:6]}."
        )
    return modules


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as a (d_out, d_in) view: GPT-2's Conv1D stores it transposed."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def as_matrix(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """Any tensor stored in the weight's own layout (gradient norms, masks) as a (d_out, d_in) view."""
    return tensor.t() if isinstance(module, Conv1D) else tensor


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- statistics ------------------------------------------------------------------------------------------------
class RunningStats:
    """A per-sequence mean updated batch by batch, as the references do:
    v <- v n/(n+b); n <- n+b; v <- v + contribution(X_batch) / n."""

    def __init__(self, value: torch.Tensor):
        self.value = value
        self.num_sequences = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        batch = inputs.shape[0] if inputs.dim() == 3 else 1
        rows = inputs.reshape(-1, inputs.shape[-1]).float()
        self.value *= self.num_sequences / (self.num_sequences + batch)
        self.num_sequences += batch
        self.value += self.contribution(rows) / self.num_sequences

    def contribution(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class InputStats(RunningStats):
    """Wanda's activation statistic a_j = (1/N) sum_{n,t} x_{ntj}^2 over N sequences."""

    def __init__(self, d_in: int, device: torch.device):
        super().__init__(torch.zeros(d_in, dtype=torch.float32, device=device))

    def contribution(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.pow(2).sum(dim=0)

    @property
    def sq_mean(self) -> torch.Tensor:
        return self.value


class LayerPruner(Protocol):
    """What the engine asks of a pruning method."""

    collects_inputs: bool

    def new_stats(self, name: str, module: nn.Module) -> Any:
        """A fresh statistics accumulator with an `add_batch(inputs)` method."""

    def prune_layer(self, name: str, module: nn.Module, stats: Any) -> None:
        """Prune `module` in place (its full model name is `name`)."""


# -- capture and replay -----------------------------------------------------------------------------------------
class _Captured(Exception):
    """Raised by the block-0 hook to stop the forward once its inputs are captured."""


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    return value


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor
) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    """Hidden states entering block 0 for every sequence, plus the extra positional and keyword arguments the
    model passes its blocks (attention mask, position ids / embeddings ...).

    Sequences all have the same length and no padding, so those extras are the same for every sequence and are
    captured once.
    """
    device = model_device(model)
    hidden: list[torch.Tensor] = []
    extras: dict[str, Any] = {}

    def hook(module, args, kwargs):
        hidden.append(args[0].detach())
        if not extras:
            extras["args"] = _detach(tuple(args[1:]))
            extras["kwargs"] = {k: _detach(v) for k, v in kwargs.items()}
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(input_ids.shape[0]):
            try:
                model(input_ids=input_ids[i : i + 1].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    kwargs = extras["kwargs"]
    # Replaying blocks must never grow a KV cache.
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return torch.cat(hidden), extras["args"], kwargs


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    input_ids: torch.Tensor,
    pruner: LayerPruner,
    targets: list[str] | None = None,
    show_progress: bool = True,
) -> None:
    """Prune every decoder block of `model` in order with `pruner`, feeding each block the pruned outputs of the
    one before it."""
    prefix, blocks = find_decoder_blocks(model)
    was_training = model.training
    model.eval()
    try:
        hidden, args, kwargs = capture_block_inputs(model, blocks, input_ids)
        for index, block in enumerate(tqdm(blocks, desc="Pruning blocks", disable=not show_progress)):
            layers = {f"{prefix}.{index}.{n}": m for n, m in block_layers(block, targets).items()}
            stats = {}
            if pruner.collects_inputs and layers:
                stats = {name: pruner.new_stats(name, module) for name, module in layers.items()}
                handles = [
                    module.register_forward_pre_hook(lambda mod, inputs, s=stats[name]: s.add_batch(inputs[0]))
                    for name, module in layers.items()
                ]
                try:
                    _run_block(block, hidden, args, kwargs)
                finally:
                    for handle in handles:
                        handle.remove()
            for name, module in layers.items():
                pruner.prune_layer(name, module, stats.get(name))
            del stats
            # The pruned block's outputs become the next block's inputs, overwriting this block's in place.
            _run_block(block, hidden, args, kwargs, out=hidden)
    finally:
        model.train(was_training)


def _run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, out: torch.Tensor | None = None) -> None:
    for i in range(hidden.shape[0]):
        result = _block_output(block(hidden[i : i + 1], *args, **kwargs))
        if out is not None:
            out[i : i + 1] = result

