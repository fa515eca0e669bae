"""Where weights live and where a block computes: accelerate's offload, and the compute device.

Models dispatched by accelerate (`from_pretrained(..., device_map=...)` with blocks on "cpu" or "disk") keep their
offloaded weights on the meta device until an `AlignDevicesHook` onloads them for a forward. `Onloaded` onloads one
block to its execution device for its whole turn in the layer-wise pass, and writes the changed weights back to the
hook's weights map (the offload folder for disk) before offloading it again.

A model that is not dispatched can name a compute device (`compute_on("cuda")`, or `device=` on the passes): each
decoder block is moved there for its turn (`OnDevice`) and back to where its weights were, as optimum's
GPTQQuantizer does. `check_device` is the one check of a requested device, for the library's `compute_device` and
the command line's `--device` alike.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, named_module_tensors, offload_weight
from torch import nn

from .structure import find_decoder_blocks


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


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed `model` with hooks (a multi-device or offloading `device_map`, `cpu_offload`...)."""
    return any(_align_hooks(sub) for sub in model.modules())


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


# -- the compute device -----------------------------------------------------------------------------------------
_COMPUTE_DEVICE: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("gblm_compute_device", default=None)
# How to do without a compute device, in the library's errors.
NO_COMPUTE_DEVICE = "drop compute_device (--compute-device) to prune where the weights are"


def _named(setting: str, value: object) -> str:
    # A flag reads as typed on the command line ("--device cuda:1"), a keyword as in Python ("compute_device='cuda'").
    return f"{setting} {value}" if setting.startswith("-") else f"{setting}={value!r}"


def check_device(requested: object, setting: str, fallback: str) -> torch.device:
    """`requested` as a torch device this machine can compute on, else a ValueError naming `setting` (a keyword such
    as "compute_device" or a flag such as "--device") and `fallback`, how to do without it ("run with --device cpu").

    Refused: a value that is not a device name, the meta device (it holds no values), CUDA on a machine or torch build
    without it, a CUDA index past the visible GPUs, an unavailable mps or xpu, and any device torch cannot allocate on.
    """
    if not isinstance(requested, (str, torch.device)):
        raise ValueError(f"{setting} must be a device name such as 'cuda' or 'cuda:1', got {type(requested).__name__}.")
    named = _named(setting, requested)
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"{named} is not a torch device: use e.g. 'cuda', 'cuda:1', 'mps', 'xpu' or 'cpu' ({str(requested)!r} is "
            f"not a device type torch knows)."
        ) from None
    if device.type == "meta":
        raise ValueError(f"{named} holds no values, so nothing could be computed there: use e.g. 'cuda' or 'cpu', not meta.")
    if device.type == "cuda":
        _check_cuda(device, named, fallback)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{named}: Apple's mps backend is not available here: {fallback}.")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ValueError(f"{named}: no Intel XPU is available here: {fallback}.")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # torch raises AssertionError for a backend it was built without
        raise ValueError(f"{named} cannot be used here ({error}): {fallback}, or choose an available device.") from None
    return device


def _check_cuda(device: torch.device, named: str, fallback: str) -> None:
    if not torch.cuda.is_available():
        reason, remedy = (
            ("this torch is built without CUDA", "install a CUDA build of torch on a machine with a GPU")
            if torch.version.cuda is None
            else ("no CUDA GPU is visible", "check the driver and CUDA_VISIBLE_DEVICES")
        )
        raise ValueError(
            f"{named} needs a CUDA GPU, but torch {torch.__version__} sees none (torch.cuda.is_available() is False: "
            f"{reason}): {fallback}, or {remedy}."
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"{named}: only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1}); choose one of them or "
            f"check CUDA_VISIBLE_DEVICES."
        )


def check_compute_device(model: nn.Module, device: str | torch.device | None) -> torch.device | None:
    """The compute device for the layer-wise pass (None: blocks compute where their weights are), refused with the
    fix before anything changes when it cannot be used: see `check_device`, and a model whose blocks accelerate
    places or that has a block spread over devices."""
    if device is None:
        return None
    resolved = check_device(device, "compute_device", NO_COMPUTE_DEVICE)
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


def compute_device_for(model: nn.Module, device: str | torch.device | None) -> torch.device | None:
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
