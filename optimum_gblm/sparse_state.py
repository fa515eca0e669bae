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
from .engine import Onloaded
from .masks import unpack_mask
from .record import PruningRecord

logger = logging.getLogger(__name__)

SaveHook = Callable[[nn.Module, "str | os.PathLike[str]"], Any]
PushHandler = Callable[..., Any]

# Called in order, after transformers wrote weights and config, by a pruned model's `save_pretrained`.
SAVE_HOOKS: list[SaveHook] = []
# Called by a pruned model's `push_to_hub(repo_id, **kwargs)` as PUSH_HANDLER(model, repo_id, **kwargs).
PUSH_HANDLER: PushHandler | None = None

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
        return model  # the weights already are dense

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


def _remove_gradient_hooks(model: nn.Module) -> None:
    for handle in getattr(model, GRADIENT_HOOKS_ATTRIBUTE, []):
        handle.remove()
    setattr(model, GRADIENT_HOOKS_ATTRIBUTE, [])


def install_gradient_masking(model: nn.Module, quantizer: GBLMHfQuantizer) -> None:
    """Zero masked gradients as they are accumulated, so no optimizer ever sees them (replaces earlier hooks)."""
    _remove_gradient_hooks(model)
    setattr(
        model,
        GRADIENT_HOOKS_ATTRIBUTE,
        [
            model.get_submodule(name).weight.register_post_accumulate_grad_hook(_zero_masked_gradient(quantizer, name))
            for name in quantizer.packed_masks
        ],
    )


def _save_pretrained_with_masks(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    if not SAVE_HOOKS:
        # Checked before anything is written: a checkpoint without its masks would load as unverifiable.
        raise RuntimeError("no GBLM save hooks are registered: `import optimum_gblm` before saving a pruned model.")
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if not os.path.isfile(save_directory):  # transformers logs and returns when given a file
        for hook in list(SAVE_HOOKS):
            hook(self, save_directory)
    return result


def _push_pruned_to_hub(self: nn.Module, repo_id: str, *args: Any, **kwargs: Any) -> Any:
    """transformers' push_to_hub would replace our card with a generic one; ours uploads everything in one commit."""
    if PUSH_HANDLER is None:
        raise RuntimeError("no GBLM push handler is registered: `import optimum_gblm` before pushing a pruned model.")
    if args:
        raise ValueError("pass push_to_hub options by keyword (token=..., private=..., commit_message=...).")
    for ignored in ("max_shard_size", "safe_serialization", "tags", "use_temp_dir"):
        kwargs.pop(ignored, None)
    return PUSH_HANDLER(self, repo_id, **kwargs)


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
