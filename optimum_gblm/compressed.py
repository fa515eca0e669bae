"""Compressed storage of a pruned checkpoint: each pruned weight written as its kept values only.

`GBLMConfig(storage=...)` chooses how `save_pretrained` writes the pruned linears:

- `"dense"` (the default): the full weight tensors with exact zeros where the masks prune, beside the mask file.
  Every stack reads it: transformers without this package (it warns about the unknown quantization type and loads
  the same weights), vLLM, TGI, llama.cpp's converter, a plain `safetensors` reader.
- `"compressed"`: for each pruned linear, `<layer>.weight` holds only the kept values, as a 1-D tensor in row-major
  order of the mask's kept positions; which positions they are is the mask file the checkpoint already carries
  (`gblm_masks.safetensors`, 1 bit per weight). Unpruned tensors (embeddings, norms, lm_head) stay as they are. At
  50% sparsity in bf16 the pruned linears take 1/2 + 1/16 = 56.25% of their dense bytes (fp32: 53.1%); the whole
  checkpoint a little more, since embeddings are not pruned. `from_pretrained` with `import optimum_gblm` rebuilds
  the dense weights while loading (the registered "gblm" quantizer adds one decompression step per pruned weight),
  so the model in memory is the same as from a dense checkpoint.

Why dense is the default: a practitioner expects a pruned checkpoint to be a drop-in replacement for the model it
came from, loadable by any tool that reads the original, and a pruned model is no smaller in memory either way (the
weights are dense tensors with zeros; see `semi_structured` for kernels that use 2:4 sparsity). Compressed storage
trades that for a download roughly half the size, and only a reader with optimum-gblm can use it. So it is opt-in,
for when size matters more than reach (a Hub repository of many variants, a slow link). A compressed checkpoint
never loads silently wrong: its pruned `weight` tensors are 1-D, so a reader without this package stops with a
shape mismatch (transformers: unless told `ignore_mismatched_sizes=True`) instead of filling them with random
values. To turn one into a plain dense checkpoint: load it with optimum-gblm, `model.dequantize()`, save. Loading
with tensor parallelism (`tp_plan`) is not supported for compressed storage: transformers shards a stored tensor
before the decompression sees it.

Mechanics, in transformers' own hooks: at save time `HfQuantizer.get_state_dict_and_metadata` returns the state
dict with the values in place of the pruned weights (`storage_state_dict`); at load time the quantizer's
`get_weight_conversions` adds one `WeightConverter` per pruned weight whose operation (`DecompressPrunedWeight`)
scatters the values into a zero tensor by the mask, on the device the weight is loaded to. The layout is the one
compressed-tensors calls a sparse bitmask, with the bitmask kept in the existing mask file rather than written a
second time beside the values.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter

from .masks import unpack_mask
from .placement import Onloaded
from .sparse_state import MaskHolder, check_weights_match_masks

logger = logging.getLogger(__name__)

# Written into every weights file of a compressed checkpoint (safetensors metadata), for readers without config.json.
STORAGE_METADATA_KEY = "optimum_gblm.storage"

_POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int32)


def kept_count(packed: torch.Tensor) -> int:
    """How many weights a packed mask keeps (its padding bits are zero, see `masks.pack_mask`)."""
    return int(_POPCOUNT[packed.to(torch.int64).cpu()].sum())


def compress_weight(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept values of `weight` as a 1-D tensor, in row-major order of `keep`'s True positions."""
    if tuple(keep.shape) != tuple(weight.shape):
        raise ValueError(f"mask of shape {tuple(keep.shape)} does not fit a weight of shape {tuple(weight.shape)}.")
    return weight.detach()[keep.to(weight.device)].contiguous()


def decompress_weight(values: torch.Tensor, keep: torch.Tensor, name: str = "a pruned weight") -> torch.Tensor:
    """Inverse of `compress_weight`: a dense tensor shaped like `keep`, zero where it prunes (exact round trip)."""
    keep = keep.to(values.device)
    kept = int(keep.sum())
    if values.dim() != 1 or values.numel() != kept:
        raise ValueError(
            f"the checkpoint holds {values.numel()} values of shape {tuple(values.shape)} for {name}, but its mask "
            f"keeps {kept}: the weights and the mask file come from different checkpoints. Restore both from the "
            f"same checkpoint."
        )
    dense = values.new_zeros(tuple(keep.shape))
    dense[keep] = values
    return dense


# -- saving -------------------------------------------------------------------------------------------------------
def refuse_semi_structured(model: nn.Module) -> None:
    """A model converted by `semi_structured.to_semi_structured` holds kernel-specific tensors: it is for inference."""
    sparse_type = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    if sparse_type is None:
        return
    for name, parameter in model.named_parameters():
        if isinstance(parameter, sparse_type) or isinstance(getattr(parameter, "data", None), sparse_type):
            raise ValueError(
                f"{name} is a semi-structured sparse tensor (to_semi_structured converted the model for inference), "
                f"which cannot be saved: save the pruned model before converting it, or load it again."
            )


def compressed_state_dict(model: nn.Module, quantizer: MaskHolder) -> dict[str, torch.Tensor]:
    """The model's state dict with every pruned weight replaced by its kept values (`compress_weight`).

    The weights must still obey their masks (a non-zero where a mask prunes would be lost without a trace, so it is
    refused, naming the fix). An offloaded weight is read through its accelerate hook.
    """
    check_weights_match_masks(model, quantizer)
    state = model.state_dict()
    for name in sorted(quantizer.packed_masks):
        key = f"{name}.weight"
        if key not in state:
            raise ValueError(f"the masks name {name}, whose weight is not in the model's state dict; re-prune the model.")
        module = model.get_submodule(name)
        with Onloaded(module):
            weight = module.weight
            state[key] = compress_weight(weight, quantizer.mask(name, weight.device))
    return state


def storage_state_dict(model: nn.Module, quantizer: MaskHolder) -> tuple[dict[str, torch.Tensor] | None, dict[str, str]]:
    """What transformers' `save_pretrained` writes for a pruned model (the `get_state_dict_and_metadata` contract):
    `(None, {})`, the model's own state dict, for dense storage; the compressed state dict and a metadata entry
    naming the storage for compressed storage."""
    refuse_semi_structured(model)
    if getattr(quantizer.quantization_config, "storage", "dense") != "compressed":
        return None, {}
    state = compressed_state_dict(model, quantizer)
    logger.info("writing %d pruned weights as kept values (compressed storage)", len(quantizer.packed_masks))
    return state, {STORAGE_METADATA_KEY: "compressed"}



# -- loading ------------------------------------------------------------------------------------------------------
class DecompressPrunedWeight(ConversionOps):
    """transformers' loading operation for one pruned weight: 1-D kept values -> the dense weight.

    A dense 2-D tensor of the mask's shape (a dense checkpoint, or one whose config was edited) passes unchanged.
    Holds the masks by reference: transformers deep-copies a converter for every weight it loads, and copying every
    mask each time would cost memory and time for nothing.
    """

    def __init__(self, packed_masks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]):
        self.packed_masks = packed_masks
        self.shapes = shapes

    def __deepcopy__(self, memo: dict[int, Any]) -> DecompressPrunedWeight:
        return self

    def convert(
        self,
        input_dict: dict[str, Any],
        source_patterns: list[str] | None = None,
        target_patterns: list[str] | None = None,
        full_layer_name: str | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        (tensors,) = input_dict.values()
        values = tensors[0] if isinstance(tensors, (list, tuple)) else tensors
        key = full_layer_name or ""
        name = key.removesuffix(".weight")
        if name not in self.packed_masks:
            raise ValueError(f"no mask for {key}: the checkpoint's mask file does not match its weights.")
        shape = self.shapes[name]
        if tuple(values.shape) == tuple(shape):
            return {key: values}
        keep = unpack_mask(self.packed_masks[name].to(values.device), shape)
        return {key: decompress_weight(values, keep, key)}

    @property
    def reverse_op(self) -> ConversionOps:
        # Saving never runs the loading conversions backwards: the quantizer's get_state_dict_and_metadata writes
        # the stored form itself, and the quantizer drops these converters after loading.
        raise NotImplementedError("compressed weights are written by get_state_dict_and_metadata, not by reversal.")


def decompression_conversions(packed_masks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> list[WeightConverter]:
    """One `WeightConverter` per pruned weight (its exact key, so no other tensor takes this path), all sharing one
    `DecompressPrunedWeight`."""
    operation = DecompressPrunedWeight(packed_masks, shapes)
    return [
        WeightConverter("^" + re.escape(f"{name}.weight"), f"{name}.weight", operations=[operation])
        for name in sorted(packed_masks)
    ]


def is_decompression_conversion(conversion: Any) -> bool:
    return any(isinstance(op, DecompressPrunedWeight) for op in getattr(conversion, "operations", ()))


def check_compressed_checkpoint(
    files: Iterable[str | os.PathLike], packed_masks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]
) -> int:
    """Before any weight is read: every pruned weight in the checkpoint's safetensors files is either dense (the
    mask's shape) or exactly as many values as its mask keeps. Reads only the files' headers.

    Returns how many weights are stored compressed; raises ValueError naming the first that fits neither.
    """
    stored: dict[str, tuple[int, ...]] = {}
    for path in files:
        path = os.fspath(path)
        if not path.endswith(".safetensors"):
            continue
        try:
            with safe_open(path, framework="pt") as handle:
                for key in handle.keys():
                    if key.endswith(".weight") and key.removesuffix(".weight") in packed_masks:
                        stored[key] = tuple(handle.get_slice(key).get_shape())
        except (SafetensorError, OSError) as error:
            raise ValueError(f"weights file {path!r} is unreadable ({error}); download or copy it again.") from None
    compressed = 0
    for name in sorted(packed_masks):
        key, shape = f"{name}.weight", tuple(shapes[name])
        if key not in stored:
            continue  # not in a safetensors file: transformers reports a missing weight itself
        if stored[key] == shape:
            continue
        kept = kept_count(packed_masks[name])
        if stored[key] != (kept,):
            raise ValueError(
                f"the checkpoint stores {key} with shape {stored[key]}, but its mask is {shape} keeping {kept} "
                f"weights: the weights and the mask file come from different checkpoints. Restore both from the "
                f"same checkpoint."
            )
        compressed += 1
    return compressed
