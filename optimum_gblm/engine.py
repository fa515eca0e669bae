"""The layer-wise pass: capture what enters decoder block 0, then give every block its turn in order. In a turn the
block's inputs are replayed through it with hooks that collect each layer's input statistics, a visitor prunes (or
measures) the block's linears, and the block runs once more: its pruned outputs are the next block's inputs. The pass
knows nothing about which method runs (see `layer_masks.prune_layers`); only one block's activations are held.

A turn runs where the block computes (see `placement`): on its accelerate execution device, its offloaded weights
onloaded for the turn only, or on a compute device the block is moved to and back. The activations follow it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from .placement import OnDevice, Onloaded, check_offload_writable, compute_device_for, execution_device
from .structure import find_decoder_blocks, layers_by_block, replay_arguments


class LayerVisitor(Protocol):
    """What the engine asks of whoever visits the layers: a pruning step (see `prune_layers`) or a measuring pass
    (OWL's outlier statistics)."""

    collects_inputs: bool
    needs_block_gradients: bool  # measure_block_gradients runs each block's calibration forwards (with a backward)

    def new_stats(self, name: str, module: nn.Module) -> Any:
        """A fresh statistics accumulator with an `add_batch(inputs)` method."""

    def measure_block_gradients(self, block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs) -> None:
        """The block's gradients of `layers` (see `gradients.block_gradient_norms`), before any of them is visited; it
        runs every sequence of `inputs` through the block once (its forwards feed the layers' statistics)."""

    def visit_layer(self, name: str, module: nn.Module, stats: Any) -> None:
        """Measure or prune `module` (its full model name is `name`); in-place weight changes are written back."""

    def end_block(self) -> None:
        """Called after the last layer of every decoder block."""


# -- capture --------------------------------------------------------------------------------------------------
class _Captured(Exception):
    """Raised by the block-0 hook to stop the forward once its inputs are captured."""


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor
) -> tuple[torch.Tensor, list[tuple], list[dict[str, Any]]]:
    """Hidden states entering block 0 for every sequence, plus, for every block, the extra positional and keyword
    arguments the model passes it (attention mask, position ids / embeddings ...).

    Those extras differ between blocks in models that mix attention types (Gemma 2/3: sliding-window blocks get a
    banded mask and local rotary tables, global blocks the causal mask and global tables), so each block's own are
    captured: the first sequence runs through every block (not the head), the others stop at block 0. Sequences all
    have the same length and no padding, so the extras are the same for every sequence.
    """
    device = execution_device(model)
    hidden: list[torch.Tensor] = []
    extras: list[tuple[tuple, dict[str, Any]] | None] = [None] * len(blocks)

    def hook(index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if index == 0:
            hidden.append(args[0].detach())
        if extras[index] is None:
            extras[index] = replay_arguments(args, kwargs)
        if index == len(blocks) - 1 or len(hidden) > 1:
            raise _Captured

    handles = [
        block.register_forward_pre_hook(lambda m, a, k, i=index: hook(i, m, a, k), with_kwargs=True)
        for index, block in enumerate(blocks)
    ]
    try:
        for i in range(input_ids.shape[0]):
            try:
                model(input_ids=input_ids[i : i + 1].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [index for index, captured in enumerate(extras) if captured is None]
    if missing:
        raise ValueError(
            f"the model's forward never called decoder block(s) {missing}: the engine needs every block called once "
            f"per forward, in order."
        )
    return torch.cat(hidden), [args for args, _ in extras], [kwargs for _, kwargs in extras]


@dataclass
class BlockInputs:
    """What one decoder block is called with in its turn: the hidden states of every calibration sequence (one row
    each) and the extra arguments the model passes that block (attention mask, position ids / embeddings)."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]

    def to(self, device: torch.device) -> BlockInputs:
        """The inputs moved to `device` (where the block computes its turn)."""
        return BlockInputs(
            send_to_device(self.hidden, device), send_to_device(self.args, device), send_to_device(self.kwargs, device)
        )

    def run(self, block: nn.Module, out: torch.Tensor | None = None) -> None:
        """Call `block` on each sequence in turn (one at a time: a block's intermediates are the largest tensors);
        its outputs go to `out` when given. `out=self.hidden` replaces each row by its output once it was read."""
        for i in range(self.hidden.shape[0]):
            result = self.output(block, i)
            if out is not None:
                out[i : i + 1] = result

    def output(self, block: nn.Module, index: int) -> torch.Tensor:
        """`block`'s hidden states for sequence `index` (a block may return a tuple: the hidden states come first)."""
        result = block(self.hidden[index : index + 1], *self.args, **self.kwargs)
        return result[0] if isinstance(result, (tuple, list)) else result


# -- the pass ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    input_ids: torch.Tensor,
    visitor: LayerVisitor,
    targets: list[str] | None = None,
    show_progress: bool = True,
    device: str | torch.device | None = None,
) -> None:
    """Visit every decoder block of `model` in order (statistics from its inputs, then `visitor.visit_layer` for
    each layer), feeding each block the outputs of the visited (pruned) block before it.

    Each block runs on its execution device (accelerate's, for a dispatched model): its offloaded weights are
    onloaded there for the block's turn only, and the calibration activations follow it. With a compute `device`
    (default: `compute_on`'s; see `placement.check_compute_device`) each block is moved there for its turn and back,
    and the activations live there. The compute device thus holds one block's weights, the hidden states of all
    calibration sequences and one sequence's intermediates.
    """
    device = compute_device_for(model, device)
    _, blocks = find_decoder_blocks(model)
    layers_of = layers_by_block(model, targets)
    check_offload_writable({name: module for layers in layers_of for name, module in layers.items()})
    was_training = model.training
    model.eval()
    try:
        # What runs before block 0 (embeddings, rotary tables, the attention mask) runs where it is; its outputs
        # follow each block to its device below.
        hidden, args_per_block, kwargs_per_block = capture_block_inputs(model, blocks, input_ids)
        turns = zip(tqdm(blocks, desc="Pruning blocks", disable=not show_progress), layers_of, args_per_block, kwargs_per_block)
        for block, layers, args, kwargs in turns:
            with OnDevice(block, device):
                inputs = BlockInputs(hidden, args, kwargs).to(device if device is not None else execution_device(block))
                with Onloaded(block) as onloaded:
                    _visit_block(block, layers, visitor, inputs, onloaded)
                    # The pruned block's outputs become the next block's inputs, overwriting this block's in place.
                    inputs.run(block, out=inputs.hidden)
                hidden = inputs.hidden
    finally:
        model.train(was_training)


def _visit_block(
    block: nn.Module, layers: dict[str, nn.Module], visitor: LayerVisitor, inputs: BlockInputs, onloaded: Onloaded
) -> None:
    stats = {}
    if visitor.collects_inputs and layers:
        stats = {name: visitor.new_stats(name, module) for name, module in layers.items()}
    if stats or (visitor.needs_block_gradients and layers):
        # Under a backward pass a layer's inputs carry the autograd graph: statistics take them detached.
        def collect(statistics: Any) -> Any:
            def hook(module: nn.Module, args: tuple) -> None:
                statistics.add_batch(args[0].detach())

            return hook

        handles = [module.register_forward_pre_hook(collect(stats[name])) for name, module in layers.items() if name in stats]
        try:
            if visitor.needs_block_gradients:
                visitor.measure_block_gradients(block, layers, inputs)
            else:
                inputs.run(block)
        finally:
            for handle in handles:
                handle.remove()
    for name, module in layers.items():
        _visit_and_store(visitor, name, module, stats.pop(name, None), onloaded)
    visitor.end_block()


def _weight_state(module: nn.Module) -> tuple[int, int]:
    # Tensor._version counts in-place writes: a layer a visitor only measured (OWL's pass) is not written back.
    return id(module.weight), module.weight._version


def _visit_and_store(visitor: LayerVisitor, name: str, module: nn.Module, stats: Any, onloaded: Onloaded) -> None:
    before = _weight_state(module)
    visitor.visit_layer(name, module, stats)
    if _weight_state(module) != before:
        onloaded.store(module)


@torch.no_grad()
def visit_without_calibration(
    model: nn.Module, visitor: LayerVisitor, targets: list[str] | None = None, device: str | torch.device | None = None
) -> None:
    """Visit layers that need no activations (magnitude), block by block, each layer onloaded on its own when
    accelerate offloads it; with a compute `device` (default: `compute_on`'s) each block is moved there for its turn."""
    device = compute_device_for(model, device)
    _, blocks = find_decoder_blocks(model)
    for block, layers in zip(blocks, layers_by_block(model, targets)):
        with OnDevice(block, device if layers else None):
            for name, module in layers.items():
                with Onloaded(module) as onloaded:
                    _visit_and_store(visitor, name, module, None, onloaded)
        visitor.end_block()
