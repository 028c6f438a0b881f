"""Graph JSON in circuit-tracer's / Neuronpedia's schema: round trips, pruned export, foreign files."""

import json

import pytest
import torch
from test_features_transcoder import relu_model

from recallscope.errors import ResultFileError
from recallscope.features.export import from_json, save_json, to_json
from recallscope.features.graph import attribution_graph, prune
from recallscope.features.transcoder import exact_mlp_transcoders

TOKENS = torch.tensor([0, 5, 9, 3, 17, 2])
NODE_KEYS = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit", "run_idx",
             "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"}


@pytest.fixture(scope="module")
def graph():
    model = relu_model(seed=2, n_layers=3)
    return attribution_graph(model, exact_mlp_transcoders(model), TOKENS, targets=[3, (4, 11)][0])


def test_schema_keys(graph):
    data = to_json(graph, slug="toy", scan="toy-scan")
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert {"slug", "scan", "transcoder_list", "prompt_tokens", "prompt", "node_threshold",
            "schema_version"} <= set(data["metadata"])
    assert all(set(nd) == NODE_KEYS for nd in data["nodes"])
    assert all(set(link) == {"source", "target", "weight"} for link in data["links"])
    ids = [nd["node_id"] for nd in data["nodes"]]
    assert len(ids) == len(set(ids))
    kinds = {nd["feature_type"] for nd in data["nodes"]}
    assert kinds == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    logit = [nd for nd in data["nodes"] if nd["feature_type"] == "logit"][0]
    assert logit["node_id"] == f"4_3_{len(TOKENS) - 1}" and logit["is_target_logit"]
    layer, pos, idx = graph.features[0].tolist()
    assert data["nodes"][0]["node_id"] == f"{layer}_{idx}_{pos}"


def test_round_trip_is_lossless(graph, tmp_path):
    path = save_json(to_json(graph, slug="toy"), tmp_path / "toy.json")
    back = from_json(path)
    torch.testing.assert_close(back.adjacency, graph.adjacency)
    assert torch.equal(back.features, graph.features) and torch.equal(back.tokens, graph.tokens)
    torch.testing.assert_close(back.activations, graph.activations)
    torch.testing.assert_close(back.logit_vectors, graph.logit_vectors)
    torch.testing.assert_close(back.bias, graph.bias)
    torch.testing.assert_close(back.node_input, graph.node_input)
    assert back.logit_labels == graph.logit_labels and back.n_layers == graph.n_layers
    assert json.loads(path.read_text()) == json.loads(json.dumps(to_json(back, slug="toy")))


def test_logit_difference_round_trip():
    model = relu_model(seed=2, n_layers=3)
    g = attribution_graph(model, exact_mlp_transcoders(model), TOKENS, targets=(4, 11))
    back = from_json(to_json(g))
    torch.testing.assert_close(back.logit_vectors, g.logit_vectors)
    torch.testing.assert_close(back.adjacency, g.adjacency)


def test_pruned_export_keeps_only_kept_nodes_and_edges(graph):
    pruned = prune(graph, node_threshold=0.6, edge_threshold=0.9)
    data = to_json(graph, pruned)
    assert len(data["nodes"]) == int(pruned.node_mask.sum())
    assert len(data["links"]) == int(pruned.edge_mask.sum())
    back = from_json(data)
    kept_feats = pruned.node_mask[: graph.n_feat]
    assert torch.equal(back.features, graph.features[kept_feats])
    # edges among kept features survive with their weights
    sub = (graph.adjacency * pruned.edge_mask)[: graph.n_feat, : graph.n_feat][kept_feats][:, kept_feats]
    torch.testing.assert_close(back.adjacency[: back.n_feat, : back.n_feat], sub)


def test_foreign_file_without_recallscope_metadata(graph):
    data = to_json(graph)
    del data["metadata"]["recallscope"]
    back = from_json(data)
    torch.testing.assert_close(back.adjacency, graph.adjacency)
    assert back.n_layers == graph.n_layers and torch.equal(back.tokens, graph.tokens)
    assert back.logit_vectors.shape[1] == max(graph.tokens.max().item(), 3) + 1
    with pytest.raises(ResultFileError, match="metadata, nodes and links"):
        from_json({"nodes": []})


def test_graph_json_files_that_are_not_graphs(tmp_path):
    listed, broken = tmp_path / "list.json", tmp_path / "broken.json"
    listed.write_text('["metadata", "nodes", "links"]')  # a list holding the key names is still no graph
    broken.write_text('{"nodes": [')
    with pytest.raises(ResultFileError, match="metadata, nodes and links"):
        from_json(listed)
    with pytest.raises(ResultFileError, match="cannot read graph JSON"):
        from_json(broken)


def test_graph_figure_draws_kept_nodes(graph):
    from recallscope.features.plot import graph_figure

    pruned = prune(graph, node_threshold=0.6, edge_threshold=0.9)
    fig = graph_figure(graph, pruned, max_edges=50)
    markers = [t for t in fig.data if t.mode == "markers"]
    assert len(markers) == 1 and len(markers[0].x) == int(pruned.node_mask.sum())
    n_segments = sum(sum(v is None for v in t.x) for t in fig.data if t.mode == "lines")
    assert n_segments == min(50, int(pruned.edge_mask.sum()))


def test_labels_and_supernodes_round_trip(graph, tmp_path):
    from recallscope.errors import ConfigError
    from recallscope.features.export import node_ids, supernodes_from_json

    n = graph.adjacency.shape[0]
    labels = [f"node {i}" for i in range(n)]
    groups = {"early": [0, 1, 2], "late": [graph.n_feat - 1]}
    data = to_json(graph, labels=labels, supernodes=groups)
    ids = node_ids(graph)
    assert data["qParams"]["supernodes"] == [["early", ids[0], ids[1], ids[2]], ["late", ids[graph.n_feat - 1]]]
    assert data["qParams"]["pinnedIds"] == [ids[0], ids[1], ids[2], ids[graph.n_feat - 1]]
    clerps = {nd["node_id"]: nd["clerp"] for nd in data["nodes"]}
    assert clerps[ids[1]] == "node 1" and clerps[ids[-1]].startswith("Output")  # logits keep their text
    back_data = json.loads(save_json(data, tmp_path / "g.json").read_text())
    back = from_json(back_data)
    assert supernodes_from_json(back_data, back) == groups
    pruned = prune(graph, node_threshold=0.3)
    dropped = int((~pruned.node_mask[: graph.n_feat]).nonzero()[0])
    with pytest.raises(ConfigError, match="not in the exported graph"):
        to_json(graph, pruned, supernodes={"x": [dropped]})
    with pytest.raises(ConfigError, match="labels has 2 entries"):
        to_json(graph, labels=["a", "b"])
