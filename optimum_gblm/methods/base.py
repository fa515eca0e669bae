"""What the engine asks of a pruning method, and of a sparsity profile.

A method is one module in this package plus one `@register_method("name")` line:

    @register_method("my_method")
    class MyMethod(PruningMethod):
        needs_activations = True                     # the engine collects `new_stats` for each layer
        def prune_layer(self, name, module, stats, sparsity):
            scores = weight_matrix(module).abs() * stats.sq_mean.sqrt()
            return select_mask(scores, self.config, sparsity)   # keep-mask; the engine zeroes and records it
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..config import GBLMConfig
from ..stats import InputStats
from ..structure import weight_matrix

Tensor = torch.Tensor
Modules = dict[str, nn.Module]


class PruningMethod:
    """One pruning method. The engine calls, for every targeted layer in block order, `new_stats` (when
    `needs_activations`), feeds the stats the layer's calibration inputs, then `prune_layer`, and at the end
    `finish`.

    Class attributes:
        needs_activations: collect input statistics (one pass over the calibration data per block).
        needs_gradients: the pruner computes gradient norms first (stage 1) and passes them in.
        Options: a dataclass of the method's own settings (fields with `metadata={"help": ...}`) or None;
            `GBLMConfig.method_options` holds its values and `self.options` the instance.
        help: one line for the CLI and the docs.
        default_alpha: the gradient term's weight when the recipe leaves alpha out (methods without one ignore it).
    """

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    needs_activations: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = False
    Options: ClassVar[type | None] = None
    default_alpha: ClassVar[float | str] = 100.0

    def __init__(self, config: GBLMConfig, gradient_norms: dict[str, torch.Tensor] | None = None):
        self.config = config
        self.options = config.options()
        self.gradient_norms = gradient_norms
        # Values chosen per layer, by setting name ({"alpha": {layer: value}}): saved in the record.
        self.layer_settings: dict[str, dict[str, float]] = {}

    @classmethod
    def check_config(cls, config: GBLMConfig) -> None:
        """Refuse, with the fix, a recipe this method cannot run (called by `GBLMConfig.validate`)."""

    @classmethod
    def gradients_needed(cls, config: GBLMConfig) -> bool:
        """Whether this recipe needs the gradient stage (a method whose options pick a score may not)."""
        return cls.needs_gradients

    def new_stats(self, name: str, module: nn.Module) -> Any:
        """A fresh per-layer statistics accumulator (`add_batch(inputs)`); Wanda's activation norms by default."""
        return InputStats(weight_matrix(module).shape[1], module.weight.device)

    def importance(self, name: str, module: nn.Module, stats: Any) -> torch.Tensor | None:
        """Per-weight importance (higher = keep) for profiles that measure the dense model (OWL); None: not defined,
        the profile then uses Wanda's score."""
        return None

    def prune_layer(self, name: str, module: nn.Module, stats: Any, sparsity: float) -> torch.Tensor:
        """Return the bool keep-mask, shaped like the (d_out, d_in) weight, removing `sparsity` of it; update the kept
        weights in place where the method does. The engine zeroes the pruned weights and records the mask."""
        raise NotImplementedError

    def finish(self) -> None:
        """End of the pass: release per-run state; anything worth keeping goes into `self.layer_settings`."""


def check_blocksize(config: GBLMConfig, blocksize: int, flag: str) -> None:
    """OBS sweeps select masks inside column blocks: a block must hold whole N:M groups, and the score methods'
    mask choices (scope, Wanda's variant) do not apply to them."""
    if config.scope != "row" or config.use_variant:
        raise ValueError(
            f"{config.method} chooses its mask per column block with the OBS saliency; scope='layer' and use_variant "
            f"apply to score methods (wanda, gblm, ...): leave them at their defaults."
        )
    nm = config.nm
    if nm is not None and blocksize % nm[1]:
        raise ValueError(
            f"{config.method} blocksize {blocksize} must be a multiple of M={nm[1]} for pattern {config.pattern!r}: "
            f"set method_options={{'blocksize': {nm[1] * max(1, 128 // nm[1])}}} ({flag})."
        )


class SparsityProfile:
    """How much of each layer to prune. `layer_sparsities` may run a measuring pass over the dense model."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    Options: ClassVar[type | None] = None

    def __init__(self, config: GBLMConfig):
        self.config = config
        self.options = config.profile_settings()

    @classmethod
    def check_config(cls, config: GBLMConfig) -> None:
        """Refuse, with the fix, a recipe this profile cannot serve."""

    def needs_calibration(self, method: type[PruningMethod]) -> bool:
        """Whether `layer_sparsities` needs calibration data for this method (beyond what the method needs)."""
        return False

    def layer_sparsities(
        self, model: nn.Module, input_ids: Tensor | None, method: PruningMethod, modules: Modules, show_progress: bool = True
    ) -> dict[str, float]:
        """Sparsity per layer name, for every layer in `modules` (a measuring pass may run `method` over the model)."""
        raise NotImplementedError
