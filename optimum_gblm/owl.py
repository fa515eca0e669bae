"""Outlier-weighted layer-wise sparsity (OWL): blocks with more outlier scores keep more weights.

For each decoder block, D = the share of the block's scores above M times their mean (M = 5). D is mapped linearly
onto [0, 2 * lambda] (lambda = 0.08), centred so that the parameter-weighted mean density is 1 - target (scaled down
when that centring would take a block past target +- lambda), and each block's sparsity is 1 - density. Usable with every score: the block's scores are whatever the method scores with
(Wanda's for SparseGPT).
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch
from torch import nn

from .engine import InputStats, weight_matrix

ScoreOf = Callable[[str, nn.Module, Any], torch.Tensor]


def block_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.3' (the decoder block a layer belongs to)."""
    match = re.match(r"(.*?\.\d+)\.", name)
    return match.group(1) if match else name


class OutlierMeter:
    """A LayerPruner that prunes nothing: it measures each block's outlier share on the dense model."""

    collects_inputs = True

    def __init__(self, score_of: ScoreOf, threshold: float = 5.0):
        self.score_of, self.threshold = score_of, threshold
        self.outlier_share: dict[str, float] = {}
        self.block_params: dict[str, int] = {}
        self._block: str | None = None
        self._scores: list[torch.Tensor] = []

    def new_stats(self, name: str, module: nn.Module) -> InputStats:
        return InputStats(weight_matrix(module).shape[1], module.weight.device)

    @torch.no_grad()
    def prune_layer(self, name: str, module: nn.Module, stats: Any) -> None:
        block = block_of(name)
        if block != self._block:
            self.finish()
            self._block = block
        self._scores.append(self.score_of(name, module, stats).reshape(-1).cpu())

    def finish(self) -> None:
        """Close the block being measured (called by the next block, and once at the end)."""
        if self._block is None:
            return
        scores = torch.cat(self._scores)
        self.outlier_share[self._block] = ((scores > self.threshold * scores.mean()).sum() / scores.numel()).item()
        self.block_params[self._block] = scores.numel()
        self._block, self._scores = None, []


def owl_sparsities(
    outlier_share: dict[str, float], block_params: dict[str, int], target: float, lam: float = 0.08
) -> dict[str, float]:
    """Per-block sparsity: outlier shares mapped onto [0, 2 lam], centred on density 1 - target (weighted by size)."""
    blocks = list(outlier_share)
    share = torch.tensor([outlier_share[b] for b in blocks], dtype=torch.float64)
    weights = torch.tensor([block_params[b] for b in blocks], dtype=torch.float64)
    spread = share.max() - share.min()
    scaled = (share - share.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(share)
    centred = scaled - (scaled * weights).sum() / weights.sum()
    # Centring on a (weighted) mean that is not the midpoint would push one end past +-lambda (the OWL reference
    # lets that happen); shrink just enough that every block stays within target +- lambda.
    reach = centred.abs().max()
    if reach > lam:
        centred = centred * (lam / reach)
    density = centred + (1 - target)
    return {b: float(1 - d) for b, d in zip(blocks, density)}
