"""Outlier-weighted layer-wise sparsity (OWL): blocks with more outlier scores keep more weights.

For each decoder block, D = the share of the block's scores above M times their mean (M = `threshold`, 5). D is mapped
linearly onto [0, 2 * lambda] (lambda = `spread`, 0.08), centred so that the parameter-weighted mean density is
1 - target (scaled down when that centring would take a block past target +- lambda), and each block's sparsity is
1 - density. Usable with every method: the block's scores are the method's own importance, or Wanda's for methods
without one (SparseGPT).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import GBLMConfig, check_number, option_flag, setting
from ..engine import run_layerwise, visit_without_calibration
from ..registry import register_profile
from ..scores import wanda_score
from ..stats import InputStats
from ..structure import weight_matrix
from .base import Modules, PruningMethod, SparsityProfile, Tensor

logger = logging.getLogger(__name__)


@dataclass
class OWLOptions:
    threshold: float = setting(5.0, "OWL's M: a score is an outlier above M times the block's mean score")
    spread: float = setting(0.08, "OWL's lambda: block sparsities stay within sparsity +- spread")

    def __post_init__(self) -> None:
        self.threshold = check_number("owl threshold", self.threshold, 0.0, 1e6)
        self.spread = check_number("owl spread", self.spread, 0.0, 1.0)


def _measures_activations(method: type[PruningMethod]) -> bool:
    # Methods without a score of their own are measured with Wanda's, which needs activations.
    return method.needs_activations or method.importance is PruningMethod.importance


class OutlierMeter:
    """An engine visitor that prunes nothing: it measures each block's outlier share on the dense model."""

    def __init__(self, method: PruningMethod, threshold: float = 5.0):
        self.method, self.threshold = method, threshold
        self.collects_inputs = _measures_activations(type(method))
        # The method's scores on the dense model need that model's block-local gradients, when it uses them.
        self.needs_block_gradients = method.needs_block_gradients
        self.outlier_share: dict[str, float] = {}
        self.block_params: dict[str, int] = {}
        self.block_layers: dict[str, list[str]] = {}
        self._scores: list[torch.Tensor] = []
        self._names: list[str] = []

    def new_stats(self, name: str, module: nn.Module) -> InputStats:
        return InputStats(weight_matrix(module).shape[1], module.weight.device)

    def measure_block_gradients(self, block: nn.Module, layers: Modules, inputs: Any) -> None:
        self.method.measure_block_gradients(block, layers, inputs)

    @torch.no_grad()
    def visit_layer(self, name: str, module: nn.Module, stats: Any) -> None:
        scores = self.method.importance(name, module, stats)
        if scores is None:  # the method has no score of its own (SparseGPT): Wanda's, as the OWL reference does
            scores = wanda_score(weight_matrix(module), stats.sq_mean)
        self._scores.append(scores.reshape(-1).cpu())
        self._names.append(name)

    def end_block(self) -> None:
        if not self._scores:
            return
        scores, block = torch.cat(self._scores), block_of(self._names[0])
        self.outlier_share[block] = ((scores > self.threshold * scores.mean()).sum() / scores.numel()).item()
        self.block_params[block] = scores.numel()
        self.block_layers[block] = self._names
        self._scores, self._names = [], []


def block_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.3' (the decoder block a layer belongs to)."""
    match = re.match(r"(.*?\.\d+)\.", name)
    return match.group(1) if match else name


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


@register_profile("owl")
class OWLProfile(SparsityProfile):
    help = "outlier-weighted sparsity per decoder block (unstructured)"
    Options = OWLOptions

    @classmethod
    def check_config(cls, config: GBLMConfig) -> None:
        if config.nm is not None:
            raise ValueError("sparsity_profile='owl' varies sparsity per block; it needs pattern='unstructured'.")
        spread = config.profile_options["spread"]
        if not (0 <= config.sparsity - spread and config.sparsity + spread < 1):
            raise ValueError(
                f"with owl spread (lambda) {spread:g} per-block sparsity would leave [0, 1) around {config.sparsity:g}; "
                f"lower it (profile_options={{'spread': ...}}, {option_flag(cls.name, 'spread', kind='profile')})."
            )

    def needs_calibration(self, method: type[PruningMethod]) -> bool:
        return _measures_activations(method)

    def layer_sparsities(
        self, model: nn.Module, input_ids: Tensor | None, method: PruningMethod, modules: Modules, show_progress: bool = True
    ) -> dict[str, float]:
        # One measuring pass over the dense model, then per-block sparsities for the pruning pass.
        meter = OutlierMeter(method, self.options.threshold)
        if meter.collects_inputs:
            run_layerwise(model, input_ids, meter, self.config.target_modules, show_progress=show_progress)
        else:
            visit_without_calibration(model, meter, self.config.target_modules)
        per_block = owl_sparsities(meter.outlier_share, meter.block_params, self.config.sparsity, self.options.spread)
        logger.info("OWL per-block sparsity: %s", {b: round(v, 4) for b, v in per_block.items()})
        return {name: per_block[block] for block, names in meter.block_layers.items() for name in names}
