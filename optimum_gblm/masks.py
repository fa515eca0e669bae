"""Mask selection from scores. A mask is a bool tensor shaped like the weight: True = keep, False = pruned.

Patterns live in `MASK_SELECTORS`, keyed by `SparsityPattern.kind`: a new pattern is one function plus one registry
line (and its string taught to `config.parse_pattern`). Selectors take data, not a config: the scores, the sparsity,
the parsed pattern, and the score methods' mask choices (scope, Wanda's variant).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .config import UNSTRUCTURED, SparsityPattern

logger = logging.getLogger(__name__)

# selector(scores, sparsity, pattern, scope, use_variant) -> keep-mask
MaskSelector = Callable[[torch.Tensor, float, SparsityPattern, str, bool], torch.Tensor]
MASK_SELECTORS: dict[str, MaskSelector] = {}


def register_pattern(kind: str) -> Callable[[MaskSelector], MaskSelector]:
    def decorator(fn: MaskSelector) -> MaskSelector:
        MASK_SELECTORS[kind] = fn
        return fn

    return decorator


def _remove_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask that drops the `count` lowest entries along the last dim (stable: ties go to the earlier index)."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        order = torch.sort(scores, dim=-1, stable=True).indices[..., :count]
        mask.scatter_(-1, order, False)
    return mask


def row_masks(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, remove the floor(d_in * sparsity) lowest scores."""
    return _remove_lowest(scores, int(scores.shape[1] * sparsity))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold over the whole matrix: remove the floor(numel * sparsity) lowest scores."""
    return _remove_lowest(scores.reshape(-1), int(scores.numel() * sparsity)).reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of `m` consecutive input columns of each row, remove the `n` lowest scores."""
    d_out, d_in = scores.shape
    if d_in % m:
        raise ValueError(f"an {n}:{m} pattern needs the input width to be a multiple of {m}, got {d_in}.")
    return _remove_lowest(scores.reshape(d_out, d_in // m, m), n).reshape(d_out, d_in)


def wanda_variant_mask(
    scores: torch.Tensor, sparsity: float, tolerance: float = 0.001, max_steps: int = 60
) -> torch.Tensor:
    """Wanda's variant: per row remove the scores whose ascending cumulative sum stays <= alpha * row total,
    one alpha for the matrix found by bisection until the matrix sparsity is within `tolerance` of the target."""
    sorted_scores, order = torch.sort(scores.double(), dim=-1, stable=True)
    cumulative = sorted_scores.cumsum(dim=-1)
    totals = sorted_scores.sum(dim=-1, keepdim=True)

    def mask_for(alpha: float) -> tuple[torch.Tensor, float]:
        removed_sorted = cumulative <= alpha * totals
        mask = torch.ones_like(scores, dtype=torch.bool)
        mask.scatter_(-1, order, ~removed_sorted)
        return mask, 1.0 - mask.float().mean().item()

    alpha, low, high = 0.4, 0.0, 0.8
    mask, achieved = mask_for(alpha)
    for _ in range(max_steps):
        if abs(achieved - sparsity) <= tolerance:
            break
        if achieved > sparsity:
            high = alpha
        else:
            low = alpha
        alpha = (low + high) / 2
        mask, achieved = mask_for(alpha)
    else:
        logger.warning(
            "Wanda's variant reached sparsity %.4f instead of %.4f after %d bisection steps", achieved, sparsity, max_steps
        )
    return mask


@register_pattern("unstructured")
def unstructured_mask(
    scores: torch.Tensor, sparsity: float, pattern: SparsityPattern, scope: str = "row", use_variant: bool = False
) -> torch.Tensor:
    if use_variant:
        return wanda_variant_mask(scores, sparsity)
    if scope == "layer":
        return layer_mask(scores, sparsity)
    return row_masks(scores, sparsity)


@register_pattern("nm")
def _nm_mask_of(
    scores: torch.Tensor, sparsity: float, pattern: SparsityPattern, scope: str = "row", use_variant: bool = False
) -> torch.Tensor:
    return nm_mask(scores, pattern.n, pattern.m)  # N:M fixes the sparsity; the config refused other mask choices


def select_mask(
    scores: torch.Tensor,
    sparsity: float,
    pattern: SparsityPattern = UNSTRUCTURED,
    scope: str = "row",
    use_variant: bool = False,
) -> torch.Tensor:
    """The keep-mask for `scores` removing `sparsity` of them under `pattern` (`config.sparsity_pattern`);
    `scope` and `use_variant` are the score methods' mask choices for unstructured patterns."""
    return MASK_SELECTORS[pattern.kind](scores, sparsity, pattern, scope, use_variant)


def check_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive inputs in every row has exactly n pruned entries."""
    d_out, d_in = mask.shape
    if d_in % m:
        return False
    return bool(((~mask).reshape(d_out, d_in // m, m).sum(-1) == n).all())


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as a flat uint8 tensor, 8 entries per byte (most significant bit first, zero-padded)."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    padding = (-flat.numel()) % 8
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return (flat.reshape(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_mask`."""
    numel = 1
    for size in shape:
        numel *= int(size)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"packed mask of {packed.numel()} bytes ({packed.dtype}) does not fit shape {tuple(shape)}.")
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(-1)[:numel].reshape(tuple(shape))
