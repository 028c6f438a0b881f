"""Score a localisation method against an organism's ground truth (ROC AUC, as InterpBench does).

A *method* here is a callable ``effects(model, pairs, *, layers, positions) -> Tensor[prompt, layer, pos]``
that estimates, per prompt, how much noising the residual stream entering ``layer`` at ``pos`` (patching
in the corrupt prompt's activation) lowers the log-prob of the clean answer. :func:`exact_patching_effects`
is the exact one (recallscope's activation-patching engine); attribution methods plug in with the same
signature.

1. **Base64 organism** (:func:`b64_cells`): for each plaintext length and output byte ``j``, pairs from
   :func:`~recallscope.organisms.b64_decoder.dependency_pairs` (clean = the prompt that predicts byte ``j``;
   corrupt = another plaintext's chunks). Cells are (prompt, input chunk) at layer 0; a cell is positive
   when byte ``j`` depends on that chunk (the codec's dependency map).
2. **Fact organism** (:func:`fact_cells`): subject-swap pairs; cells are (prompt, layer, position) over
   :meth:`~recallscope.organisms.fact_store.FactTruth.resid_nodes`; positive when the node carries the
   subject by construction.
3. Score with :func:`recallscope.attribution.scoring.roc_auc` (Mann-Whitney; ties count one half).
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.organisms.b64_decoder import dependency_pairs
from recallscope.organisms.fact_store import subject_swap_pairs
from recallscope.tasks.pairs import PromptPair

Effects = Callable[..., Tensor]


def exact_patching_effects(model: Any, pairs: Sequence[PromptPair], *, layers: Sequence[int],
                           positions: Sequence[int]) -> Float[Tensor, "prompt layer pos"]:
    """Exact noising effects: clean log-prob minus log-prob with the resid cell taken from the corrupt run."""
    from recallscope.patching import activation_patching

    result = activation_patching(model, list(pairs), "logprob", component="resid_pre", direction="noising",
                                 corruption="resample", layers=list(layers), positions=list(positions),
                                 progress=False)
    return result.clean.view(-1, 1, 1) - result.values


def b64_cells(model: Any, effects: Effects = exact_patching_effects, *, n_per_byte: int = 8,
              seed: int = 0) -> tuple[Tensor, Tensor]:
    """(scores, labels) over every (prompt, output byte, input chunk) cell of the base64 organism."""
    from recallscope.organisms import ground_truth

    truth = ground_truth(model)
    chunk_pos = [1 + i for i in range(truth.n_chunks)]
    scores, labels = [], []
    for n_bytes in truth.lengths:
        dep = truth.dependency(n_bytes)
        pairs = dependency_pairs(n_bytes, n_per_byte, seed=seed + n_bytes)
        for j in range(n_bytes):
            group = pairs[j * n_per_byte:(j + 1) * n_per_byte]
            eff = effects(model, group, layers=[0], positions=chunk_pos)[:, 0]  # [prompt, chunk]
            scores.append(eff.flatten())
            labels.append(dep[j].expand_as(eff).flatten())
    return torch.cat(scores), torch.cat(labels)


def fact_cells(model: Any, effects: Effects = exact_patching_effects, *, n: int = 64,
               seed: int = 0) -> tuple[Tensor, Tensor]:
    """(scores, labels) over every (prompt, layer, position) node of the fact organism's ground truth."""
    from recallscope.organisms import ground_truth

    truth = ground_truth(model)
    nodes = truth.resid_nodes()
    layers = sorted({layer for layer, _ in nodes})
    positions = sorted({pos for _, pos in nodes})
    eff = effects(model, subject_swap_pairs(truth, n=n, seed=seed), layers=layers, positions=positions)
    scores, labels = [], []
    for (layer, pos), carries in nodes.items():
        cell = eff[:, layers.index(layer), positions.index(pos)]
        scores.append(cell)
        labels.append(torch.full_like(cell, carries, dtype=torch.bool))
    return torch.cat(scores), torch.cat(labels)
