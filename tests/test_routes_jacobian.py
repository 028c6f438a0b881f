"""Jacobian-lens route scores: the fit, readout and swap equal TransformerLens's JacobianLens (and the lens
formula written out by hand), the fit is cached by weight hash, and the swap score's controls behave."""

import pytest
import torch

from recallscope.errors import ConfigError
from recallscope.routes.jacobian import (
    JLensConfig,
    JLensRouteResult,
    default_corpus,
    jacobian_lens,
    jlens_readout,
    jlens_route_score,
    jlens_swap_drops,
    auto_layers,
    lens_cache_path,
)

CORPUS = ["The cat sat on the mat and then it went to sleep in the warm sun all day long.",
          "Paris is the capital of France, and Berlin is the capital of Germany, said the old teacher."]
CFG = JLensConfig(layers=(0, 1), n_prompts=2, max_seq_len=24, skip_first_positions=2, dim_batch=8)
PROMPTS = ("The word cat is", "I saw a cat and", "Notes on the cat say")


@pytest.fixture(scope="module")
def tiny3(gpt2_tokenizer):
    from recallscope.models import tiny_model

    return tiny_model("llama", tokenizer=gpt2_tokenizer, seed=0, n_layers=3)


@pytest.fixture(scope="module")
def lens(tiny3, tmp_path_factory):
    return jacobian_lens(tiny3, CFG, prompts=CORPUS, cache_dir=tmp_path_factory.mktemp("jl"))


def test_fit_equals_transformerlens_and_is_cached(tiny3, gpt2_tokenizer, tmp_path, monkeypatch):
    from transformer_lens.tools.analysis import JacobianLens

    from recallscope.manifest import weights_hash
    from recallscope.models import tiny_model

    ours = jacobian_lens(tiny3, CFG, prompts=CORPUS, cache_dir=tmp_path)
    ref = JacobianLens.fit(tiny3, CORPUS, corpus="ref", source_layers=[0, 1], dim_batch=8, max_seq_len=24,
                           skip_first_positions=2, show_progress=False)
    assert ours.source_layers == [0, 1] and ours.n_prompts == 2
    for layer in (0, 1):
        torch.testing.assert_close(ours.jacobians[layer], ref.jacobians[layer])
    path = lens_cache_path(tiny3, CFG, CORPUS, tmp_path)
    assert path.is_file() and path.name.startswith(weights_hash(tiny3)[:16])

    def no_fit(*args, **kwargs):
        raise AssertionError("the cached lens should have been loaded, not refitted")

    monkeypatch.setattr(JacobianLens, "fit", no_fit)
    again = jacobian_lens(tiny3, CFG, prompts=CORPUS, cache_dir=tmp_path)
    for layer in (0, 1):
        assert torch.equal(again.jacobians[layer], ours.jacobians[layer])
    other = tiny_model("llama", tokenizer=gpt2_tokenizer, seed=1, n_layers=3)
    assert lens_cache_path(other, CFG, CORPUS, tmp_path) != path
    with pytest.raises(AssertionError, match="refitted"):
        jacobian_lens(other, CFG, prompts=CORPUS, cache_dir=tmp_path)


def test_readout_equals_transformerlens_and_the_formula(tiny3, lens):
    ranks = jlens_readout(tiny3, lens, PROMPTS, " cat", " dog")
    assert ranks.shape == (3, 2)
    (dog,) = tiny3.tokenizer.encode(" dog", add_special_tokens=False)
    (cat,) = tiny3.tokenizer.encode(" cat", add_special_tokens=False)
    for i, prompt in enumerate(PROMPTS):
        tokens = tiny3.to_tokens(prompt)
        pos = int((tokens[0] == cat).nonzero()[-1])
        ro = lens.readout(tiny3, tokens, positions=[pos], return_full_logits=True)
        _, cache = tiny3.run_with_cache(tokens)
        for j, layer in enumerate((0, 1)):
            tl = ro.lens_logits[layer][0]
            h = cache[f"blocks.{layer}.hook_out"][0, pos]
            by_hand = tiny3.unembed(tiny3.ln_final((lens.jacobians[layer] @ h)[None, None]))[0, 0]
            torch.testing.assert_close(tl, by_hand, rtol=1e-4, atol=1e-4)
            assert ranks[i, j] == (tl > tl[dog]).sum()


def test_swap_equals_transformerlens_and_the_formula(tiny3, lens):
    clean, drops, norms = jlens_swap_drops(tiny3, lens, PROMPTS, " cat", " is", [" dog", " red"], " blue", 1,
                                           alpha=2.0)
    tok = tiny3.tokenizer
    ids = {w: tok.encode(w, add_special_tokens=False)[0] for w in (" cat", " is", " dog", " red", " blue")}
    for i, prompt in enumerate(PROMPTS):
        tokens = tiny3.to_tokens(prompt)
        pos = int((tokens[0] == ids[" cat"]).nonzero()[-1])
        lp = tiny3(tokens)[0, -1].log_softmax(-1)[ids[" is"]]
        torch.testing.assert_close(clean[i], lp.detach(), rtol=1e-5, atol=1e-5)
        for j, word in enumerate((" dog", " red")):
            with tiny3.hooks(fwd_hooks=lens.swap_hooks(tiny3, word, " blue", [1], alpha=2.0, positions=[pos])):
                tl = tiny3(tokens)[0, -1].log_softmax(-1)[ids[" is"]]
            V = lens.lens_vectors(tiny3, [ids[word], ids[" blue"]], 1).T  # [d, 2]

            edit = {}

            def by_hand(act, hook, V=V):
                h = act[0, pos]
                c = torch.linalg.pinv(V) @ h
                act = act.clone()
                act[0, pos] = h + 2.0 * V @ (c.flip(0) - c)
                edit["norm"] = (act[0, pos] - h).norm()
                return act

            with tiny3.hooks(fwd_hooks=[("blocks.1.hook_out", by_hand)]):
                hand = tiny3(tokens)[0, -1].log_softmax(-1)[ids[" is"]]
            torch.testing.assert_close(drops[i, j], (lp - tl).detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tl, hand, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(norms[i, j], edit["norm"].detach(), rtol=1e-4, atol=1e-4)


def test_route_score_controls_save_and_plot(tiny3, lens, tmp_path):
    import plotly.graph_objects as go

    r = jlens_route_score(tiny3, lens, PROMPTS, " cat", " is", " dog", " blue", [" red", " sun"], layer=1, alpha=2.0)
    assert r.tokens == (" dog", " red", " sun") and r.drops.shape == (3, 3) and r.ranks.shape == (3, 2)
    torch.testing.assert_close(r.margin(), r.drops[:, 0] - r.drops[:, 1:].max(1).values)
    torch.testing.assert_close(r.per_norm(), (r.drops / r.norms).mean(0))
    assert (r.norms > 0).all()
    # the concept as its own control: the margin is exactly zero, so the test cannot reject
    same = jlens_route_score(tiny3, lens, PROMPTS, " cat", " is", " dog", " blue", [" dog"], layer=1, alpha=2.0)
    assert same.swap_score == 0.0 and same.p_value == 1.0
    back = JLensRouteResult.load(r.save(tmp_path / "jl"))
    torch.testing.assert_close(back.drops, r.drops)
    torch.testing.assert_close(back.norms, r.norms)
    assert back.tokens == r.tokens and back.layers == r.layers and back.p_value == r.p_value
    assert isinstance(r.plot(), go.Figure)


def test_auto_layers_and_cache_key(tiny3):
    assert auto_layers(30) == (14, 19, 23, 28)
    assert auto_layers(3) == (0, 1)
    explicit = JLensConfig(layers=auto_layers(3), n_prompts=2)
    assert lens_cache_path(tiny3, JLensConfig(n_prompts=2), CORPUS) == lens_cache_path(tiny3, explicit, CORPUS)
    assert lens_cache_path(tiny3, JLensConfig(layers=(1,), n_prompts=2), CORPUS) != lens_cache_path(
        tiny3, explicit, CORPUS)
    assert lens_cache_path(tiny3, explicit, CORPUS) != lens_cache_path(tiny3, explicit, CORPUS[:1])


def test_bad_inputs(tiny3, lens):
    with pytest.raises(ConfigError, match="not fitted"):
        jlens_route_score(tiny3, lens, PROMPTS, " cat", " is", " dog", " blue", [" red"], layer=2)
    with pytest.raises(ConfigError, match="control tokens"):
        jlens_route_score(tiny3, lens, PROMPTS, " cat", " is", " dog", " blue", [], layer=1)
    with pytest.raises(ConfigError, match="does not occur"):
        jlens_readout(tiny3, lens, PROMPTS, " horse", " dog")
    with pytest.raises(ConfigError, match="at most"):
        default_corpus(10_000)
    with pytest.raises(ConfigError, match="max_seq_len"):
        JLensConfig(max_seq_len=4, skip_first_positions=4)


@pytest.mark.smollm2
def test_smollm2_lens_reads_the_answer(smollm2, tmp_path):
    """A cheap SmolLM2 lens (last source layer, one corpus paragraph): fitted natively, cached, and at layer 28
    the J-lens at the last position of the VAT prompt ranks the model's answer " Value" near the top."""
    cfg = JLensConfig(layers=(28,), n_prompts=1, max_seq_len=12)
    lens = jacobian_lens(smollm2, cfg, cache_dir=tmp_path)
    assert lens_cache_path(smollm2, cfg, default_corpus(1), tmp_path).is_file()
    ranks = jlens_readout(smollm2, lens, ["The acronym VAT stands for"], " for", " Value")
    assert ranks[0, 0] < 10


def test_learned_route_scores_row(tiny3, lens):
    """The report hook returns exactly the two scores it wraps, flattened into one row."""
    from recallscope.routes.das import ConceptVariable, DASConfig, das_route_score
    from recallscope.routes.learned import learned_route_scores

    variable = ConceptVariable("The word{input} is a", (" cat", " dog", " red", " blue"), ("a", "a", "b", "b"),
                               {"a": " animal", "b": " colour"})
    das_cfg = DASConfig(epochs=2, controls=("placebo", "no_intervention"), n_permutations=999)
    got = learned_route_scores(tiny3, PROMPTS, " cat", " is a", " dog", counter=" blue", controls=[" red", " cat"],
                               layer=1, lens=lens, variable=variable, das_config=das_cfg)
    jl = jlens_route_score(tiny3, lens, PROMPTS, " cat", " is", " dog", " blue", [" red", " cat"], layer=1)
    das = das_route_score(tiny3, variable.pairs(tiny3), 2, das_cfg)
    torch.testing.assert_close(got.jlens.drops, jl.drops)
    torch.testing.assert_close(got.das.correct, das.correct)
    row = got.row()
    assert row["jlens_swap_margin"] == pytest.approx(jl.swap_score) and row["das_iia"] == pytest.approx(das.score)
    assert {"jlens_p", "jlens_best_rank", "das_p", "das_placebo", "das_no_intervention"} <= set(row)
