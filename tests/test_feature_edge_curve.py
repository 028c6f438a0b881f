"""Causal edge-level MIB curve of feature graphs: all edges = the real model, no edges = the bias, equality with
the graph's linear model when no feature switches state, removing a feature's out-edges = ablating it (frozen
attention, exact transcoders), and the same identities on a trained organism."""

import pytest
import torch
from test_features_graph import TOKENS, random_partial_set
from test_features_transcoder import relu_model

from recallscope.attribution.feature_curve import edge_circuit_run, feature_edge_curve, freeze_for, prune_to_paths
from recallscope.attribution.mib import cpr_cmd, feature_mib_curve, linear_circuit_logits
from recallscope.errors import ConfigError
from recallscope.features.graph import attribution_graph
from recallscope.features.interventions import FeatureEdit, run_intervention
from recallscope.features.transcoder import exact_mlp_transcoders


@pytest.fixture(scope="module")
def exact():
    model = relu_model(seed=2, n_layers=3)
    tset = exact_mlp_transcoders(model)
    graph = attribution_graph(model, tset, TOKENS, targets=(4, 11))
    return model, tset, graph


def test_all_edges_are_the_real_model_and_none_the_bias(exact):
    model, tset, graph = exact
    nonzero = graph.adjacency != 0
    with torch.no_grad():
        real = model(TOKENS[None], return_type="logits")[0, -1]
    full = edge_circuit_run(model, tset, graph, nonzero)
    torch.testing.assert_close(full.logits, (real[4] - real[11])[None], rtol=0, atol=1e-5)
    torch.testing.assert_close(full.activations, graph.activations, rtol=1e-5, atol=1e-6)
    assert full.switched_off == 0 and full.clamped_on == 0 and full.identity_residual < 1e-4
    none = edge_circuit_run(model, tset, graph, torch.zeros_like(nonzero))
    torch.testing.assert_close(none.logits, graph.bias[graph.logit_slice], rtol=0, atol=1e-5)
    assert none.switched_off > 0 and none.identity_residual < 1e-4  # features did switch off: the check is live


def test_equals_the_linear_model_when_no_feature_switches(exact):
    model, tset, graph = exact
    fz = freeze_for(model, tset, graph)
    nonzero = graph.adjacency != 0
    weights = graph.adjacency.abs()
    same = 0
    for q in (0.05, 0.2, 0.5, 0.8, 0.95):  # remove the weakest edges: from none to many features switch off
        keep = nonzero & (weights > weights[nonzero].quantile(q))
        run = edge_circuit_run(model, tset, graph, keep, frozen=fz)
        assert run.identity_residual < 1e-4
        if run.switched_off == 0:  # the linear model's assumption holds: the two agree
            torch.testing.assert_close(run.logits, linear_circuit_logits(graph, keep).float(), rtol=1e-4, atol=1e-5)
            same += 1
    assert same >= 2
    # a case where only the logit's own input edges go: no feature input changes, so nothing switches
    keep = nonzero.clone()
    keep[graph.logit_slice, : graph.n_feat // 2] = False
    run = edge_circuit_run(model, tset, graph, keep, frozen=fz)
    assert run.switched_off == 0
    torch.testing.assert_close(run.logits, linear_circuit_logits(graph, keep).float(), rtol=1e-4, atol=1e-5)
    # and one where they must differ: cut every input of a feature whose bias is negative and that writes to
    # the logit. ReLU switches it off (activation 0); the linear model gives it bias / clean activation < 0.
    direct = graph.adjacency[graph.logit_slice.start, : graph.n_feat].abs()
    direct[graph.bias[: graph.n_feat] >= 0] = 0
    t = int(direct.argmax())
    assert float(direct[t]) > 1e-2
    keep = nonzero.clone()
    keep[t] = False
    run = edge_circuit_run(model, tset, graph, keep, frozen=fz)
    assert run.switched_off >= 1 and float(run.activations[t]) == 0.0
    linear = float(linear_circuit_logits(graph, keep)[0])
    ratio = float(graph.bias[t] / graph.activations[t])  # the linear model's value of t over its clean one
    # the gap is at least the direct edge's part (t's other out-edges reach the logit through later features)
    assert abs(float(run.logits[0]) - linear) > 1e-3
    assert ratio < 0


def test_removing_a_features_out_edges_is_ablating_it(exact):
    """Oracle: zero-ablation of a feature in the real model (exact transcoders, attention and norms frozen)
    equals removing every edge out of it, when the ablation switches no inactive neuron on."""
    model, tset, graph = exact
    fz = freeze_for(model, tset, graph)
    nonzero = graph.adjacency != 0
    vec = graph.logit_vectors[0]
    checked, with_switch = 0, 0
    for n in (graph.features[:, 0] == 0).nonzero().squeeze(-1).tolist()[:12]:
        layer, pos, f = graph.features[n].tolist()
        res = run_intervention(model, tset, TOKENS, [FeatureEdit(layer, f, pos, value=0.0)],
                               freeze=("attention", "norms"))
        if any(((res.acts[lay] > 0) & (res.clean_acts[lay] == 0)).any() for lay in res.acts):
            continue  # a neuron off in the clean run switched on: not an edge of the graph
        keep = nonzero.clone()
        keep[:, n] = False
        run = edge_circuit_run(model, tset, graph, keep, frozen=fz)
        torch.testing.assert_close(run.logits[0], res.logits[-1] @ vec, rtol=1e-4, atol=1e-5)
        checked += 1
        with_switch += run.switched_off > 0
    assert checked >= 3 and with_switch >= 1, (checked, with_switch)


def test_prune_to_paths_by_hand():
    from test_attribution_mib import hand_graph

    graph = hand_graph()  # nodes: f0, error, embedding, logit; edges f0<-emb, logit<-f0, logit<-err, logit<-emb
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[3, 0] = True  # logit <- f0 without f0 <- emb: f0 is not reached from an input
    assert not prune_to_paths(graph, keep).any()
    keep[0, 2] = True
    assert prune_to_paths(graph, keep).sum() == 2
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[0, 2] = True  # f0 <- emb alone reaches no logit
    assert not prune_to_paths(graph, keep).any()


def test_curve_on_the_exact_model(exact):
    model, tset, graph = exact
    fractions = (0.01, 0.1, 0.5, 1.0)
    curve = feature_edge_curve(model, tset, graph, fractions=fractions, progress=False)
    assert curve.kind == "feature-edges" and curve.n_edges_total == int((graph.adjacency != 0).sum())
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    assert (curve.cpr, curve.cmd) == pytest.approx(cpr_cmd(fractions, curve.faithfulness))
    assert curve.n_edges == sorted(curve.n_edges) and curve.config["identity_residual"] < 1e-4
    linear = feature_mib_curve(graph, fractions=fractions)
    assert len(linear.faithfulness) == len(curve.faithfulness)
    same = curve.config["linear_same_edges"]  # the same kept edges in the graph's linear model
    assert same[-1] == pytest.approx(1.0, abs=1e-4)
    for f, lin, off in zip(curve.faithfulness, same, curve.config["switched_off"]):
        if off == 0:
            assert f == pytest.approx(lin, abs=1e-4)
    with pytest.raises(ConfigError, match="keep is"):
        edge_circuit_run(model, tset, graph, torch.zeros(3, 3, dtype=torch.bool))


def test_a_graph_of_other_transcoders_is_refused(exact):
    model, tset, graph = exact
    other = exact_mlp_transcoders(relu_model(seed=5, n_layers=3))
    with pytest.raises(ConfigError, match="transcoder set the graph was built with"):
        freeze_for(model, other, graph)



@pytest.mark.parametrize("max_feature_nodes", [None, 12])
def test_partial_topk_skip_set_and_partial_rows(max_feature_nodes):
    """Layer 1 without a transcoder (all error), TopK skip transcoders elsewhere, optionally only some feature
    rows computed: all edges still give the real logit and none the bias; the decomposition holds in every run."""
    model = relu_model(seed=2, n_layers=3)
    gen = torch.Generator().manual_seed(5)
    tset = random_partial_set(gen)
    graph = attribution_graph(model, tset, TOKENS, targets=[7], max_feature_nodes=max_feature_nodes)
    nonzero = graph.adjacency != 0
    with torch.no_grad():
        real = model(TOKENS[None], return_type="logits")[0, -1, 7]
    fz = freeze_for(model, tset, graph)
    full = edge_circuit_run(model, tset, graph, nonzero, frozen=fz)
    torch.testing.assert_close(full.logits, real[None], rtol=0, atol=1e-5)
    none = edge_circuit_run(model, tset, graph, torch.zeros_like(nonzero), frozen=fz)
    torch.testing.assert_close(none.logits, graph.bias[graph.logit_slice], rtol=0, atol=1e-5)
    half = edge_circuit_run(model, tset, graph, nonzero & (torch.rand(nonzero.shape, generator=gen) < 0.5),
                            frozen=fz)
    assert max(full.identity_residual, none.identity_residual, half.identity_residual) < 1e-4
    if max_feature_nodes is not None:  # features without computed rows keep their clean activation
        fixed = ~graph.rows_computed[: graph.n_feat]
        assert fixed.any()
        torch.testing.assert_close(none.activations[fixed], graph.activations[fixed])


@pytest.mark.usefixtures("organism_determinism")
def test_organism_all_edges_real_none_bias(fact_organism, tmp_path):
    from recallscope.features.data import organism_task_tokens, training_tokens
    from recallscope.features.train import TranscoderTrainConfig, train_set

    model = fact_organism
    tokens = training_tokens(model, 200, seed=0)
    cfg = TranscoderTrainConfig(d_sae=64, k=6, steps=60, batch_size=256, lr=3e-3)
    tset, _ = train_set(model, tokens, cfg, tmp_path / "tc", progress=False)
    prompt = organism_task_tokens(model, 2, seed=3)[0]
    with torch.no_grad():
        real = model(prompt[None], return_type="logits")[0, -1]
    answer = int(real.argmax())
    graph = attribution_graph(model, tset, prompt, targets=[answer])
    nonzero = graph.adjacency != 0
    full = edge_circuit_run(model, tset, graph, nonzero)
    torch.testing.assert_close(full.logits, real[answer][None], rtol=1e-5, atol=1e-4)
    assert full.identity_residual < 1e-3 and full.switched_off == 0
    none = edge_circuit_run(model, tset, graph, torch.zeros_like(nonzero))
    torch.testing.assert_close(none.logits, graph.bias[graph.logit_slice], rtol=1e-5, atol=1e-4)
    curve = feature_edge_curve(model, tset, graph, fractions=(0.05, 0.5, 1.0), progress=False)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
