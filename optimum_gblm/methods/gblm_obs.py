"""GBLM-OBS: the OBS sweep on a regularised Hessian, the mask chosen with the update and the gradients (the default),
or taken from a score (GBLM, Wanda, ...) and only updated.

SparseGPT's update fits the calibration outputs as well as the mask allows (least squares on H): far better than a
plain mask on text like the calibration data, worse on text far from it. Masking alone (Wanda, GBLM) keeps a
subnetwork of the dense model, robust but less accurate. This method slides between the two with one number: the
OBS column sweep runs on H_mu = H + mu Diag(H) + eps mean(diag H) I, where mu = 0 is SparseGPT's Hessian and
mu -> inf no update at all (`optimum_gblm.obs` has the maths). mu is relative to each input's own H_jj, so one value
means the same shrinkage towards the diagonal in every layer: H_mu / (1 + mu) moves H a share mu / (1 + mu) of the way
to Diag(H) (mu = 1: half way).

selection="joint" (the default) chooses the mask with the update, as SparseGPT does, on H_mu, with the gradient
term in the OBS saliency: gradient_form="scale" (the default) multiplies it by (1 + alpha G / sqrt(a))^2, so with a
diagonal H it ranks weights as the GBLM score does (as SparseGPT's ranks them as Wanda's) while with correlated
inputs each weight keeps its OBS scale w^2 / [H_mu^-1]_jj; "bonus" adds 2 W^2 (2 sqrt(a) alpha G + (alpha G)^2), in
diagonal units, which where inputs are correlated (1 / [H_mu^-1]_jj far below H_jj) swamps the OBS term.
selection="score" takes the score's mask and only updates it.

After the sweep, refit_steps (10 by default) conjugate-gradient steps fit the kept weights on the mask under
H_mu (`obs.refit_kept_weights`): the sweep fixes each column once and compensates only with later columns, a greedy
approximation of that fit. Cost: ~10 matrix products per layer.

mu="auto" chooses mu per layer from the calibration data alone: the calibration sequences are dealt into K folds
(sequence n -> fold n mod K), and for each candidate mu the update fitted on K-1 folds is scored by its output error
on the held-out fold, computed from the fold Hessians alone (`obs.cross_validated_mu`; ties go to the larger mu). It
sees over-fitting to the calibration distribution only, not a shift to other text. To bound its cost it uses a
seeded sample of `cv_rows` output rows.

update_mu, when set, re-fits the kept weights on the chosen mask with that mu instead (attribution: the joint mask
with SparseGPT's update is update_mu=0).

mask_only_modules names layers that keep the score's mask with no update at all (mu -> inf for those layers only);
score_mask_modules layers that take the score's mask and update it (selection="score" for those layers only). At
1.5B, pruning the last blocks alone, the mask chosen with the update loses text far from the calibration text
(handbook ppl +42%), the score's mask alone less (+21%) and the score's mask with the update least (+20%), which
also keeps the calibration-like text best (docs/scaling.md).

How the defaults (mu 0.5, the scale form, the refit) were chosen, and what each choice measured:
docs/methods.md#gblm_obs and docs/results.md#gblm_obs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import (
    GBLMConfig,
    check_int,
    check_number,
    module_name_list,
    option_flag,
    parse_auto_or_number,
    setting,
)
from ..masks import select_mask
from ..obs import cross_validated_mu, obs_prune
from ..registry import register_method
from ..scores import SCORES
from ..structure import as_matrix, module_matches, weight_matrix
from .base import GradientOptions, PruningMethod, check_blocksize

SELECTIONS = ("score", "joint")
GRADIENT_FORMS = ("scale", "bonus")


def listed(name: str, modules: list[str] | None) -> bool:
    """Whether layer `name` is one of `modules`, where None lists none (module_matches reads None as every module,
    which is right for refit_modules but not for the opt-in mask_only_modules / score_mask_modules)."""
    return modules is not None and module_matches(name, modules)


def _parse_mu(value: Any) -> float | str:
    return parse_auto_or_number(value, "gblm_obs mu")


@dataclass
class GBLMOBSOptions(GradientOptions):
    # every measurement of this method (docs/results.md#gblm_obs) matched the gradient term's scale per layer
    default_alpha: ClassVar[float | str] = "auto"

    score: str = setting(
        "gblm", "score that chooses the mask: gblm, wanda, magnitude, ... (selection=score, score_mask_modules, "
        "mask_only_modules, mu=auto)",
    )
    selection: str = setting(
        "joint", "'joint': mask chosen with the update on H_mu, gradient term in the saliency; 'score': the score's mask",
        choices=SELECTIONS,
    )
    mu: float | str = setting(
        0.5, "relative damping mu of H + mu Diag(H), >= 0 (0: SparseGPT's Hessian; 1: half way to the diagonal), or "
        "'auto' (cross-validated per layer on calibration folds)", parse=_parse_mu,
    )
    update_mu: float | None = setting(
        None, "re-fit the kept weights on the chosen mask with this mu (default: mu itself)", absent=None,  # added later
    )
    gradient_form: str = setting(
        "scale", "joint selection: 'bonus' adds 2 W^2 (2 sqrt(a) alpha G + (alpha G)^2) to the OBS saliency; 'scale' "
        "multiplies it by (1 + alpha G / sqrt(a))^2, keeping each weight's OBS (correlation-aware) scale",
        choices=GRADIENT_FORMS, absent="bonus",  # checkpoints written before the option existed used the bonus
    )
    refit_steps: int = setting(
        10, "after the sweep, fit the kept weights on the mask under H_mu (least squares) with this many conjugate-gradient "
        "steps (0: the sweep's weights, SparseGPT's update)", absent=0,  # checkpoints written before it did not refit
    )
    refit_modules: list[str] | None = setting(
        None, "refit only these layers (module-name suffixes such as q_proj or mlp.up_proj, or regexes over the full "
        "name; default: every pruned layer): a step costs d_out x d_in^2, so a wide-input layer such as down_proj "
        "costs most", nargs="+",
        absent=None,  # added later; before it, every layer was refitted
    )
    mask_only_modules: list[str] | None = setting(
        None, "these layers keep the score's mask alone, with no update (mu -> inf): module-name suffixes, or regexes "
        "over the full name such as model\\.layers\\.(2[1-7])\\..* for the last blocks (default: none)", nargs="+",
        absent=None,  # added later; before it, every layer was updated
    )
    score_mask_modules: list[str] | None = setting(
        None, "these layers take the score's mask and only update it (selection 'score' there), whatever selection "
        "says: module-name suffixes, or regexes over the full name (default: none; mask_only_modules wins)", nargs="+",
        absent=None,  # added later; before it, every layer selected as `selection` says
    )
    mu_candidates: list[float] = setting([0.03, 0.1, 0.3, 1.0, 3.0], "the mu values mu='auto' chooses among", nargs="+", type=float)
    folds: int = setting(3, "folds of calibration sequences for mu='auto' (K >= 2; at most num_samples)")
    cv_rows: int = setting(128, "output rows sampled per layer for mu='auto' (0 = all rows)")
    damping: float = setting(0.01, "absolute damping eps, a share of mean(diag H), as SparseGPT's")
    blocksize: int = setting(128, "columns updated together (N:M: a multiple of M)")

    def __post_init__(self) -> None:
        self.check_gradient_term()
        if not isinstance(self.score, str) or self.score not in SCORES:
            raise ValueError(f"gblm_obs score must be one of {sorted(SCORES)}, got {self.score!r}.")
        if self.gradient_form not in GRADIENT_FORMS:
            raise ValueError(f"gblm_obs gradient_form must be one of {GRADIENT_FORMS}, got {self.gradient_form!r}.")
        if self.selection not in SELECTIONS:
            raise ValueError(f"gblm_obs selection must be one of {SELECTIONS}, got {self.selection!r}.")
        self.mu = _parse_mu(self.mu)
        if not isinstance(self.mu_candidates, (list, tuple)) or not self.mu_candidates:
            raise ValueError("gblm_obs mu_candidates must be a non-empty list of numbers >= 0.")
        self.mu_candidates = [check_number("gblm_obs mu_candidates entry", m, 0.0, 1e6) for m in self.mu_candidates]
        check_int("gblm_obs folds", self.folds, 2)
        check_int("gblm_obs cv_rows", self.cv_rows, 0)
        self.damping = check_number("gblm_obs damping", self.damping, 1e-9, 1e6)
        check_int("gblm_obs blocksize", self.blocksize, 1)
        check_int("gblm_obs refit_steps", self.refit_steps, 0)
        for option in ("refit_modules", "mask_only_modules", "score_mask_modules"):
            names = module_name_list(
                getattr(self, option), f"gblm_obs {option} must be a list of module-name suffixes such as "
                f"['q_proj', 'up_proj'] or regexes", f"gblm_obs {option}",
            )
            setattr(self, option, names)
        if self.update_mu is not None:
            self.update_mu = check_number("gblm_obs update_mu", self.update_mu, 0.0, math.inf)
            if self.mu == "auto":
                raise ValueError(
                    "gblm_obs update_mu replaces the update whose mu 'auto' would choose (and record): set a number "
                    "for mu, or drop update_mu."
                )


class FoldHessians:
    """Per-fold Hessian sums: sequence n goes to fold n mod K. H = (2/N) sum_k S_k with S_k = sum_{n in k} X_n^T X_n;
    Wanda's a_j = diag(H)_j / 2 comes from the same sums, so one statistic serves the score and the update."""

    def __init__(self, d_in: int, folds: int, device: torch.device):
        self.sums = torch.zeros(folds, d_in, d_in, dtype=torch.float32, device=device)
        self.num_sequences = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        sequences = inputs if inputs.dim() == 3 else inputs.unsqueeze(0)
        for sequence in sequences:
            rows = sequence.reshape(-1, sequence.shape[-1]).float()
            self.sums[self.num_sequences % self.sums.shape[0]] += rows.t() @ rows
            self.num_sequences += 1

    def fold_hessians(self) -> torch.Tensor:
        return self.sums * (2 / max(self.num_sequences, 1))

    @property
    def hessian(self) -> torch.Tensor:
        """H, a new tensor the caller owns (at d_in = 8960 each d_in x d_in copy is 321 MB: one fold makes one)."""
        if self.sums.shape[0] == 1:
            return self.sums[0] * (2 / max(self.num_sequences, 1))
        return self.fold_hessians().sum(0)

    @property
    def sq_mean(self) -> torch.Tensor:
        # the fold sums' diagonals only: no d_in x d_in copy
        return torch.diagonal(self.sums, dim1=-2, dim2=-1).sum(0) / max(self.num_sequences, 1)


@register_method("gblm_obs")
class GBLMOBS(PruningMethod):
    help = "OBS sweep on H + mu Diag(H): mask chosen with the update and the gradient term (or from a score), then updated"
    Options = GBLMOBSOptions
    needs_gradients = True

    @classmethod
    def check_config(cls, config: GBLMConfig) -> None:
        options = config.method_options
        if options["selection"] == "joint":  # a fixed mask from a score needs neither
            check_blocksize(config, options["blocksize"])
        if options["mu"] == "auto" and options["folds"] > config.num_samples:
            raise ValueError(
                f"gblm_obs folds={options['folds']} needs at least that many calibration sequences, num_samples is "
                f"{config.num_samples}: lower folds ({option_flag(cls.name, 'folds')}) or use more data (--num-samples)."
            )

    @classmethod
    def gradients_needed(cls, config: GBLMConfig) -> bool:
        return SCORES[config.method_options["score"]].needs_gradients

    def new_stats(self, name: str, module: nn.Module) -> FoldHessians:
        folds = self.options.folds if self.options.mu == "auto" else 1
        return FoldHessians(weight_matrix(module).shape[1], folds, module.weight.device)

    def _scaled_gradients(self, name: str, module: nn.Module, stats: FoldHessians) -> torch.Tensor | None:
        score = SCORES[self.options.score]
        if not score.needs_gradients:
            return None
        gradient = as_matrix(module, self.gradient_norms[name]).to(module.weight.device).float()
        # alpha weighs the gradient term in the OBS saliency even for a score without activations
        return self.weighted_gradient(name, gradient, stats.sq_mean)

    def importance(self, name: str, module: nn.Module, stats: Any) -> torch.Tensor:
        score = SCORES[self.options.score]
        input_sq_mean = stats.sq_mean if stats is not None else None
        return score.fn(weight_matrix(module), input_sq_mean, self._scaled_gradients(name, module, stats))

    def _cv_rows(self, name: str, rows: int) -> torch.Tensor | None:
        if not self.options.cv_rows or self.options.cv_rows >= rows:
            return None
        # Seeded by the recipe and the layer: the same run always draws the same rows.
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + sum(map(ord, name)))
        return torch.randperm(rows, generator=generator)[: self.options.cv_rows].sort().values

    def refit_steps(self, name: str) -> int:
        """The refit steps of layer `name` (a full module name): refit_steps, or 0 outside refit_modules."""
        return self.options.refit_steps if module_matches(name, self.options.refit_modules) else 0

    def selection(self, name: str) -> str:
        """How layer `name` (a full module name) chooses its mask: "score" in score_mask_modules, else `selection`."""
        options = self.options
        if listed(name, options.score_mask_modules):
            return "score"
        return options.selection

    @torch.no_grad()
    def prune_layer(self, name: str, module: nn.Module, stats: Any, sparsity: float) -> torch.Tensor:
        weight = weight_matrix(module)
        options = self.options
        if listed(name, options.mask_only_modules):
            return select_mask(self.importance(name, module, stats), sparsity, self.config.sparsity_pattern)
        mu = options.mu
        refit_steps = self.refit_steps(name)
        selection = self.selection(name)
        # The score's mask is the mask itself (selection="score") or what cross-validation fits around (mu="auto");
        # joint selection at a fixed mu needs none.
        score_mask = None
        if selection == "score" or mu == "auto":
            score_mask = select_mask(self.importance(name, module, stats), sparsity, self.config.sparsity_pattern)
        if mu == "auto":
            dense = weight.float()
            rows = self._cv_rows(name, dense.shape[0])
            sample = (dense, score_mask) if rows is None else (dense[rows], score_mask[rows.to(dense.device)])
            mu, _ = cross_validated_mu(
                stats.fold_hessians(),
                *sample,
                candidates=options.mu_candidates,
                damping=options.damping,
                blocksize=options.blocksize,
                name=name,
                refit_steps=refit_steps,
            )
            self.layer_settings.setdefault("mu", {})[name] = mu
        hessian = stats.hessian  # our own copy: the last obs_prune may regularise it in place
        # with update_mu the kept weights are fitted again below: no refit of the first update, and H is used twice
        refit_again = options.update_mu is not None
        first_refit_steps = 0 if refit_again else refit_steps
        if selection == "joint":
            gradient = self._scaled_gradients(name, module, stats)
            bonus = scale = None
            if gradient is not None:
                activation = stats.sq_mean.sqrt().unsqueeze(0)
                if options.gradient_form == "scale":
                    # For a diagonal H this ranks as GBLM's score at any mu; with correlated inputs each weight keeps
                    # its OBS scale w^2 / [H_mu^-1]_jj, which an additive bonus (diagonal units) would swamp.
                    scale = (1 + gradient / activation.clamp_min(torch.finfo(torch.float32).tiny)) ** 2
                    scale = torch.where(activation > 0, scale, torch.ones_like(scale))
                else:
                    bonus = 2 * weight.float() ** 2 * (2 * activation * gradient + gradient**2)
            updated, mask = obs_prune(
                weight, hessian, sparsity, self.config.nm, options.blocksize, options.damping, mu, saliency_bonus=bonus,
                name=name, saliency_scale=scale, refit_steps=first_refit_steps, method=self.name,
                overwrite_hessian=not refit_again,
            )
        else:
            updated, mask = obs_prune(
                weight, hessian, sparsity, self.config.nm, options.blocksize, options.damping, mu, keep_mask=score_mask,
                name=name, refit_steps=first_refit_steps, method=self.name, overwrite_hessian=not refit_again,
            )
        if refit_again:
            updated, mask = obs_prune(
                weight, hessian, sparsity, self.config.nm, options.blocksize, options.damping, options.update_mu,
                keep_mask=mask, name=name, refit_steps=refit_steps, method=self.name, overwrite_hessian=True,
            )
        weight.copy_(updated.to(weight.dtype))
        return mask
