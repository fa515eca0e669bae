"""Methods that mask the lowest-scoring weights and leave the rest untouched: one per registered score
(`optimum_gblm.scores`: magnitude, wanda, gblm, gradient, gblm_inverse)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..config import GBLMConfig
from ..masks import select_mask
from ..registry import register_method
from ..scores import SCORES, ScoreSpec
from ..structure import as_matrix, weight_matrix
from .base import LAYER_PASS_GRADIENTS, GradientScoreOptions, PruningMethod, ScoreOptions


class ScoreMethod(PruningMethod):
    """Keep-mask from `score(weight, activation statistic, alpha * gradient norms)` under the config's pattern."""

    score: ClassVar[ScoreSpec]

    @classmethod
    def check_config(cls, config: GBLMConfig) -> None:
        options = config.method_options
        if options.get("gradient_loss") in LAYER_PASS_GRADIENTS and not cls.needs_activations:
            raise ValueError(
                f"method {cls.name!r} visits no calibration activations, so it has no layer pass to take "
                f"gradient_loss={options['gradient_loss']!r} gradients in: use gradient_loss='model' (--gradient-loss "
                f"model) or a method such as gblm."
            )
        if config.nm is not None:
            if options["use_variant"]:
                raise ValueError("use_variant (Wanda's variant) only applies to pattern='unstructured'.")
            if options["scope"] != "row":
                raise ValueError("scope='layer' only applies to pattern='unstructured'; N:M masks are per row.")

    def importance(self, name: str, module: nn.Module, stats: Any) -> torch.Tensor:
        weight = weight_matrix(module)
        input_sq_mean = stats.sq_mean if stats is not None else None
        gradient = None
        if self.score.needs_gradients:
            gradient = as_matrix(module, self.gradient_norms[name]).to(weight.device)
            # alpha only matters where the gradient term is weighed against the activation term.
            if self.score.needs_activations:
                gradient = self.weighted_gradient(name, gradient, input_sq_mean)
        return self.score.fn(weight, input_sq_mean, gradient)

    @torch.no_grad()
    def prune_layer(self, name: str, module: nn.Module, stats: Any, sparsity: float) -> torch.Tensor:
        scores = self.importance(name, module, stats)
        return select_mask(scores, sparsity, self.config.sparsity_pattern, self.options.scope, self.options.use_variant)


def _score_method(spec: ScoreSpec) -> type[ScoreMethod]:
    doc = (spec.fn.__doc__ or "").strip().splitlines()
    attributes = {
        "score": spec,
        "needs_activations": spec.needs_activations,
        "needs_gradients": spec.needs_gradients,
        "Options": GradientScoreOptions if spec.needs_gradients else ScoreOptions,
        "help": doc[0] if doc else f"mask by the {spec.name} score",
        "__doc__": f"Prune by the {spec.name!r} score.",
        "__module__": __name__,
    }
    return type(f"{spec.name.title().replace('_', '')}Method", (ScoreMethod,), attributes)


for _spec in SCORES.values():
    register_method(_spec.name)(_score_method(_spec))
