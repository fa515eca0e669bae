"""A pruning pass, and what every method's keep-masks must become. `prune_layers` runs the layer-wise pass (or, for a
method that needs no activations, a visit of each layer) with the method as the visitor, and makes each keep-mask
true: the pruned weights are exactly zero and the mask is recorded bit-packed in the weight's own layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .engine import run_layerwise, visit_without_calibration
from .masks import pack_mask, unpack_mask
from .structure import as_matrix, weight_matrix


class PruningStep(Protocol):
    """The part of a pruning method the engine calls (see `methods.base.PruningMethod`)."""

    needs_activations: bool
    needs_block_gradients: bool

    def new_stats(self, name: str, module: nn.Module) -> Any: ...

    def measure_block_gradients(self, block: nn.Module, layers: dict[str, nn.Module], inputs: Any) -> None: ...

    def prune_layer(self, name: str, module: nn.Module, stats: Any, sparsity: float) -> torch.Tensor: ...

    def finish(self) -> None: ...


@dataclass
class LayerMasks:
    """Bit-packed keep-masks in each weight's own layout, with the shapes to unpack them."""

    packed: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def mask(self, name: str) -> torch.Tensor:
        return unpack_mask(self.packed[name], self.shapes[name])


class _MaskRecorder:
    """Calls the method for each layer and makes its keep-mask true: pruned weights are exactly zero (a method that
    updates weights in a low precision must not leave a rounded remainder) and the mask is recorded bit-packed."""

    def __init__(self, method: PruningStep, sparsities: Mapping[str, float]):
        self.method, self.sparsities = method, sparsities
        self.collects_inputs = method.needs_activations
        self.needs_block_gradients = method.needs_block_gradients
        self.masks = LayerMasks()

    def new_stats(self, name: str, module: nn.Module) -> Any:
        return self.method.new_stats(name, module)

    def measure_block_gradients(self, block: nn.Module, layers: dict[str, nn.Module], inputs: Any) -> None:
        self.method.measure_block_gradients(block, layers, inputs)

    def visit_layer(self, name: str, module: nn.Module, stats: Any) -> None:
        weight = weight_matrix(module)
        mask = self.method.prune_layer(name, module, stats, self.sparsities[name])
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
            raise TypeError(
                f"{type(self.method).__name__}.prune_layer must return a bool keep-mask shaped like the (d_out, d_in) "
                f"weight {tuple(weight.shape)} of {name}, got {getattr(mask, 'dtype', type(mask).__name__)} "
                f"{tuple(getattr(mask, 'shape', ()))}."
            )
        weight.masked_fill_(~mask.to(weight.device), 0)
        self.masks.packed[name] = pack_mask(as_matrix(module, mask))
        self.masks.shapes[name] = tuple(module.weight.shape)

    def end_block(self) -> None:
        pass


@torch.no_grad()
def prune_layers(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    method: PruningStep,
    sparsities: Mapping[str, float],
    targets: list[str] | None = None,
    show_progress: bool = True,
    device: str | torch.device | None = None,
) -> LayerMasks:
    """Prune every targeted layer of `model` with `method` at its sparsity, block by block (inputs propagated through
    the already-pruned blocks when the method needs activations), then call the method's end-of-pass hook. With a
    compute `device` (default: `compute_on`'s) each block is moved there for its turn and back."""
    recorder = _MaskRecorder(method, sparsities)
    if method.needs_activations:
        run_layerwise(model, input_ids, recorder, targets, show_progress=show_progress, device=device)
    else:
        visit_without_calibration(model, recorder, targets, device=device)
    method.finish()
    return recorder.masks
