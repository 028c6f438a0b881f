"""Statistics of learning curves: area under the curve, a paired sign-flip test, a bootstrap CI, and power.

1. :func:`curve_auc`: the normalised trapezoidal area under each item's curve of ``log p(answer)`` over
   steps ``0 .. S`` (``sum_t (y_t + y_{t+1}) / 2 / S``): the mean log-prob during training, so a fact
   learned sooner has a larger (less negative) area.
2. :func:`pair_differences`: per pair, hooked minus control area, averaged over seeds (the unit of
   analysis is the pair; seeds only reduce the training noise within it).
3. :func:`sign_flip_test`: two-sided test of mean difference 0 by flipping the signs of the pair
   differences (exact enumeration up to 2^16 patterns, else Monte Carlo with the observed pattern counted,
   ``p = (1 + hits) / (1 + n_perm)``). :func:`bootstrap_ci`: percentile CI of the mean over pairs.
4. :func:`power_by_simulation`: resample the pilot's centred pair differences (with replacement) to the
   planned number of pairs, add a true effect, run the test; power = share of rejections.
"""

import itertools
import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError


def curve_auc(logp: Float[Tensor, "step item"]) -> Float[Tensor, " item"]:
    """Normalised trapezoidal area of each column over its steps (module docstring, 1)."""
    if logp.ndim != 2 or logp.shape[0] < 2:
        raise ConfigError(f"curve_auc needs a [step, item] curve with at least 2 steps, got shape {tuple(logp.shape)}.")
    return ((logp[1:] + logp[:-1]) / 2).mean(0)


def pair_differences(auc: Float[Tensor, "seed item"], pair: Int[Tensor, " item"],
                     hooked: Tensor) -> Float[Tensor, " pair"]:
    """Hooked minus control area per pair, averaged over seeds; pairs in increasing id order."""
    ids = torch.unique(pair)
    out = []
    for p in ids.tolist():
        h = (pair == p) & hooked
        c = (pair == p) & ~hooked
        if int(h.sum()) != 1 or int(c.sum()) != 1:
            raise ConfigError(f"pair {p} has {int(h.sum())} hooked and {int(c.sum())} control items; need one each.")
        out.append((auc[:, h] - auc[:, c]).mean())
    return torch.stack(out)


def sign_flip_test(diff: Float[Tensor, " pair"], *, n_perm: int = 100_000, seed: int = 0) -> float:
    """Two-sided p of mean(diff) = 0 under sign flips (exact when 2^n <= 65,536)."""
    n = diff.shape[0]
    if n < 2:
        raise ConfigError(f"the sign-flip test needs at least 2 pairs, got {n}.")
    d = diff.double()
    observed = abs(float(d.mean()))
    if n <= 16:
        signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=n)), dtype=torch.float64)
        return float(((signs @ d).abs() / n >= observed - 1e-12).double().mean())
    gen = torch.Generator().manual_seed(seed)
    hits = 0
    for start in range(0, n_perm, 10_000):
        k = min(10_000, n_perm - start)
        signs = torch.randint(0, 2, (k, n), generator=gen).double() * 2 - 1
        hits += int(((signs @ d).abs() / n >= observed - 1e-12).sum())
    return (1 + hits) / (1 + n_perm)


def bootstrap_ci(diff: Float[Tensor, " pair"], *, n_boot: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over pairs."""
    if not 0 < level < 1:
        raise ConfigError(f"level must be in (0, 1), got {level}.")
    gen = torch.Generator().manual_seed(seed)
    n = diff.shape[0]
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    means = diff.double()[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def power_by_simulation(pilot_diff: Float[Tensor, " pair"], *, n_pairs: int, effects: list[float], alpha: float = 0.05,
                        n_sim: int = 1000, n_perm: int = 2000, seed: int = 0) -> dict[float, float]:
    """Power of :func:`sign_flip_test` at each true effect, from the pilot's centred differences (docstring, 4)."""
    if n_pairs < 2 or pilot_diff.shape[0] < 2:
        raise ConfigError("power_by_simulation needs at least 2 pilot differences and n_pairs >= 2.")
    gen = torch.Generator().manual_seed(seed)
    centred = pilot_diff.double() - pilot_diff.double().mean()
    out = {}
    for effect in effects:
        rejections = 0
        for _ in range(n_sim):
            sample = centred[torch.randint(0, len(centred), (n_pairs,), generator=gen)] + effect
            signs = torch.randint(0, 2, (n_perm, n_pairs), generator=gen).double() * 2 - 1
            observed = abs(float(sample.mean()))
            p = (1 + int(((signs @ sample).abs() / n_pairs >= observed - 1e-12).sum())) / (1 + n_perm)
            rejections += p <= alpha
        out[effect] = rejections / n_sim
    return out


def minimum_detectable_effect(power: dict[float, float], target: float = 0.8) -> float:
    """Smallest simulated effect whose power reaches ``target`` (``nan`` if none does)."""
    hits = [e for e, p in sorted(power.items()) if p >= target and e > 0]
    return hits[0] if hits else math.nan
