"""The on-disk form of a pruned checkpoint: the mask file beside the weights, and whole-folder atomic saves.

`config.json` (`quantization_config`) holds the recipe and the record; `gblm_masks.safetensors` holds the masks, 1 bit
per prunable weight, with their shapes in its metadata. The weights keep their exact zeros, so a stack that ignores
our key still loads a correct model. Importing this module registers `write_masks` with `sparse_state.SAVE_HOOKS`,
so a pruned model's `save_pretrained` writes its masks.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .files import write_atomically
from .sparse_state import (
    GBLMHfQuantizer,
    attach_masks,
    check_weights_match_masks,
    pruning_quantizer,
    register_save_hook,
)

logger = logging.getLogger(__name__)

MASKS_FORMAT = "optimum-gblm-masks/1"


def read_masks(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """Packed masks and their shapes from a mask file (safetensors only: nothing is unpickled)."""
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
    checksum = config.record.masks_checksum if config.record is not None else None
    metadata = {"format": MASKS_FORMAT, "checksum": checksum or ""}
    metadata.update({f"shape:{name}": ",".join(map(str, shape)) for name, shape in quantizer.mask_shapes.items()})
    target = Path(save_directory) / config.masks_file
    write_atomically(target, lambda tmp: save_file(dict(quantizer.packed_masks), tmp, metadata=metadata))
    return target


register_save_hook(write_masks)


def find_masks_file(model: nn.Module, masks_file: str, checkpoint_dir: str | None = None) -> str:
    """The mask file of the checkpoint `model` was loaded from: beside its weights, in its folder, or on the Hub."""
    if checkpoint_dir and os.path.isfile(os.path.join(checkpoint_dir, masks_file)):
        return os.path.join(checkpoint_dir, masks_file)
    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    if os.path.isdir(source):
        path = os.path.join(source, masks_file)
    else:
        from transformers.utils import cached_file

        path = cached_file(source, masks_file, _raise_exceptions_for_missing_entries=False) if source else None
    if not path or not os.path.isfile(path):
        raise ValueError(
            f"the checkpoint {source or checkpoint_dir!r} was pruned with optimum-gblm but its mask file "
            f"{masks_file!r} is missing. Restore the file, or delete `quantization_config` from config.json to load "
            f"the weights as a plain dense model."
        )
    return path


def load_masks(model: nn.Module, quantizer: GBLMHfQuantizer, checkpoint_dir: str | None = None) -> GBLMHfQuantizer:
    """Read the masks of the checkpoint `model` was just loaded from and attach them, verified against the checksum,
    the weights and the recorded sparsity (what `from_pretrained` does for quant_method "gblm")."""
    path = find_masks_file(model, quantizer.quantization_config.masks_file, checkpoint_dir)
    packed, shapes = read_masks(path)
    attach_masks(model, quantizer.quantization_config, packed, shapes, verify=True, quantizer=quantizer)
    logger.info("loaded %d GBLM masks from %s and verified them against the weights", len(packed), path)
    return quantizer


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
    never half-overwritten, and a crash leaves at most a hidden temporary folder.

    (Each file inside is written by its own writer; `files.write_atomically` covers single files such as the masks.
    A folder needs the swap, since `os.replace` cannot atomically replace a non-empty directory.)
    """
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
