"""What a pruned model carries, as data the save and load code can check: bit-packed masks held by its quantizer
(`model.hf_quantizer`, a `quantizer.GBLMHfQuantizer`), the hooks that keep masked gradients at zero, and the checks
that weights, masks, checksum and recorded sparsity agree.

This module sits below the storage, checkpoint, card and quantizer modules, so it knows the quantizer only as what
it holds (`MaskHolder`); the quantizer class, above them, owns saving, loading and pushing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from .config import GBLMConfig
from .gradients import is_dtensor
from .masks import unpack_mask
from .placement import Onloaded

logger = logging.getLogger(__name__)

# Module attribute holding a model's gradient-masking hook handles (gradients.py checks it too).
GRADIENT_HOOKS_ATTRIBUTE = "_gblm_gradient_hooks"


class MaskHolder(Protocol):
    """What a pruned model's quantizer holds: its recipe and the masks (packed bits and shapes, by layer name)."""

    quantization_config: GBLMConfig
    packed_masks: dict[str, torch.Tensor]
    mask_shapes: dict[str, tuple[int, ...]]

    def mask(self, name: str, device: torch.device | None = None) -> torch.Tensor: ...


def unpacked_mask(holder: MaskHolder, name: str, device: torch.device | None = None) -> torch.Tensor:
    """Layer `name`'s keep-mask (True = kept), unpacked, in the weight's layout."""
    mask = unpack_mask(holder.packed_masks[name], holder.mask_shapes[name])
    return mask if device is None else mask.to(device)


def holds_masks(quantizer: Any) -> bool:
    """Whether `quantizer` (a model's `hf_quantizer`) is this package's, holding GBLM masks."""
    return isinstance(getattr(quantizer, "quantization_config", None), GBLMConfig) and hasattr(quantizer, "packed_masks")


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


def pruning_quantizer(model: nn.Module) -> MaskHolder:
    """The model's GBLM quantizer (what holds its masks), or a clear error for a model that was never pruned."""
    quantizer = getattr(model, "hf_quantizer", None)
    if not holds_masks(quantizer):
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
def check_weights_match_masks(model: nn.Module, quantizer: MaskHolder) -> None:
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


def check_recorded_sparsity(model: nn.Module, config: GBLMConfig, quantizer: MaskHolder) -> None:
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


def verify_checksum(
    config: GBLMConfig, packed_masks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], current: str
) -> None:
    """Refuse masks and recipe that do not match the checksum `config.record` stored (`current` is theirs now)."""
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
def _zero_masked_gradient(quantizer: MaskHolder, name: str) -> Callable[[torch.Tensor], None]:
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
        self.entries: dict[str, tuple[nn.Module, Any, MaskHolder, Any]] = {}

    def __bool__(self) -> bool:
        return True

    def __reduce__(self) -> tuple[type, tuple]:
        return (_GradientMasking, ())

    def install(self, model: nn.Module, quantizer: MaskHolder) -> None:
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
    if isinstance(masking, _GradientMasking) and holds_masks(quantizer):
        masking.install(model, quantizer)


def remove_gradient_masking(model: nn.Module) -> None:
    """Remove the hooks `install_gradient_masking` put on `model` (and on its weights)."""
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


def install_gradient_masking(model: nn.Module, quantizer: MaskHolder) -> None:
    """Zero masked gradients as they are accumulated, so no optimizer ever sees them (replaces earlier hooks).

    Copies of the model (`copy.deepcopy`, pickling) keep this: they hook their own weights before their first
    forward with gradients (see _GradientMasking)."""
    remove_gradient_masking(model)
    masking = _GradientMasking()
    setattr(model, GRADIENT_HOOKS_ATTRIBUTE, masking)
    masking.install(model, quantizer)
    model.register_forward_pre_hook(_ensure_gradient_masking)


def detach_masks(model: nn.Module) -> None:
    """Forget earlier pruning state (masks, gradient hooks, save/push overrides) before pruning afresh: stale masks
    would zero gradients of weights that are no longer pruned."""
    remove_gradient_masking(model)
    for attribute in ("save_pretrained", "push_to_hub"):
        model.__dict__.pop(attribute, None)
    if holds_masks(getattr(model, "hf_quantizer", None)):
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
