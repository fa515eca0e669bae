"""What a pruned model carries: its bit-packed masks (held by a `GBLMHfQuantizer`), the hooks that keep masked
gradients at zero, and the `save_pretrained` / `push_to_hub` overrides that make a save write the masks too.

This module sits below the pruner, the checkpoint format and the Hub code, so it cannot call them. Instead they
register here when they are imported: `checkpoint` appends `write_masks` to `SAVE_HOOKS`, `hub` appends
`write_model_card` and sets `PUSH_HANDLER`. Loading (reading a mask file, pruning at load) lives in `checkpoint`
and `quantizer`, above.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from .config import GBLMConfig
from .gradients import is_dtensor
from .masks import unpack_mask
from .placement import Onloaded
from .record import PruningRecord

logger = logging.getLogger(__name__)

SaveHook = Callable[[nn.Module, "str | os.PathLike[str]"], Any]
PushHandler = Callable[..., Any]

# Called in order, after transformers wrote weights and config, by a pruned model's `save_pretrained`.
SAVE_HOOKS: list[SaveHook] = []
# Called by a pruned model's `push_to_hub(repo_id, ...)` as PUSH_HANDLER(model, repo_id, **options) (transformers'
# options, bound by name, plus tokenizer / replace_model_card / endpoint / safe_serialization), and by its
# `save_pretrained(folder, push_to_hub=True, ...)` once everything is written there, as PUSH_HANDLER(model, repo_id,
# folder=folder, changed_since={name: (mtime_ns, size, inode)} of the folder's files before the save, **options).
PUSH_HANDLER: PushHandler | None = None

# What a pruned model's save_pretrained writes as its weights (transformers' get_state_dict_and_metadata contract):
# STATE_DICT_HOOK(model, quantizer) -> (state dict or None for the model's own, safetensors metadata). Set by
# `optimum_gblm.compressed` (the storage choice lives there).
StateDictHook = Callable[[nn.Module, "GBLMHfQuantizer"], "tuple[dict[str, torch.Tensor] | None, dict[str, str]]"]
STATE_DICT_HOOK: StateDictHook | None = None

# Module attribute holding a model's gradient-masking hook handles (gradients.py checks it too).
GRADIENT_HOOKS_ATTRIBUTE = "_gblm_gradient_hooks"


def register_save_hook(hook: SaveHook) -> SaveHook:
    """Add `hook(model, save_directory)` to what a pruned model's `save_pretrained` runs after the weights.

    Re-registering a hook of the same module and name (a reloaded module) replaces it in place, so a reload never
    writes a file twice and the order of first registration is kept.
    """
    key = (hook.__module__, hook.__qualname__)
    for index, existing in enumerate(SAVE_HOOKS):
        if (existing.__module__, existing.__qualname__) == key:
            SAVE_HOOKS[index] = hook
            return hook
    SAVE_HOOKS.append(hook)
    return hook


def set_state_dict_hook(hook: StateDictHook) -> StateDictHook:
    """Make `hook(model, quantizer)` decide what a pruned model's save_pretrained writes as its weights."""
    global STATE_DICT_HOOK
    STATE_DICT_HOOK = hook
    return hook


def set_push_handler(handler: PushHandler) -> PushHandler:
    """Make `handler(model, repo_id, **kwargs)` what a pruned model's `push_to_hub` calls."""
    global PUSH_HANDLER
    PUSH_HANDLER = handler
    return handler


def masks_checksum(
    packed_masks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], recipe: dict[str, Any] | None = None
) -> str:
    """sha256 over the recipe and every layer's name, shape and mask bits, in name order (independent of the file's
    layout): editing either the masks or the recipe in config.json breaks it."""
    digest = hashlib.sha256()
    digest.update(json.dumps(recipe or {}, sort_keys=True).encode())
    for name in sorted(packed_masks):
        digest.update(f"{name}|{tuple(shapes[name])}|".encode())
        digest.update(packed_masks[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


class GBLMHfQuantizer(HfQuantizer):
    """transformers' view of a GBLM-pruned model: dense weights with exact zeros plus bit-packed masks.

    It only holds the masks; `optimum_gblm.quantizer` subclasses it with the loading logic transformers calls.
    """

    requires_calibration = False

    def __init__(self, quantization_config: GBLMConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.packed_masks: dict[str, torch.Tensor] = {}
        self.mask_shapes: dict[str, tuple[int, ...]] = {}

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return False  # weights load as they are; masks are read after loading

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict[str, str]]:
        return STATE_DICT_HOOK(model, self) if STATE_DICT_HOOK is not None else (None, {})

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # Full fine-tuning is what sparse models get; masks keep the zeros (see training.SparsityCallback).
        return True

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """`model.dequantize()`: the weights already are dense, so what goes is the pruning state (gradient masking,
        the mask-writing save/push overrides); transformers then removes this quantizer and quantization_config.
        The model is a plain dense model afterwards, and saves as one."""
        _remove_gradient_hooks(model)
        for attribute in ("save_pretrained", "push_to_hub"):
            model.__dict__.pop(attribute, None)
        return model

    def mask(self, name: str, device: torch.device | None = None) -> torch.Tensor:
        """Layer `name`'s keep-mask (True = kept), unpacked, in the weight's layout."""
        mask = unpack_mask(self.packed_masks[name], self.mask_shapes[name])
        return mask if device is None else mask.to(device)


def pruning_quantizer(model: nn.Module) -> GBLMHfQuantizer:
    """The model's `GBLMHfQuantizer`, or a clear error for a model that was never pruned."""
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, GBLMHfQuantizer):
        raise ValueError("this model was not pruned by optimum-gblm (it carries no GBLM masks); prune it first.")
    return quantizer


def sparsity_report(modules: dict[str, nn.Module], masks: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Share of pruned weights per layer and over all of them: from keep-masks when given, else the exact zeros.

    Masks are what pruning removed; zeros can also include kept weights that happen to be 0.0 (dequantized GGUF
    weights have some) and that fine-tuning may move.
    """
    pruned = total = 0
    per_layer = {}
    for name, module in modules.items():
        layer_pruned = int((~masks[name]).sum()) if masks is not None else int((module.weight == 0).sum())
        per_layer[name] = round(layer_pruned / module.weight.numel(), 6)
        pruned += layer_pruned
        total += module.weight.numel()
    return {"global_sparsity": round(pruned / total, 6), "layer_sparsity": per_layer}


# -- checks -----------------------------------------------------------------------------------------------------
def check_weights_match_masks(model: nn.Module, quantizer: GBLMHfQuantizer) -> None:
    """Refuse masks of another model, and weights that are non-zero where their mask says pruned."""
    for name in quantizer.packed_masks:
        try:
            module = model.get_submodule(name)
            weight = module.weight
        except AttributeError:
            raise ValueError(f"the masks name layer {name}, which this model does not have; they belong to another model.") from None
        if tuple(weight.shape) != quantizer.mask_shapes[name]:
            raise ValueError(
                f"mask for {name} has shape {quantizer.mask_shapes[name]} but the weight has {tuple(weight.shape)}; "
                f"the masks belong to another model."
            )
        # An offloaded weight (accelerate device_map) is on the meta device: read it through its hook.
        with Onloaded(module):
            weight = module.weight  # onloading replaced the parameter
            stray = int(torch.count_nonzero(weight.detach()[~quantizer.mask(name, weight.device)]))
        if stray:
            raise ValueError(
                f"{name} has {stray} non-zero weights where its mask says pruned: the weights were changed after "
                f"pruning, or weights and masks come from different checkpoints. Call optimum_gblm.apply_masks(model) "
                f"to re-impose the masks, or re-prune."
            )


def check_recorded_sparsity(model: nn.Module, config: GBLMConfig, quantizer: GBLMHfQuantizer) -> None:
    """The per-layer sparsity recorded in config.json must be what the masks prune (an edited file is refused).

    A record without layer sparsity (None or {}) has nothing to check.
    """
    recorded = config.record.layer_sparsity if config.record is not None else None
    if not recorded:
        return
    unknown = sorted(set(recorded) - set(quantizer.packed_masks))
    if unknown:
        raise ValueError(f"layer_sparsity in config.json names {unknown[0]}, which has no mask: config.json was edited.")
    modules = {name: model.get_submodule(name) for name in recorded}
    measured = sparsity_report(modules, {name: quantizer.mask(name) for name in recorded})["layer_sparsity"]
    wrong = [name for name in recorded if abs(measured[name] - recorded[name]) > 1e-6]
    if wrong:
        raise ValueError(
            f"layer_sparsity in config.json says {recorded[wrong[0]]} for {wrong[0]} but its mask prunes "
            f"{measured[wrong[0]]}: config.json was edited or belongs to other masks."
        )


def _verify_checksum(
    config: GBLMConfig, packed_masks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], current: str
) -> None:
    stored = config.record.masks_checksum if config.record is not None else None
    if stored is not None and stored == current:
        return
    # An older checkpoint's checksum covers the flat recipe it was written with: any recipe the config was read
    # from may match.
    if stored is not None and any(stored == masks_checksum(packed_masks, shapes, r) for r in config.checksum_recipes()):
        return
    raise ValueError(
        "the masks and the recipe in config.json do not match the checksum recorded there: the mask file or the "
        "pruning recipe was altered, or they come from different checkpoints. Restore both files from the same "
        "checkpoint."
    )


# -- attaching and detaching ------------------------------------------------------------------------------------
def _zero_masked_gradient(quantizer: GBLMHfQuantizer, name: str) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            param.grad.masked_fill_(~quantizer.mask(name, param.grad.device), 0)

    return hook


class _GradientMasking:
    """The hooks that zero a model's masked gradients, one per masked weight; held at GRADIENT_HOOKS_ATTRIBUTE.

    torch keeps such hooks on the parameter, and a copy of a parameter (`copy.deepcopy`, pickling) does not take
    them along. So a copy of this record is an empty one (`__reduce__`), and the model's forward pre-hook
    `_ensure_gradient_masking`, which copies keep, hooks the copy's own parameters to the copy's own masks before
    its first forward with gradients. It also hooks a weight whose parameter was replaced, or that was frozen and
    now requires grad. The record is true while masks are attached (gradients.py refuses such a model).
    """

    def __init__(self) -> None:
        # name -> (module, its hooked weight or None when frozen, quantizer, handle or None)
        self.entries: dict[str, tuple[nn.Module, Any, GBLMHfQuantizer, Any]] = {}

    def __bool__(self) -> bool:
        return True

    def __reduce__(self) -> tuple[type, tuple]:
        return (_GradientMasking, ())

    def install(self, model: nn.Module, quantizer: GBLMHfQuantizer) -> None:
        for name in quantizer.packed_masks:
            entry = self.entries.get(name)
            if entry is not None:
                module, weight, owner, handle = entry
                current = module.weight
                if owner is quantizer and (current is weight if weight is not None else not _hookable(current)):
                    continue  # hooked, or still not hookable
                if handle is not None:
                    handle.remove()
            module = model.get_submodule(name)
            weight = module.weight
            if not _hookable(weight):
                self.entries[name] = (module, None, quantizer, None)
                continue
            handle = weight.register_post_accumulate_grad_hook(_zero_masked_gradient(quantizer, name))
            self.entries[name] = (module, weight, quantizer, handle)

    def remove(self) -> None:
        for _, _, _, handle in self.entries.values():
            if handle is not None:
                handle.remove()
        self.entries.clear()


def _hookable(weight: torch.Tensor) -> bool:
    """Frozen: no gradient to mask (hooked once it requires grad). Sharded (FSDP2 DTensor): the full-shape mask does
    not apply to a shard's gradient; such weights were never masked (FSDP replaces the parameters the hooks were put
    on), and are not now."""
    return weight.requires_grad and not is_dtensor(weight)


def _ensure_gradient_masking(model: nn.Module, args: Any) -> None:
    """Forward pre-hook of a pruned model: (re)hooks masked weights that lack their hook (see _GradientMasking)."""
    if not torch.is_grad_enabled():
        return  # no backward can follow this forward
    masking = getattr(model, GRADIENT_HOOKS_ATTRIBUTE, None)
    quantizer = getattr(model, "hf_quantizer", None)
    if isinstance(masking, _GradientMasking) and isinstance(quantizer, GBLMHfQuantizer):
        masking.install(model, quantizer)


def _remove_gradient_hooks(model: nn.Module) -> None:
    masking = getattr(model, GRADIENT_HOOKS_ATTRIBUTE, None)
    if isinstance(masking, _GradientMasking):
        masking.remove()
    else:
        for handle in masking or []:
            handle.remove()
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _ensure_gradient_masking:
            del model._forward_pre_hooks[key]
    setattr(model, GRADIENT_HOOKS_ATTRIBUTE, [])


def install_gradient_masking(model: nn.Module, quantizer: GBLMHfQuantizer) -> None:
    """Zero masked gradients as they are accumulated, so no optimizer ever sees them (replaces earlier hooks).

    Copies of the model (`copy.deepcopy`, pickling) keep this: they hook their own weights before their first
    forward with gradients (see _GradientMasking)."""
    _remove_gradient_hooks(model)
    masking = _GradientMasking()
    setattr(model, GRADIENT_HOOKS_ATTRIBUTE, masking)
    masking.install(model, quantizer)
    model.register_forward_pre_hook(_ensure_gradient_masking)


def _save_pretrained_with_masks(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    if not isinstance(getattr(self, "hf_quantizer", None), GBLMHfQuantizer):
        # Checked before anything is written. Without its quantizer the model carries no masks to write.
        if isinstance(getattr(self.config, "quantization_config", None), GBLMConfig):
            raise ValueError(
                "this model's config.json would name GBLM masks (quantization_config) but the model no longer carries "
                "them (its hf_quantizer was removed), so the checkpoint would not load; nothing was written. Call "
                "model.dequantize() to save it as a plain dense model, or prune it again."
            )
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)  # a plain dense model now
    if not SAVE_HOOKS:
        # Checked before anything is written: a checkpoint without its masks would load as unverifiable.
        raise RuntimeError("no GBLM save hooks are registered: `import optimum_gblm` before saving a pruned model.")
    # transformers would push from inside its save_pretrained, before the masks and our card exist: the save is
    # done here without pushing, then PUSH_HANDLER uploads what it wrote, in one commit.
    save, push, hub_options = _split_push_options(type(self).save_pretrained, self, save_directory, *args, **kwargs)
    if push and PUSH_HANDLER is None:
        raise RuntimeError("no GBLM push handler is registered: `import optimum_gblm` before pushing a pruned model.")
    before = _file_stamps(save_directory) if push else None
    result = save()
    if os.path.isfile(save_directory) or not hub_options.pop("is_main_process", True):
        return result  # transformers logs and returns when given a file; other ranks write nothing
    for hook in list(SAVE_HOOKS):
        hook(self, save_directory)
    if push:
        repo_id = hub_options.pop("repo_id", None) or os.fspath(save_directory).rstrip("/" + os.sep).split(os.sep)[-1]
        PUSH_HANDLER(self, repo_id, folder=save_directory, changed_since=before, **hub_options)
    return result


# save_pretrained(..., push_to_hub=True, **kwargs) options that concern the push (transformers' names).
_SAVE_PUSH_OPTIONS = ("repo_id", "commit_message", "commit_description", "private", "create_pr", "revision", "tags")


def _split_push_options(
    save_pretrained: Callable[..., Any], model: nn.Module, save_directory: Any, *args: Any, **kwargs: Any
) -> tuple[Callable[[], Any], bool, dict[str, Any]]:
    """(transformers' save_pretrained call without pushing, whether a push was asked, the push's options plus
    is_main_process), from the arguments as transformers' signature binds them (positional ones included)."""
    import functools
    import inspect

    bound = inspect.signature(save_pretrained).bind(model, save_directory, *args, **kwargs)
    push = bool(bound.arguments.pop("push_to_hub", False))
    options: dict[str, Any] = {"is_main_process": bound.arguments.get("is_main_process", True)}
    if push:
        extra = next((p.name for p in inspect.signature(save_pretrained).parameters.values() if p.kind is p.VAR_KEYWORD), None)
        more = bound.arguments.get(extra, {}) if extra else {}
        options.update({name: more.pop(name) for name in _SAVE_PUSH_OPTIONS if name in more})
        if bound.arguments.get("token") is not None:
            options["token"] = bound.arguments["token"]
    return functools.partial(save_pretrained, *bound.args, **bound.kwargs), push, options


def _file_stamps(folder: Any) -> dict[str, tuple[int, int, int]]:
    """{name: (mtime_ns, size, inode)} of the files in `folder` (a save_pretrained with a push uploads the changed)."""
    stamps = {}
    if os.path.isdir(folder):
        for entry in os.scandir(folder):
            info = entry.stat(follow_symlinks=False)
            stamps[entry.name] = (info.st_mtime_ns, info.st_size, info.st_ino)
    return stamps


# Options a pruned model's push_to_hub takes besides transformers' own (by keyword only).
_PUSH_EXTRAS = ("tokenizer", "replace_model_card", "endpoint", "safe_serialization")


def _push_pruned_to_hub(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """transformers' push_to_hub would replace our card with a generic one; ours uploads everything in one commit.

    It takes what transformers' `PushToHubMixin.push_to_hub` of the installed version takes, positional arguments in
    its order included (repo_id first), plus `_PUSH_EXTRAS`; `max_shard_size` / `safe_serialization` shape the save
    that is uploaded."""
    import inspect

    from transformers.utils.hub import PushToHubMixin

    if PUSH_HANDLER is None:
        raise RuntimeError("no GBLM push handler is registered: `import optimum_gblm` before pushing a pruned model.")
    parameters = list(inspect.signature(PushToHubMixin.push_to_hub).parameters.values())[1:]  # after self
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    by_keyword = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} | set(_PUSH_EXTRAS)
    if len(args) > len(positional):
        raise TypeError(
            f"push_to_hub() takes {len(positional)} positional argument{'s' if len(positional) != 1 else ''} "
            f"({', '.join(positional)}) but {len(args)} were given; pass the other options by keyword."
        )
    options = dict(zip(positional, args))
    for name, value in kwargs.items():
        if name in options:
            raise TypeError(f"push_to_hub() got multiple values for argument {name!r}")
        if name not in by_keyword:
            raise TypeError(f"push_to_hub() got an unexpected keyword argument {name!r}")
        options[name] = value
    if "repo_id" not in options:
        raise TypeError("push_to_hub() missing 1 required argument: 'repo_id'")
    options.pop("use_temp_dir", None)  # older transformers: the upload always comes from a temporary folder here
    return PUSH_HANDLER(self, options.pop("repo_id"), **options)


def attach_masks(
    model: nn.Module,
    config: GBLMConfig,
    packed_masks: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    verify: bool = False,
    quantizer: GBLMHfQuantizer | None = None,
) -> GBLMHfQuantizer:
    """Make `model` a GBLM-pruned model: quantizer, config entry, mask-saving `save_pretrained`, gradient masking.

    With `verify` (loading a checkpoint) the masks must match the recorded checksum, the weights and the recorded
    sparsity. The checksum of the current recipe is then stored in `config.record`.
    """
    checksum = masks_checksum(packed_masks, shapes, config.recipe())
    if verify:
        _verify_checksum(config, packed_masks, shapes, checksum)
    if config.record is None:
        config.record = PruningRecord()
    config.record.masks_checksum = checksum
    if quantizer is None:
        quantizer = GBLMHfQuantizer(config, pre_quantized=True)
    quantizer.packed_masks, quantizer.mask_shapes = dict(packed_masks), dict(shapes)
    if verify:
        check_weights_match_masks(model, quantizer)
        check_recorded_sparsity(model, config, quantizer)
    install_gradient_masking(model, quantizer)
    model.hf_quantizer = quantizer
    model.config.quantization_config = config
    # No transformers hook sees the save folder, so the instance's save_pretrained writes the masks after the rest.
    model.save_pretrained = types.MethodType(_save_pretrained_with_masks, model)
    model.push_to_hub = types.MethodType(_push_pruned_to_hub, model)
    return quantizer


def detach_masks(model: nn.Module) -> None:
    """Forget earlier pruning state (masks, gradient hooks, save/push overrides) before pruning afresh: stale masks
    would zero gradients of weights that are no longer pruned."""
    _remove_gradient_hooks(model)
    for attribute in ("save_pretrained", "push_to_hub"):
        model.__dict__.pop(attribute, None)
    if isinstance(getattr(model, "hf_quantizer", None), GBLMHfQuantizer):
        model.hf_quantizer = None
        for attribute in ("is_quantized", "quantization_method"):
            model.__dict__.pop(attribute, None)
    if isinstance(getattr(model.config, "quantization_config", None), GBLMConfig):
        del model.config.quantization_config


def restore_dense(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load dense weights back into a pruned model and forget its masks (benchmarks prune one model many times).

    Loading weights alone is not enough: the previous prune's gradient hooks would keep zeroing the gradients of
    the weights it had masked, in fine-tuning and in a new gradient stage alike.
    """
    model.load_state_dict(state_dict)
    detach_masks(model)


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every weight its mask marks as pruned (after an optimizer step, or to repair a modified model)."""
    quantizer = pruning_quantizer(model)
    for name in quantizer.packed_masks:
        module = model.get_submodule(name)
        with Onloaded(module) as onloaded:
            module.weight.masked_fill_(~quantizer.mask(name, module.weight.device), 0)
            onloaded.store(module)  # an offloaded weight is written back to its offload
