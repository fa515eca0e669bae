"""OBS pruning on a regularised Hessian: choose the mask (from a score, or jointly as SparseGPT does), then update.

Notation. A linear layer y = x W^T with W of shape (d_out, d_in); N calibration sequences X_n (T x d_in);
H = (2/N) sum_n X_n^T X_n. The layer's output error of a weight change D is (1/N) sum_n ||X_n D^T||^2 =
trace(D H D^T) / 2, so everything below is measured in trace(D H D^T).

Regularised Hessian. H_mu = H + mu Diag(H) + eps mean(diag H) I. Writing H = S C S with S = Diag(H)^(1/2) and C the
input correlation matrix (unit diagonal), H + mu Diag(H) = (1 + mu) S (C / (1 + mu) + (1 - 1 / (1 + mu)) I) S: the
correlations are shrunk towards 0 by the factor 1 / (1 + mu) (Ledoit-Wolf style) while every input keeps its own
scale. The update below does not change when H is scaled, so only that shrinkage matters. The eps term is
SparseGPT's absolute damping; it pulls towards magnitude pruning, so keep it small and use mu to regularise.

Update (OBS column sweep). U = upper Cholesky factor of H_mu^-1 (H_mu^-1 = U^T U). Columns j = 0 .. d_in - 1 in order:
q_j = w_j with the pruned entries zeroed, err_j = (w_j - q_j) / U_jj, W[:, j:] -= err_j U[j, j:]. Because U_jk / U_jj
is the OBS compensation of column j by a later column k under H_mu restricted to columns >= j, each step removes
column j's pruned weights at the least output error, using only columns not yet fixed. Columns go in blocks of
`blocksize` (errors are sent to later blocks once per block: same result, matrix products instead of rank-1 updates).
mu = 0 is SparseGPT's update (the least-squares fit of the calibration outputs); mu -> inf makes H_mu^-1 diagonal,
so U_jk / U_jj -> 0: no compensation, W * M, the score method's own weights.

Joint selection (keep_mask=None) is SparseGPT's: per block, unstructured masks prune the lowest saliency
w^2 / U_jj^2 (= twice the OBS increase of the output error) over rows x block; N:M masks the n lowest per row in each
group of m, on the already-updated weights. An optional saliency_bonus (same units, e.g. |W| * alpha * G from
gradient norms) is added, or an optional saliency_scale multiplies it (e.g. (1 + alpha G / sqrt(a))^2, which keeps
the OBS scale of each weight), so weights with a large gradient term are kept.

Choosing mu (cross_validated_mu). H is a sum over sequences, so with K folds of calibration sequences H = sum_k H_k.
For fold k, update with H - H_k (regularised by mu) and measure the held-out error e_k(mu) = trace(D H_k D^T),
D = W - W_updated: exactly the output error on the fold's sequences, from the Hessians alone (no activations kept,
no layer re-run). The rule: mu* = argmin_mu mean_k e_k(mu), ties (within a relative `tolerance`) going to the larger mu,
which stays closer to the dense subnetwork. Why: mu = 0 minimises the in-sample error by construction, so in-sample
error cannot choose mu; the held-out error measures what the update gains or loses on sequences it did not fit.
It measures generalisation within the calibration distribution (sample noise, too few tokens for d_in); folds that
are different sources (leave-one-domain-out) make it measure a domain shift instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .config import option_flag

Tensor = torch.Tensor


def _damping_fix(method: str) -> str:
    """The fix for a Hessian that damping did not make positive definite, naming `method`'s own flag."""
    return f"a larger damping ({option_flag(method, 'damping')} 0.1, or method_options={{'damping': 0.1}})"


def regularised_hessian(
    hessian: Tensor, mu: float = 0.0, eps: float = 0.01, overwrite: bool = False
) -> tuple[Tensor, Tensor]:
    """(H_mu, dead): dead inputs (H_jj = 0; `dead` is bool (..., d_in)) get H_jj = 1, then
    H_mu = H + mu Diag(H) + eps mean(diag H) I.

    Accepts a batch (..., d_in, d_in); mean(diag H) is per matrix and taken after the dead inputs are set to 1
    (as SparseGPT does). mu must be finite: mu = inf means no update, which needs no Hessian. overwrite=True
    regularises a contiguous fp32 `hessian` in place (the caller's scratch copy) instead of a clone.
    """
    if not math.isfinite(mu) or mu < 0:
        raise ValueError(f"mu must be finite and >= 0 (mu = inf means no update: obs_prune(update=False)); got {mu}")
    H = hessian.detach()
    if not (overwrite and H.dtype == torch.float32 and H.is_contiguous()):
        H = H.float().clone(memory_format=torch.contiguous_format)
    diagonal = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diagonal == 0
    diagonal[dead] = 1
    mean = diagonal.mean() if H.dim() == 2 else diagonal.mean(-1, keepdim=True)
    shift = eps * mean
    if mu:
        diagonal.add_(mu * diagonal + shift)
    else:
        diagonal.add_(shift)  # bit for bit SparseGPT's H + eps mean(diag H) I
    return H, dead


def inverse_hessian_factor(hessian: Tensor, name: str = "layer", method: str = "sparsegpt") -> Tensor:
    """U, the upper Cholesky factor of H^-1 (H^-1 = U^T U), of an already regularised H (batches allowed).

    Raises FloatingPointError naming the layer when H is not positive definite: more damping (`method`'s damping
    option) or data is the fix.
    """
    try:
        lower = torch.linalg.cholesky(hessian)
        inverse = torch.cholesky_inverse(lower)
        del lower  # d_in x d_in each: three alive at once, not four
        return torch.linalg.cholesky(inverse, upper=True)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise FloatingPointError(
            f"OBS/SparseGPT: the Hessian of {name} is not positive definite after damping; use {_damping_fix(method)}, "
            f"a larger mu, or more calibration data."
        ) from None


def _sweep(
    W: Tensor,
    U: Tensor,
    blocksize: int,
    keep_mask: Tensor | None = None,
    sparsity: float = 0.0,
    nm: tuple[int, int] | None = None,
    saliency_bonus: Tensor | None = None,
    update: bool = True,
    saliency_scale: Tensor | None = None,
) -> Tensor:
    """The OBS column sweep in place on W (..., d_out, d_in) with U (..., d_in, d_in); returns the pruned mask.

    keep_mask fixes the mask (batches allowed); otherwise the mask is chosen per block (2-D only). With the same
    inputs the joint path performs SparseGPT's operations in SparseGPT's order, hence the same bits.
    """
    columns = W.shape[-1]
    joint = keep_mask is None
    pruned = torch.zeros_like(W, dtype=torch.bool) if joint else ~keep_mask
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        W1 = W[..., start:end].clone(memory_format=torch.contiguous_format)
        U1 = U[..., start:end, start:end]
        errors = torch.zeros_like(W1)
        diagonal = torch.diagonal(U1, dim1=-2, dim2=-1)
        if joint:
            pruned1 = torch.zeros_like(W1, dtype=torch.bool)
            if nm is None:
                saliency = W1**2 / diagonal.unsqueeze(0) ** 2
                if saliency_scale is not None:
                    saliency = saliency * saliency_scale[:, start:end]
                if saliency_bonus is not None:
                    saliency = saliency + saliency_bonus[:, start:end]
                saliency = saliency.reshape(-1)
                count = int(saliency.numel() * sparsity)
                order = torch.sort(saliency, stable=True).indices[:count]
                pruned1.view(-1)[order] = True
        else:
            pruned1 = pruned[..., start:end]
        for i in range(end - start):
            if joint and nm is not None and i % nm[1] == 0:
                group = W1[:, i : i + nm[1]] ** 2 / diagonal[i : i + nm[1]].unsqueeze(0) ** 2
                if saliency_scale is not None:
                    group = group * saliency_scale[:, start + i : start + i + nm[1]]
                if saliency_bonus is not None:
                    group = group + saliency_bonus[:, start + i : start + i + nm[1]]
                lowest = torch.sort(group, dim=1, stable=True).indices[:, : nm[0]]
                pruned1.scatter_(1, i + lowest, True)
            w = W1[..., i]
            q = w.masked_fill(pruned1[..., i], 0)
            pivot = U1[i, i] if U1.dim() == 2 else U1[..., i, i].unsqueeze(-1)
            error = (w - q) / pivot
            if update:
                W1[..., i:] -= error.unsqueeze(-1) @ U1[..., i, i:].unsqueeze(-2)
            W1[..., i] = q
            errors[..., i] = error
        W[..., start:end] = W1
        if joint:
            pruned[:, start:end] = pruned1
        if update:
            W[..., end:] -= errors @ U[..., start:end, end:]
    return pruned


@torch.no_grad()
def obs_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    damping: float = 0.01,
    mu: float = 0.0,
    keep_mask: Tensor | None = None,
    saliency_bonus: Tensor | None = None,
    name: str = "layer",
    update: bool = True,
    saliency_scale: Tensor | None = None,
    refit_steps: int = 0,
    method: str = "sparsegpt",
    overwrite_hessian: bool = False,
) -> tuple[Tensor, Tensor]:
    """(updated weight fp32 (d_out, d_in), keep-mask): prune and compensate with the OBS sweep on H_mu.

    keep_mask=None: the mask is chosen jointly with the update as SparseGPT does (`sparsity`, or N:M when `nm`), by
    w^2 / U_jj^2 + saliency_bonus; with mu=0 and no bonus this is SparseGPT exactly. keep_mask given: that mask, no
    re-selection, only the update (`sparsity`, `nm`, `saliency_bonus` are then unused). `damping` is eps. Dead
    inputs (H_jj = 0) get a zero column as in SparseGPT. update=False or mu=inf with a keep_mask returns exactly
    weight * keep_mask (dead columns untouched: the score method's weights); with update=False and no keep_mask the
    mask is chosen by the saliency of the un-updated weights. refit_steps > 0 then fits the kept weights on the mask
    under H_mu (`refit_kept_weights`, CG started from the sweep's); 0 leaves the sweep's (SparseGPT's) weights.
    `method` names the method whose damping option the errors' fix names. overwrite_hessian=True lets H_mu be formed
    in `hessian` itself (a scratch copy the caller no longer needs), saving one d_in x d_in matrix.
    """
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    if keep_mask is not None:
        keep_mask = keep_mask.to(device=W.device, dtype=torch.bool)
        if keep_mask.shape != W.shape:
            raise ValueError(f"keep_mask of {name} has shape {tuple(keep_mask.shape)}, the weight {tuple(W.shape)}")
    if math.isinf(mu):
        if keep_mask is None:
            raise ValueError("mu=inf is no update and so has no OBS saliency: give a keep_mask (from a score)")
        update = False
    if not update and keep_mask is not None:
        return W.masked_fill(~keep_mask, 0), keep_mask.clone()
    if keep_mask is None and nm is not None and W.shape[1] % nm[1]:
        raise ValueError(f"{nm[0]}:{nm[1]} needs d_in divisible by {nm[1]}; {name} has {W.shape[1]}")
    if saliency_bonus is not None:
        saliency_bonus = saliency_bonus.to(device=W.device, dtype=torch.float32)
    if saliency_scale is not None:
        saliency_scale = saliency_scale.to(device=W.device, dtype=torch.float32)
    H, dead = regularised_hessian(hessian, mu, damping, overwrite=overwrite_hessian)
    W[:, dead] = 0
    target = W.clone() if update and refit_steps else None
    U = inverse_hessian_factor(H, name, method)
    pruned = _sweep(W, U, blocksize, keep_mask, sparsity, nm, saliency_bonus, update, saliency_scale)
    del U  # the refit needs H only
    if target is not None:
        W = refit_kept_weights(target, W, ~pruned, H, refit_steps)
    if not torch.isfinite(W).all():
        raise FloatingPointError(
            f"OBS/SparseGPT produced NaN/inf weights for {name}; use {_damping_fix(method)} or float32 weights."
        )
    return W, ~pruned


@torch.no_grad()
def refit_kept_weights(
    target: Tensor, weight: Tensor, keep_mask: Tensor, hessian: Tensor, steps: int, rows_per_chunk: int = 4096
) -> Tensor:
    """The kept weights fitted on their mask: `steps` Jacobi-preconditioned conjugate-gradient steps per row towards
    argmin trace((target - X) H (target - X)^T) over X zero off keep_mask, started from `weight` (the sweep's).

    The sweep fixes each column once, compensating only with later columns, so its kept weights are a greedy
    approximation of this least-squares fit; CG on the mask's subspace (a linear space per row) lowers the objective
    at every step and, in exact arithmetic, reaches the fit in at most d_in steps; how many it needs depends on how
    well-conditioned H is (a regularised H_mu converges in a few, mu = 0 with correlated inputs may need tens).
    H is the already regularised Hessian (H_mu): with mu -> inf it is diagonal and the fit is target * mask, the score
    method's weights. One step costs one (rows, d_in) x (d_in, d_in) product. Rows are independent (each has its own
    step sizes; they go in chunks of `rows_per_chunk` to bound memory); a row whose residual is 0 stays put.
    Batches (..., d_out, d_in) with H (..., d_in, d_in) are allowed. Returns fp32.
    """
    tiny = torch.finfo(torch.float32).tiny
    hessian = hessian.float()
    inverse_diagonal = (1 / torch.diagonal(hessian, dim1=-2, dim2=-1).clamp_min(tiny)).unsqueeze(-2)
    fitted = weight.float().masked_fill(~keep_mask, 0)
    for start in range(0, fitted.shape[-2], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        X = fitted[..., rows, :]  # a view: updated in place
        pruned = ~keep_mask[..., rows, :]
        residual = ((target[..., rows, :].float() - X) @ hessian).masked_fill_(pruned, 0)  # -gradient / 2, on the mask
        direction = residual * inverse_diagonal
        residual_dot = (residual * direction).sum(-1, keepdim=True)
        for _ in range(steps):
            product = (direction @ hessian).masked_fill_(pruned, 0)
            curvature = (direction * product).sum(-1, keepdim=True)
            step = torch.where(curvature > 0, residual_dot / curvature.clamp_min(tiny), 0)
            X.add_(step * direction)
            residual.sub_(step * product)
            preconditioned = residual * inverse_diagonal
            new_dot = (residual * preconditioned).sum(-1, keepdim=True)
            beta = torch.where(residual_dot > 0, new_dot / residual_dot.clamp_min(tiny), 0)
            direction = preconditioned.add_(beta * direction)
            residual_dot = new_dot
    return fitted


def sparsegpt_prune(
    weight: Tensor, hessian: Tensor, sparsity: float, nm: tuple[int, int] | None = None,
    blocksize: int = 128, damping: float = 0.01, name: str = "layer", refit_steps: int = 0, method: str = "sparsegpt",
) -> tuple[Tensor, Tensor]:
    """SparseGPT: obs_prune with mu=0 and the mask chosen jointly; (pruned and updated W fp32, keep-mask).
    refit_steps > 0 then moves the kept weights towards the least-squares fit on SparseGPT's mask (CG steps)."""
    return obs_prune(weight, hessian, sparsity, nm, blocksize, damping, name=name, refit_steps=refit_steps, method=method)


@torch.no_grad()
def cross_validated_mu(
    per_fold_hessians: Sequence[Tensor] | Tensor,
    weight: Tensor,
    keep_mask: Tensor,
    candidates: Sequence[float] = (0, 0.01, 0.03, 0.1, 0.3, 1, 3, 10),
    damping: float = 0.01,
    include_no_update: bool = False,
    blocksize: int = 128,
    tolerance: float = 1e-6,
    name: str = "layer",
    refit_steps: int = 0,
) -> tuple[float, dict[float, Tensor]]:
    """(mu*, {mu: held-out errors per fold (K,)}): the mu whose fixed-mask update best predicts held-out sequences.

    per_fold_hessians: K >= 2 Hessians H_k = (2/N) sum_{n in fold k} X_n^T X_n (one N for all folds, so that
    sum_k H_k = H). For each mu and fold: W_k = obs_prune(weight, H - H_k, mu, keep_mask) and
    e_k = trace((W - W_k) H_k (W - W_k)^T). mu* = the largest mu whose mean error is within `tolerance` (relative)
    of the smallest. include_no_update adds mu = inf (W * M, the score method's weights). A candidate whose Hessian
    is not positive definite gets error inf. refit_steps scores the update the method will use: the sweep followed by
    that many refit steps (`refit_kept_weights`), which fits the training folds harder than the sweep alone.

    Cost per finite candidate: one batched factorisation of the K training Hessians (K x (Cholesky, inverse,
    Cholesky), ~4/3 d_in^3 flops each), K sweeps (~d_out d_in^2) and K traces (~d_out d_in^2): about 2K times one
    obs_prune. Reused across candidates: sum_k H_k, the K training Hessians, W; mu = inf costs K traces only.
    The folds run as one batch, so memory is ~K copies of W and ~3K of H.
    """
    H_folds = torch.stack([h.detach().float() for h in per_fold_hessians])
    K = H_folds.shape[0]
    if K < 2:
        raise ValueError("cross_validated_mu needs at least 2 folds")
    W = weight.detach().float().to(H_folds.device)
    keep_mask = keep_mask.to(device=W.device, dtype=torch.bool)
    H_train = H_folds.sum(0, keepdim=True) - H_folds  # fold k trains on the other folds

    def held_out_errors(updated: Tensor) -> Tensor:
        D = W - updated  # (K, d_out, d_in) or (d_out, d_in)
        return ((D @ H_folds) * D).sum(dim=(-2, -1))

    mus = [float(mu) for mu in candidates] + ([math.inf] if include_no_update else [])
    errors: dict[float, Tensor] = {}
    for mu in mus:
        if math.isinf(mu):
            errors[mu] = held_out_errors(W.masked_fill(~keep_mask, 0))
            continue
        H, dead = regularised_hessian(H_train, mu, damping)
        try:
            U = inverse_hessian_factor(H, name)
        except FloatingPointError:
            errors[mu] = torch.full((K,), math.inf, device=W.device)
            continue
        target = W.expand(K, *W.shape).masked_fill(dead.unsqueeze(-2), 0)  # dead inputs zeroed, as obs_prune does
        updated = target.clone()
        _sweep(updated, U, blocksize, keep_mask)
        if refit_steps:
            updated = refit_kept_weights(target, updated, keep_mask, H, refit_steps)
        fold_errors = held_out_errors(updated)
        errors[mu] = torch.where(torch.isfinite(fold_errors), fold_errors, math.inf)
    means = {mu: e.mean().item() for mu, e in errors.items()}
    best = min(means.values())
    if not math.isfinite(best):
        raise FloatingPointError(f"cross_validated_mu: no candidate mu gives a finite error for {name}")
    chosen = max(mu for mu, m in means.items() if m <= best * (1 + tolerance))
    return chosen, errors
