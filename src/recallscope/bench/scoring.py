"""Score a localisation method against an organism's ground truth (ROC AUC, as InterpBench does).

A *method* here is a callable ``effects(model, pairs, *, layers, positions) -> Tensor[prompt, layer, pos]``
that estimates, per prompt, how much noising the residual stream entering ``layer`` at ``pos`` (patching
in the corrupt prompt's activation) lowers the log-prob of the clean answer. :func:`exact_patching_effects`
is the exact one (recallscope's activation-patching engine); attribution methods plug in with the same
signature.

1. **Base64 organism** (:func:`b64_cells`, groups from :func:`b64_groups`): for each plaintext length and
   output byte ``j``, pairs from :func:`~recallscope.organisms.b64_decoder.dependency_pairs` (clean = the
   prompt that predicts byte ``j``; corrupt = another plaintext's chunks). Cells are (prompt, input chunk)
   at layer 0; a cell is positive when byte ``j`` depends on that chunk (the codec's dependency map).
2. **Fact organism** (:func:`fact_cells`): subject-swap pairs; cells are (prompt, layer, position) over
   :meth:`~recallscope.organisms.fact_store.FactTruth.resid_nodes`; positive when the node carries the
   subject by construction. :func:`truth_groups` gives either organism's (true cells, pairs) groups.
3. Score with :func:`recallscope.attribution.scoring.roc_auc` (Mann-Whitney; ties count one half).

**Edges and residual cells.** The truth is defined on residual cells (the residual stream entering block
``L`` at position ``p``; ``L = n_layers`` is the final residual), not on heads or MLPs: which head moves
the first name, or which MLP stores a fact, is not fixed by construction, so a truth over graph nodes
would be invented. Edge attribution and circuits are therefore scored on the cells, through the
per-position edges of :class:`~recallscope.attribution.graph.Graph` that *cross* each cell
(:func:`edge_cells`): edge ``u -> v`` at position ``p`` crosses cell ``(L, p)`` when its sender writes
before block ``L`` and its receiver reads at block ``L`` or later (``layer(u) < L <= layer(v)``; the input
is layer -1, the logits layer ``n_layers``; an MLP reading its own block's heads crosses no cell).

4. **EAP-IG as a localisation method** (:func:`eapig_effects`): patching cell ``(L, p)`` replaces, for
   every receiver at block ``L`` or later, the part of its input that senders before ``L`` wrote at
   ``p``, so its effect is estimated by the sum of the scores of the edges crossing the cell (a cut
   through the residual stream; to first order exact, since the gradient of a cell is the sum of the
   gradients of the receivers that read it; with integrated gradients on the inputs it equals node-level
   IG at ``resid_pre``, :func:`~recallscope.attribution.atp.atp` with ``ig_steps``). One EAP-IG run per
   prompt gives per-prompt cell effects, scored by :func:`b64_cells` / :func:`fact_cells` like exact
   patching.
5. **Circuits on cells** (:func:`cell_scores`, :func:`circuit_cells`, :func:`cell_recovery`): a circuit of
   per-position edges *uses* a cell when one of its edges crosses it; a cell's score is the largest
   ``|score|`` of the edges crossing it, so the threshold circuits ``|score| >= tau`` use exactly the
   cells whose score is ``>= tau`` and the ROC curve of cell scores is that of threshold circuits (the
   InterpBench node convention of :mod:`recallscope.attribution.scoring`, with cells as the nodes).
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from recallscope.attribution.edges import Circuit, EdgeScores
from recallscope.attribution.graph import Graph
from recallscope.attribution.scoring import roc_auc, roc_curve
from recallscope.errors import ConfigError
from recallscope.organisms.b64_decoder import dependency_pairs
from recallscope.organisms.fact_store import subject_swap_pairs
from recallscope.tasks.pairs import PromptPair

Effects = Callable[..., Tensor]
Cell = tuple[int, int]
"""``(layer, pos)``: the residual stream entering block ``layer`` at ``pos`` (``layer = n_layers``: final)."""


def exact_patching_effects(model: Any, pairs: Sequence[PromptPair], *, layers: Sequence[int],
                           positions: Sequence[int]) -> Float[Tensor, "prompt layer pos"]:
    """Exact noising effects: clean log-prob minus log-prob with the resid cell taken from the corrupt run."""
    from recallscope.patching import activation_patching

    result = activation_patching(model, list(pairs), "logprob", component="resid_pre", direction="noising",
                                 corruption="resample", layers=list(layers), positions=list(positions),
                                 progress=False)
    return result.clean.view(-1, 1, 1) - result.values


def b64_groups(truth: Any, *, n_per_byte: int = 8, seed: int = 0) -> list[tuple[dict[Cell, bool], list[PromptPair]]]:
    """One group per (plaintext length, output byte ``j``): the true cells ``{(0, 1 + i): byte j depends on
    chunk i}`` (the codec's dependency map on the input chunks' residual cells) and ``n_per_byte`` pairs
    from :func:`~recallscope.organisms.b64_decoder.dependency_pairs` whose clean prompt predicts byte ``j``."""
    out = []
    for n_bytes in truth.lengths:
        dep = truth.dependency(n_bytes)
        pairs = dependency_pairs(n_bytes, n_per_byte, seed=seed + n_bytes)
        for j in range(n_bytes):
            cells = {(0, 1 + i): bool(dep[j, i]) for i in range(truth.n_chunks)}
            out.append((cells, pairs[j * n_per_byte:(j + 1) * n_per_byte]))
    return out


def truth_groups(model: Any, *, n: int = 64, seed: int = 0) -> list[tuple[dict[Cell, bool], list[PromptPair]]]:
    """(true cells, pairs) groups of a base64 or fact organism; each group's pairs share one token length.

    Base64: :func:`b64_groups` with ``n`` pairs per output byte. Facts: one group, the cells of
    :meth:`~recallscope.organisms.fact_store.FactTruth.resid_nodes` and ``n`` subject-swap pairs."""
    from recallscope.organisms import ground_truth

    truth = ground_truth(model)
    if truth.kind == "b64":
        return b64_groups(truth, n_per_byte=n, seed=seed)
    if truth.kind == "facts":
        return [(truth.resid_nodes(), subject_swap_pairs(truth, n=n, seed=seed))]
    raise ConfigError(f"localisation is scored on the base64 and fact organisms; this one is {truth.kind!r}.")


def score_cells(model: Any, pairs: Sequence[PromptPair], cells: Mapping[Cell, bool], effects: Effects
                ) -> tuple[Float[Tensor, " n"], Bool[Tensor, " n"]]:
    """(scores, labels) of ``effects`` over every (prompt, cell): one call over the cells' layers x positions."""
    layers = sorted({layer for layer, _ in cells})
    positions = sorted({pos for _, pos in cells})
    eff = effects(model, pairs, layers=layers, positions=positions)
    scores = torch.stack([eff[:, layers.index(layer), positions.index(pos)] for layer, pos in cells], 1)
    labels = torch.tensor([bool(x) for x in cells.values()]).expand_as(scores)
    return scores.flatten(), labels.flatten()


def b64_cells(model: Any, effects: Effects = exact_patching_effects, *, n_per_byte: int = 8,
              seed: int = 0) -> tuple[Tensor, Tensor]:
    """(scores, labels) over every (prompt, output byte, input chunk) cell of the base64 organism."""
    return _pooled(model, effects, truth_groups(model, n=n_per_byte, seed=seed))


def fact_cells(model: Any, effects: Effects = exact_patching_effects, *, n: int = 64,
               seed: int = 0) -> tuple[Tensor, Tensor]:
    """(scores, labels) over every (prompt, layer, position) node of the fact organism's ground truth."""
    return _pooled(model, effects, truth_groups(model, n=n, seed=seed))


def _pooled(model: Any, effects: Effects, groups: list[tuple[dict[Cell, bool], list[PromptPair]]]
            ) -> tuple[Tensor, Tensor]:
    parts = [score_cells(model, pairs, cells, effects) for cells, pairs in groups]
    return torch.cat([s for s, _ in parts]), torch.cat([lab for _, lab in parts])


# ------------------------------------------------------------------------------- edges and residual cells
def receiver_layer(graph: Graph, v: int) -> int:
    """Block whose input receiver ``v`` reads (``n_layers`` for the logits)."""
    return graph.n_layers if v == graph.logits else v // graph.per_layer


def edge_cells(graph: Graph) -> Bool[Tensor, "cell sender receiver"]:
    """``C[L, u, v]``: edge ``u -> v`` crosses the residual entering block ``L`` (``L`` in ``0..n_layers``),
    i.e. ``layer(u) < L <= layer(v)`` (input: layer -1); only edges of the graph cross anything."""
    senders = torch.tensor([graph.sender_layer(u) for u in range(graph.n_senders)])
    receivers = torch.tensor([receiver_layer(graph, v) for v in range(graph.n_receivers)])
    cells = torch.arange(graph.n_layers + 1).view(-1, 1, 1)
    return (senders.view(1, -1, 1) < cells) & (cells <= receivers.view(1, 1, -1)) & graph.valid


def _check_cells(graph: Graph, values: Tensor, cells: Sequence[Cell]) -> None:
    if values.ndim != 3 or values.shape[:2] != (graph.n_senders, graph.n_receivers):
        raise ConfigError(f"cell scores need per-position edge values [sender, receiver, pos]; got shape "
                          f"{tuple(values.shape)}. Run edge attribution with per_position=True.")
    bad = [c for c in cells if not (0 <= c[0] <= graph.n_layers and 0 <= c[1] < values.shape[2])]
    if bad:
        raise ConfigError(f"cells {bad} are outside this graph ({graph.n_layers + 1} residual layers, "
                          f"{values.shape[2]} positions).")


def cell_cut(graph: Graph, values: Float[Tensor, "sender receiver pos"], cells: Sequence[Cell]
             ) -> Float[Tensor, " cell"]:
    """Sum of the values of the edges crossing each cell (EAP's estimate of patching the cell)."""
    _check_cells(graph, values, cells)
    cross = edge_cells(graph)
    return torch.stack([(values[..., p] * cross[layer]).sum() for layer, p in cells])


def cell_scores(scores: EdgeScores, cells: Sequence[Cell]) -> Float[Tensor, " cell"]:
    """Largest ``|score|`` of the per-position edges crossing each cell (0 when none crosses it)."""
    _check_cells(scores.graph, scores.scores, cells)
    cross = edge_cells(scores.graph)
    mag = scores.scores.abs()
    return torch.stack([(mag[..., p] * cross[layer]).amax() for layer, p in cells])


def circuit_cells(circuit: Circuit, cells: Sequence[Cell]) -> Bool[Tensor, " cell"]:
    """Whether the (per-position) circuit keeps an edge crossing each cell."""
    _check_cells(circuit.graph, circuit.edges, cells)
    cross = edge_cells(circuit.graph)
    return torch.tensor([bool((circuit.edges[..., p] & cross[layer]).any()) for layer, p in cells])


def eapig_effects(model: Any, pairs: Sequence[PromptPair], *, layers: Sequence[int], positions: Sequence[int],
                  steps: int = 5) -> Float[Tensor, "prompt layer pos"]:
    """EAP-IG's per-prompt estimate of :func:`exact_patching_effects`: for each prompt, minus the summed
    per-position EAP-IG (inputs) scores of the edges crossing each cell (module docstring, step 4)."""
    from recallscope.attribution.eap import eap_ig

    cells = [(layer, p) for layer in layers for p in positions]
    out = []
    for pair in pairs:
        scores = eap_ig(model, [pair], "logprob", steps=steps, per_position=True, progress=False)
        out.append(-cell_cut(scores.graph, scores.scores, cells).view(len(layers), len(positions)))
    return torch.stack(out)


@dataclass(frozen=True)
class CellRecovery:
    """How well edge scores / found circuits recover the cells of a known mechanism."""

    auc: float
    """ROC AUC of :func:`cell_scores` (threshold circuits over every threshold)."""
    roc: tuple[list[float], list[float]]
    """(FPR, TPR) of that ROC curve."""
    tpr: dict[str, float]
    """Per found circuit: the share of true cells it uses."""
    fpr: dict[str, float]
    """Per found circuit: the share of other cells it uses."""
    n_cells: int
    n_true: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cell_recovery(truth: Mapping[Cell, bool] | Sequence[Mapping[Cell, bool]],
                  scores: EdgeScores | Sequence[EdgeScores],
                  found: Mapping[str, Circuit | Sequence[Circuit]] | None = None) -> CellRecovery:
    """Score per-position edge scores (ROC over thresholds) and found circuits (TPR/FPR) against the true
    cells ``{(layer, pos): carries the mechanism}``. Several (truth, scores, circuits) groups (e.g. one per
    output byte) are pooled: give sequences of equal length."""
    truths: list[Mapping[Cell, bool]] = [truth] if isinstance(truth, Mapping) else list(truth)
    all_scores = [scores] if isinstance(scores, EdgeScores) else list(scores)
    circuits = {k: [v] if isinstance(v, Circuit) else list(v) for k, v in (found or {}).items()}
    if len(all_scores) != len(truths) or any(len(v) != len(truths) for v in circuits.values()):
        raise ConfigError(f"give one set of edge scores and one circuit per truth; got {len(truths)} truths, "
                          f"{len(all_scores)} scores, {[len(v) for v in circuits.values()]} circuits.")
    labels = torch.tensor([bool(x) for t in truths for x in t.values()])
    values = torch.cat([cell_scores(s, list(t)) for s, t in zip(all_scores, truths)])
    tpr, fpr = {}, {}
    for name, cs in circuits.items():
        used = torch.cat([circuit_cells(c, list(t)) for c, t in zip(cs, truths)])
        tpr[name] = float((used & labels).sum()) / max(1, int(labels.sum()))
        fpr[name] = float((used & ~labels).sum()) / max(1, int((~labels).sum()))
    return CellRecovery(roc_auc(values, labels), roc_curve(values, labels), tpr, fpr, len(labels),
                        int(labels.sum()))
