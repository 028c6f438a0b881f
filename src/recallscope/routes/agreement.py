"""Agreement statistics between a model's route scores and human mnemonic keywords.

For each card the human keyword (candidate 0) competes with ``K`` control keywords (other cards'
keywords matched on frequency and token count, i.e. shuffled keywords). For one score (higher = more
route-like):

1. Percentile of the human keyword among the ``K + 1`` candidates: ``1 - rank / K`` (rank 0 = best;
   ties share the mean rank), so 1 = the model's best concept, 0 = its worst, 0.5 = chance.
2. Top-k hit rate: the share of cards where the human keyword ranks in the top ``k`` (chance ``k/(K+1)``).
3. Permutation p-value against the shuffled-keyword baseline: under the null the human keyword is
   exchangeable with its controls, so a random candidate per card is relabelled "human" ``n_perm`` times;
   ``p = (1 + #{T_perm >= T_obs}) / (1 + n_perm)`` for the mean percentile and for each hit rate.
4. 95% bootstrap CI of the mean percentile over cards.
"""

from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.stats import bootstrap_indices


def percentiles(values: Float[Tensor, "card candidate"]) -> Float[Tensor, "card candidate"]:
    """Each candidate's percentile within its card (1 = highest value; ties share the mean rank)."""
    k = values.shape[1] - 1
    higher = (values[:, None, :] > values[:, :, None]).sum(-1).double()  # [card, cand]: how many beat it
    ties = (values[:, None, :] == values[:, :, None]).sum(-1).double() - 1
    rank = higher + ties / 2
    return 1 - rank / max(k, 1)


def _hits(pct: Tensor, k: int, n_cand: int) -> Tensor:
    """Top-k indicator from percentiles: rank < k  <=>  pct > 1 - k / K."""
    return (pct > 1 - k / max(n_cand - 1, 1) + 1e-9).double()


def agreement(values: Float[Tensor, "card candidate"], *, ks: Sequence[int] = (1, 3), n_perm: int = 10000,
              n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Agreement of candidate 0 (the human keyword) with the scores; see the module doc."""
    n_cards, n_cand = values.shape
    if n_cards == 0:
        return {"n_cards": 0}
    pct = percentiles(values.double())
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(n_cand, (n_perm, n_cards), generator=gen)
    perm_pct = pct.gather(1, pick.T).T  # [perm, card]
    t_obs = float(pct[:, 0].mean())
    boot = pct[bootstrap_indices(n_cards, n_boot, gen), 0].mean(1)
    out: dict[str, Any] = {
        "n_cards": n_cards, "n_candidates": n_cand, "mean_percentile": t_obs,
        "mean_percentile_ci95": (float(boot.quantile(0.025)), float(boot.quantile(0.975))),
        "mean_percentile_chance": 0.5,
        "p_value": (1 + int((perm_pct.mean(1) >= t_obs - 1e-12).sum())) / (1 + n_perm),
        "median_rank": float(((1 - pct[:, 0]) * (n_cand - 1)).median()),
    }
    for k in ks:
        hit = float(_hits(pct[:, 0], k, n_cand).mean())
        perm_hit = _hits(perm_pct, k, n_cand).mean(1)
        out[f"top{k}"] = hit
        out[f"top{k}_chance"] = k / n_cand
        out[f"top{k}_p_value"] = (1 + int((perm_hit >= hit - 1e-12).sum())) / (1 + n_perm)
    return out
