"""Scoring methods against the organisms' residual-cell truth: edges crossing cells, EAP-IG cell effects,
cell recovery of circuits, truth groups, and per-position ACDC on a planted circuit."""

import pytest
import torch

from recallscope.attribution import Circuit, acdc, atp
from recallscope.attribution.edges import EdgeScores
from recallscope.attribution.graph import Graph
from recallscope.errors import ConfigError
from recallscope.organisms import ground_truth
from recallscope.bench.scoring import (cell_cut, cell_recovery, cell_scores, circuit_cells, eapig_effects,
                                           edge_cells, exact_patching_effects, score_cells, truth_groups)
from test_attribution_toys import PLANTED_EDGES, planted_model, random_pairs

GRAPHS = [Graph(3, 4, 4), Graph(2, 4, 2), Graph(2, 2, 2, parallel=True)]


pytestmark = pytest.mark.usefixtures("organism_determinism")



def _layer_of(name: str, n_layers: int) -> int:
    """Oracle: a node's block from its name (input -> -1, logits -> n_layers, 'a1.h0.q' / 'm1' -> 1)."""
    if name == "input":
        return -1
    if name == "logits":
        return n_layers
    return int(name[1:].split(".")[0])


def _random_scores(graph: Graph, n_pos: int, seed: int) -> EdgeScores:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(graph.n_senders, graph.n_receivers, n_pos, generator=g) * graph.valid[..., None]
    return EdgeScores(graph, values, torch.zeros(1), torch.zeros(1))


@pytest.mark.parametrize("graph", GRAPHS, ids=str)
def test_edge_cells_are_the_edges_spanning_each_residual(graph):
    cross = edge_cells(graph)
    assert cross.shape == (graph.n_layers + 1, graph.n_senders, graph.n_receivers)
    for layer in range(graph.n_layers + 1):
        for u, sender in enumerate(graph.senders):
            for v, receiver in enumerate(graph.receivers):
                want = bool(graph.valid[u, v]) and _layer_of(sender, graph.n_layers) < layer <= \
                    _layer_of(receiver, graph.n_layers)
                assert bool(cross[layer, u, v]) == want, (layer, sender, receiver)
    assert cross[:, graph.head(0, 0), graph.mlp_input(0)].sum() == 0  # a block's heads -> its MLP: no cell
    assert cross[:, 0, graph.logits].all()  # the input reaches the logits through every residual


@pytest.mark.parametrize("graph", GRAPHS, ids=str)
def test_cell_scores_cut_and_threshold_circuits_agree_with_loops(graph):
    scores = _random_scores(graph, 3, seed=1)
    cells = [(layer, p) for layer in range(graph.n_layers + 1) for p in range(3)]
    best, cut = cell_scores(scores, cells), cell_cut(graph, scores.scores, cells)
    for i, (layer, p) in enumerate(cells):
        crossing = [float(scores.scores[u, v, p]) for u, s in enumerate(graph.senders)
                    for v, r in enumerate(graph.receivers) if graph.valid[u, v]
                    and _layer_of(s, graph.n_layers) < layer <= _layer_of(r, graph.n_layers)]
        torch.testing.assert_close(best[i], torch.tensor(max(map(abs, crossing))))
        torch.testing.assert_close(cut[i], torch.tensor(sum(crossing)), rtol=1e-5, atol=1e-5)
    for tau in best.tolist() + [0.0, float(best.max()) + 1]:  # threshold circuits use exactly the cells >= tau
        assert circuit_cells(scores.threshold(tau), cells).tolist() == (best >= tau).tolist()


def test_eapig_effects_equal_node_integrated_gradients_on_the_residual(fact_organism):
    cells, pairs = truth_groups(fact_organism, n=3)[0]
    layers, positions = [0, 1, 2], [1, 2, 3, 4]
    got = eapig_effects(fact_organism, pairs, layers=layers, positions=positions, steps=5)
    ref = atp(fact_organism, pairs, "logprob", components=["resid_pre"], direction="noising", ig_steps=5,
              progress=False).values["resid_pre"][:, layers][:, :, positions]
    torch.testing.assert_close(got, -ref, rtol=1e-4, atol=1e-4)
    exact = exact_patching_effects(fact_organism, pairs, layers=layers, positions=positions)
    assert got.shape == exact.shape == (3, 3, 4)
    scores, labels = score_cells(fact_organism, pairs, cells, eapig_effects)  # [prompt, cell], flattened
    for i, ((layer, pos), carries) in enumerate(cells.items()):
        torch.testing.assert_close(scores.view(3, -1)[:, i], got[:, layers.index(layer), positions.index(pos)])
        assert labels.view(3, -1)[:, i].tolist() == [carries] * 3


def test_truth_groups_map_each_organism_truth_to_cells(fact_organism):
    from recallscope import load_model
    from recallscope.organisms.b64_decoder import B64Truth
    from recallscope.tasks.pairs import tokenize_pairs

    b64 = load_model("organism:b64-decoder")
    truth = B64Truth()
    groups = truth_groups(b64, n=2, seed=0)
    assert len(groups) == sum(truth.lengths)
    for (cells, pairs), (n_bytes, j) in zip(groups, [(n, j) for n in truth.lengths for j in range(n)]):
        assert cells == {(0, 1 + i): bool(truth.dependency(n_bytes)[j, i]) for i in range(truth.n_chunks)}
        assert [p.meta["byte"] for p in pairs] == [j, j] and len(pairs[0].meta["plaintext"]) == n_bytes
        tokenize_pairs(b64, pairs)  # one token length per group
    (cells, pairs), = truth_groups(fact_organism, n=5)
    assert cells == ground_truth(fact_organism).resid_nodes() and len(pairs) == 5
    with pytest.raises(ConfigError, match="base64 and fact"):
        truth_groups(load_model("organism:route-s0"))


def test_cell_recovery_of_a_planted_cell_truth_and_its_errors():
    graph = GRAPHS[0]
    truth = {(1, 2): True, (2, 2): True, (1, 0): False, (2, 1): False, (3, 0): False}
    noise = _random_scores(graph, 3, seed=2).scores * 1e-3
    signal = (edge_cells(graph)[1, ..., None] & (torch.arange(3) == 2)).float()  # edges crossing (1, 2)
    scores = EdgeScores(graph, noise + signal * graph.valid[..., None], torch.zeros(1), torch.zeros(1))
    exact = Circuit(graph, signal.bool() & graph.valid[..., None])
    rec = cell_recovery(truth, scores, {"exact": exact, "everything": scores.threshold(0.0)})
    assert rec.auc == 1.0 and (rec.n_cells, rec.n_true) == (5, 2)
    assert (rec.tpr["exact"], rec.fpr["exact"]) == (1.0, 0.0)
    assert (rec.tpr["everything"], rec.fpr["everything"]) == (1.0, 1.0)
    assert rec.roc[0][0] == 0.0 and rec.roc[1][-1] == 1.0
    pooled = cell_recovery([truth, truth], [scores, scores], {"exact": [exact, exact]})
    assert pooled.auc == 1.0 and pooled.n_cells == 10 and pooled.tpr == {"exact": 1.0}
    with pytest.raises(ConfigError, match="one set of edge scores"):
        cell_recovery([truth, truth], [scores])
    with pytest.raises(ConfigError, match="per_position=True"):
        cell_recovery(truth, EdgeScores(graph, scores.scores.sum(-1), torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ConfigError, match="outside this graph"):
        cell_scores(scores, [(4, 0)])


def test_per_position_acdc_finds_the_planted_edges_at_their_positions():
    model = planted_model()
    tp, metric = random_pairs(batch=4)  # the corruption changes position 2; the logits read position 5
    graph = Graph(2, 4, 4)
    everything = Circuit(graph, graph.valid[..., None].expand(-1, -1, 6).clone())
    circuit = acdc(model, tp, metric, threshold=0.005, candidates=everything, progress=False)
    want = {f"{e} @{2 if e.startswith('input') else 5}" for e in PLANTED_EDGES}
    assert set(circuit.edge_labels()) == want
    assert abs(circuit.info["faithfulness"] - 1.0) < 1e-4 and circuit.info["n_trials"] > len(want)
    cells = [(layer, p) for layer in range(3) for p in range(6)]
    used = {c for c, hit in zip(cells, circuit_cells(circuit, cells).tolist()) if hit}
    assert used == {(0, 2), (1, 5), (2, 5)}  # the corrupted token's residual, then the read position's
