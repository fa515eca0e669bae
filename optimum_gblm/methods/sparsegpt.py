"""SparseGPT: the OBS-style baseline that prunes and updates the remaining weights to compensate (see
`optimum_gblm.obs.sparsegpt_prune` for the column sweep)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import GBLMConfig, check_int, setting
from ..obs import sparsegpt_prune
from ..registry import register_method
from ..stats import HessianStats
from ..structure import weight_matrix
from .base import PruningMethod, check_blocksize


@dataclass
class SparseGPTOptions:
    damping: float = setting(0.01, "dampening added to the Hessian, as a share of its mean diagonal")
    blocksize: int = setting(128, "columns pruned and updated together (N:M: a multiple of M)")
    refit_steps: int = setting(
        0, "after the sweep, move the kept weights towards the least-squares fit on the mask with this many "
        "conjugate-gradient steps; 0 is SparseGPT as published", absent=0,
    )

    def __post_init__(self) -> None:
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 < self.damping < 1e6:
            raise ValueError(f"sparsegpt damping must be a number > 0 (default 0.01), got {self.damping!r}.")
        self.damping = float(self.damping)
        check_int("sparsegpt blocksize", self.blocksize, 1)
        check_int("sparsegpt refit_steps", self.refit_steps, 0)


@register_method("sparsegpt")
class SparseGPT(PruningMethod):
    help = "SparseGPT: OBS prune-and-update on each layer's Hessian"
    Options = SparseGPTOptions

    needs_activations = True  # for the Hessian

    @classmethod
    def check_config(cls, config: GBLMConfig) -> None:
        check_blocksize(config, config.method_options["blocksize"])

    def new_stats(self, name: str, module: nn.Module) -> HessianStats:
        return HessianStats(weight_matrix(module).shape[1], module.weight.device)

    @torch.no_grad()
    def prune_layer(self, name: str, module: nn.Module, stats: Any, sparsity: float) -> torch.Tensor:
        weight = weight_matrix(module)
        updated, mask = sparsegpt_prune(
            weight,
            stats.hessian,
            sparsity,
            self.config.nm,
            blocksize=self.options.blocksize,
            damping=self.options.damping,
            name=name,
            refit_steps=self.options.refit_steps,
            method=self.name,
        )
        weight.copy_(updated.to(weight.dtype))
        return mask
