"""What the engine asks of a pruning method, and of a sparsity profile, and the options several methods share.

A method is one module in this package plus one `@register_method("name")` line:

    @register_method("my_method")
    class MyMethod(PruningMethod):
        needs_activations = True                     # the engine collects `new_stats` for each layer
        def prune_layer(self, name, module, stats, sparsity):
            scores = weight_matrix(module).abs() * stats.sq_mean.sqrt()
            return select_mask(scores, sparsity, self.config.sparsity_pattern)   # keep-mask; the engine zeroes it

Shared options: `ScoreOptions` (scope, use_variant: how a mask is picked from a score) and `GradientOptions` (alpha,
gradient_norm: the gradient term) are bases of the methods' own `Options`; their fields carry `shared_by`, so their
flags keep plain names (`--alpha`, `--scope`) while a method's own options are `--<method>-<option>`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import GBLMConfig, option_flag, parse_alpha, setting
from ..gradients import block_gradient_norms
from ..scores import auto_alpha
from ..stats import InputStats
from ..structure import weight_matrix

Tensor = torch.Tensor
Modules = dict[str, nn.Module]

GRADIENT_NORMS = ("l1", "l2")
GRADIENT_LOSSES = ("model", "model_by_block", "block")
# the model loss's gradients, which the pruner's gradient stage takes before the layer pass (in one backward or one
# block at a time)
MODEL_LOSS_GRADIENTS = ("model", "model_by_block")
# the gradient losses measured in the layer pass, block by block (no gradient stage before it, no gradient cache)
LAYER_PASS_GRADIENTS = ("block",)
SCOPES = ("row", "layer")
SCORE_METHODS = "score methods (wanda, gblm, magnitude, ...)"
GRADIENT_METHODS = "methods with a gradient term (gblm, gblm_obs, ...)"


@dataclass
class ScoreOptions:
    """How a score method picks its mask from the scores (unstructured patterns only)."""

    scope: str = setting(
        "row", "unstructured masks per output row (Wanda/GBLM) or per layer (reference magnitude)", choices=SCOPES,
        shared_by=SCORE_METHODS,
    )
    use_variant: bool = setting(
        False, "Wanda's variant: one cumulative-score threshold per matrix (unstructured)", shared_by=SCORE_METHODS
    )

    def __post_init__(self) -> None:
        self.check_mask_choice()

    def check_mask_choice(self) -> None:
        if not isinstance(self.scope, str) or self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}.")
        if not isinstance(self.use_variant, bool):
            raise ValueError(f"use_variant must be True or False, got {self.use_variant!r}.")
        if self.use_variant and self.scope != "row":
            raise ValueError("use_variant picks per-row thresholds; it cannot be combined with scope='layer'.")


@dataclass
class GradientOptions:
    """The gradient term's weight and how per-sequence gradients accumulate (methods with `needs_gradients`)."""

    # The method's default when left out (`default_alpha`); stored resolved, so a recipe never depends on our defaults.
    default_alpha: ClassVar[float | str] = 100.0

    alpha: float | str | None = setting(
        None,
        "weight of the gradient term: a number >= 0 (0 = Wanda) or 'auto' (per-layer scale match); default: the "
        "method's (gblm: the paper's 100; gblm_obs: auto)",
        parse=parse_alpha, shared_by=GRADIENT_METHODS,
    )
    gradient_norm: str = setting(
        "l1", "accumulation of per-sequence gradients: l1 (the paper) or l2", choices=GRADIENT_NORMS,
        shared_by=GRADIENT_METHODS,
    )
    gradient_loss: str = setting(
        "model",
        "what the gradients are of, and how they are taken: 'model', the causal-LM loss, one backward through the "
        "whole model before the layer pass (the GBLM paper's; memory of a training step, cached on disk); "
        "'model_by_block', the same loss's gradients (equal up to rounding) taken one block at a time before the layer "
        "pass: one forward keeps every block's inputs, then each block from the last down is recomputed and "
        "back-propagated from the loss's gradient at its output, its norms written to a scratch folder in the cache "
        "folder (memory of one block plus one hidden state per block and gradient sequence, for offloaded models too; "
        "the backward's compute plus one forward; not cached); 'block', each decoder block's output norm, "
        "back-propagated through that block only in its turn (Wanda++'s regional gradients; memory of one block)",
        choices=GRADIENT_LOSSES, shared_by=GRADIENT_METHODS, absent="model",  # recipes before it took the model loss's
    )
    gradient_samples: int | None = setting(
        None,
        "take the gradients on the first n calibration sequences only (default: all of them). The gradient stage's "
        "time grows with n, the layer pass still sees every sequence; the norms are rescaled to all sequences, so a "
        "fixed alpha keeps its weight",
        type=int, shared_by=GRADIENT_METHODS, absent=None,
    )

    def __post_init__(self) -> None:
        self.check_gradient_term()

    def check_gradient_term(self) -> None:
        if not isinstance(self.gradient_norm, str) or self.gradient_norm not in GRADIENT_NORMS:
            raise ValueError(f"gradient_norm must be one of {GRADIENT_NORMS}, got {self.gradient_norm!r}.")
        if not isinstance(self.gradient_loss, str) or self.gradient_loss not in GRADIENT_LOSSES:
            raise ValueError(f"gradient_loss must be one of {GRADIENT_LOSSES}, got {self.gradient_loss!r}.")
        if self.gradient_samples is not None and (
            isinstance(self.gradient_samples, bool) or not isinstance(self.gradient_samples, int) or self.gradient_samples < 1
        ):
            raise ValueError(
                f"gradient_samples must be a whole number >= 1 (calibration sequences), got {self.gradient_samples!r}; "
                f"leave it out to take the gradients on every sequence."
            )
        if self.alpha is None:
            self.alpha = self.default_alpha
        if self.alpha == "auto":
            return
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(
                f"alpha must be a finite number >= 0 (0 is Wanda) or 'auto', got {self.alpha!r}; leave it out for the "
                f"method's default ({self.default_alpha})."
            )
        self.alpha = float(self.alpha)


@dataclass
class GradientScoreOptions(GradientOptions, ScoreOptions):
    """A score method with a gradient term (gblm, gradient, gblm_inverse)."""

    def __post_init__(self) -> None:
        self.check_mask_choice()
        self.check_gradient_term()


class PruningMethod:
    """One pruning method. The engine calls, for every targeted layer in block order, `new_stats` (when
    `needs_activations`), feeds the stats the layer's calibration inputs, then `prune_layer`, and at the end
    `finish`.

    Class attributes:
        needs_activations: collect input statistics (one pass over the calibration data per block).
        needs_gradients: the pruner computes gradient norms first (stage 1) and passes them in.
        Options: a dataclass of the method's own settings (fields declared with `config.setting(default, help)`;
            shared ones from `ScoreOptions` / `GradientOptions`) or None; `GBLMConfig.method_options` holds its
            values and `self.options` the instance.
        help: one line for the CLI and the docs.
    """

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    needs_activations: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = False
    Options: ClassVar[type | None] = None

    def __init__(self, config: GBLMConfig, gradient_norms: Mapping[str, torch.Tensor] | None = None):
        self.config = config
        self.options = config.method_settings()
        self.gradient_norms = gradient_norms
        self.block_gradient_seconds = 0.0
        # Values chosen per layer, by setting name ({"alpha": {layer: value}}): saved in the record.
        self.layer_settings: dict[str, dict[str, float]] = {}

    @classmethod
    def check_config(cls, config: GBLMConfig) -> None:
        """Refuse, with the fix, a recipe this method cannot run (called by `GBLMConfig.validate`)."""

    @classmethod
    def gradients_needed(cls, config: GBLMConfig) -> bool:
        """Whether this recipe needs the gradient stage (a method whose options pick a score may not)."""
        return cls.needs_gradients

    @classmethod
    def gradient_norm(cls, config: GBLMConfig) -> str:
        """How the gradient stage accumulates per-sequence gradients for this recipe (part of the cache key)."""
        return config.method_options.get("gradient_norm", "l1")

    @classmethod
    def gradient_loss(cls, config: GBLMConfig) -> str | None:
        """Where this recipe's gradients come from: "model" (the pruner's gradient stage, before the layer pass),
        "block" (each block's turn, `measure_block_gradients`), or None (no gradients needed)."""
        if not cls.gradients_needed(config):
            return None
        return config.method_options.get("gradient_loss", "model")

    @classmethod
    def gradient_samples(cls, config: GBLMConfig, num_sequences: int) -> int:
        """How many of the `num_sequences` calibration sequences the gradients are taken on (the first ones)."""
        wanted = config.method_options.get("gradient_samples") if cls.gradients_needed(config) else None
        if wanted is None:
            return num_sequences
        if wanted > num_sequences:
            raise ValueError(
                f"gradient_samples={wanted} asks for more calibration sequences than there are ({num_sequences}): lower "
                f"gradient_samples (--gradient-samples), raise num_samples, or leave gradient_samples out to use them all."
            )
        return wanted

    @property
    def needs_block_gradients(self) -> bool:
        return self.gradient_loss(self.config) in LAYER_PASS_GRADIENTS

    def measure_block_gradients(self, block: nn.Module, layers: Modules, inputs: Any) -> None:
        """gradient_loss="block": this block's gradient norms, which replace the previous block's (memory stays one
        block's); the seconds are added to `block_gradient_seconds`."""
        tick = time.perf_counter()
        total, norm = inputs.hidden.shape[0], self.gradient_norm(self.config)
        self.gradient_norms = block_gradient_norms(block, layers, inputs, norm, self.gradient_samples(self.config, total))
        self.block_gradient_seconds += time.perf_counter() - tick

    def weighted_gradient(self, name: str, gradient: torch.Tensor, input_sq_mean: torch.Tensor | None) -> torch.Tensor:
        """alpha * G for one layer; alpha="auto" is resolved from this layer's statistics (`scores.auto_alpha`) and
        recorded in `layer_settings`."""
        alpha = self.options.alpha
        if alpha == "auto":
            alpha = auto_alpha(input_sq_mean, gradient)
            self.layer_settings.setdefault("alpha", {})[name] = alpha
        return gradient * alpha

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


def check_blocksize(config: GBLMConfig, blocksize: int) -> None:
    """OBS sweeps select masks inside column blocks: a block must hold whole N:M groups."""
    nm = config.nm
    if nm is not None and blocksize % nm[1]:
        raise ValueError(
            f"{config.method} blocksize {blocksize} must be a multiple of M={nm[1]} for pattern {config.pattern!r}: "
            f"set method_options={{'blocksize': {nm[1] * max(1, 128 // nm[1])}}} "
            f"({option_flag(config.method, 'blocksize')})."
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
