"""MIB interop and scoring: edge-score JSON round trip, CPR/CMD by hand, faithfulness at MIB's edge budgets for
component circuits (planted circuit) and feature graphs (hand-built graph and a real one)."""

import json

import pytest
import torch
from test_attribution_toys import PLANTED_EDGES, planted_model, random_pairs

from recallscope.attribution import eap
from recallscope.attribution.circuits import evaluate_circuit
from recallscope.attribution.edges import Circuit, EdgeScores
from recallscope.attribution.graph import Graph
from recallscope.attribution.mib import (
    MIBCurve,
    cpr_cmd,
    feature_mib_curve,
    from_mib_json,
    linear_circuit_logits,
    mib_curve,
    to_mib_json,
    write_mib_json,
)
from recallscope.errors import ConfigError, ResultFileError
from recallscope.features.graph import AttributionGraph


def eap_ig_edge_count(n_layers, n_heads):
    """Edges of EAP-IG's ``Graph.from_model`` (MIB's graph), counted the way it builds them."""
    total, stream = 0, 1
    for _ in range(n_layers):
        total += stream * 3 * n_heads  # every earlier node -> q, k, v of every head
        stream += n_heads
        total += stream  # every earlier node and this layer's heads -> the MLP
        stream += 1
    return total + stream  # every node -> logits


def _random_scores(graph, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(graph.n_senders, graph.n_receivers, generator=g) * graph.valid
    return EdgeScores(graph, values, torch.zeros(2), torch.zeros(2))


@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 4, 2)])
def test_mib_json_round_trip(shape, tmp_path):
    graph = Graph(*shape)
    scores = _random_scores(graph)
    circuit = scores.top(9)
    path = write_mib_json(scores, tmp_path / "task_model" / "importances.json", d_model=16, circuit=circuit)
    data = json.loads(path.read_text())
    assert data["cfg"] == {"n_layers": shape[0], "n_heads": shape[1], "parallel_attn_mlp": False, "d_model": 16,
                           **({"n_key_value_heads": 2} if shape[2] != shape[1] else {})}
    assert len(data["edges"]) == eap_ig_edge_count(shape[0], shape[1])
    u, v = graph.edge("input -> a0.h1.q")
    assert data["edges"]["input->a0.h1<q>"]["score"] == pytest.approx(float(scores.scores[u, v]))
    assert data["nodes"]["logits"]["in_graph"] and set(data["nodes"]) == {"input", "logits", *graph.senders[1:]}
    back, inside = from_mib_json(path)
    assert back.graph == graph
    torch.testing.assert_close(back.scores, scores.scores, rtol=0, atol=1e-6)
    assert torch.equal(inside.edges, circuit.edges)
    assert sum(e["in_graph"] for e in data["edges"].values()) >= circuit.n_edges


def test_mib_json_grouped_heads_split_the_score():
    graph = Graph(1, 4, 2)
    scores = _random_scores(graph, seed=1)
    data = to_mib_json(scores, d_model=8)
    u, v = graph.edge("input -> a0.kv1.k")
    share = [data["edges"][f"input->a0.h{h}<k>"]["score"] for h in (2, 3)]  # heads 2, 3 read key/value head 1
    assert share == pytest.approx([float(scores.scores[u, v]) / 2] * 2)
    assert "input->a0.h0<k>" in data["edges"] and not any(e["in_graph"] for e in data["edges"].values())


def test_mib_json_bad_input():
    data = to_mib_json(_random_scores(Graph(1, 2, 2)), d_model=8)
    data["edges"]["m5->logits"] = {"score": 1.0, "in_graph": False}
    with pytest.raises(ResultFileError, match="not edges of a 1-layer, 2-head graph"):
        from_mib_json(data)
    with pytest.raises(ResultFileError, match="lacks"):
        from_mib_json({"cfg": {}, "nodes": {}})


def test_mib_json_files_that_are_not_circuits(tmp_path):
    listed, broken = tmp_path / "list.json", tmp_path / "broken.json"
    listed.write_text("[1, 2]")
    broken.write_text('{"cfg": ')
    with pytest.raises(ResultFileError, match="the JSON is a list"):
        from_mib_json(listed)
    with pytest.raises(ResultFileError, match="cannot read MIB JSON"):
        from_mib_json(broken)


def test_cpr_cmd_by_hand():
    cpr, cmd = cpr_cmd([0.1, 0.5, 1.0], [0.2, 0.6, 1.0])
    assert cpr == pytest.approx(0.4 * 0.4 + 0.5 * 0.8) and cmd == pytest.approx(0.4 * 0.6 + 0.5 * 0.2)
    # overshoot counts against CMD: |1 - 1.5| = 0.5
    assert cpr_cmd([0.5, 1.0], [1.5, 1.0]) == pytest.approx((0.625, 0.125))
    with pytest.raises(ConfigError, match="increase"):
        cpr_cmd([0.5, 0.1], [1.0, 1.0])


def test_component_curve_on_the_planted_circuit(tmp_path):
    model = planted_model()
    tp, metric = random_pairs(batch=4)
    scores = eap(model, tp, metric, method="eap", progress=False)
    total = int(scores.graph.valid.sum())
    assert total == eap_ig_edge_count(2, 4) == 110
    curve = mib_curve(model, tp, metric, scores, fractions=(0.01, 0.05, 0.1, 1.0), progress=False)
    assert curve.n_edges_total == 110
    # 11 top edges contain the 7 planted ones: the whole effect; all edges: the clean run
    assert curve.faithfulness[2] == pytest.approx(1.0, abs=1e-4) and curve.faithfulness[3] == pytest.approx(1.0, abs=1e-4)
    for k, f, n in zip(curve.fractions, curve.faithfulness, curve.n_edges):
        circuit = scores.top(int(k * 110)).pruned()
        assert n == circuit.n_edges
        assert f == pytest.approx(evaluate_circuit(model, tp, metric, circuit).faithfulness, abs=1e-6)
    assert set(scores.top(int(0.1 * 110)).pruned().edge_labels()) == set(PLANTED_EDGES)
    assert (curve.cpr, curve.cmd) == pytest.approx(cpr_cmd(curve.fractions, curve.faithfulness))
    back = MIBCurve.load(curve.save(tmp_path / "curve"))
    assert back == curve


def hand_graph():
    """One layer, one position: feature f0 (activation 2 = bias 0.5 + 1.5 from the embedding); the logit
    = 0.25 + 3 (f0) + 1 (error) - 0.5 (embedding) = 3.75. Nodes: f0, error, embedding, logit."""
    adjacency = torch.zeros(4, 4)
    adjacency[0, 2] = 1.5
    adjacency[3, 0], adjacency[3, 1], adjacency[3, 2] = 3.0, 1.0, -0.5
    bias = torch.tensor([0.5, 0.0, 0.0, 0.25])
    return AttributionGraph(tokens=torch.tensor([7]), features=torch.tensor([[0, 0, 5]]),
                            activations=torch.tensor([2.0]), logit_vectors=torch.eye(10)[[4]], logit_labels=("4",),
                            n_layers=1, adjacency=adjacency, bias=bias, node_input=torch.tensor([2.0, 0, 0, 3.75]))


def test_feature_curve_by_hand():
    graph = hand_graph()
    curve = feature_mib_curve(graph, fractions=(0.25, 0.5, 0.75, 1.0))
    # edges by |weight|: logit<-f0 (3), f0<-emb (1.5), logit<-err (1), logit<-emb (0.5); gap = 3.75 - 0.25
    # 1 edge: f0 = its bias 0.5 (a quarter of 2) -> logit 0.25 + 3/4 = 1.0; 2: 3.25; 3: 4.25; 4: 3.75
    expected = [0.75 / 3.5, 3.0 / 3.5, 4.0 / 3.5, 1.0]
    assert curve.n_edges == [1, 2, 3, 4] and curve.n_edges_total == 4
    assert curve.faithfulness == pytest.approx(expected)
    assert curve.cpr == pytest.approx(73 / 112) and curve.cmd == pytest.approx(19 / 112)
    assert curve.kind == "feature" and isinstance(curve.plot().data[0].y, tuple)


def test_feature_curve_on_a_real_graph():
    from test_features_graph import TOKENS
    from test_features_transcoder import relu_model

    from recallscope.features.graph import attribution_graph
    from recallscope.features.transcoder import exact_mlp_transcoders

    model = relu_model(seed=2, n_layers=3)
    graph = attribution_graph(model, exact_mlp_transcoders(model), TOKENS, targets=(4, 11))
    everything = graph.adjacency != 0
    # all edges: the graph's linear model gives the real logit difference
    torch.testing.assert_close(linear_circuit_logits(graph, everything).float(), graph.node_input[graph.logit_slice],
                               rtol=1e-4, atol=1e-4)
    curve = feature_mib_curve(graph)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    assert curve.n_edges[-1] == int(everything.sum()) and curve.n_edges[0] == int(0.001 * int(everything.sum()))
    with pytest.raises(ConfigError, match="fractions in"):
        feature_mib_curve(graph, fractions=(0.0, 1.0))


def test_circuit_from_mib_keeps_in_graph_edges_only():
    graph = Graph(1, 2, 2)
    circuit = Circuit.from_edges(graph, ["input -> a0.h1.v", "a0.h1 -> logits"])
    data = to_mib_json(_random_scores(graph), d_model=4, circuit=circuit)
    assert {k for k, e in data["edges"].items() if e["in_graph"]} == {"input->a0.h1<v>", "a0.h1->logits"}
    assert {k for k, n in data["nodes"].items() if n["in_graph"]} == {"input", "a0.h1", "logits"}
    assert from_mib_json(data)[1].edge_labels() == circuit.edge_labels()


def test_feature_node_curve_matches_neuron_ablation():
    """Exact transcoders: a feature is an MLP neuron, so ablating features = zeroing neurons (an oracle by hooks)."""
    from test_features_graph import TOKENS
    from test_features_transcoder import relu_model

    from recallscope.attribution.mib import feature_node_curve
    from recallscope.features.graph import attribution_graph, influence
    from recallscope.features.transcoder import exact_mlp_transcoders

    model = relu_model(seed=2, n_layers=3)
    tset = exact_mlp_transcoders(model)
    graph = attribution_graph(model, tset, TOKENS, targets=(4, 11))
    fractions = (0.1, 0.5, 1.0)
    curve = feature_node_curve(model, tset, graph, fractions=fractions)
    order = influence(graph)[: graph.n_feat].argsort(descending=True).tolist()

    def oracle(kept):
        drop = [tuple(graph.features[n].tolist()) for n in range(graph.n_feat) if n not in kept]

        def zero(layer):
            def hook(post, hook):
                post = post.clone()
                for lay, pos, f in drop:
                    if lay == layer:
                        post[0, pos, f] = 0.0
                return post
            return hook

        hooks = [(f"blocks.{layer}.mlp.hook_post", zero(layer)) for layer in range(3)]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(TOKENS[None], return_type="logits")[0, -1]
        return float(logits[4] - logits[11])

    full, none = oracle(set(range(graph.n_feat))), oracle(set())
    for k, f, n in zip(fractions, curve.faithfulness, curve.n_edges):
        assert n == int(k * graph.n_feat)
        assert f == pytest.approx((oracle(set(order[:n])) - none) / (full - none), abs=1e-4)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-6) and curve.kind == "feature-nodes"
