"""Statistics of the route verdict: paired tests over prompts, selection-corrected peaks, Holm.

For a concept ``c`` and its competitor classes ``k`` (effects ``E[prompt, slot, window]`` of the
interchange intervention, nats):

1. **Class effect** per prompt and window: the strongest member of a competitor class (``max``).
2. **Margin** ``D[i, w] = E_c[i, w] - max_k class_k[i, w]``: on each prompt the concept must beat every class.
3. **Paired test** (:func:`sign_flip_max_t`): the statistic is ``max_w t(D[:, w])`` (one-sample t over prompts,
   maximised over windows, which corrects for picking the peak layer); its null flips the sign of each
   prompt's margins (all windows together), exactly (every sign pattern when ``2**n <= n_perm``) or with
   ``n_perm`` random draws: ``p = (1 + #{T* >= T}) / (1 + n_perm)``. Eight prompts give p down to 1/256.
4. **Held-out peak** (:func:`cross_fitted`): each prompt's margin (and interchange effect) is read at the
   window chosen on the *other* prompts, so the score and its CI are not inflated by the choice of layer.
5. **CI** (:func:`bootstrap_ratio`): percentile bootstrap over prompts of ``mean(x) / |mean(TE)|``.
6. **Holm** (:func:`holm`) over the candidates of one report.
"""

import itertools

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.stats import bootstrap_indices, holm  # noqa: F401  (holm: one implementation, in stats)


def t_stats(d: Float[Tensor, "... prompt window"]) -> Float[Tensor, "... window"]:
    """One-sample t statistic over prompts (``mean / (sd / sqrt(n))``; sd 0 -> a tiny floor)."""
    n = d.shape[-2]
    mean = d.mean(-2)
    sd = d.std(-2, unbiased=True) if n > 1 else torch.zeros_like(mean)
    floor = 1e-9 * (mean.abs() + 1e-9)
    return mean / (sd / n ** 0.5 + floor)


def _signs(n: int, n_perm: int, generator: torch.Generator) -> tuple[Tensor, bool]:
    if 2 ** n <= n_perm:
        return torch.tensor(list(itertools.product((1.0, -1.0), repeat=n)), dtype=torch.float64), True
    return torch.randint(0, 2, (n_perm, n), generator=generator).double() * 2 - 1, False


def sign_flip_max_t(d: Float[Tensor, "prompt window"], *, n_perm: int = 1999, seed: int = 0) -> float:
    """p-value of ``max_w t(d[:, w]) > 0`` against sign flips of whole prompts (see the module doc)."""
    d = d.double()
    keep = torch.isfinite(d).all(-1)
    d = d[keep]
    n = d.shape[0]
    if n < 2:
        return 1.0
    observed = float(t_stats(d).max())
    signs, exact = _signs(n, n_perm, torch.Generator().manual_seed(seed))
    null = t_stats(signs[:, :, None] * d[None]).amax(-1)  # [draw]
    hits = int((null >= observed - 1e-12 * abs(observed)).sum())
    return hits / len(signs) if exact else (1 + hits) / (1 + len(signs))


def cross_fitted(d: Float[Tensor, "prompt window"], *values: Float[Tensor, "prompt window"]
                 ) -> tuple[Tensor, ...]:
    """Per prompt ``i``: the window maximising ``t(d)`` over the other prompts, and ``d`` (then each of
    ``values``) read there. Returns ``(window[prompt], d_heldout[prompt], *values_heldout)``."""
    n = d.shape[0]
    chosen = []
    for i in range(n):
        rest = torch.cat([d[:i], d[i + 1:]])
        rest = rest[torch.isfinite(rest).all(-1)]
        score = t_stats(rest) if rest.shape[0] > 1 else (rest.mean(0) if len(rest) else d[i])
        chosen.append(int(torch.nan_to_num(score, nan=-float("inf")).argmax()))
    idx = torch.tensor(chosen)
    rows = torch.arange(n)
    return (idx, d[rows, idx], *(v[rows, idx] for v in values))


def bootstrap_ratio(x: Float[Tensor, " prompt"], te: Float[Tensor, " prompt"], *, n_boot: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """95% percentile CI of ``mean(x) / |mean(te)|`` resampling prompts (te NaN -> scale 1)."""
    ok = torch.isfinite(x)
    x, te = x[ok], te[ok]
    if len(x) == 0:
        return float("nan"), float("nan")
    gen = torch.Generator().manual_seed(seed)
    idx = bootstrap_indices(len(x), n_boot, gen)
    scale = te[idx].nanmean(1).abs() if torch.isfinite(te).any() else torch.ones(n_boot)
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
    s = x[idx].mean(1) / scale
    return float(s.quantile(0.025)), float(s.quantile(0.975))


def class_effect(effects: Float[Tensor, "prompt member window"], how: str) -> Float[Tensor, "prompt window"]:
    """A competitor class's effect per prompt and window: its strongest member (``max``) or ``median``."""
    if how == "median":
        return effects.median(1).values
    return effects.amax(1)
