"""2:4-pruned linears as PyTorch semi-structured sparse tensors, for the sparse tensor cores of NVIDIA GPUs.

A model pruned with `pattern="2:4"` holds dense weights with zeros: no faster and no smaller in memory than the
original. `to_semi_structured(model)` swaps each pruned `nn.Linear` weight for a
`torch.sparse.SparseSemiStructuredTensor` (half the values plus 2-bit indices), whose matmuls run on the 2:4 sparse
tensor cores of GPUs with compute capability 8.0 or newer (A100, H100, RTX 30xx and later), through cuSPARSELt when
this torch build has it, else CUTLASS. Only torch is needed; torchao's `sparsify_(model, semi_sparse_weight())` does
the same swap without checking the layout first.

What the kernels accept is checked before anything changes, by a pure function (`semi_structured_problem`, usable
on a CPU): an `nn.Linear` (GPT-2's transposed Conv1D is not), a mask keeping at most 2 of every 4 consecutive
weights along the input dimension of each row (`pattern="2:4"`; a 4:8 or unstructured mask does not qualify), a
dtype the backend has kernels for (float16 and bfloat16 on both backends, int8, and float32 on CUTLASS only), and
both weight dimensions multiples of the backend's minimum tile for that dtype (cuSPARSELt: 16 x 16 for
float16/bfloat16, 32 x 32 for int8; CUTLASS: 32 rows x 64 input columns for float16/bfloat16, 16 x 128 for int8,
32 x 32 for float32), read from torch's own tables so that they follow the installed version.

The converted model is for inference: its sparse weights cannot be saved (save before converting), trained, or
have masks re-applied.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .sparse_state import check_weights_match_masks, pruning_quantizer

logger = logging.getLogger(__name__)

BACKENDS = ("cusparselt", "cutlass")
MIN_COMPUTE_CAPABILITY = (8, 0)
# float8 has kernels only for torch._scaled_mm, not for the plain matmul of nn.Linear.
_UNUSABLE_DTYPES = {getattr(torch, "float8_e4m3fn", None)}
# torch's tables, used when a torch version lacks the private attribute: (rows, input columns) per dtype.
_FALLBACK_CONSTRAINTS = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (16, 128), torch.float32: (32, 32)},
}


def _tensor_class(backend: str) -> Any:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (the best this torch build has), got {backend!r}.")
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else torch.sparse.SparseSemiStructuredTensorCUTLASS


def default_backend() -> str:
    """cuSPARSELt when this torch build has it (faster, fewer shape limits), else CUTLASS."""
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if cusparselt is not None and cusparselt.is_available() else "cutlass"


def kernel_constraints(backend: str) -> dict[torch.dtype, tuple[int, int]]:
    """Per dtype usable in an nn.Linear, the (rows, input columns) both weight dimensions must be multiples of."""
    table = getattr(_tensor_class(backend), "_DTYPE_SHAPE_CONSTRAINTS", None)
    if not table:
        return dict(_FALLBACK_CONSTRAINTS[backend])
    return {
        dtype: (int(limits.sparse_min_rows), int(limits.sparse_min_cols))
        for dtype, limits in table.items()
        if dtype not in _UNUSABLE_DTYPES
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def semi_structured_problem(
    shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, keep: torch.Tensor | None, backend: str
) -> str | None:
    """Why a weight of `shape` (out, in) and `dtype` with keep-mask `keep` (True = kept; None: not checked) cannot
    become a semi-structured sparse tensor on `backend`, or None when it can. Pure: runs on any device."""
    if len(shape) != 2:
        return f"its weight has {len(shape)} dimensions; the kernels take 2-D (out x in) weights"
    rows, cols = int(shape[0]), int(shape[1])
    constraints = kernel_constraints(backend)
    if dtype not in constraints:
        supported = ", ".join(_dtype_name(d) for d in constraints)
        return (
            f"its weight is {_dtype_name(dtype)}, which the {backend} kernels do not take ({supported}): cast the "
            f"model first, e.g. model.to(torch.bfloat16)"
        )
    min_rows, min_cols = constraints[dtype]
    if rows % min_rows or cols % min_cols or rows < min_rows or cols < min_cols:
        return (
            f"its weight is {rows} x {cols}, but the {backend} kernels for {_dtype_name(dtype)} need rows a multiple "
            f"of {min_rows} and input columns a multiple of {min_cols}"
        )
    if keep is not None:
        if tuple(keep.shape) != (rows, cols):
            return f"its mask has shape {tuple(keep.shape)}, not the weight's {rows} x {cols}"
        crowded = int((keep.reshape(rows, cols // 4, 4).sum(dim=-1) > 2).sum())
        if crowded:
            return (
                f"{crowded} groups of 4 consecutive input weights keep more than 2: the mask is not 2:4 along the "
                f"input dimension (prune with pattern='2:4')"
            )
    return None


def check_semi_structured(model: nn.Module, backend: str | None = None) -> dict[str, str | None]:
    """For every pruned layer of `model` (by its GBLM masks): None when the layer can be converted on `backend`,
    else why not. Reads shapes, dtypes and masks only, so it runs on a CPU."""
    backend = backend or default_backend()
    _tensor_class(backend)  # validates the name
    quantizer = pruning_quantizer(model)
    problems: dict[str, str | None] = {}
    for name in sorted(quantizer.packed_masks):
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):  # GPT-2's Conv1D stores its weight transposed and runs addmm
            problems[name] = f"it is a {type(module).__name__}, not an nn.Linear"
            continue
        shape = quantizer.mask_shapes[name]
        problems[name] = semi_structured_problem(shape, module.weight.dtype, quantizer.mask(name), backend)
    return problems


def require_sparse_gpu(device: torch.device | str | None = None) -> None:
    """Refuse, in one sentence, a machine (or `device`) without a CUDA GPU of compute capability >= 8.0."""
    if not torch.cuda.is_available():
        raise ValueError(
            "semi-structured (2:4) sparse kernels need a CUDA GPU with compute capability >= 8.0 (Ampere or newer), "
            "and this machine has none."
        )
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_COMPUTE_CAPABILITY:
        raise ValueError(
            f"semi-structured (2:4) sparse kernels need a CUDA GPU with compute capability >= 8.0 (Ampere or newer), "
            f"and {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}."
        )


@torch.no_grad()
def to_semi_structured(model: nn.Module, backend: str | None = None, skip_incompatible: bool = False) -> nn.Module:
    """Replace the weight of every 2:4-pruned `nn.Linear` of `model` by a semi-structured sparse tensor, in place,
    and return the model (for inference on an NVIDIA GPU with compute capability >= 8.0).

    Everything is checked before the first layer changes: the GPU, the weights still obeying their masks, and each
    layer's layout (`semi_structured_problem`). A layer the kernels cannot take is an error naming it and the
    reason, unless `skip_incompatible=True` keeps such layers dense. `backend` is "cusparselt" or "cutlass"; None
    picks cuSPARSELt when available.
    """
    require_sparse_gpu()
    backend = backend or default_backend()
    tensor_class = _tensor_class(backend)
    quantizer = pruning_quantizer(model)
    problems = check_semi_structured(model, backend)
    blocked = {name: why for name, why in problems.items() if why is not None}
    if blocked and not skip_incompatible:
        name, why = next(iter(blocked.items()))
        more = f" (and {len(blocked) - 1} more layers)" if len(blocked) > 1 else ""
        raise ValueError(
            f"{name} cannot use the 2:4 sparse kernels: {why}{more}. Pass skip_incompatible=True to keep such layers dense."
        )
    convertible = [name for name, why in problems.items() if why is None]
    if not convertible:
        raise ValueError("no pruned layer of this model fits the 2:4 sparse kernels; prune with pattern='2:4' in float16 or bfloat16.")
    devices = set()
    for name in convertible:
        weight = model.get_submodule(name).weight
        if weight.device.type != "cuda":
            raise ValueError(f"{name} is on {weight.device}: move the model to the GPU first (model.to('cuda')).")
        devices.add(weight.device)
    for device in devices:
        require_sparse_gpu(device)
    check_weights_match_masks(model, quantizer)
    for name in convertible:
        module = model.get_submodule(name)
        sparse = tensor_class.from_dense(module.weight.detach().contiguous())
        module.weight = nn.Parameter(sparse, requires_grad=False)
    for name, why in blocked.items():
        logger.info("%s stays dense: %s", name, why)
    logger.info("converted %d linears to 2:4 semi-structured sparse tensors (%s); %d stay dense", len(convertible), backend, len(blocked))
    return model
