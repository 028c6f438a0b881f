"""Route-score engines against slow obviously-correct oracles (full re-runs), on tiny random models."""

import pytest
import torch

from recallscope.errors import ConfigError, DatasetFormatError, LengthMismatchError
from recallscope.lens import LogitLens, hidden_states
from recallscope.models.forward import run
from recallscope.models.stack import build_stack
from recallscope.routes import (
    Concept,
    RouteQuery,
    concept_directions,
    control_pool,
    lexicon_candidates,
    load_acronym_lexicon,
    match_controls,
    vocabulary_candidates,
)
from recallscope.routes.agreement import agreement, percentiles
from recallscope.routes.scores import (
    SpanRunner,
    ablation_attribution,
    ablation_exact,
    alternative_runs,
    mediation,
    prepare_prompt,
    readout_and_similarity,
)
from recallscope.tasks.b64_stimuli import WORDS

QUERY = RouteQuery(("The acronym VAT stands for", "Everyone knows VAT is"), " VAT", " value added tax")


@pytest.fixture(scope="module")
def setup(tiny_llama):
    model = tiny_llama
    dirs = concept_directions(model, [Concept(" tax"), Concept(" money"), Concept(" house")])
    prep = prepare_prompt(model, QUERY.prompts[0], QUERY, max_output_tokens=3, n_alternatives=2, seed=0)
    return model, dirs, prep, SpanRunner(build_stack(model), prep)


def _oracle(model, prep, tokens, layers, fn):
    """Metric of a full re-run from the embeddings with ``fn`` editing the span at ``layers``."""
    s, e = prep.span

    def edit(point, lyr, t):
        if point == "resid_pre" and lyr in layers:
            t = t.clone()
            t[:, s:e] = fn(t[:, s:e], lyr)
        return t

    with torch.no_grad():
        logits, _ = run(build_stack(model), tokens, edit=edit)
    logp = torch.log_softmax(logits[:, prep.read].float(), -1)
    return logp.gather(-1, prep.targets.expand(tokens.shape[0], -1).unsqueeze(-1)).squeeze(-1).sum(-1)


def test_prepare_prompt_spans_targets_and_alternatives(tiny_llama, setup):
    _, _, prep, _ = setup
    tok = tiny_llama.tokenizer
    ids = prep.tokens[0].tolist()
    assert tok.decode(ids[prep.span[0]:prep.span[1]]) == " VAT"
    assert tok.decode(prep.targets.tolist()) == " value added tax"
    assert prep.alt_tokens.shape == (2, prep.tokens.shape[1])
    outside = torch.ones(prep.tokens.shape[1], dtype=torch.bool)
    outside[prep.span[0]:prep.span[1]] = False
    assert torch.equal(prep.alt_tokens[:, outside], prep.tokens[:, outside].expand(2, -1))
    assert not torch.equal(prep.alt_tokens[:, ~outside], prep.tokens[:, ~outside].expand(2, -1))
    with pytest.raises(LengthMismatchError):
        prepare_prompt(tiny_llama, QUERY.prompts[0], RouteQuery(QUERY.prompts[:1], " VAT", " x",
                       alternatives=(" value added",)), max_output_tokens=1, n_alternatives=0, seed=0)
    with pytest.raises(ConfigError):
        RouteQuery(("no input here",), " VAT", " x")


def test_exact_ablation_matches_full_rerun(setup):
    model, dirs, prep, runner = setup
    unit, absent = dirs.unit(), dirs.absent()
    got = ablation_exact(runner, unit, absent, (0, 1), 1, batch_size=2)
    window = ablation_exact(runner, unit, absent, (0,), 2, batch_size=8)
    for c in range(unit.shape[0]):
        def fn(h, lyr, c=c):
            return h - ((h @ unit[c, lyr]) - absent[c, lyr])[..., None] * unit[c, lyr]

        for j, layer in enumerate((0, 1)):
            want = runner.clean - _oracle(model, prep, prep.tokens, {layer}, fn)
            assert float(got[c, j]) == pytest.approx(float(want), abs=1e-4)
        want = runner.clean - _oracle(model, prep, prep.tokens, {0, 1}, fn)
        assert float(window[c, 0]) == pytest.approx(float(want), abs=1e-4)


def test_mediation_matches_full_rerun(setup):
    model, dirs, prep, runner = setup
    unit = dirs.unit()
    alt_states, alt_metric = alternative_runs(runner)
    share = mediation(runner, alt_states, alt_metric, unit, (1,), 1, batch_size=4)
    s, e = prep.span
    drops = torch.zeros(unit.shape[0])
    for a in range(prep.alt_tokens.shape[0]):
        for c in range(unit.shape[0]):
            def fn(h, lyr, a=a, c=c):
                return h + ((alt_states[lyr, a, s:e] - h) @ unit[c, lyr])[..., None] * unit[c, lyr]

            drops[c] += runner.clean - _oracle(model, prep, prep.tokens, {1}, fn)[0]
    total = (runner.clean - alt_metric).sum()
    torch.testing.assert_close(share[:, 0], drops / total, atol=1e-4, rtol=1e-4)


def test_interchange_and_edit_norms_match_full_rerun(setup):
    """The interchange along each direction (edit scaled by k per slot, alternative and window) equals a
    full re-run from the embeddings; the edit norm is ||(h_alt - h) . u|| over the span at the window's layer."""
    from recallscope.routes.interchange import edit_norms, interchange

    model, dirs, prep, runner = setup
    unit = dirs.unit()
    alt_states, _ = alternative_runs(runner)
    s, e = prep.span
    scale = torch.tensor([1.0, 0.5, 2.0])[:, None, None].expand(3, alt_states.shape[1], 2).clone()
    got = interchange(runner, alt_states, unit, (0, 1), 1, batch_size=4, scale=scale)
    norms = edit_norms(runner, alt_states, unit, (0, 1))
    for c in range(unit.shape[0]):
        for a in range(alt_states.shape[1]):
            for j, layer in enumerate((0, 1)):
                k = float(scale[c, a, j])

                def fn(h, lyr, a=a, c=c, k=k):
                    return h + k * ((alt_states[lyr, a, s:e] - h) @ unit[c, lyr])[..., None] * unit[c, lyr]

                want = runner.clean - _oracle(model, prep, prep.tokens, {layer}, fn)[0]
                assert float(got[c, a, j]) == pytest.approx(float(want), abs=1e-4)
                diff = alt_states[layer, a, s:e] - runner.states[layer, 0, s:e]
                assert float(norms[c, a, j]) == pytest.approx(float((diff @ unit[c, layer]).norm()), rel=1e-5)


def test_attribution_is_the_derivative_of_ablation(setup):
    """First-order estimate = the derivative of the effect of ablating a fraction t of the concept's
    component, at t = 0 (central finite difference)."""
    model, dirs, prep, runner = setup
    unit, absent = dirs.unit(), dirs.absent()
    attr = ablation_attribution(model, runner, unit, absent, (0, 1), 1)
    eps = 0.02
    for c in range(unit.shape[0]):
        for layer in (0, 1):
            def at(t, c=c):
                def fn(h, lyr):
                    return h - t * ((h @ unit[c, lyr]) - absent[c, lyr])[..., None] * unit[c, lyr]

                with torch.no_grad():
                    return float(runner.run(layer, 1, 1, fn)[0])

            fd = (at(-eps) - at(eps)) / (2 * eps)
            assert float(attr[c, layer]) == pytest.approx(fd, rel=0.02, abs=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_readout_ranks_and_similarity_match_brute_force(tiny_gpt2):
    model = tiny_gpt2
    dirs = concept_directions(model, [Concept(" tax"), Concept(" the")])
    prep = prepare_prompt(model, QUERY.prompts[1], QUERY, max_output_tokens=1, n_alternatives=0, seed=0)
    runner = SpanRunner(build_stack(model), prep)
    ids = torch.tensor([model.tokenizer.encode(t, add_special_tokens=False)[0] for t in (" tax", " the")] + [-1])
    vectors = torch.cat([dirs.vectors, dirs.vectors[:1]])
    ranks, sim = readout_and_similarity(runner, LogitLens(model), ids, vectors, dirs.baseline)
    states = hidden_states(build_stack(model), prep.tokens)[:, 0, prep.span[0]:prep.span[1]]
    lens = LogitLens(model)
    for layer in range(states.shape[0]):
        logits = lens.logits(states[layer], layer)  # [span, vocab]
        for c in range(2):
            want = min(int((row > row[ids[c]]).sum()) for row in logits)
            assert ranks[c, layer] == want
        cos = torch.nn.functional.cosine_similarity(states[layer, -1] - dirs.baseline[layer], vectors[:, layer], -1)
        torch.testing.assert_close(sim[:, layer], cos)
    assert torch.isnan(ranks[2]).all()


def test_match_controls_token_count_frequency_and_exclusions(tiny_gpt2):
    pool = control_pool(tiny_gpt2, [*WORDS[:60], " ice cream", " New York", " red apple", " value added tax"])
    concept = Concept(" sales tax")
    controls = match_controls(tiny_gpt2, concept, pool, k=3, exclude=[" value added tax"])
    texts = [c.text for c in controls]
    assert all(len(tiny_gpt2.tokenizer.encode(t, add_special_tokens=False)) == 2 for t in texts)
    assert " value added tax" not in texts and all("tax" not in t for t in texts)
    n2 = [i for i, n in enumerate(pool.n_tokens.tolist()) if n == 2 and "tax" not in pool.texts[i]]
    from recallscope.routes.controls import frequency_logprob

    target = float(frequency_logprob(tiny_gpt2, [" sales tax"])[0])
    nearest = sorted(n2, key=lambda i: abs(float(pool.logfreq[i]) - target))[:3]
    assert sorted(texts) == sorted(pool.texts[i] for i in nearest)


def test_acronym_lexicon_and_candidates(tmp_path, tiny_gpt2):
    lexicon = load_acronym_lexicon()
    assert lexicon["VAT"] == ("value added tax",)
    assert "Virginia" in lexicon["VA"]
    cands = [c.text for c in lexicon_candidates("VA", lexicon)]
    assert " Virginia" in cands and " VAT" in cands
    bsd = tmp_path / "acronyms"
    bsd.write_text("$NetBSD: acronyms,v 1.1 $\nWYSIWYG\twhat you see is what you get\nFOO\t{a,b} thing\n")
    assert load_acronym_lexicon(bsd)["FOO"] == ("a thing", "b thing")
    bsd.write_text("NOTAB line\n")
    with pytest.raises(DatasetFormatError, match=":1:.*skip_bad_lines"):
        load_acronym_lexicon(bsd)
    bsd.write_text("GR\tgolden ratio\nGVFS    git virtual file system\nHA\thigh availability\n")
    with pytest.warns(UserWarning, match="left out 1 line.*lines 2"):
        kept = load_acronym_lexicon(bsd, skip_bad_lines=True)
    assert kept == {"GR": ("golden ratio",), "HA": ("high availability",)}
    vocab = [c.text for c in vocabulary_candidates(tiny_gpt2, "VA", k=30)]
    assert " VAT" in vocab and all(t.strip().upper().startswith("VA") for t in vocab)


def test_agreement_statistics():
    values = torch.tensor([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    torch.testing.assert_close(percentiles(values)[:, 0], torch.tensor([1.0, 0.75, 0.0], dtype=torch.float64))
    best = agreement(torch.cat([torch.full((40, 1), 9.0), torch.rand(40, 9, generator=torch.Generator().manual_seed(0))], 1),
                     n_perm=2000)
    assert best["mean_percentile"] == 1.0 and best["top1"] == 1.0 and best["p_value"] < 0.001
    null = agreement(torch.rand(200, 10, generator=torch.Generator().manual_seed(1)), n_perm=2000)
    assert 0.4 < null["mean_percentile"] < 0.6 and null["p_value"] > 0.01
    assert null["top1_chance"] == pytest.approx(0.1) and null["top3_chance"] == pytest.approx(0.3)
