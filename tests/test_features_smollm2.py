"""SmolLM2 end to end at toy size: `recallscope transcoders` on Python-docs text (streamed, float16 store,
BOS left out) for two layers, then `recallscope graph` from the cache: graph.json + HTML, the untrained
layers as error nodes, the decomposition exact, and the replacement model keeping the real MLP at BOS."""

import json

import pytest
import torch

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]


@pytest.fixture(scope="module")
def cached(smollm2, tmp_path_factory):
    from recallscope.cli import main
    from recallscope.features.cache import find_cached_set

    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("RECALLSCOPE_CACHE", str(cache))
    assert main(["transcoders", "--model", "smollm2", "--layers", "3,20", "--n-tokens", "310", "--eval-tokens", "62",
                 "--seq-len", "32", "--d-sae", "64", "--k", "8", "--steps", "20", "--quiet"]) == 0
    yield mp, find_cached_set("smollm2")
    mp.undo()


def test_training_writes_a_bosless_partial_set(smollm2, cached):
    from recallscope.features.transcoder import TranscoderSet

    _, tdir = cached
    report = json.loads((tdir / "report.json").read_text())
    assert set(report["explained_variance"]) == {"3", "20"}
    assert report["n_train_tokens"] == 310 and report["n_eval_tokens"] == 62  # 10 x 31 and 2 x 31, BOS left out
    assert not any(tdir.parent.parent.glob("activations/*/train"))  # the store is deleted after training
    tset = TranscoderSet.load(tdir)
    assert tset.layers == [3, 20] and tset.info.first_pos == 1
    assert json.loads((tdir / "config.json").read_text())["corpus"] == "python-docs"


def test_graph_from_the_cache_is_exact_with_error_nodes(smollm2, cached, tmp_path):
    from recallscope.cli import main
    from recallscope.features.graph import attribution_graph
    from recallscope.features.transcoder import TranscoderSet

    _, tdir = cached
    out = tmp_path / "g"
    assert main(["graph", "--model", "smollm2", "--prompt", "The acronym VAT stands for Value Added",
                 "--target", " Tax", "--max-feature-nodes", "48", "--node-threshold", "1.0", "--out", str(out),
                 "--quiet"]) == 0  # toy transcoders: errors dominate, so keep every feature
    data = json.loads((out / "graph.json").read_text())
    feats = [nd for nd in data["nodes"] if nd["feature_type"] == "cross layer transcoder"]
    assert feats and {nd["layer"] for nd in feats} <= {"3", "20"} and all(nd["ctx_idx"] >= 1 for nd in feats)
    assert "plotly" in (out / "graph.html").read_text()[:100_000].lower()
    tset = TranscoderSet.load(tdir)
    tokens = smollm2.to_tokens("The acronym VAT stands for")[0]
    graph = attribution_graph(smollm2, tset, tokens, max_feature_nodes=16)
    rows = graph.rows_computed.nonzero().squeeze(-1)
    torch.testing.assert_close(graph.adjacency[rows].sum(1) + graph.bias[rows], graph.node_input[rows],
                               rtol=1e-3, atol=1e-3)
    err = torch.stack([graph.adjacency[graph.logit_slice.start, graph.error_index(7, p)] for p in range(len(tokens))])
    assert err.abs().sum() > 0  # layer 7 has no transcoder: its whole MLP output is error nodes
