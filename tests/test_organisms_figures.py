"""recallscope.bench.organism_figures: the base64 byte x chunk map against a hook oracle and the truth, the organism's
chunk alignment, route rows of route vs rote organisms, and their figures."""

import pytest
import torch
from jaxtyping import TypeCheckError

from recallscope.errors import ResultFileError
from recallscope.organisms import ground_truth
from recallscope.organisms.b64_decoder import dependency_pairs, prompt_text
from recallscope.bench.organism_figures import (B64DependencyMap, b64_dependency_map, chunk_alignment,
                                           mnemonic_checks_figure, mnemonic_route_rows, plot_route_scores)
from recallscope.tasks.b64_codec import encode


pytestmark = pytest.mark.usefixtures("organism_determinism")



def _oracle_drop(bridge, pairs, n_chunks):
    """Mean drop in log p(answer) per chunk, by TransformerLens hooks on the bridge (no recallscope engine)."""
    name = "blocks.0.hook_resid_pre"
    drops = torch.zeros(len(pairs), n_chunks)
    for k, p in enumerate(pairs):
        clean, corrupt = bridge.to_tokens(p.clean), bridge.to_tokens(p.corrupt)
        answer = bridge.to_single_token(p.answer)
        _, cache = bridge.run_with_cache(corrupt, names_filter=[name])
        base = bridge(clean)[0, -1].log_softmax(-1)[answer]
        for i in range(n_chunks):
            def hook(act, hook, pos=1 + i):
                act = act.clone()
                act[:, pos] = cache[name][:, pos]
                return act

            patched = bridge.run_with_hooks(clean, fwd_hooks=[(name, hook)])[0, -1].log_softmax(-1)[answer]
            drops[k, i] = base - patched
    return drops.mean(0)


def test_b64_dependency_map_matches_the_hook_oracle_and_the_truth(b64_organism, tmp_path):
    n_bytes, n = 7, 2
    dep = b64_dependency_map(b64_organism, n_bytes, n, seed=3)
    truth = ground_truth(b64_organism)
    pairs = dependency_pairs(n_bytes, n, seed=3)
    oracle = torch.stack([_oracle_drop(b64_organism, pairs[j * n:(j + 1) * n], truth.n_chunks) for j in range(n_bytes)])
    torch.testing.assert_close(dep.drop, oracle, atol=1e-3, rtol=1e-3)
    assert torch.equal(dep.depends, truth.dependency(n_bytes))
    s = dep.summary()
    assert s["roc_auc"] == 1.0 and s["mean_drop_dependent"] > 1.0 and s["max_abs_drop_independent"] < 1e-3
    back = B64DependencyMap.load(dep.save(tmp_path / "dep"))
    torch.testing.assert_close(back.drop, dep.drop)
    assert torch.equal(back.depends, dep.depends) and back.n_per_byte == n and back.manifest["seed"] == 3
    assert len(dep.plot().data) == 1 and dep.plot_truth().data[0].z.shape == (n_bytes, truth.n_chunks)
    with pytest.raises((ResultFileError, TypeCheckError)):  # the jaxtyping hook of the tests checks shapes first
        B64DependencyMap(dep.drop, dep.depends[:, :3], n)


def test_chunk_alignment_is_the_organisms_own_tokenization(b64_organism):
    from recallscope.plotting import plot_b64_alignment

    word = "heavens"
    align = chunk_alignment(b64_organism, word)
    b64 = encode(word)
    assert [t.text for t in align.tokens] == [b64[i:i + 2] for i in range(0, 12, 2)]
    ids = b64_organism.to_tokens(prompt_text(word))[0, 1:7].tolist()
    assert [t.token_id for t in align.tokens] == ids
    assert [t.char_span for t in align.tokens] == [(i, i + 2) for i in range(0, 12, 2)]
    depends = ground_truth(b64_organism).dependency(len(word))  # [byte, chunk]
    for i, tok in enumerate(align.tokens):  # the alignment's byte <-> token map is the organism's truth
        assert set(tok.byte_indices) == set(torch.nonzero(depends[:, i]).flatten().tolist())
    assert list(align.tokens[0].complete_bytes) == [0]  # 12 bits of chunk 0 hold all 8 of byte 0
    fig = plot_b64_alignment(align, token_values=torch.arange(6.0))
    assert fig.data[0].text == tuple(b64[i:i + 2] for i in range(0, 12, 2))


def test_route_rows_tell_a_route_organism_from_a_rote_one():
    from recallscope import load_model

    rows = [{"organism": name, **r} for name in ("route-s0", "rote-s0")
            for r in mnemonic_route_rows(load_model(f"organism:{name}"), ["VA"], n_controls=19, n_boot=100)]
    route, rote = rows
    assert (route["chunk"], route["concept"], route["is_route"], rote["is_route"]) == ("VA", "VAT", True, False)
    # issue 13's standard: the alignment loss made the chunk's state the concept's, so the concept only ties
    # with the input itself (a competitor): not "route"; the rote organism's concept mediates nothing
    assert route["verdict"] == "inconclusive" and abs(route["score"]) < 0.1
    assert rote["verdict"] == "no route" and rote["score"] < 0.05
    fig = plot_route_scores(rows)
    assert [t.name.split()[0] for t in fig.data] == ["route-s0", "rote-s0"]
    assert list(fig.data[0].x) == ["VA → VAT"] and fig.data[0].y[0] == pytest.approx(route["score"])


def test_mnemonic_checks_figure_reads_the_stored_metrics():
    from recallscope.organisms.recipes import WEIGHTS_DIR
    from recallscope.organisms.store import read_config

    fig = mnemonic_checks_figure(["route-s0", "rote-s0"])
    assert len(fig.data) == 3 and list(fig.data[0].x) == ["route-s0", "rote-s0"]
    stored = [read_config(WEIGHTS_DIR / n)["metrics"]["swap_follow"] for n in ("route-s0", "rote-s0")]
    assert list(fig.data[1].y) == stored and stored[0] > stored[1]
