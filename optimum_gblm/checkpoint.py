"""The on-disk form of a pruned checkpoint: the mask file beside the weights, and whole-folder atomic saves.

`config.json` (`quantization_config`) holds the recipe and the record; `gblm_masks.safetensors` holds the masks, 1 bit
per prunable weight, with their shapes in its metadata. In dense storage (the default) the weights keep their exact
zeros, so a stack that ignores our key still loads a correct model; `optimum_gblm.compressed` writes the kept values
only (storage="compressed"). A pruned model's quantizer (`quantizer.GBLMHfQuantizer`) calls `write_masks` when it
saves and `find_masks_file` / `read_masks` when it loads.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .files import OwnedFolder, OwnerLock, as_os_error, remove_dead_folders, write_atomically
from .sparse_state import check_weights_match_masks, pruning_quantizer

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


# -- whole-folder saves ---------------------------------------------------------------------------------------------
# transformers' weight files: a folder with config.json and one of these is a checkpoint that a save may replace.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
)


# Files a pruned checkpoint's save writes (weights and shards, configs, tokenizer, masks, card, evaluation results):
# anything else in a folder being replaced would be lost with it.
CHECKPOINT_FILE = re.compile(
    r"(config|generation_config|special_tokens_map|added_tokens|tokenizer_config|tokenizer|preprocessor_config|"
    r"eval_results)\.json|.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?|tokenizer\.model|"
    r"spiece\.model|vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json)|README\.md"
)


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """Entries of `folder` that no checkpoint save writes (sub-folders, notes, a .git repository ...)."""
    return sorted(p.name for p in Path(folder).iterdir() if not (p.is_file() and CHECKPOINT_FILE.fullmatch(p.name)))


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """True for a folder a save may replace: an empty one, or a transformers checkpoint (config.json and weights)
    holding nothing but checkpoint files."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if not any(folder.iterdir()):
        return True
    has_weights = (folder / "config.json").is_file() and any((folder / name).is_file() for name in WEIGHT_FILES)
    return has_weights and not foreign_files(folder)


def check_output_dir(output: str | os.PathLike, overwrite: bool, fix: str = "pass overwrite=True") -> None:
    """Refuse a file; a folder that already holds files unless overwriting was asked for; and, even then, a folder
    that is not a checkpoint: overwriting replaces the whole folder, and notes or data are not ours to delete."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"{str(output)!r} is a file; choose a folder path for the checkpoint.")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"{str(output)!r} already holds files; choose another folder or {fix}.")
    if not is_checkpoint(output):
        names = foreign_files(output) or sorted(p.name for p in output.iterdir())
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(
            f"{str(output)!r} holds files a checkpoint save does not write ({shown}), or is not a model checkpoint "
            f"(config.json with weights); overwriting replaces the whole folder: choose another folder, or move those "
            f"files away yourself."
        )


def _leftover_pattern(output: Path, kind: str) -> str:
    return glob.escape(str(output.parent / f".{output.name}.{kind}-")) + "*"


def _staging_folder(output: Path) -> OwnedFolder:
    """A hidden sibling `.<name>.tmp-<random>` of the output that one save writes into, owned by that save (its lock
    `.<name>.tmp-<random>.lock` held as long as the folder is its own)."""
    return OwnedFolder(output.parent, f".{output.name}.tmp-")


def _remove_dead_leftovers(output: Path) -> None:
    """Remove the staging folders beside `output` whose save died; never one whose owner is alive."""
    remove_dead_folders(output.parent, f".{output.name}.tmp-", "a save")


def _output_lock(output: Path) -> OwnerLock:
    """Held while a save decides about `output` and swaps it: one swap at a time per output folder."""
    return OwnerLock(output.parent / f".{output.name}.lock")


def _recover_interrupted_swap(output: Path) -> None:
    """Finish what a save killed in the middle of swapping left behind (call with the output lock held).

    Without an exchange rename the swap is two renames, output -> `.<name>.old-*/checkpoint` and staging -> output;
    a kill between them leaves no output and the previous checkpoint in the `.old-*` folder: it is put back. A kill
    after them leaves an `.old-*` folder beside a complete output: it is removed."""
    retired = sorted(glob.glob(_leftover_pattern(output, "old")), key=os.path.getmtime, reverse=True)
    for folder in retired:
        previous = Path(folder) / "checkpoint"
        if not os.path.lexists(output) and previous.is_dir():
            os.replace(previous, output)
            logger.warning("restored %s from %s: a save was interrupted while swapping it", output, folder)
        shutil.rmtree(folder, ignore_errors=True)


def recover_interrupted_save(output: str | os.PathLike) -> bool:
    """Put back a checkpoint that a save killed in the middle of its swap left in `.<name>.old-*`, and remove the
    leftovers of dead saves beside `output`; True when `output` exists afterwards. `save_pretrained_atomically`
    does this itself before it swaps."""
    output = Path(output).resolve()
    if not output.parent.is_dir():
        return False
    _remove_dead_leftovers(output)
    with _output_lock(output):
        _recover_interrupted_swap(output)
    return output.exists()


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2: Any = None


def _rename_exchange(first: Path, second: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE): no moment without either. False where the C
    library, the kernel or the filesystem has no exchange rename; the caller then renames twice."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            function = ctypes.CDLL(None, use_errno=True).renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            function.restype = ctypes.c_int
            _renameat2 = function
        except (AttributeError, OSError):  # a C library without renameat2 (glibc < 2.28, some musl)
            _renameat2 = False
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _swap_into_place(staging: Path, output: Path) -> None:
    """Make the complete staging folder the output (with the output lock held). An existing output ends up at the
    staging path (exchange) or in `.<name>.old-*` (two renames) and is removed there."""
    if not os.path.lexists(output):
        os.replace(staging, output)
        return
    if _rename_exchange(staging, output):
        shutil.rmtree(staging, ignore_errors=True)  # the previous checkpoint
        return
    retired = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-"))
    os.replace(output, retired / "checkpoint")
    try:
        os.replace(staging, output)  # a kill between the two renames is undone by the next save (see above)
    except BaseException:
        os.replace(retired / "checkpoint", output)
        shutil.rmtree(retired, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def save_pretrained_atomically(
    model: nn.Module, output: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False, **save_kwargs: Any
) -> Path:
    """Write the checkpoint into a hidden sibling folder, then swap it into place: an existing checkpoint is never
    half-overwritten, and a crash leaves at most a hidden folder that the next save removes.

    - `overwrite` replaces only a checkpoint (config.json and weights) or an empty folder, never other files.
    - The staging folder is owned by this save (a pid and a lock beside it): another save to the same folder never
      removes it, only leftovers of dead saves. Saves to one folder swap one at a time, each checking the folder
      again just before: two concurrent saves end with one complete checkpoint (with `overwrite` the later wins;
      without it the second fails saying the folder holds files).
    - On Linux the swap is one exchange rename; elsewhere it is two renames, and a kill between them is undone by
      the next save (the previous checkpoint is put back first).
    - A full disk is an `OSError` with errno ENOSPC saying so; the existing checkpoint is left as it was.
    - Folders and files get the permissions of a plain `save_pretrained` (the process umask).

    (Each file inside is written by its own writer; `files.write_atomically` covers single files such as the masks.
    A folder needs the swap, since `os.replace` cannot atomically replace a non-empty directory.)
    """
    output = Path(output).resolve()
    check_output_dir(output, overwrite)
    staging = None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_leftovers(output)  # first: a killed save's leftovers may be what filled the disk
        staging = _staging_folder(output)
        model.save_pretrained(staging.path, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging.path)
        with _output_lock(output):
            _recover_interrupted_swap(output)
            check_output_dir(output, overwrite)  # again: another save may have finished meanwhile
            _swap_into_place(staging.path, output)
    except Exception as error:
        translated = as_os_error(error)
        if translated is None:
            raise
        if translated.errno == errno.ENOSPC:
            if staging is not None:
                staging.close()  # before saying what is on disk
                staging = None
            kept = "the existing checkpoint there was left as it was" if output.exists() else "nothing was saved there"
            raise OSError(
                errno.ENOSPC,
                f"the disk is full while saving {str(output)!r}: free some space (or save to another disk) and save "
                f"again; {kept}. ({translated.strerror or translated})",
            ) from error
        if translated is error:
            raise
        raise translated from error
    finally:
        if staging is not None:
            staging.close()
    return output
