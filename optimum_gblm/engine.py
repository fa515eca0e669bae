"""The layer-wise pass: find the decoder blocks of any causal LM, capture what enters block 0, and for each block
collect input statistics with hooks, let a visitor prune (or measure) the block's linears, re-run the block and hand
its pruned outputs to the next one. The engine knows nothing about which method runs: it asks the method for a
keep-mask per layer (`prune_layers`) and owns what follows (exact zeros, bit-packed masks, offload write-back).
Only one block's activations are held.

Models dispatched by accelerate (`from_pretrained(..., device_map=...)` with blocks on "cpu" or "disk") keep their
offloaded weights on the meta device until an `AlignDevicesHook` onloads them for a forward. The engine onloads one
block at a time to its execution device, keeps it there while calibration runs through it and it is pruned, and
writes the changed weights back to the hook's weights map (the offload folder for disk) before offloading it again.

A model that is not dispatched can name a compute device (`compute_on("cuda")`, or `device=` on the passes): each
decoder block is moved there for its turn (statistics, pruning, pruned outputs) and back to where its weights were,
as optimum's GPTQQuantizer does; the calibration activations live on the compute device, everything else stays put.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook
from accelerate.utils import (
    OffloadedWeightsLoader,
    PrefixedDataset,
    named_module_tensors,
    offload_weight,
    send_to_device,
)
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from .masks import pack_mask, unpack_mask

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
    modules = {name: module for layers in _layers_by_block(model, targets) for name, module in layers.items()}
    if not modules:
        prefix, blocks = find_decoder_blocks(model)
        raise ValueError(
            f"no prunable layer matched target_modules={targets!r} inside {prefix}; names look like "
            f"{sorted(block_layers(blocks[0]))[:6]}."
        )
    return modules


def _layers_by_block(model: nn.Module, targets: list[str] | None = None) -> list[dict[str, nn.Module]]:
    """The prunable linears of each block in order; a linear whose weight is tied to an embedding is left out (pruning
    it would prune the embedding), here and so in every pass of the engine."""
    prefix, blocks = find_decoder_blocks(model)
    tied = {
        id(getattr(get(), "weight", None))
        for get in (getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None))
        if get is not None and get() is not None
    }
    return [
        {f"{prefix}.{i}.{n}": m for n, m in block_layers(block, targets).items() if id(m.weight) not in tied}
        for i, block in enumerate(blocks)
    ]


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as a (d_out, d_in) view: GPT-2's Conv1D stores it transposed."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def as_matrix(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """Any tensor stored in the weight's own layout (gradient norms, masks) as a (d_out, d_in) view."""
    return tensor.t() if isinstance(module, Conv1D) else tensor


# -- accelerate offload -----------------------------------------------------------------------------------------
def _align_hooks(module: nn.Module) -> list[AlignDevicesHook]:
    """The AlignDevicesHooks accelerate attached to `module` itself (dispatch may chain several in a SequentialHook)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def _offload_hooks(module: nn.Module) -> list[tuple[nn.Module, AlignDevicesHook]]:
    """(submodule, hook) for every hook inside `module` that keeps weights off the device between forwards."""
    return [(sub, hook) for sub in module.modules() for hook in _align_hooks(sub) if hook.offload]


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps weights of `module` on CPU or disk (the meta device in the model) between forwards."""
    return bool(_offload_hooks(module))


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: the execution device of its accelerate hooks when it was dispatched with a device
    map (its weights may then be on the meta device), else the device of its first real parameter."""
    for sub in module.modules():
        for hook in _align_hooks(sub):
            if hook.execution_device is not None:
                return torch.device(hook.execution_device)
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def _storage(weights_map: Mapping, key: str) -> tuple[Mapping, str]:
    """The mapping behind a hook's (prefixed) weights map, and the key of the tensor in it."""
    while isinstance(weights_map, PrefixedDataset):
        weights_map, key = weights_map.dataset, weights_map.prefix + key
    return weights_map, key


def _needs_offload_folder(weights_map: Mapping, key: str) -> bool:
    storage, key = _storage(weights_map, key)
    return isinstance(storage, OffloadedWeightsLoader) and key not in storage.state_dict and storage.save_folder is None


def store_offloaded(weights_map: Mapping, key: str, value: torch.Tensor) -> None:
    """Make the hook owning `weights_map` read `value` for `key` on its next onload.

    CPU-offloaded tensors are overwritten in place. A disk-offloaded one is written into the loader's offload folder
    (accelerate's own `.dat` format) and its index entry repointed there: transformers indexes disk-offloaded weights
    straight into the checkpoint's safetensors files, and the user's checkpoint must never be modified.
    """
    storage, key = _storage(weights_map, key)
    if isinstance(storage, OffloadedWeightsLoader) and key not in storage.state_dict:
        if storage.save_folder is None:
            raise ValueError(_no_offload_folder(key))
        offload_weight(value.detach().cpu(), key, storage.save_folder, index=storage.index)
    elif isinstance(storage, OffloadedWeightsLoader):
        storage.state_dict[key].copy_(value)
    elif isinstance(storage, dict) and key in storage:
        storage[key].copy_(value)
    else:
        raise ValueError(
            f"cannot write the pruned {key} back to accelerate's weights map of type {type(storage).__name__}; load "
            f"the model with from_pretrained(..., device_map=..., offload_folder=...) or without offload."
        )


def _no_offload_folder(name: str) -> str:
    return (
        f"{name} is offloaded to disk without an offload folder, so its pruned weights have nowhere to go (it is read "
        f"from the checkpoint files, which pruning never modifies). Load the model with "
        f"from_pretrained(..., device_map=..., offload_folder=DIR); DIR then receives the pruned offloaded weights."
    )


def check_offload_writable(modules: Mapping[str, nn.Module]) -> None:
    """Refuse, before anything is pruned, layers whose pruned weights could not be written back to their offload."""
    for name, module in modules.items():
        for hook in _align_hooks(module):
            if hook.offload and hook.weights_map is not None and _needs_offload_folder(hook.weights_map, "weight"):
                raise ValueError(_no_offload_folder(f"{name}.weight"))


class Onloaded:
    """`with Onloaded(block) as onloaded:` onloads every weight accelerate offloads inside `block` to its execution
    device once, keeps it there for every forward inside (the hooks' offloading is paused, so a block is not re-read
    from disk for each calibration sequence) and offloads it again on exit.

    Pruning changes the onloaded copies, which offloading simply drops: `store(layer)` writes a changed weight back
    to where the hook reads it, and must be called before exit. A module without offloaded weights is left as it is.
    """

    def __init__(self, module: nn.Module):
        self._hooks = _offload_hooks(module)
        self._entered: list[tuple[nn.Module, AlignDevicesHook]] = []
        self._sources: dict[tuple[int, str], tuple[Mapping, str]] = {}

    def __enter__(self) -> Onloaded:  # noqa: PYI034 (typing.Self needs Python 3.11)
        try:
            for sub, hook in self._hooks:
                self._entered.append((sub, hook))
                hook.pre_forward(sub)
                hook.offload = False
                tensors = named_module_tensors(
                    sub, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True
                )
                for key, _ in tensors:
                    owner, _, attribute = key.rpartition(".")
                    self._sources[(id(sub.get_submodule(owner)), attribute)] = (hook.weights_map, key)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        while self._entered:
            sub, hook = self._entered.pop()
            hook.offload = True
            hook.post_forward(sub, None)
        self._sources.clear()

    def store(self, module: nn.Module, tensor_name: str = "weight") -> None:
        """Write `module.<tensor_name>` back to its offload; a resident tensor was changed in place and needs nothing."""
        source = self._sources.get((id(module), tensor_name))
        if source is not None:
            store_offloaded(*source, getattr(module, tensor_name).detach())


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
    device = _compute_device(model, device)
    _, blocks = find_decoder_blocks(model)
    for block, layers in zip(blocks, _layers_by_block(model, targets)):
        with OnDevice(block, device if layers else None):
            for name, module in layers.items():
                with Onloaded(module) as onloaded:
                    _visit_and_store(visitor, name, module, None, onloaded)
        visitor.end_block()


# -- compute device ---------------------------------------------------------------------------------------------
_COMPUTE_DEVICE: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("gblm_compute_device", default=None)


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed `model` with hooks (a multi-device or offloading `device_map`, `cpu_offload`...)."""
    return any(_align_hooks(sub) for sub in model.modules())


def check_compute_device(model: nn.Module, device: str | torch.device | None) -> torch.device | None:
    """The compute device for the layer-wise pass, refused with the fix before anything changes when it cannot be
    used: not a device, the meta device, a device this machine lacks, or a model whose blocks accelerate places."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"compute_device must be a device name such as 'cuda' or 'cuda:1', got {type(device).__name__}.")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"compute_device {device!r} is not a torch device: use e.g. 'cuda', 'cuda:1', 'xpu' or 'cpu'.") from None
    if resolved.type == "meta":
        raise ValueError("compute_device 'meta' holds no values, so nothing could be measured there: use e.g. 'cuda'.")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"compute_device {device!r} needs a CUDA GPU, but torch {torch.__version__} sees none "
            f"(torch.cuda.is_available() is False): drop compute_device (--compute-device) to prune where the weights "
            f"are, or install a CUDA build of torch on a machine with a GPU."
        )
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(
            f"compute_device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0."
        )
    try:
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError) as error:  # torch raises AssertionError for a backend it was built without
        raise ValueError(f"compute_device {device!r} cannot be used here ({error}): choose an available device.") from None
    _check_movable(model, resolved)
    return resolved


def _check_movable(model: nn.Module, device: torch.device) -> None:
    """Blocks can be moved to `device` and back: the model is not placed by accelerate's hooks, and each block lives
    on one device, with values (not on the meta device)."""
    if is_dispatched(model):
        raise ValueError(
            f"compute_device '{device}' moves each decoder block itself, but this model is dispatched by accelerate "
            f"(from_pretrained(device_map=...) over several devices or with offload, cpu_offload, disk_offload): its "
            f"hooks already run each block on its execution device, onloading offloaded blocks one at a time. Drop "
            f"compute_device (--compute-device), or load the model on one device (e.g. device_map='cpu') to use it."
        )
    prefix, blocks = find_decoder_blocks(model)
    for i, block in enumerate(blocks):
        homes = _home_devices(block)
        if len(homes) > 1 or "meta" in {home.type for home in homes}:
            raise ValueError(
                f"compute_device '{device}' moves each decoder block there and back, but {prefix}.{i} has weights on "
                f"{sorted(map(str, homes))}: a block must live on one device, with values. Place the model on one "
                f"device first (model.to('cpu')), or drop compute_device."
            )


def _home_devices(module: nn.Module) -> set[torch.device]:
    return {tensor.device for tensor in (*module.parameters(), *module.buffers())}


@contextlib.contextmanager
def compute_on(device: str | torch.device | None) -> Iterator[None]:
    """`with compute_on("cuda"):` every layer-wise pass inside (a profile's measuring pass as well as the pruning
    pass) moves each decoder block to `device` for its turn. None: blocks compute where their weights are."""
    token = _COMPUTE_DEVICE.set(None if device is None else torch.device(device))
    try:
        yield
    finally:
        _COMPUTE_DEVICE.reset(token)


def _compute_device(model: nn.Module, device: str | torch.device | None) -> torch.device | None:
    """The pass's compute device (the argument, else `compute_on`'s), checked to be usable on `model`'s blocks."""
    resolved = torch.device(device) if device is not None else _COMPUTE_DEVICE.get()
    if resolved is not None:
        _check_movable(model, resolved)
    return resolved


class OnDevice:
    """`with OnDevice(block, device):` moves `block` (on one device, see `check_compute_device`) to `device` for the
    body and back on exit; None leaves it where it is. `Module.to` moves parameters in place, so whatever holds them
    (the layers' modules, tied references) follows the move and keeps the changes made meanwhile (pruned weights)."""

    def __init__(self, module: nn.Module, device: torch.device | None):
        self.module, self.device = module, device
        self._home: torch.device | None = None

    def __enter__(self) -> OnDevice:  # noqa: PYI034 (typing.Self needs Python 3.11)
        homes = _home_devices(self.module) if self.device is not None else set()
        if len(homes) == 1:
            self._home = homes.pop()
            try:
                self.module.to(self.device)
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._home is not None:
            self.module.to(self._home)
            self._home = None


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


class HessianStats(RunningStats):
    """The layer Hessian of the reconstruction loss, H = (2/N) sum_n X_n^T X_n over N sequences (SparseGPT's)."""

    def __init__(self, d_in: int, device: torch.device):
        super().__init__(torch.zeros(d_in, d_in, dtype=torch.float32, device=device))

    def contribution(self, rows: torch.Tensor) -> torch.Tensor:
        return 2 * rows.t() @ rows

    @property
    def hessian(self) -> torch.Tensor:
        return self.value


class LayerVisitor(Protocol):
    """What the engine asks of whoever visits the layers: a pruning step (see `prune_layers`) or a measuring pass
    (OWL's outlier statistics)."""

    collects_inputs: bool

    def new_stats(self, name: str, module: nn.Module) -> Any:
        """A fresh statistics accumulator with an `add_batch(inputs)` method."""

    def visit_layer(self, name: str, module: nn.Module, stats: Any) -> None:
        """Measure or prune `module` (its full model name is `name`); in-place weight changes are written back."""

    def end_block(self) -> None:
        """Called after the last layer of every decoder block."""


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
            extras[index] = (_detach(tuple(args[1:])), {k: _detach(v) for k, v in kwargs.items()})
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
    args_per_block, kwargs_per_block = [], []
    for args, kwargs in extras:
        # Replaying blocks must never grow a KV cache.
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        args_per_block.append(args)
        kwargs_per_block.append(kwargs)
    return torch.cat(hidden), args_per_block, kwargs_per_block


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


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
    (default: `compute_on`'s; see `check_compute_device`) each block is moved there for its turn and back, and the
    activations live there. The compute device thus holds one block's weights, the hidden states of all calibration
    sequences and one sequence's intermediates.
    """
    device = _compute_device(model, device)
    _, blocks = find_decoder_blocks(model)
    layers_of = _layers_by_block(model, targets)
    check_offload_writable({name: module for layers in layers_of for name, module in layers.items()})
    was_training = model.training
    model.eval()
    try:
        # What runs before block 0 (embeddings, rotary tables, the attention mask) runs where it is; its outputs
        # follow each block to its device below.
        hidden, args_per_block, kwargs_per_block = capture_block_inputs(model, blocks, input_ids)
        for index, (block, layers) in enumerate(zip(tqdm(blocks, desc="Pruning blocks", disable=not show_progress), layers_of)):
            with OnDevice(block, device):
                target = device if device is not None else execution_device(block)
                hidden = send_to_device(hidden, target)
                args, kwargs = send_to_device(args_per_block[index], target), send_to_device(kwargs_per_block[index], target)
                with Onloaded(block) as onloaded:
                    _visit_block(block, layers, visitor, hidden, args, kwargs, onloaded)
                    # The pruned block's outputs become the next block's inputs, overwriting this block's in place.
                    _run_block(block, hidden, args, kwargs, out=hidden)
    finally:
        model.train(was_training)


def _visit_block(
    block: nn.Module,
    layers: dict[str, nn.Module],
    visitor: LayerVisitor,
    hidden: torch.Tensor,
    args: tuple,
    kwargs: dict,
    onloaded: Onloaded,
) -> None:
    stats = {}
    if visitor.collects_inputs and layers:
        stats = {name: visitor.new_stats(name, module) for name, module in layers.items()}
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
        _visit_and_store(visitor, name, module, stats.pop(name, None), onloaded)
    visitor.end_block()


def _run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, out: torch.Tensor | None = None) -> None:
    for i in range(hidden.shape[0]):
        result = _block_output(block(hidden[i : i + 1], *args, **kwargs))
        if out is not None:
            out[i : i + 1] = result



# -- pruning: the engine owns what every method's masks must become ---------------------------------------------
class PruningStep(Protocol):
    """The part of a pruning method the engine calls (see `methods.base.PruningMethod`)."""

    needs_activations: bool

    def new_stats(self, name: str, module: nn.Module) -> Any: ...

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
        self.masks = LayerMasks()

    def new_stats(self, name: str, module: nn.Module) -> Any:
        return self.method.new_stats(name, module)

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
