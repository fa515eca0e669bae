"""Importance scores: pure functions of (weight, activation statistic, gradient norms). Higher = keep.

Every score takes
    weight:         (d_out, d_in) tensor
    input_sq_mean:  (d_in,) Wanda's activation statistic a_j = (1/N) sum_{n,t} x_{ntj}^2, or None
    gradient_norms: (d_out, d_in) accumulated G, already multiplied by alpha, or None
and returns a float32 (d_out, d_in) tensor. A new score is one function plus its `@register_score` line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ScoreFn = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class ScoreSpec:
    name: str
    fn: ScoreFn
    needs_activations: bool
    needs_gradients: bool


SCORES: dict[str, ScoreSpec] = {}


def register_score(name: str, *, needs_activations: bool, needs_gradients: bool) -> Callable[[ScoreFn], ScoreFn]:
    """Register a score; `optimum_gblm.methods.score` makes every registered score a pruning method of that name."""

    def decorator(fn: ScoreFn) -> ScoreFn:
        if name in SCORES:
            raise ValueError(f"a score named {name!r} is already registered")
        SCORES[name] = ScoreSpec(name, fn, needs_activations, needs_gradients)
        return fn

    return decorator


def _activation_norms(input_sq_mean: torch.Tensor) -> torch.Tensor:
    # sqrt(a_j) = ||X_j|| / sqrt(N): the 1/sqrt(N) sets the balance against the gradient term, keep it.
    return input_sq_mean.float().sqrt().unsqueeze(0)


@register_score("magnitude", needs_activations=False, needs_gradients=False)
def magnitude_score(weight, input_sq_mean=None, gradient_norms=None):
    """|W|: no calibration data needed"""
    return weight.float().abs()


@register_score("wanda", needs_activations=True, needs_gradients=False)
def wanda_score(weight, input_sq_mean, gradient_norms=None):
    """Wanda: |W| ||X|| / sqrt(N)"""
    return weight.float().abs() * _activation_norms(input_sq_mean)


@register_score("gblm", needs_activations=True, needs_gradients=True)
def gblm_score(weight, input_sq_mean, gradient_norms):
    """GBLM: |W| (||X|| / sqrt(N) + alpha G), G from the gradient stage"""
    # |W| * sqrt(a) + |W| * alpha G: the reference form; the caller has multiplied G by alpha.
    return weight.float().abs() * (_activation_norms(input_sq_mean) + gradient_norms.float())


@register_score("gradient", needs_activations=False, needs_gradients=True)
def gradient_score(weight, input_sq_mean, gradient_norms):
    """|W| G: the gradient term alone"""
    return weight.float().abs() * gradient_norms.float()


@register_score("gblm_inverse", needs_activations=True, needs_gradients=True)
def gblm_inverse_score(weight, input_sq_mean, gradient_norms):
    """|W| ||X|| / sqrt(N) / G: the reference's inverse variant"""
    return weight.float().abs() * _activation_norms(input_sq_mean) / (gradient_norms.float() + 1e-8)


def auto_alpha(input_sq_mean: torch.Tensor, gradient_norms: torch.Tensor) -> float:
    """alpha="auto" for one layer: median_j sqrt(a_j) / median_ij G_ij, so that alpha G has the activation term's
    typical size and neither term decides alone.

    Medians rather than means: both terms are heavy-tailed (outlier features, a few large gradients) and the rule
    should balance the bulk of weights that pruning chooses among. A zero median (mostly-dead inputs or gradients)
    falls back to the mean. When G is all zero alpha is 0, and GBLM is exactly Wanda.
    """
    activation = _typical(input_sq_mean.float().sqrt())
    gradient = _typical(gradient_norms.float())
    return 0.0 if gradient == 0.0 else activation / gradient


def _typical(values: torch.Tensor) -> float:
    median = float(values.median())  # torch's median is the lower middle value: no averaging, deterministic
    return median if median > 0 else float(values.mean())


def get_score(name: str) -> ScoreSpec:
    try:
        return SCORES[name]
    except KeyError:
        raise ValueError(f"unknown score {name!r}: choose one of {sorted(SCORES)}.") from None
