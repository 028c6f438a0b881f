"""The streaming activation store, resumable set training, partial sets and BOS-less sets in graphs,
the transcoder cache and the `recallscope transcoders` / `graph` commands' errors and cache lookup."""

import json

import numpy as np
import pytest
import torch

from recallscope.errors import ConfigError
from recallscope.features import train as train_mod
from recallscope.features.graph import attribution_graph
from recallscope.features.replacement import replaced
from recallscope.features.store import ActivationStore, StoreMeta, collect_to_store, n_rows_of
from recallscope.features.train import TranscoderTrainConfig, collect_activations, sample_tokens, train_set
from recallscope.features.transcoder import TranscoderSet
from test_features_transcoder import relu_model


@pytest.fixture(scope="module")
def rmodel():
    return relu_model(seed=3, n_layers=3)


def _meta(tokens, layers, first_pos=0, dtype="float32"):
    return StoreMeta(tuple(layers), n_rows_of(tokens, first_pos), 16, 16, dtype=dtype, first_pos=first_pos)


def test_store_round_trips_the_activations(rmodel, tmp_path):
    tokens = sample_tokens(rmodel, 10, 6, seed=0)
    store = collect_to_store(rmodel, tokens, ActivationStore.create(tmp_path / "s", _meta(tokens, [0, 2], 1)),
                             batch_size=3, progress=False)
    assert store.complete and store.rows_done == 50
    ref = collect_activations(rmodel, tokens, [0, 2], first_pos=1)
    again = ActivationStore(tmp_path / "s")  # reopened from disk
    for layer in (0, 2):
        x, y = again.layer(layer)
        # float32 round trip; the reference forward batches differently, so matmul blocking (and the thread
        # count) can change the last bits of the MLP output: compare to float32 precision, not bitwise.
        torch.testing.assert_close(x, ref[layer][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, ref[layer][1], rtol=1e-5, atol=1e-6)
    half = collect_to_store(rmodel, tokens, ActivationStore.create(tmp_path / "h", _meta(tokens, [2], 1, "float16")),
                            batch_size=4, progress=False)
    x16, _ = half.layer(2)
    assert np.load(tmp_path / "h" / "layer2.in.npy", mmap_mode="r").dtype == np.float16
    torch.testing.assert_close(x16, ref[2][0], rtol=2e-3, atol=2e-3)
    assert not torch.equal(x16, ref[2][0])


def test_interrupted_collection_resumes_to_the_same_store(rmodel, tmp_path, monkeypatch):
    tokens = sample_tokens(rmodel, 12, 5, seed=1)
    full = collect_to_store(rmodel, tokens, ActivationStore.create(tmp_path / "a", _meta(tokens, [0, 1])),
                            batch_size=4, progress=False)
    real_write, calls = ActivationStore.write, []

    def flaky(self, start, acts):
        calls.append(start)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(self, start, acts)

    monkeypatch.setattr(ActivationStore, "write", flaky)
    with pytest.raises(KeyboardInterrupt):
        collect_to_store(rmodel, tokens, ActivationStore.create(tmp_path / "b", _meta(tokens, [0, 1])),
                         batch_size=4, progress=False)
    monkeypatch.setattr(ActivationStore, "write", real_write)
    part = ActivationStore(tmp_path / "b")
    assert part.rows_done == 20 and not part.complete
    with pytest.raises(Exception, match="incomplete"):
        part.layer(0)
    resumed = collect_to_store(rmodel, tokens, ActivationStore.create(tmp_path / "b", _meta(tokens, [0, 1])),
                               batch_size=4, progress=False)
    for layer in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(full.layer(layer), resumed.layer(layer)))
    with pytest.raises(ConfigError, match="another configuration"):
        ActivationStore.create(tmp_path / "b", _meta(tokens, [0]))
    with pytest.raises(ConfigError, match="not the tokens"):
        collect_to_store(rmodel, tokens[:5], ActivationStore.create(tmp_path / "c", _meta(tokens, [0])),
                         progress=False)


def test_interrupted_set_training_resumes_to_identical_weights(rmodel, tmp_path, monkeypatch):
    tokens = sample_tokens(rmodel, 60, 6, seed=2)
    cfg = TranscoderTrainConfig(d_sae=32, k=4, steps=40, batch_size=64, checkpoint_every=10)
    ref, ref_report = train_set(rmodel, tokens, cfg, tmp_path / "ref", progress=False)
    real = train_mod.train_transcoder

    def interrupted(x, y, cfg, **kw):
        if kw.get("desc") == "layer 1":  # layer 0 finished, layer 1 stops after 20 steps
            real(x, y, cfg, stop_after=20, **kw)
            raise KeyboardInterrupt
        return real(x, y, cfg, **kw)

    monkeypatch.setattr(train_mod, "train_transcoder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_set(rmodel, tokens, cfg, tmp_path / "run", progress=False)
    monkeypatch.setattr(train_mod, "train_transcoder", real)
    assert torch.load(tmp_path / "run" / "checkpoints" / "layer1.pt", weights_only=False)["step"] == 20
    assert not (tmp_path / "run" / "transcoders.json").exists()
    tset, report = train_set(rmodel, tokens, cfg, tmp_path / "run", progress=False)
    for layer in ref.layers:
        for name, p in ref[layer].named_parameters():
            assert torch.equal(p, dict(tset[layer].named_parameters())[name]), (layer, name)
    assert report == ref_report
    assert not (tmp_path / "run" / "activations").exists()  # deleted after training by default
    again, _ = train_set(rmodel, tokens, cfg, tmp_path / "run", progress=False)  # finished: reloads, no store
    assert torch.equal(again[2].W_dec, ref[2].W_dec) and not (tmp_path / "run" / "activations").exists()


def _check_exact(graph):
    rows = graph.rows_computed.nonzero().squeeze(-1)
    lhs = graph.adjacency[rows].sum(1) + graph.bias[rows]
    torch.testing.assert_close(lhs, graph.node_input[rows], rtol=1e-4, atol=1e-4)


def test_partial_bosless_set_gives_error_nodes_and_an_exact_graph(rmodel, tmp_path):
    """A set trained for layers 0 and 2 only, without the BOS position: layer 1 is all error nodes (its
    whole MLP output), BOS has no features, the replacement model keeps the real MLP at BOS, and the
    graph's decomposition stays exact."""
    tokens = sample_tokens(rmodel, 80, 6, seed=4)
    cfg = TranscoderTrainConfig(d_sae=32, k=4, steps=60, batch_size=64)
    tset, report = train_set(rmodel, tokens, cfg, tmp_path, layers=[0, 2], first_pos=1, progress=False)
    assert set(report.explained_variance) == {0, 2} and report.n_train_tokens == 72 * 5
    loaded = TranscoderSet.load(tmp_path)
    assert loaded.layers == [0, 2] and loaded.info.first_pos == 1
    prompt = tokens[0]
    graph = attribution_graph(rmodel, loaded, prompt)
    assert graph.n_feat > 0 and (graph.features[:, 1] >= 1).all()  # no features at BOS
    _, cache = rmodel.run_with_cache(prompt[None])
    err1 = graph.adjacency[:, graph.error_index(1, 3)]
    assert err1.abs().sum() > 0
    _check_exact(graph)
    with replaced(rmodel, loaded):
        _, rcache = rmodel.run_with_cache(prompt[None])
    torch.testing.assert_close(rcache["blocks.0.hook_mlp_out"][:, 0], cache["blocks.0.hook_mlp_out"][:, 0])
    assert not torch.allclose(rcache["blocks.0.hook_mlp_out"][:, 1:], cache["blocks.0.hook_mlp_out"][:, 1:])
    torch.testing.assert_close(rcache["blocks.1.hook_mlp_out"][:, 0], cache["blocks.1.hook_mlp_out"][:, 0])


def test_cache_dirs_are_keyed_and_found(tmp_path, monkeypatch):
    from recallscope.errors import ResultFileError
    from recallscope.features.cache import cached_sets, find_cached_set, model_slug, transcoder_dir

    monkeypatch.setenv("RECALLSCOPE_CACHE", str(tmp_path))
    assert model_slug("SmolLM2-135M") == "smollm2" and model_slug("organism:fact-store") == "organism-fact-store"
    a, b = transcoder_dir("smollm2", {"k": 8}), transcoder_dir("smollm2", {"k": 16})
    assert a != b and a == transcoder_dir("smollm2", {"k": 8}) and a.parent == tmp_path / "transcoders"
    with pytest.raises(ResultFileError, match="recallscope transcoders --model smollm2"):
        find_cached_set("smollm2")
    a.mkdir(parents=True)
    assert cached_sets("smollm2") == []  # no saved set yet (e.g. interrupted training)
    (a / "transcoders.json").write_text("{}")
    assert find_cached_set("smollm2") == a


def test_cli_trains_into_the_cache_and_graphs_from_it(tmp_path, monkeypatch):
    from recallscope.cli import main

    monkeypatch.setenv("RECALLSCOPE_CACHE", str(tmp_path / "cache"))
    args = ["transcoders", "--model", "organism:fact-store", "--n-seqs", "100", "--steps", "30", "--d-sae", "32",
            "--k", "4", "--layers", "0,2", "--quiet"]
    assert main(args) == 0
    (found,) = (tmp_path / "cache" / "transcoders").iterdir()
    assert found.name.startswith("organism-fact-store-")
    assert json.loads((found / "config.json").read_text())["layers"] == [0, 2]
    assert set(json.loads((found / "report.json").read_text())["explained_variance"]) == {"0", "2"}
    out = tmp_path / "graph"
    assert main(["graph", "--model", "organism:fact-store", "--prompt", "f3 Pia Orr color", "--out", str(out),
                 "--quiet"]) == 0
    data = json.loads((out / "graph.json").read_text())
    layers = {nd["layer"] for nd in data["nodes"] if nd["feature_type"] == "cross layer transcoder"}
    assert layers and layers <= {"0", "2"}
    assert any(nd["feature_type"] == "mlp reconstruction error" and nd["layer"] == "1" for nd in data["nodes"])
    assert "<html" in (out / "graph.html").read_text()[:2000].lower()


@pytest.mark.parametrize("extra, message", [
    (["--k", "64", "--d-sae", "32"], "larger than --d-sae"),
    (["--layers", "0,7"], "do not exist"),
    (["--steps", "0"], "at least 1"),
    (["--text-file", "/nonexistent/words.txt"], "does not exist"),
    (["--seq-len", "999", "--corpus", "python-docs"], "--seq-len"),
])
def test_transcoders_command_rejects_bad_input(extra, message, tmp_path, capsys):
    from recallscope.cli import main

    code = main(["transcoders", "--model", "organism:fact-store", "--out", str(tmp_path), "--quiet", *extra])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "transcoders.json").exists()


def test_self_corpus_is_for_organisms_only(capsys):
    from recallscope.cli import main

    assert main(["transcoders", "--model", "smollm2", "--corpus", "self", "--quiet"]) == 2
    assert "organisms" in capsys.readouterr().err


def test_text_windows_are_bos_plus_consecutive_text(gpt2_tokenizer):
    from types import SimpleNamespace

    from recallscope.features.data import python_docs_text, text_windows

    assert len(gpt2_tokenizer) > 50000  # offline from_pretrained can return an empty tokenizer
    text = python_docs_text(20_000)
    assert len(text) >= 20_000 and "assert" in text
    model = SimpleNamespace(tokenizer=gpt2_tokenizer)
    rows = text_windows(model, text, 6, 9, seed=0, bos_id=7)
    ids = gpt2_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert rows.shape == (6, 9) and (rows[:, 0] == 7).all()
    for row in rows[:, 1:].tolist():
        starts = [i for i in range(0, len(ids) - 8, 8) if ids[i:i + 8] == row]
        assert starts, row  # each row is one aligned window of the text
    assert len({tuple(r) for r in rows.tolist()}) == 6
    with pytest.raises(ConfigError, match="windows"):
        text_windows(model, "a few words", 3, 9)


def test_graph_command_errors_name_the_fix(tmp_path, capsys, monkeypatch):
    from recallscope.cli import main

    monkeypatch.setenv("RECALLSCOPE_CACHE", str(tmp_path / "empty"))
    assert main(["graph", "--model", "organism:fact-store", "--prompt", "f3 Pia Orr color", "--contrast", "white",
                 "--out", str(tmp_path)]) == 2
    assert "--contrast needs --target" in capsys.readouterr().err
    assert main(["graph", "--model", "organism:fact-store", "--prompt", "f3 Pia Orr color", "--max-feature-nodes", "-1",
                 "--out", str(tmp_path)]) == 2
    assert "--max-feature-nodes must be >= 0" in capsys.readouterr().err
    assert main(["graph", "--model", "smollm2", "--prompt", "f3 Pia Orr color", "--out", str(tmp_path)]) == 2
    assert "recallscope transcoders --model smollm2" in capsys.readouterr().err
    # an organism with nothing cached falls back to the set shipped with recallscope
    assert main(["graph", "--model", "organism:fact-store", "--prompt", "f3 Pia Orr color", "--out",
                 str(tmp_path / "shipped")]) == 0
    assert "the set shipped with recallscope" in capsys.readouterr().err
    assert (tmp_path / "shipped" / "graph.json").is_file() and not (tmp_path / "empty" / "transcoders").exists()
