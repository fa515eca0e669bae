"""transformers integration: quant_method "gblm".

A pruned model carries a `GBLMHfQuantizer` holding its bit-packed masks. `save_pretrained` writes the recipe and the
measured sparsity into `config.json` (`quantization_config`) and the masks, 1 bit per prunable weight, into
`gblm_masks.safetensors` beside the weights; the weights keep their exact zeros, so a stack that ignores our key
still loads a correct model. After `import optimum_gblm`, `from_pretrained` reads the masks back and verifies them
against the weights, or, given `quantization_config=GBLMConfig(dataset=...)` on a dense checkpoint, prunes while
loading. Masked gradients are zeroed as they are produced and `SparsityCallback` re-applies the masks after every
optimizer step, so fine-tuning keeps the sparsity exactly.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantizer
from transformers.quantizers.base import HfQuantizer

from .config import GBLMConfig
from .engine import Onloaded
from .files import write_atomically
from .masks import unpack_mask

logger = logging.getLogger(__name__)

MASKS_FORMAT = "optimum-gblm-masks/1"


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
    """transformers' view of a GBLM-pruned model: dense weights with exact zeros plus bit-packed masks."""

    requires_calibration = False

    def __init__(self, quantization_config: GBLMConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.packed_masks: dict[str, torch.Tensor] = {}
        self.mask_shapes: dict[str, tuple[int, ...]] = {}
        self.checkpoint_dir: str | None = None

    # -- loading ----------------------------------------------------------------------------------------------
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized and self.quantization_config.dataset is None:
            raise ValueError(
                "pruning while loading needs calibration data: GBLMConfig(dataset='c4' | 'wikitext2' | a local path, "
                "tokenizer=...)."
            )

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        return False  # weights load as they are; masks are read after loading

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        files = kwargs.get("checkpoint_files") or []
        if files:
            self.checkpoint_dir = os.path.dirname(files[0])
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        if self.pre_quantized:
            path = self._masks_path(model)
            packed, shapes = read_masks(path)
            attach_masks(model, self.quantization_config, packed, shapes, verify=True, quantizer=self)
            logger.info("loaded %d GBLM masks from %s and verified them against the weights", len(packed), path)
        else:
            from .pruner import GBLMPruner

            config = self.quantization_config
            tokenizer = config.tokenizer if config.tokenizer is not None else model.name_or_path
            GBLMPruner(config).prune(model, config.dataset, tokenizer=tokenizer)
        return model

    def _masks_path(self, model) -> str:
        name = self.quantization_config.masks_file
        if self.checkpoint_dir and os.path.isfile(os.path.join(self.checkpoint_dir, name)):
            return os.path.join(self.checkpoint_dir, name)
        source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
        if os.path.isdir(source):
            path = os.path.join(source, name)
        else:
            from transformers.utils import cached_file

            path = cached_file(source, name, _raise_exceptions_for_missing_entries=False) if source else None
        if not path or not os.path.isfile(path):
            raise ValueError(
                f"the checkpoint {source or self.checkpoint_dir!r} was pruned with optimum-gblm but its mask file "
                f"{name!r} is missing. Restore the file, or delete `quantization_config` from config.json to load "
                f"the weights as a plain dense model."
            )
        return path

    # -- saving and training ----------------------------------------------------------------------------------
    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # Full fine-tuning is what sparse models get; masks keep the zeros (see SparsityCallback).
        return True

    def _dequantize(self, model, dtype=None):
        return model  # the weights already are dense

    # -- masks ------------------------------------------------------------------------------------------------
    def mask(self, name: str, device: torch.device | None = None) -> torch.Tensor:
        mask = unpack_mask(self.packed_masks[name], self.mask_shapes[name])
        return mask if device is None else mask.to(device)


if AUTO_QUANTIZER_MAPPING.get("gblm") is not GBLMHfQuantizer:
    AUTO_QUANTIZER_MAPPING.pop("gblm", None)
    register_quantizer("gblm")(GBLMHfQuantizer)


def read_masks(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """Packed masks and their shapes from a mask file (safetensors only: nothing is unpickled)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        packed = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"mask file {str(path)!r} is unreadable ({error}); restore it from the original checkpoint.") from None
    if metadata.get("format") != MASKS_FORMAT:
        raise ValueError(f"mask file {str(path)!r} is not an optimum-gblm mask file (format {metadata.get('format')!r}).")
    shapes = {}
    for name in packed:
        raw = metadata.get(f"shape:{name}")
        if raw is None:
            raise ValueError(f"mask file {str(path)!r} has no shape for {name}; the file is damaged.")
        shapes[name] = tuple(int(s) for s in raw.split(","))
    return packed, shapes


def write_masks(model: nn.Module, save_directory: str | os.PathLike) -> Path:
    """Write the model's masks into `save_directory` atomically, after checking the weights still obey them."""
    quantizer = pruning_quantizer(model)
    check_weights_match_masks(model, quantizer)
    config = quantizer.quantization_config
    metadata = {"format": MASKS_FORMAT, "checksum": config.masks_checksum or ""}
    metadata.update({f"shape:{name}": ",".join(map(str, shape)) for name, shape in quantizer.mask_shapes.items()})
    target = Path(save_directory) / config.masks_file
    write_atomically(target, lambda tmp: save_file(dict(quantizer.packed_masks), tmp, metadata=metadata))
    return target


def pruning_quantizer(model: nn.Module) -> GBLMHfQuantizer:
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, GBLMHfQuantizer):
        raise ValueError("this model was not pruned by optimum-gblm (it carries no GBLM masks); prune it first.")
    return quantizer


def _save_pretrained_with_masks(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if not os.path.isfile(save_directory):  # transformers logs and returns when given a file
        from .hub import write_model_card

        write_masks(self, save_directory)
        write_model_card(self, save_directory)
    return result


def _push_pruned_to_hub(self: nn.Module, repo_id: str, *args: Any, **kwargs: Any):
    """transformers' push_to_hub would replace our card with a generic one; ours uploads everything in one commit."""
    from .hub import push_to_hub

    if args:
        raise ValueError("pass push_to_hub options by keyword (token=..., private=..., commit_message=...).")
    for ignored in ("max_shard_size", "safe_serialization", "tags", "use_temp_dir"):
        kwargs.pop(ignored, None)
    return push_to_hub(self, repo_id, **kwargs)


def check_weights_match_masks(model: nn.Module, quantizer: GBLMHfQuantizer) -> None:
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


def attach_masks(
    model: nn.Module,
    config: GBLMConfig,
    packed_masks: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    verify: bool = False,
    quantizer: GBLMHfQuantizer | None = None,
) -> GBLMHfQuantizer:
    """Make `model` a GBLM-pruned model: quantizer, config entry, mask-saving `save_pretrained`, gradient masking."""
    checksum = masks_checksum(packed_masks, shapes, config.recipe())
    if verify and checksum != config.masks_checksum:
        raise ValueError(
            "the masks and the recipe in config.json do not match the checksum recorded there: the mask file or the "
            "pruning recipe was altered, or they come from different checkpoints. Restore both files from the same "
            "checkpoint."
        )
    config.masks_checksum = checksum
    if quantizer is None:
        quantizer = GBLMHfQuantizer(config, pre_quantized=True)
    quantizer.packed_masks, quantizer.mask_shapes = dict(packed_masks), dict(shapes)
    if verify:
        check_weights_match_masks(model, quantizer)
        check_recorded_sparsity(model, config, quantizer)
    for handle in getattr(model, "_gblm_gradient_hooks", []):
        handle.remove()
    model._gblm_gradient_hooks = [
        model.get_submodule(name).weight.register_post_accumulate_grad_hook(_zero_masked_gradient(quantizer, name))
        for name in packed_masks
    ]
    model.hf_quantizer = quantizer
    model.config.quantization_config = config
    # No transformers hook sees the save folder, so the instance's save_pretrained writes the masks after the rest.
    model.save_pretrained = types.MethodType(_save_pretrained_with_masks, model)
    model.push_to_hub = types.MethodType(_push_pruned_to_hub, model)
    return quantizer


def restore_dense(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load dense weights back into a pruned model and forget its masks (benchmarks prune one model many times).

    Loading weights alone is not enough: the previous prune's gradient hooks would keep zeroing the gradients of
    the weights it had masked, in fine-tuning and in a new gradient stage alike.
    """
    model.load_state_dict(state_dict)
    detach_masks(model)


def detach_masks(model: nn.Module) -> None:
    """Forget earlier pruning state (masks, gradient hooks, save/push overrides) before pruning afresh: stale masks
    would zero gradients of weights that are no longer pruned."""
    for handle in getattr(model, "_gblm_gradient_hooks", []):
        handle.remove()
    model._gblm_gradient_hooks = []
    for attribute in ("save_pretrained", "push_to_hub"):
        model.__dict__.pop(attribute, None)
    if isinstance(getattr(model, "hf_quantizer", None), GBLMHfQuantizer):
        model.hf_quantizer = None
        for attribute in ("is_quantized", "quantization_method"):
            model.__dict__.pop(attribute, None)
    if isinstance(getattr(model.config, "quantization_config", None), GBLMConfig):
        del model.config.quantization_config


def _zero_masked_gradient(quantizer: GBLMHfQuantizer, name: str):
    def hook(param: torch.Tensor) -> None:
        if param.grad is not None:
            param.grad.masked_fill_(~quantizer.mask(name, param.grad.device), 0)

    return hook


def check_recorded_sparsity(model: nn.Module, config: GBLMConfig, quantizer: GBLMHfQuantizer) -> None:
    from .pruner import sparsity_report

    recorded = config.layer_sparsity or {}
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


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every weight its mask marks as pruned (after an optimizer step, or to repair a modified model)."""
    quantizer = pruning_quantizer(model)
    for name in quantizer.packed_masks:
        module = model.get_submodule(name)
        with Onloaded(module) as onloaded:
            module.weight.masked_fill_(~quantizer.mask(name, module.weight.device), 0)
            onloaded.store(module)  # an offloaded weight is written back to its offload


def check_output_dir(output: str | os.PathLike, overwrite: bool, fix: str = "pass overwrite=True") -> None:
    """Refuse a file, or a folder that already holds files unless overwriting was asked for."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"{str(output)!r} is a file; choose a folder path for the checkpoint.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"{str(output)!r} already holds files; choose another folder or {fix}.")


def save_pretrained_atomically(
    model: nn.Module, output: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False, **save_kwargs: Any
) -> Path:
    """Write the checkpoint into a temporary sibling folder, then swap it into place: an existing checkpoint is
    never half-overwritten, and a crash leaves at most a hidden temporary folder."""
    output = Path(output).resolve()
    check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a save that was killed before it could clean up: never a checkpoint, safe to remove.
    for stale in output.parent.glob(f".{output.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        model.save_pretrained(staging, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if output.exists():
            retired = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
            os.replace(output, retired / "checkpoint")
            os.replace(staging, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, output)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise OSError(
                error.errno, f"the disk is full while saving {str(output)!r}: free some space and save again; "
                f"{'the existing checkpoint was left as it was' if output.exists() else 'nothing was written'}"
            ) from error
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


class SparsityCallback(TrainerCallback):
    """Re-applies the pruning masks after every optimizer step, whatever the optimizer does with zero gradients."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None and isinstance(getattr(model, "hf_quantizer", None), GBLMHfQuantizer):
            apply_masks(model)
