"""SparseGPT: the OBS-style baseline that prunes and updates the remaining weights to compensate.

Per layer, H = (2/N) sum_n X_n^T X_n; dead inputs (H_jj = 0) get H_jj = 1 and a zeroed column; H is damped by
`damping * mean(diag H)`; U is the upper Cholesky factor of H^-1. Columns are processed in blocks of 128:
unstructured masks take the lowest w^2 / U_jj^2 over the rows x block, N:M masks the n lowest per row in every group
of m (on the already-updated weights). Each column's pruning error (w - q) / U_jj is propagated to the rest of the
block, and the block's errors to all later columns.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import GBLMConfig
from .engine import RunningStats, as_matrix, weight_matrix
from .masks import pack_mask


class HessianStats(RunningStats):
    """H = (2/N) sum_n X_n^T X_n over N sequences."""

    def __init__(self, d_in: int, device: torch.device):
        super().__init__(torch.zeros(d_in, d_in, dtype=torch.float32, device=device))

    def contribution(self, rows: torch.Tensor) -> torch.Tensor:
        return 2 * rows.t() @ rows

    @property
    def hessian(self) -> torch.Tensor:
        return self.value


def inverse_hessian_factor(hessian: torch.Tensor, damping: float, name: str = "layer") -> torch.Tensor:
    """Upper Cholesky factor of the damped H^-1; a clear error naming the layer when H is not positive definite."""
    diagonal = torch.diagonal(hessian)
    hessian = hessian + damping * diagonal.mean() * torch.eye(hessian.shape[0], device=hessian.device)
    try:
        lower = torch.linalg.cholesky(hessian)
        inverse = torch.cholesky_inverse(lower)
        return torch.linalg.cholesky(inverse, upper=True)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise FloatingPointError(
            f"SparseGPT: the Hessian of {name} is not positive definite after damping {damping:g}; use a larger "
            f"damping (GBLMConfig(sparsegpt_damping=0.1)) or more calibration data."
        ) from None


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damping: float = 0.01,
    name: str = "layer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pruned and updated (d_out, d_in) weights (fp32) and the keep-mask."""
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    H = hessian.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    U = inverse_hessian_factor(H, damping, name)
    rows, columns = W.shape
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        W1 = W[:, start:end].clone(memory_format=torch.contiguous_format)
        U1 = U[start:end, start:end]
        errors = torch.zeros_like(W1)
        pruned1 = torch.zeros_like(W1, dtype=torch.bool)
        diagonal = torch.diagonal(U1)
        if nm is None:
            saliency = (W1**2 / diagonal.unsqueeze(0) ** 2).reshape(-1)
            count = int(saliency.numel() * sparsity)
            order = torch.sort(saliency, stable=True).indices[:count]
            pruned1.view(-1)[order] = True
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                group = W1[:, i : i + nm[1]] ** 2 / diagonal[i : i + nm[1]].unsqueeze(0) ** 2
                lowest = torch.sort(group, dim=1, stable=True).indices[:, : nm[0]]
                pruned1.scatter_(1, i + lowest, True)
            w = W1[:, i]
            q = w.masked_fill(pruned1[:, i], 0)
            error = (w - q) / U1[i, i]
            W1[:, i:] -= error.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            errors[:, i] = error
        W[:, start:end] = W1
        pruned[:, start:end] = pruned1
        W[:, end:] -= errors @ U[start:end, end:]
    if not torch.isfinite(W).all():
        raise FloatingPointError(
            f"SparseGPT produced NaN/inf weights for {name}; use a larger damping (GBLMConfig(sparsegpt_damping=0.1)) "
            f"or float32 weights."
        )
    return W, ~pruned


class SparseGPTPruner:
    """The engine's LayerPruner for SparseGPT: Hessian statistics, then prune-and-update each layer."""

    collects_inputs = True

    def __init__(self, config: GBLMConfig):
        self.config = config
        self.packed_masks: dict[str, torch.Tensor] = {}
        self.mask_shapes: dict[str, tuple[int, ...]] = {}
        self.layer_sparsity: dict[str, float] = {}  # per-layer overrides (OWL); others use config.sparsity

    def new_stats(self, name: str, module: nn.Module) -> HessianStats:
        return HessianStats(weight_matrix(module).shape[1], module.weight.device)

    @torch.no_grad()
    def prune_layer(self, name: str, module: nn.Module, stats: HessianStats) -> None:
        weight = weight_matrix(module)
        updated, mask = sparsegpt_prune(
            weight,
            stats.hessian,
            self.layer_sparsity.get(name, self.config.sparsity),
            self.config.nm,
            blocksize=self.config.sparsegpt_blocksize,
            damping=self.config.sparsegpt_damping,
            name=name,
        )
        weight.copy_(updated.to(weight.dtype))
        weight.masked_fill_(~mask, 0)  # a low-precision copy must not round a pruned weight away from zero
        self.packed_masks[name] = pack_mask(as_matrix(module, mask))
        self.mask_shapes[name] = tuple(module.weight.shape)
