"""Statistics shared by every method: bootstrap resampling, ranks with ties, Spearman, multiple testing.

One implementation each, so two methods never disagree on what a CI or a rank correlation is:

1. **Bootstrap** (:func:`bootstrap_indices`, :func:`bootstrap_ci`, :func:`bootstrap_stat`): resample prompts
   (rows) with replacement from a seeded ``torch.Generator``; percentile intervals. Rows are resampled
   together, so a ratio of two per-prompt quantities keeps its pairing.
2. **Ranks** (:func:`ranks`): 1-based, ties share their average rank (the "fractional" ranking).
3. **Spearman** (:func:`spearman`): Pearson correlation of average ranks over the pairs where both values are
   finite; NaN when fewer than ``min_n`` pairs remain or either side is constant.
4. **Multiple testing** (:func:`holm`, :func:`benjamini_hochberg`): adjusted p-values in the input order.

Efron & Tibshirani (1993), *An Introduction to the Bootstrap*; Holm (1979); Benjamini & Hochberg (1995).
"""

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor


def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def bootstrap_indices(n: int, n_boot: int, seed: int | torch.Generator = 0) -> Tensor:
    """``[n_boot, n]`` row indices drawn with replacement (``seed``: an int or a generator to draw from)."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"bootstrap needs n >= 1 rows and n_boot >= 1 draws, got n={n}, n_boot={n_boot}")
    return torch.randint(0, n, (n_boot, n), generator=_generator(seed))


def bootstrap_ci(values: Float[Tensor, "prompt ..."], *, level: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap CI of the mean over the prompt axis (axis 0), per remaining cell.

    NaN marks a cell a prompt lacks and is skipped in each resampled mean.
    """
    n = values.shape[0]
    idx = bootstrap_indices(n, n_boot, seed)
    flat = values.reshape(n, -1).double()
    alpha = (1 - level) / 2
    lo, hi = torch.empty(flat.shape[1], dtype=flat.dtype), torch.empty(flat.shape[1], dtype=flat.dtype)
    step = max(1, 2**24 // max(1, n_boot * n))  # cells per chunk: ~128 MB of resampled values
    for c in range(0, flat.shape[1], step):
        means = flat[:, c:c + step][idx].nanmean(1)  # [n_boot, cells]
        lo[c:c + step] = torch.nanquantile(means, alpha, dim=0)
        hi[c:c + step] = torch.nanquantile(means, 1 - alpha, dim=0)
    return lo.reshape(values.shape[1:]).to(values.dtype), hi.reshape(values.shape[1:]).to(values.dtype)


def bootstrap_stat(stat: Callable[..., Tensor], *columns: Tensor, level: float = 0.95, n_boot: int = 2000,
                   seed: int | torch.Generator = 0) -> tuple[Tensor, Tensor]:
    """Percentile CI of ``stat(*columns)`` resampling rows (axis 0) of all ``columns`` together.

    ``stat`` maps the resampled columns (each ``[n, ...]``) to a tensor of any shape; returns ``(lo, hi)`` of
    that shape. NaN draws (e.g. an empty resample of finite values) are skipped in the quantiles.
    """
    n = columns[0].shape[0]
    if any(c.shape[0] != n for c in columns):
        raise ValueError(f"bootstrap_stat needs columns with the same number of rows, got "
                         f"{[c.shape[0] for c in columns]}")
    idx = bootstrap_indices(n, n_boot, seed)
    draws = torch.stack([stat(*(c[i] for c in columns)) for i in idx]).double()
    alpha = (1 - level) / 2
    return torch.nanquantile(draws, alpha, dim=0), torch.nanquantile(draws, 1 - alpha, dim=0)


def ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor (float64), ties sharing their average rank."""
    x = x.flatten()
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of each distinct value's last copy
    return (last - (counts.double() - 1) / 2)[inverse]


def spearman(a: Tensor, b: Tensor, *, min_n: int = 2) -> float:
    """Spearman rank correlation with average ranks for ties, over the pairs where both are finite.

    NaN when fewer than ``min_n`` such pairs remain or either side is constant there.
    """
    a, b = a.flatten().double(), b.flatten().double()
    if a.shape != b.shape:
        raise ValueError(f"spearman needs two tensors of one size, got {tuple(a.shape)} and {tuple(b.shape)}")
    ok = torch.isfinite(a) & torch.isfinite(b)
    if int(ok.sum()) < max(2, min_n):
        return float("nan")
    ra, rb = ranks(a[ok]), ranks(b[ok])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def holm(p: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1), in the input order."""
    order = sorted(range(len(p)), key=lambda i: p[i])
    out = [0.0] * len(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


def benjamini_hochberg(p: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (step-up FDR, monotone, capped at 1), in the input order."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i], reverse=True)
    out = [0.0] * m
    running = 1.0
    for k, i in enumerate(order):
        rank = m - k  # 1-based rank of p[i] in ascending order
        running = min(running, p[i] * m / rank)
        out[i] = min(1.0, running)
    return out
