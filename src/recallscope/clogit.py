"""Conditional (McFadden) logit: which alternative of a choice set is chosen, given its features.

Data for ``C`` clusters (e.g. cards), each with ``S`` choice sets of up to ``A`` alternatives with ``F``
features: ``x [cluster, set, alt, feature]``, the chosen alternative ``chosen [cluster, set]`` and which
alternatives are available ``mask [cluster, set, alt]``. The model:

    P(chosen = a | set) = exp(x_a . beta) / sum_{b available} exp(x_b . beta)

1. **Likelihood** (:func:`clogit_loglik`): ``sum_sets x_chosen . beta - logsumexp_b x_b . beta``. Features
   constant within a set cancel (the set's own intercept is conditioned away), which is what makes the
   model "conditional": each card is its own stratum.
2. **Fit** (:func:`fit_clogit`): Newton-Raphson on the (concave) log-likelihood with step halving; the
   gradient is ``sum_sets (x_chosen - E_p x)`` and the Hessian ``-sum_sets Cov_p(x)``. A small ridge
   (``ridge * ||beta||^2 / 2``) keeps a (quasi-)separated resample finite; the standard errors are
   ``sqrt(diag(-H^-1))``.
3. **Cluster bootstrap** (:func:`bootstrap_clogit`): resample clusters with replacement
   (:func:`recallscope.stats.bootstrap_indices`) and refit (many resamples at once, each as its clusters'
   multiplicities: the same likelihood as the resampled rows); percentile CIs, and the two-sided p-value
   of ``beta_j = 0`` by inverting the percentile interval (:func:`bootstrap_p`).
4. **Rank-ordered (exploded) logit** (:func:`ranked_choice_sets`): a ranking of the alternatives by a
   score becomes ``depth`` successive choice sets (the best of all, the best of the rest, ...), each a
   conditional logit: the Plackett-Luce likelihood of the top ``depth`` places.

McFadden (1974), *Conditional logit analysis of qualitative choice behavior*; Beggs, Cardell & Hausman
(1981) for the rank-ordered logit; Efron & Tibshirani (1993) for the percentile bootstrap.
"""

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from recallscope.stats import bootstrap_indices


def _check(x: Tensor, chosen: Tensor, mask: Tensor) -> None:
    if x.ndim != 4 or chosen.shape != x.shape[:2] or mask.shape != x.shape[:3]:
        raise ValueError(f"conditional logit needs x [cluster, set, alt, feature], chosen [cluster, set] and mask "
                         f"[cluster, set, alt]; got {tuple(x.shape)}, {tuple(chosen.shape)}, {tuple(mask.shape)}")
    if not bool(mask.gather(2, chosen[..., None].clamp_min(0)).all()):
        raise ValueError("every chosen alternative must be available (mask True at chosen).")


def clogit_loglik(beta: Float[Tensor, " feature"], x: Float[Tensor, "cluster set alt feature"],
                  chosen: Int[Tensor, "cluster set"], mask: Bool[Tensor, "cluster set alt"]) -> Tensor:
    """Conditional log-likelihood (summed over every set; see the module doc)."""
    eta = torch.einsum("csaf,f->csa", x, beta).masked_fill(~mask, float("-inf"))
    return (eta.gather(2, chosen[..., None])[..., 0] - torch.logsumexp(eta, dim=2)).sum()


def _grad_hess(beta: Tensor, x: Tensor, chosen: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    eta = torch.einsum("csaf,f->csa", x, beta).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(eta, dim=2)
    p = torch.exp(eta - lse[..., None])  # [cluster, set, alt]
    mean = torch.einsum("csa,csaf->csf", p, x)
    xc = x.gather(2, chosen[..., None, None].expand(-1, -1, 1, x.shape[-1]))[:, :, 0]
    centred = x - mean[:, :, None]
    hess = -torch.einsum("csa,csaf,csag->fg", p, centred, centred)
    ll = (eta.gather(2, chosen[..., None])[..., 0] - lse).sum()
    return ll, (xc - mean).sum((0, 1)), hess


@dataclass(frozen=True)
class ClogitFit:
    """A fitted conditional logit: coefficients, model-based standard errors, log-likelihood."""

    beta: Float[Tensor, " feature"]
    se: Float[Tensor, " feature"]
    loglik: float
    n_iter: int
    converged: bool


def fit_clogit(x: Float[Tensor, "cluster set alt feature"], chosen: Int[Tensor, "cluster set"],
               mask: Bool[Tensor, "cluster set alt"] | None = None, *, ridge: float = 0.0, max_iter: int = 100,
               tol: float = 1e-9) -> ClogitFit:
    """Maximum (penalised) likelihood by Newton-Raphson with step halving (float64)."""
    x = x.double()
    mask = torch.ones(x.shape[:3], dtype=torch.bool) if mask is None else mask
    _check(x, chosen, mask)
    n_f = x.shape[-1]
    beta = torch.zeros(n_f, dtype=torch.float64)
    eye = torch.eye(n_f, dtype=torch.float64)

    def objective(b: Tensor) -> Tensor:
        return clogit_loglik(b, x, chosen, mask) - 0.5 * ridge * b.dot(b)

    converged, it = False, 0
    for it in range(1, max_iter + 1):
        ll, grad, hess = _grad_hess(beta, x, chosen, mask)
        grad, hess = grad - ridge * beta, hess - ridge * eye
        step = torch.linalg.lstsq(-hess, grad[:, None]).solution[:, 0]
        current, t = float(ll - 0.5 * ridge * beta.dot(beta)), 1.0
        while t > 1e-8 and float(objective(beta + t * step)) < current - 1e-12:
            t /= 2
        beta = beta + t * step
        if float(step.abs().max()) * t < tol or float(grad.abs().max()) < tol:
            converged = True
            break
    _, _, hess = _grad_hess(beta, x, chosen, mask)
    cov = torch.linalg.pinv(-(hess - ridge * eye))
    se = cov.diagonal().clamp_min(0).sqrt()
    return ClogitFit(beta=beta, se=se, loglik=float(clogit_loglik(beta, x, chosen, mask)), n_iter=it,
                     converged=converged)


def _weighted_objective(beta: Tensor, x: Tensor, chosen: Tensor, mask: Tensor, w: Tensor, ridge: float) -> Tensor:
    """Per draw ``b``: ``sum_c w[b, c] loglik_c(beta[b]) - ridge |beta[b]|^2 / 2``."""
    eta = torch.einsum("csaf,bf->bcsa", x, beta).masked_fill(~mask, float("-inf"))
    ll = eta.gather(3, chosen[None, ..., None].expand(beta.shape[0], -1, -1, 1))[..., 0] - torch.logsumexp(eta, 3)
    return torch.einsum("bc,bcs->b", w, ll) - 0.5 * ridge * (beta * beta).sum(1)


def _weighted_newton(x: Tensor, chosen: Tensor, mask: Tensor, w: Tensor, ridge: float, max_iter: int = 100,
                     tol: float = 1e-9) -> tuple[Tensor, Tensor]:
    """Newton-Raphson with step halving for a batch of cluster weightings ``w [draw, cluster]`` at once
    (a bootstrap resample = its clusters' multiplicities); returns ``beta [draw, F]`` and convergence."""
    n_b, n_f = w.shape[0], x.shape[-1]
    beta = torch.zeros(n_b, n_f, dtype=torch.float64)
    eye = torch.eye(n_f, dtype=torch.float64)
    done = torch.zeros(n_b, dtype=torch.bool)
    xc = x.gather(2, chosen[..., None, None].expand(-1, -1, 1, n_f))[:, :, 0]  # [C, S, F]
    n_c, n_s, n_a = x.shape[:3]
    outer = (x[..., :, None] * x[..., None, :]).reshape(n_c * n_s * n_a, n_f * n_f)  # [C*S*A, F*F]
    for _ in range(max_iter):
        eta = torch.einsum("csaf,bf->bcsa", x, beta).masked_fill(~mask, float("-inf"))
        p = torch.softmax(eta, dim=3)
        mean = torch.einsum("bcsa,csaf->bcsf", p, x)
        grad = torch.einsum("bc,bcsf->bf", w, xc[None] - mean) - ridge * beta
        wp = (w[:, :, None, None] * p).reshape(n_b, -1)  # [B, C*S*A]
        wm = (w[:, :, None, None] * mean).reshape(n_b, n_c * n_s, n_f)
        second = (wp @ outer).view(n_b, n_f, n_f) - wm.transpose(1, 2) @ mean.reshape(n_b, n_c * n_s, n_f)
        step = torch.linalg.lstsq(second + ridge * eye, grad[..., None]).solution[..., 0]
        step[done] = 0
        current = _weighted_objective(beta, x, chosen, mask, w, ridge)
        t = torch.ones(n_b, dtype=torch.float64)
        for _ in range(30):
            worse = _weighted_objective(beta + t[:, None] * step, x, chosen, mask, w, ridge) < current - 1e-12
            if not bool(worse.any()):
                break
            t = torch.where(worse, t / 2, t)
        beta = beta + t[:, None] * step
        done |= ((step * t[:, None]).abs().amax(1) < tol) | (grad.abs().amax(1) < tol)
        if bool(done.all()):
            break
    return beta, done


def bootstrap_clogit(x: Float[Tensor, "cluster set alt feature"], chosen: Int[Tensor, "cluster set"],
                     mask: Bool[Tensor, "cluster set alt"] | None = None, *, n_boot: int = 1999, seed: int = 0,
                     ridge: float = 0.0, chunk: int = 128) -> tuple[Float[Tensor, "draw feature"], int]:
    """Coefficients refitted on ``n_boot`` resamples of the clusters (:func:`recallscope.stats.bootstrap_indices`;
    each resample fitted as its clusters' multiplicities, ``chunk`` resamples at a time: the same maximum
    as :func:`fit_clogit` on the resampled rows); also the number of draws whose fit did not converge."""
    x = x.double()
    mask = torch.ones(x.shape[:3], dtype=torch.bool) if mask is None else mask
    _check(x, chosen, mask)
    idx = bootstrap_indices(x.shape[0], n_boot, seed)
    counts = torch.zeros(n_boot, x.shape[0], dtype=torch.float64).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float64))
    draws, failed = [], 0
    for start in range(0, n_boot, chunk):
        beta, ok = _weighted_newton(x, chosen, mask, counts[start:start + chunk], ridge)
        draws.append(beta)
        failed += int((~ok).sum())
    return torch.cat(draws), failed


def bootstrap_p(draws: Float[Tensor, " draw"]) -> float:
    """Two-sided p-value of "the coefficient is 0" from bootstrap draws: twice the smaller share of draws on
    either side of 0 (the level at which the percentile interval starts to contain 0), floored at
    ``2 / (n + 1)`` so that it is never 0."""
    n = draws.numel()
    below, above = int((draws <= 0).sum()), int((draws >= 0).sum())
    return min(1.0, max(2.0 * min(below, above) / n, 2.0 / (n + 1)))


def wald_p(beta: float, se: float) -> float:
    """Two-sided normal p-value of ``beta / se``."""
    if not se > 0:
        return float("nan")
    return math.erfc(abs(beta / se) / math.sqrt(2.0))


def ranked_choice_sets(score: Float[Tensor, "cluster alt"], depth: int, *, seed: int = 0
                       ) -> tuple[Int[Tensor, "cluster set"], Bool[Tensor, "cluster set alt"]]:
    """The top ``depth`` places of each cluster's ranking by ``score`` (highest first) as choice sets:
    set ``r`` offers every alternative not chosen in sets ``< r``; returns ``chosen`` and ``mask``. Ties
    are broken uniformly at random (seeded), never in favour of the first alternative."""
    n_c, n_a = score.shape
    if not 1 <= depth <= n_a - 1:
        raise ValueError(f"depth must be in 1..{n_a - 1} (alternatives - 1), got {depth}")
    if bool(torch.isnan(score).any()):
        raise ValueError("ranked_choice_sets: scores must not be NaN; drop the clusters that lack them.")
    shuffle = torch.argsort(torch.rand(n_c, n_a, generator=torch.Generator().manual_seed(seed)), dim=1)
    ranked = torch.argsort(score.gather(1, shuffle), dim=1, descending=True, stable=True)
    order = shuffle.gather(1, ranked)[:, :depth]  # [cluster, depth]
    mask = torch.ones(n_c, depth, n_a, dtype=torch.bool)
    for r in range(1, depth):
        mask[:, r] = mask[:, r - 1]
        mask[torch.arange(n_c), r, order[:, r - 1]] = False
    return order, mask
