"""The graph view: supernodes sum their members' edges, the pruning slider keeps what cumulative influence
says, labels come from the decoder's lens tokens and from top-activating contexts (checked against oracles
computed from the model's own weights and hooks), and component circuits get the same view with site labels."""

from dataclasses import replace

import pytest
import torch
from test_attribution_mib import hand_graph
from test_features_graph import TOKENS
from test_features_transcoder import relu_model

from recallscope.attribution.graph import Graph
from recallscope.errors import ConfigError
from recallscope.features.graph import AttributionGraph, attribution_graph, influence
from recallscope.features.transcoder import TranscoderSet, exact_mlp_transcoders
from recallscope.features.view import (
    THRESHOLDS,
    component_node_graph,
    draw,
    feature_labels,
    feature_node_graph,
    graph_view,
    group_nodes,
    kept_nodes,
    lens_tokens,
    node_influence,
    top_contexts,
)


@pytest.fixture(scope="module")
def setup():
    model = relu_model(seed=2, n_layers=3)
    tset = exact_mlp_transcoders(model)
    return model, tset, attribution_graph(model, tset, TOKENS, targets=(4, 11))


def test_supernodes_sum_member_edges():
    ng = feature_node_graph(hand_graph())  # nodes: f0, error, embedding, logit
    grouped = group_nodes(ng, {"f0+err": [0, 1]})
    assert grouped.labels[0] == "f0+err (2)" and grouped.kinds[0] == "supernode"
    assert grouped.members == [[0, 1], [2], [3]]
    # logit <- {f0, err} = 3 + 1; {f0, err} <- embedding = 1.5 (f0's); no self edge
    assert grouped.adjacency.tolist() == [[0.0, 1.5, 0.0], [0.0, 0.0, 0.0], [4.0, -0.5, 0.0]]
    with pytest.raises(ConfigError, match="already in another supernode"):
        group_nodes(ng, {"a": [0], "b": [0, 1]})
    with pytest.raises(ConfigError, match="group_by"):
        group_nodes(ng, by="colour")


def test_influence_and_slider_frames(setup):
    _, _, graph = setup
    ng = feature_node_graph(graph)
    infl = node_influence(ng)
    torch.testing.assert_close(infl, influence(graph), rtol=1e-5, atol=1e-6)  # the graph module's influence
    counts = [int(kept_nodes(ng, t, infl).sum()) for t in THRESHOLDS]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    keep = kept_nodes(ng, 0.5, infl)
    assert keep[graph.embed_slice.start:].all()  # embeddings and logits are always drawn
    free = ~ng.pinned
    # the kept free nodes are the most influential ones, and together carry at least half of the influence
    assert infl[free & keep].min() >= infl[free & ~keep].max()
    assert infl[free & keep].sum() >= 0.5 * infl[free].sum()
    fig = draw(ng, thresholds=(0.5, 0.9), max_edges=50)
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == ["0.5", "0.9"] and fig.layout.sliders[0].active == 1
    per_frame = len(fig.data) // 2
    for k, step in enumerate(steps):
        visible = step.args[0]["visible"]
        assert visible == [j // per_frame == k for j in range(len(fig.data))]
        nodes = fig.data[(k + 1) * per_frame - 1]
        assert len(nodes.x) == int(kept_nodes(ng, (0.5, 0.9)[k], infl).sum())
        drawn = sum(len(tr.x) // 3 for tr in fig.data[k * per_frame:(k + 1) * per_frame - 1])
        assert 0 < drawn <= 50


def test_lens_tokens_and_top_contexts_match_oracles(setup):
    model, tset, graph = setup
    feats = graph.features[:6]
    gain = dict(model.named_parameters())["ln_out._original_component.weight"].detach()
    for (layer, _, idx), got in zip(feats.tolist(), lens_tokens(model, tset, feats, k=3)):
        oracle = ((tset[layer].W_dec[0][idx] * gain) @ model.W_U).topk(3).indices.tolist()
        assert got == oracle
    contexts = torch.randint(0, 24, (5, 7), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(contexts)  # exact transcoders: a feature is an MLP neuron
    for (layer, _, idx), (value, ids, at) in zip(feats.tolist(), top_contexts(model, tset, feats, contexts, window=3)):
        post = cache[f"blocks.{layer}.mlp.hook_post"][..., idx]
        b, p = divmod(int(post.argmax()), 7)
        assert value == pytest.approx(float(post.max()), abs=1e-5)
        assert ids == contexts[b, max(0, p - 2):p + 1].tolist() and ids[at] == int(contexts[b, p])
    bosless = TranscoderSet({k: tset[k] for k in tset.layers}, tset.n_layers, replace(tset.info, first_pos=1))
    every = graph.features  # several of them fire most at position 0 of these contexts
    assert any(int(cache[f"blocks.{la}.mlp.hook_post"][..., i].argmax()) % 7 == 0 for la, _, i in every.tolist())
    for (layer, _, idx), (value, ids, at) in zip(every.tolist(), top_contexts(model, bosless, every, contexts)):
        post = cache[f"blocks.{layer}.mlp.hook_post"][:, 1:, idx]  # position 0 has no features in this set
        assert value == pytest.approx(float(post.max()), abs=1e-5) and at >= 1
    labels = feature_labels(model, tset, graph, contexts=contexts, decode=lambda ids: f"t{ids[0]}")
    assert len(labels) == graph.adjacency.shape[0]
    layer, _, idx = graph.features[0].tolist()
    assert labels[0].startswith(f"L{layer} #{idx} → ") and "| …" in labels[0] and "[t" in labels[0]
    assert labels[-1] == "logit 4-11" and labels[graph.embed_slice.start] == "emb 't0'"
    with pytest.raises(ConfigError, match="no tokenizer"):
        feature_labels(model, tset, graph)


def test_group_by_label_merges_features_saying_the_same_tokens(setup):
    model, tset, graph = setup
    labels = feature_labels(model, tset, graph, decode=lambda ids: f"t{ids[0]}")
    fig = graph_view(graph, labels=labels, group_by="label", thresholds=(1.0,))
    ng = group_nodes(feature_node_graph(graph, labels=labels), by="label")
    supers = [m for m, k in zip(ng.members, ng.kinds) if k == "supernode"]
    assert supers and all(len({labels[i].split("→")[1] for i in m}) == 1 for m in supers)
    assert sum(len(m) for m in ng.members) == graph.adjacency.shape[0]
    assert any(str(t).startswith("→") for t in fig.data[-1].text)


def test_component_view_uses_site_labels():
    graph = Graph(2, 4, 4)
    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    for label, w in (("input -> a0.h1.q", 1.0), ("input -> a0.h1.v", 2.0), ("a0.h1 -> m1", -3.0),
                     ("m1 -> logits", 4.0), ("a0.h1 -> logits", 0.5)):
        scores[graph.edge(label)] = w
    from recallscope.attribution.edges import EdgeScores

    es = EdgeScores(graph, scores, torch.zeros(1), torch.zeros(1))
    ng = component_node_graph(es)
    assert ng.ids == ["input", "a0.h1", "m1", "logits"]  # only nodes with an edge (and input, logits) are drawn
    assert ng.y.tolist() == [0.0, 1.0, 2.0, 3.0] and ng.y_ticks[1] == ["embed", "z L0", "mlp_out L1", "logits"]
    at = {n: i for i, n in enumerate(ng.ids)}
    assert ng.adjacency[at["a0.h1"], at["input"]] == 3.0  # q and v inputs summed
    assert ng.adjacency[at["m1"], at["a0.h1"]] == -3.0 and ng.adjacency[at["logits"], at["m1"]] == 4.0
    assert ng.labels[at["a0.h1"]] == "z L0.H1" and ng.labels[at["m1"]] == "mlp_out L1"
    fig = graph_view(es.top(4), thresholds=(1.0,))
    assert {"z L0.H1", "mlp_out L1", "embed", "logits"} <= set(fig.data[-1].text)
    assert [graph.node_label(n) for n in ("input", "a1.h3", "m0", "logits")] == ["embed", "z L1.H3", "mlp_out L0",
                                                                                  "logits"]
    assert Graph(1, 4, 2).node_label("a0.kv1") == "k/v L0.H1"
    grouped = group_nodes(ng, {"route": ["a0.h1", "mlp_out L1"]})  # by id or by label
    assert grouped.members[0] == [at["a0.h1"], at["m1"]] and grouped.adjacency[grouped.ids.index("logits"), 0] == 4.5
    # grouped-query attention: a key/value input's weight is split over the query heads of its group
    gqa = Graph(1, 4, 2)
    s2 = torch.zeros(gqa.n_senders, gqa.n_receivers)
    s2[gqa.edge("input -> a0.kv1.v")] = 2.0
    s2[gqa.edge("a0.h2 -> logits")] = s2[gqa.edge("a0.h3 -> logits")] = 1.0
    ng2 = component_node_graph(EdgeScores(gqa, s2, torch.zeros(1), torch.zeros(1)))
    assert ng2.ids == ["input", "a0.h2", "a0.h3", "logits"] and ng2.adjacency[1:3, 0].tolist() == [1.0, 1.0]
    with pytest.raises(ConfigError, match="no node"):
        graph.node_label("b0")


def test_attribution_graph_is_a_result(setup, tmp_path):
    _, _, graph = setup
    back = AttributionGraph.load(graph.save(tmp_path / "g"))
    for name in ("tokens", "features", "activations", "adjacency", "bias", "node_input", "rows_computed"):
        assert torch.equal(getattr(back, name), getattr(graph, name)), name
    assert back.logit_labels == graph.logit_labels and back.config == graph.config
    html = graph._repr_html_()
    assert "AttributionGraph" in html and "features" in html
