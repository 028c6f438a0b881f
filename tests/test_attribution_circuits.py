"""Circuit discovery recovers a circuit planted by construction; faithfulness, pruning and scoring."""

import pytest
import torch

from pathlib import Path

from recallscope.attribution import (
    Circuit,
    acdc,
    eap,
    eap_ig,
    evaluate_circuit,
    faithfulness_curve,
    roc_auc,
    score_recovery,
)
from recallscope.attribution.circuits import CircuitRunner
from recallscope.attribution.edges import EdgeScores, edge_display_label, receiver_label
from recallscope.attribution.graph import Graph
from recallscope.attribution.scoring import roc_curve
from recallscope.errors import ConfigError
from recallscope.features.view import THRESHOLDS
from test_attribution_toys import PLANTED_EDGES, native_model, planted_model, random_pairs


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    tp, metric = random_pairs(batch=4)
    return model, tp, metric


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "eap-ig-activations"])
def test_edge_scores_recover_the_planted_circuit(planted, method):
    model, tp, metric = planted
    scores = eap(model, tp, metric, method=method, steps=4, progress=False)
    truth = Circuit.from_edges(scores.graph, PLANTED_EDGES)
    found = scores.top(len(PLANTED_EDGES))
    assert set(found.edge_labels()) == set(PLANTED_EDGES)
    rec = score_recovery(truth, scores=scores, found=found)
    assert rec.edge_auc == 1.0 and rec.node_auc == 1.0
    assert (rec.edge_tpr, rec.edge_fpr, rec.node_tpr, rec.node_fpr) == (1.0, 0.0, 1.0, 0.0)
    off = scores.scores.abs().masked_fill(truth.edges, 0.0)
    assert off.max() < 1e-6 < scores.scores[truth.edges].abs().min()
    assert set(scores.threshold(1e-4).edge_labels()) == set(PLANTED_EDGES)
    ev = evaluate_circuit(model, tp, metric, found)
    assert abs(ev.faithfulness - 1.0) < 1e-4 and abs(ev.completeness - 1.0) < 1e-4


def test_acdc_recovers_the_planted_circuit_from_the_full_graph(planted, tmp_path):
    model, tp, metric = planted
    circuit = acdc(model, tp, metric, threshold=0.005, progress=False)
    assert set(circuit.edge_labels()) == set(PLANTED_EDGES)
    assert abs(circuit.info["faithfulness"] - 1.0) < 1e-4 and circuit.info["n_trials"] > len(PLANTED_EDGES)
    assert circuit.nodes() == ["input", "a0.h1", "m0", "m1", "logits"]
    loaded = Circuit.load(circuit.save(tmp_path / "circuit"))
    assert loaded.edge_labels() == circuit.edge_labels() and loaded.info == circuit.info
    fig = circuit.plot()
    assert {"embed", "z L0.H1", "mlp_out L0", "mlp_out L1", "logits"} <= _shown_labels(fig)


def test_faithfulness_endpoints_and_pruning_preserves_the_function():
    model = native_model(seed=5)
    tp, metric = random_pairs(change=(1, 3))
    runner = CircuitRunner(model, tp, metric)
    g = runner.graph
    empty = Circuit(g, torch.zeros_like(g.valid))
    full = Circuit(g, g.valid.clone())
    assert abs(evaluate_circuit(model, tp, metric, empty, runner=runner).faithfulness) < 1e-5
    ev = evaluate_circuit(model, tp, metric, full, runner=runner)
    assert abs(ev.faithfulness - 1.0) < 1e-5 and abs(ev.completeness - 1.0) < 1e-5
    gen = torch.Generator().manual_seed(0)
    for density in (0.1, 0.3):
        edges = (torch.rand(g.valid.shape, generator=gen) < density) & g.valid
        circuit = Circuit(g, edges)
        pruned = circuit.pruned()
        assert pruned.n_edges < circuit.n_edges
        torch.testing.assert_close(runner.metric(pruned.keep_mask()), runner.metric(circuit.keep_mask()),
                                   atol=1e-5, rtol=1e-5)
    recorded = runner.run(edges.float(), record=True)  # resuming a recorded run skips the layers below
    changed = edges.float().clone()
    changed[:, g.attn_inputs(1)] = 1.0 - changed[:, g.attn_inputs(1)]
    changed = changed * g.valid
    torch.testing.assert_close(runner.metric(changed, start_layer=1, resume=recorded), runner.metric(changed),
                               atol=1e-5, rtol=1e-5)
    scores = eap_ig(model, tp, metric, steps=2, progress=False)
    curve = faithfulness_curve(model, tp, metric, scores, [0, 10, int(g.valid.sum())], progress=False)
    assert abs(curve.faithfulness[0]) < 1e-5 and abs(curve.faithfulness[-1] - 1.0) < 1e-5
    assert len(curve.plot().data) == 2


def test_roc_auc_matches_counting_pairs():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (40,), generator=gen).float()
    labels = torch.rand(40, generator=gen) < 0.4
    pos, neg = scores[labels], scores[~labels]
    slow = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos.tolist() for n in neg.tolist())
    assert roc_auc(scores, labels) == pytest.approx(slow / (len(pos) * len(neg)))
    fpr, tpr = roc_curve(scores, labels)
    area = sum((fpr[i + 1] - fpr[i]) * (tpr[i + 1] + tpr[i]) / 2 for i in range(len(fpr) - 1))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0) and area == pytest.approx(roc_auc(scores, labels))
    with pytest.raises(ConfigError, match="positives"):
        roc_auc(scores, torch.ones(40, dtype=torch.bool))


# --- drawing: the graph view with site labels -------------------------------------------------------------
SAVED_CIRCUIT = Path(__file__).resolve().parents[1] / "figures" / "circuit" / "circuit_topn"


def _shown_labels(fig) -> set[str]:
    """Every node's text label in any frame of the figure (what a reader sees written on the picture)."""
    return {t for tr in fig.data if tr.mode == "markers+text" for t in tr.text if t}


def test_circuit_plot_is_the_graph_view_with_site_labels_and_a_slider():
    g = Graph(2, 4, 4)
    weights = torch.zeros(g.n_senders, g.n_receivers)
    for i, label in enumerate(PLANTED_EDGES):
        weights[g.edge(label)] = 1.0 + i
    circuit = Circuit(g, Circuit.from_edges(g, PLANTED_EDGES).edges, weights, {"faithfulness": 0.93})
    fig = circuit.plot(thresholds=(0.5, 1.0), start=1.0)
    shown = _shown_labels(fig)
    assert shown == {"embed", "z L0.H1", "mlp_out L0", "mlp_out L1", "logits"}
    assert not shown & (set(g.nodes) - {"logits"}), "node ids (a0.h1, m0, input) are not shown as labels"
    hover = " ".join(h for tr in fig.data if tr.hovertext for h in tr.hovertext)
    assert "id a0.h1" in hover, "the id stays findable on hover"
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == ["0.5", "1"] and fig.layout.sliders[0].active == 1
    assert fig.layout.title.text == "Circuit: 7 edges, faithfulness 0.93: 5 nodes at 1"
    rows = set(fig.layout.yaxis.ticktext)
    assert rows == {"embed", "z L0", "mlp_out L0", "mlp_out L1", "logits"}, rows
    default = circuit.plot()
    assert [s.label for s in default.layout.sliders[0].steps] == [f"{t:g}" for t in THRESHOLDS]
    grouped = circuit.plot(groups={"MLPs": ["m0", "m1"]}, start=1.0)
    assert "MLPs (2)" in _shown_labels(grouped) and "mlp_out L0" not in _shown_labels(grouped)


def test_grouped_query_circuit_plot_splits_key_value_nodes_over_their_heads():
    g = Graph(1, 4, 2)
    circuit = Circuit.from_edges(g, ["input -> a0.kv1.k", "a0.h2 -> logits", "a0.h3 -> logits"])
    shown = _shown_labels(circuit.plot(start=1.0))
    assert shown == {"embed", "z L0.H2", "z L0.H3", "logits"}, shown
    assert not any("kv" in s or s.startswith("a0") for s in shown)


def test_edge_and_receiver_display_labels_use_the_site_vocabulary():
    g, gqa = Graph(2, 4, 4), Graph(1, 4, 2)
    assert edge_display_label(g, "a0.h1 -> a1.h0.q @3") == "z L0.H1 -> q L1.H0 @3"
    assert edge_display_label(g, "input -> m1") == "embed -> mlp_out L1"
    assert edge_display_label(g, "m1 -> logits") == "mlp_out L1 -> logits"
    assert receiver_label(gqa, "a0.kv1.v") == "v L0.H1" and receiver_label(g, "a1.h3.k") == "k L1.H3"
    with pytest.raises(ConfigError, match="no edge"):
        edge_display_label(g, "m1 -> a0.h0.q")
    scores = torch.zeros(g.n_senders, g.n_receivers)
    scores[g.edge("a0.h1 -> a1.h0.q")] = 2.0
    scores[g.edge("input -> m1")] = -1.0
    bars = EdgeScores(g, scores, torch.zeros(1), torch.zeros(1)).plot(top=2)
    shown = {y for tr in bars.data for y in tr.y}
    assert shown == {"z L0.H1 -> q L1.H0", "embed -> mlp_out L1"}, shown


def test_a_saved_circuit_from_before_the_view_loads_and_plots():
    """figures/circuit/circuit_topn was saved (06:06 UTC, 2026-12-04) before Circuit.plot drew the view."""
    circuit = Circuit.load(SAVED_CIRCUIT)
    assert circuit.n_edges == 192 and len(circuit.nodes()) == 62
    fig = circuit.plot()
    shown = _shown_labels(fig)
    assert {"embed", "logits", "z L23.H4", "mlp_out L0"} <= shown
    assert all(s.startswith(("z L", "mlp_out L")) or s in ("embed", "logits") for s in shown), shown
    assert fig.layout.title.text == "Circuit: 192 edges, faithfulness 0.82: 17 nodes at 0.8"
    rows = dict(circuit.summary_extra())
    assert rows["edges"] == "192" and rows["nodes"].startswith("62: embed, mlp_out L0, ") and "a4.h0" not in rows["nodes"]
    assert rows["faithfulness"] == "0.816" and "z L4.H0" in circuit._repr_html_()
    assert len(fig.layout.sliders[0].steps) == len(THRESHOLDS)
