"""Circuit discovery recovers a circuit planted by construction; faithfulness, pruning and scoring."""

import pytest
import torch

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
from recallscope.attribution.scoring import roc_curve
from recallscope.errors import ConfigError
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
    assert {"input", "a0.h1", "m0", "m1", "logits"} <= set(fig.data[-1].text)


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
