"""MIB / EAP-IG ``.pt`` circuit files: round trip, agreement with the JSON export edge by edge, EAP-IG's index
rule checked by hand on a tiny config, clear errors for malformed files."""

import pytest
import torch

from recallscope.attribution.edges import EdgeScores
from recallscope.attribution.graph import Graph
from recallscope.attribution.mib import to_mib_json
from recallscope.attribution.mib_pt import (
    from_mib_pt,
    mib_backward_index,
    mib_dst_nodes,
    mib_forward_index,
    mib_json_to_pt,
    mib_pt_to_json,
    mib_src_nodes,
    to_mib_pt,
    write_mib_pt,
)
from recallscope.errors import ResultFileError


def _random_scores(graph, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(graph.n_senders, graph.n_receivers, generator=g) * graph.valid
    return EdgeScores(graph, values, torch.zeros(2), torch.zeros(2))


@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 4, 2), (2, 3, 3, True)])
def test_pt_round_trip(shape, tmp_path):
    graph = Graph(*shape)
    scores = _random_scores(graph)
    circuit = scores.top(9)
    path = write_mib_pt(scores, tmp_path / "task_model" / "importances.pt", d_model=16, circuit=circuit)
    back, inside = from_mib_pt(path)
    assert back.graph == graph
    torch.testing.assert_close(back.scores, scores.scores, rtol=0, atol=1e-6)
    assert torch.equal(inside.edges, circuit.edges)
    d = torch.load(path, weights_only=True)
    assert d["edges_scores"].dtype == torch.float32 and d["edges_in_graph"].dtype == torch.bool
    # a node is in the graph when one of its edges is (the JSON export's rule)
    used = set(circuit.nodes())
    assert [bool(x) for x in d["nodes_in_graph"]] == [n in used for n in d["src_nodes"]]


@pytest.mark.parametrize("shape", [(2, 4, 4), (2, 4, 2)])
def test_pt_and_json_agree_edge_by_edge(shape):
    graph = Graph(*shape)
    scores = _random_scores(graph, seed=3)
    circuit = scores.top(12)
    data = to_mib_json(scores, d_model=8, circuit=circuit)
    d = to_mib_pt(scores, d_model=8, circuit=circuit)
    assert d["cfg"] == data["cfg"]
    src, dst = d["src_nodes"], d["dst_nodes"]
    seen = torch.zeros_like(d["edges_in_graph"])
    for name, info in data["edges"].items():
        sender, receiver = name.split("->")
        u, v = src.index(sender), dst.index(receiver)
        assert float(d["edges_scores"][u, v]) == pytest.approx(info["score"], abs=1e-6)
        assert bool(d["edges_in_graph"][u, v]) == info["in_graph"]
        seen[u, v] = True
    # every other entry (not an edge of MIB's graph) is empty
    assert not d["edges_scores"][~seen].any() and not d["edges_in_graph"][~seen].any()
    assert int(seen.sum()) == len(data["edges"])
    # and the reverse conversion gives the JSON back
    again = mib_pt_to_json(d)
    assert set(again["edges"]) == set(data["edges"])
    for name, info in data["edges"].items():
        assert again["edges"][name]["in_graph"] == info["in_graph"]
        assert again["edges"][name]["score"] == pytest.approx(info["score"], abs=1e-6)


def test_layout_follows_eap_igs_index_rule():
    # 2 layers, 2 heads: n_forward = 1 + 2 * 3 = 7, n_backward = 2 * 7 + 1 = 15
    assert mib_src_nodes(2, 2) == ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]
    assert mib_dst_nodes(2, 2) == ["a0.h0<q>", "a0.h1<q>", "a0.h0<k>", "a0.h1<k>", "a0.h0<v>", "a0.h1<v>", "m0",
                                   "a1.h0<q>", "a1.h1<q>", "a1.h0<k>", "a1.h1<k>", "a1.h0<v>", "a1.h1<v>", "m1",
                                   "logits"]
    # by hand: a1.h1 = 1 + 1*(2+1) + 1 = 5; m0 = 1 + 0 + 2 = 3; a1.h0<v> = 1*7 + 2*2 + 0 = 11; m1 = 7 + 6 = 13
    assert [mib_forward_index(n, 2, 2) for n in ("input", "a1.h1", "m0")] == [0, 5, 3]
    assert [mib_backward_index(n, 2, 2) for n in ("a1.h0<v>", "m1", "logits", "a0.h1<k>")] == [11, 13, 14, 3]
    scores = torch.zeros(7, 15)
    graph = Graph(2, 2, 2)
    values = torch.zeros(graph.n_senders, graph.n_receivers)
    values[graph.edge("a0.h1 -> a1.h0.v")] = 2.0
    values[graph.edge("m0 -> m1")] = -3.0
    values[graph.edge("input -> logits")] = 0.5
    d = to_mib_pt(EdgeScores(graph, values, torch.zeros(1), torch.zeros(1)), d_model=4)
    scores[2, 11], scores[3, 13], scores[0, 14] = 2.0, -3.0, 0.5
    torch.testing.assert_close(d["edges_scores"], scores, rtol=0, atol=0)
    assert d["edges_scores"].shape == (7, 15) and d["nodes_in_graph"].shape == (7,)


def test_grouped_query_split_in_pt():
    graph = Graph(1, 4, 2)
    values = torch.zeros(graph.n_senders, graph.n_receivers)
    values[graph.edge("input -> a0.kv1.k")] = 1.0
    d = to_mib_pt(EdgeScores(graph, values, torch.zeros(1), torch.zeros(1)), d_model=8)
    k_cols = [mib_backward_index(f"a0.h{h}<k>", 1, 4) for h in range(4)]
    assert d["edges_scores"][0, k_cols].tolist() == [0.0, 0.0, 0.5, 0.5]  # heads 2, 3 read key/value head 1
    assert d["cfg"]["n_key_value_heads"] == 2
    back, _ = from_mib_pt(d)
    assert back.graph == graph and float(back.scores[graph.edge("input -> a0.kv1.k")]) == pytest.approx(1.0)


def test_eap_ig_style_file_without_recallscope_keys():
    """A file as EAP-IG writes it (plain cfg, float scores on real edges only) is read."""
    src, dst = mib_src_nodes(1, 2), mib_dst_nodes(1, 2)
    scores = torch.zeros(len(src), len(dst))
    scores[0, dst.index("a0.h1<q>")] = 0.25
    scores[src.index("a0.h0"), dst.index("m0")] = -1.0
    inside = scores != 0
    d = {"cfg": {"n_layers": 1, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8}, "src_nodes": src,
         "dst_nodes": dst, "edges_scores": scores, "edges_in_graph": inside, "nodes_in_graph": torch.ones(4).bool()}
    back, circuit = from_mib_pt(d)
    assert float(back.scores[back.graph.edge("input -> a0.h1.q")]) == 0.25
    assert sorted(circuit.edge_labels()) == ["a0.h0 -> m0", "input -> a0.h1.q"]


def _good():
    return to_mib_pt(_random_scores(Graph(1, 2, 2)), d_model=8)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.pop("edges_in_graph"), "lacks \\['edges_in_graph'\\]"),
    (lambda d: d.update(edges_scores=torch.zeros(3, 3)), "edges_scores is \\(3, 3\\)"),
    (lambda d: d.update(dst_nodes=list(reversed(d["dst_nodes"]))), "dst_nodes of the file is not EAP-IG's order"),
    (lambda d: d["cfg"].pop("n_heads"), "lacks an integer n_layers"),
    (lambda d: d["edges_scores"].__setitem__((3, 0), 1.0), "off the graph's edges, e.g. m0->a0.h0<q>"),
    (lambda d: d.update(nodes_in_graph=torch.ones(2).bool()), "nodes_in_graph must be"),
])
def test_malformed_pt_files(edit, match):
    d = _good()
    edit(d)
    with pytest.raises(ResultFileError, match=match):
        from_mib_pt(d)


def test_unreadable_pt_file(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_text("not a torch file")
    with pytest.raises(ResultFileError, match="cannot read an MIB .pt circuit file"):
        from_mib_pt(path)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ResultFileError, match="holds a dict"):
        from_mib_pt(tmp_path / "list.pt")
    with pytest.raises(ResultFileError, match="no MIB receiver"):
        mib_json_to_pt({"cfg": {"n_layers": 1, "n_heads": 2}, "nodes": {},
                        "edges": {"input->a0.h2<q>": {"score": 1.0, "in_graph": True}}})
