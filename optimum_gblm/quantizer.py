"""`GBLMHfQuantizer`: the one class that owns a pruned model's masks, and how it is saved, loaded and pushed.

transformers sees a GBLM-pruned model as a quantized one (quant_method "gblm"): dense weights with exact zeros plus
bit-packed masks, held here. Each of the three public flows reads top-down from this class:

- `save_pretrained(folder)`: `save` - transformers writes config and weights (asking `get_state_dict_and_metadata`
  for the stored form: dense, or compressed values), then `write_masks_and_card` writes the mask file and the card,
  then, when asked, `push` uploads what the save wrote.
- `push_to_hub(repo_id)`: `push` - the model saved into a temporary folder as above, uploaded in one commit.
- `from_pretrained(pruned checkpoint)`: `_process_model_before_weight_loading` reads the masks once, for both
  storages (compressed weights need them to be rebuilt as they load: `get_weight_conversions`);
  `_process_model_after_weight_loading` attaches them, verified against checksum, weights and recorded sparsity.

The storage, the mask file and the card are plain functions of `compressed`, `checkpoint` and `hub`, below; pruning
while loading a dense checkpoint is `pruner.PruneAtLoadQuantizer`, the subclass transformers instantiates, above.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from . import card, checkpoint, compressed, hub
from .config import GBLMConfig
from .record import PruningRecord
from .sparse_state import (
    check_recorded_sparsity,
    check_weights_match_masks,
    holds_masks,
    install_gradient_masking,
    masks_checksum,
    pruning_quantizer,
    remove_gradient_masking,
    unpacked_mask,
    verify_checksum,
)

logger = logging.getLogger(__name__)

# save_pretrained(..., push_to_hub=True, **kwargs) options that concern the push (transformers' names).
_SAVE_PUSH_OPTIONS = ("repo_id", "commit_message", "commit_description", "private", "create_pr", "revision", "tags")
# Options a pruned model's push_to_hub takes besides transformers' own (by keyword only).
_PUSH_EXTRAS = ("tokenizer", "replace_model_card", "endpoint", "safe_serialization")


class GBLMHfQuantizer(HfQuantizer):
    """transformers' view of a GBLM-pruned model: its masks, and how the model is saved, pushed and loaded."""

    requires_calibration = False

    def __init__(self, quantization_config: GBLMConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.packed_masks: dict[str, torch.Tensor] = {}
        self.mask_shapes: dict[str, tuple[int, ...]] = {}
        self.checkpoint_dir: str | None = None
        self._read_before_weights = False  # set while loading: masks read, attached once the weights are in

    def mask(self, name: str, device: torch.device | None = None) -> torch.Tensor:
        """Layer `name`'s keep-mask (True = kept), unpacked, in the weight's layout."""
        return unpacked_mask(self, name, device)

    # -- attaching ----------------------------------------------------------------------------------------------
    def attach(
        self, model: nn.Module, packed_masks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], verify: bool = False
    ) -> GBLMHfQuantizer:
        """Make `model` a GBLM-pruned model held by this quantizer: masks, config entry, gradient masking, and the
        model's `save_pretrained` / `push_to_hub` routed through `save` / `push`.

        With `verify` (loading a checkpoint) the masks must match the recorded checksum, the weights and the recorded
        sparsity. The checksum of the current recipe is then stored in the config's record.
        """
        config = self.quantization_config
        checksum = masks_checksum(packed_masks, shapes, config.recipe())
        if verify:
            verify_checksum(config, packed_masks, shapes, checksum)
        if config.record is None:
            config.record = PruningRecord()
        config.record.masks_checksum = checksum
        self.packed_masks, self.mask_shapes = dict(packed_masks), dict(shapes)
        if verify:
            check_weights_match_masks(model, self)
            check_recorded_sparsity(model, config, self)
        install_gradient_masking(model, self)
        model.hf_quantizer = self
        model.config.quantization_config = config
        # No transformers hook sees the save folder, so the instance's own methods route saves and pushes here.
        model.save_pretrained = types.MethodType(_save_pretrained, model)
        model.push_to_hub = types.MethodType(_push_to_hub, model)
        return self

    # -- saving -------------------------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict[str, str]]:
        """What transformers writes as the weights: the model's own (dense) or the kept values (compressed)."""
        return compressed.storage_state_dict(model, self)

    def save(self, model: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """A pruned model's `save_pretrained`: transformers' save (config, weights), the mask file and the card, then
        the upload when `push_to_hub=True` (transformers would push before the masks and card exist)."""
        transformers_save, push, hub_options = _split_push_options(type(model).save_pretrained, model, save_directory, *args, **kwargs)
        before = _file_stamps(save_directory) if push else None
        result = transformers_save()
        if os.path.isfile(save_directory) or not hub_options.pop("is_main_process", True):
            return result  # transformers logs and returns when given a file; other ranks write nothing
        self.write_masks_and_card(model, save_directory)
        if push:
            repo_id = hub_options.pop("repo_id", None) or os.fspath(save_directory).rstrip("/" + os.sep).split(os.sep)[-1]
            hub.push_to_hub(model, repo_id, folder=save_directory, changed_since=before, **hub_options)
        return result

    def write_masks_and_card(self, model: nn.Module, save_directory: str | os.PathLike) -> None:
        """What a pruned checkpoint has beyond transformers' files: the mask file, then the card (which reads the
        record the masks' checksum is in). The Trainer's pushes call this too (`training.SparsityCallback`)."""
        checkpoint.write_masks(model, save_directory)
        card.write_model_card(model, save_directory)

    def push(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """A pruned model's `push_to_hub`: transformers' arguments (positional ones in its order) plus `_PUSH_EXTRAS`;
        the model is saved to a temporary folder by `save` and uploaded in one commit with our card."""
        options = _bind_push_arguments(args, kwargs)
        options.pop("use_temp_dir", None)  # older transformers: the upload always comes from a temporary folder here
        return hub.push_to_hub(model, options.pop("repo_id"), **options)

    # -- loading ------------------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        # The only place the weights' folder is known (a Hub checkpoint is in the cache, not at name_or_path).
        files = kwargs.get("checkpoint_files") or []
        if files:
            self.checkpoint_dir = os.path.dirname(files[0])
        if self.pre_quantized:
            # One read for both storages: compressed weights need the masks as they load, dense ones after.
            path = checkpoint.find_masks_file(model, self.quantization_config.masks_file, self.checkpoint_dir)
            self.packed_masks, self.mask_shapes = checkpoint.read_masks(path)
            self._read_before_weights = True
            if self.quantization_config.storage == "compressed":
                stored = compressed.check_compressed_checkpoint(files, self.packed_masks, self.mask_shapes)
                logger.info("compressed checkpoint: %d of %d pruned weights are stored as kept values", stored, len(self.packed_masks))
        return model

    def get_weight_conversions(self) -> list[Any]:
        if not self._read_before_weights or self.quantization_config.storage != "compressed":
            return []
        return compressed.decompression_conversions(self.packed_masks, self.mask_shapes)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized and self._read_before_weights:
            # Saving reverses the conversions kept on the model; ours must not be: `get_state_dict_and_metadata`
            # writes the stored form itself.
            conversions = getattr(model, "_weight_conversions", None)
            if conversions:
                model._weight_conversions = [c for c in conversions if not compressed.is_decompression_conversion(c)]
            self._read_before_weights = False
            self.attach(model, self.packed_masks, self.mask_shapes, verify=True)
            logger.info("loaded %d GBLM masks and verified them against the weights", len(self.packed_masks))
        return model

    # -- what transformers asks -----------------------------------------------------------------------------------
    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return False  # weights load as they are; masks are read beside them

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
        the save/push routing); transformers then removes this quantizer and quantization_config. The model is a
        plain dense model afterwards, and saves as one."""
        remove_gradient_masking(model)
        for attribute in ("save_pretrained", "push_to_hub"):
            model.__dict__.pop(attribute, None)
        return model


def attach_masks(
    model: nn.Module,
    config: GBLMConfig,
    packed_masks: dict[str, torch.Tensor],
    shapes: dict[str, tuple[int, ...]],
    verify: bool = False,
) -> GBLMHfQuantizer:
    """Make `model` a GBLM-pruned model with these masks (a new `GBLMHfQuantizer` holding them)."""
    return GBLMHfQuantizer(config, pre_quantized=True).attach(model, packed_masks, shapes, verify=verify)


# -- the model's own save_pretrained / push_to_hub ------------------------------------------------------------------
def _save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    if not holds_masks(getattr(self, "hf_quantizer", None)):
        # Checked before anything is written. Without its quantizer the model carries no masks to write.
        if isinstance(getattr(self.config, "quantization_config", None), GBLMConfig):
            raise ValueError(
                "this model's config.json would name GBLM masks (quantization_config) but the model no longer carries "
                "them (its hf_quantizer was removed), so the checkpoint would not load; nothing was written. Call "
                "model.dequantize() to save it as a plain dense model, or prune it again."
            )
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)  # a plain dense model now
    return self.hf_quantizer.save(self, save_directory, *args, **kwargs)


def _push_to_hub(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # transformers' push_to_hub would replace our card with a generic one; ours uploads everything in one commit.
    return pruning_quantizer(self).push(self, *args, **kwargs)


def _split_push_options(
    save_pretrained: Callable[..., Any], model: nn.Module, save_directory: Any, *args: Any, **kwargs: Any
) -> tuple[Callable[[], Any], bool, dict[str, Any]]:
    """(transformers' save_pretrained call without pushing, whether a push was asked, the push's options plus
    is_main_process), from the arguments as transformers' signature binds them (positional ones included)."""
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


def _bind_push_arguments(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """push_to_hub's arguments by name, as transformers' `PushToHubMixin.push_to_hub` of the installed version takes
    them (repo_id first), plus `_PUSH_EXTRAS`; the TypeErrors Python would raise for a wrong call."""
    from transformers.utils.hub import PushToHubMixin

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
    return options
