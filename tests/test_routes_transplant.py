"""Held-out concept transplant (recallscope.routes.transplant, with the second-attribute check of
recallscope.routes.transplant_attr) on the shipped mnemonic organisms.

Expectations changed with detector v2 (r1-detector): CONFIG gives the attribute (the concept's kind), because
without it a forward "route" is now reported as "inconclusive" (the answer-code competitor is not ruled out),
and layer 0 is no longer scored by default."""

import dataclasses
import random

import pytest
import torch

import recallscope
from recallscope.errors import ConfigError
from recallscope.bench import route_bench
from recallscope.organisms import ground_truth
from recallscope.routes.transplant import (TransplantConfig, TransplantPair, fit_map, max_sign_flip_p,
                                           prepare_transplant, states_at, transplant_logits, transplant_score)

CONFIG = TransplantConfig(n_perm=199, n_boot=200, attribute_template="{concept} kind")
FORWARD_ONLY = TransplantConfig(n_perm=199, n_boot=200)


def _model(name):
    return recallscope.load_model(f"organism:{name}")


def _pairs(model, shuffle_concepts=False, attribute=True):
    truth = ground_truth(model)
    chunks = list(truth.chunk_concept)
    concepts = [truth.chunk_concept[c] for c in chunks]
    if shuffle_concepts:  # a wrong hypothesis: every chunk paired with another chunk's concept
        concepts = concepts[1:] + concepts[:1]
    kind = (lambda k: " " + truth.concept_kind[k]) if attribute else (lambda k: "")
    return [TransplantPair(f"{c} ==", c, " " + k, " " + truth.chunk_letter[c], attribute=kind(k))
            for c, k in zip(chunks, concepts)]


def _verdicts(name, chunks=("VA", "TA", "WA"), config=CONFIG, **kw):
    model = _model(name)
    prep = prepare_transplant(model, _pairs(model, attribute=bool(config.attribute_template), **kw), config)
    return [transplant_score(model, prep, c, config) for c in chunks]


@pytest.mark.parametrize("name", ["route-s0", "route-rot-s0"])
def test_planted_routes_pass_also_in_a_rotated_basis(name):
    for r in _verdicts(name):
        assert r.verdict == "route", r
        assert r.fitted >= 0.8 and r.shuffled <= 0.2 and r.p_value <= 0.01
        # the attribute check: the site state, mapped into "<s> VAT kind", gives the concept's kind
        assert r.answer_code == "ruled out" and r.attr_fitted >= 0.8 and r.attr_p <= 0.01, r
        assert r.score == pytest.approx(min(r.per_layer[r.layer], r.attr_per_layer[r.layer]))


def test_answer_at_site_is_no_route_and_fails_the_attribute_check():
    """A rote organism whose read site holds only the answer letter (family answer-at-site): the site is read
    (ceiling ~1), but its state carries no kind of the concept, so it is not a route."""
    rs = _verdicts("answer-at-site-s0", chunks=("MA", "NA", "RA", "SA", "TA", "UA", "VA", "WA"))
    assert all(r.verdict == "no route" for r in rs), rs
    assert all(r.attr_score < 0.5 and r.answer_code == "not ruled out" for r in rs), rs
    assert max(r.ceiling for r in rs) >= 0.9  # the site is read (another chunk's site state carries its letter)


def test_without_an_attribute_a_forward_route_is_only_inconclusive():
    rs = _verdicts("route-s0", config=FORWARD_ONLY)
    assert all(r.forward_verdict == "route" and r.verdict == "inconclusive" for r in rs), rs
    assert all(r.answer_code == "not tested" for r in rs)
    loose = dataclasses.replace(FORWARD_ONLY, require_attribute=False)
    assert [r.verdict for r in _verdicts("route-s0", config=loose)] == ["route"] * 3


def test_attribute_states_are_the_concept_states_in_the_organisms():
    """R1's concept position in "<s> VAT kind" is the concept's own state "<s> VAT" (causal model, same prefix)."""
    model = _model("route-iit-s0")
    prep = prepare_transplant(model, _pairs(model), CONFIG)
    assert prep.layers == (1, 2)  # min_layer 1 by default: the token embedding is not scored
    torch.testing.assert_close(prep.attribute.concept_z, prep.concept_x, atol=1e-5, rtol=1e-5)
    assert prep.attribute.pos == (1,) * len(prep.pairs)


@pytest.mark.parametrize("name", ["rote-s0", "bypass-s0"])
def test_rote_and_bypassed_organisms_are_no_route(name):
    for r in _verdicts(name):
        assert r.verdict == "no route", r
        assert r.score < 0.5


def test_a_wrong_pairing_is_no_route_in_a_route_organism():
    """The arbitrary-label side: the same route organism with every chunk paired to another chunk's concept.
    A fitted map can learn the wrong pairing on the training folds, but its held-out transplants then move
    the output to the wrong concept's answer; they must not earn a route."""
    for r in _verdicts("route-s0", shuffle_concepts=True):
        assert r.verdict != "route", r
        assert r.score < 0.5


def test_transplant_logits_match_the_hook_oracle():
    model = _model("route-iit-s0")
    truth = ground_truth(model)
    concept = truth.chunk_concept["VA"]  # VAT, letter T, transplanted into WA's decode
    base, source = model.to_tokens(" WA =="), model.to_tokens(" " + concept)
    state = states_at(model, source, 1, [1])[0]
    name = "blocks.1.hook_resid_pre"

    def hook(act, hook):
        act = act.clone()
        act[:, 1] = state
        return act

    oracle = model.run_with_hooks(base, fwd_hooks=[(name, hook)])[:, -1]
    ours = transplant_logits(model, base, 1, 1, state)
    torch.testing.assert_close(ours, oracle, atol=1e-4, rtol=1e-4)
    letter = " " + truth.concept_letter[concept]
    assert ours.argmax(-1).item() == model.to_tokens(letter, prepend_bos=False)[0, 0].item()


def test_fit_map_recovers_a_rotation_and_cannot_generalise_a_random_pairing():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=gen)
    rot, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    a, mx, my = fit_map(x[:40], x[:40] @ rot, ridge=0.0)
    torch.testing.assert_close(my + (x[40:] - mx) @ a, x[40:] @ rot, atol=1e-4, rtol=1e-4)
    y = torch.randn(60, 8, generator=gen)  # no relation: the held-out fit explains nothing
    a, mx, my = fit_map(x[:40], y[:40], ridge=0.1)
    held = ((my + (x[40:] - mx) @ a) - y[40:]).pow(2).sum() / (y[40:] - y[40:].mean(0)).pow(2).sum()
    assert held > 0.9


def test_sign_flip_max_over_layers():
    ones = torch.ones(1, 8)
    assert max_sign_flip_p(ones, 1999, 0) == pytest.approx(1 / 256)  # exact: only the all-plus flip reaches it
    zeros = torch.zeros(3, 12)
    assert max_sign_flip_p(zeros, 1999, 0) == 1.0
    mixed = torch.tensor([[1.0] * 20, [random.Random(0).choice([-1.0, 1.0]) for _ in range(20)]])
    p = max_sign_flip_p(mixed, 1999, 0)
    assert 1 / 2000 <= p <= 0.01


def test_clear_errors():
    with pytest.raises(ConfigError, match="n_folds"):
        TransplantConfig(n_folds=1)
    with pytest.raises(ConfigError, match="not TransplantConfig fields"):
        TransplantConfig.from_dict({"folds": 5})
    model = _model("route-s0")
    with pytest.raises(ConfigError, match="not in its prompt"):
        prepare_transplant(model, [TransplantPair("VA ==", "XY", " VAT", " T")] * 12, FORWARD_ONLY)
    with pytest.raises(ConfigError, match="no layer"):
        prepare_transplant(model, _pairs(model), dataclasses.replace(CONFIG, min_layer=3))
    assert prepare_transplant(model, _pairs(model), dataclasses.replace(CONFIG, min_layer=0)).layers == (0, 1, 2)
    prep = prepare_transplant(model, _pairs(model), CONFIG)
    with pytest.raises(ConfigError, match="not an input"):
        transplant_score(model, prep, "ZZ", CONFIG)


def test_bad_attribute_specs_are_clear_errors():
    model = _model("route-s0")
    good, bare = _pairs(model), _pairs(model, attribute=False)
    cases = [(good, dataclasses.replace(CONFIG, attribute_template="kind"), "exactly once"),
             (good, FORWARD_ONLY, "attribute_template is empty"),
             (bare[:1] + good[1:], CONFIG, "have no attribute"),
             ([dataclasses.replace(p, attribute=p.answer) for p in good], CONFIG, "equals the answer"),
             ([dataclasses.replace(p, attribute=" animal") for p in good], CONFIG, "same attribute")]
    for pairs, config, message in cases:
        with pytest.raises(ConfigError, match=message):
            prepare_transplant(model, pairs, config)


def test_route_bench_dispatches_on_detector_use(tmp_path):
    toml = tmp_path / "d.toml"
    body = '[route_config]\nn_templates = 0\n[transplant]\nn_perm = 199\nn_boot = 200\nattribute_template = "{concept} kind"\n'
    toml.write_text('[detector]\nuse = "transplant"\n' + body)
    spec = route_bench.load_detector(toml)
    model, _ = route_bench.organism_model("route-rot-s0")
    row = route_bench.detect(model, "VA", spec, seed=0)
    assert row["verdict"] == "route" and row["concept"] == "VAT" and row["is_route"]
    assert row["answer_code"] == "ruled out" and row["attr_fitted"] >= 0.8
    assert "report_score" not in row
    toml.write_text('[detector]\nuse = "magic"\n' + body)
    with pytest.raises(ConfigError, match="use"):
        route_bench.load_detector(toml)
    toml.write_text('[detector]\nuse = "transplant"\n[route_config]\nn_templates = 0\n[transplant]\nfolds = 3\n')
    with pytest.raises(ConfigError, match="folds"):
        route_bench.load_detector(toml)


def test_summary_of_both_detectors():
    rows = [{"family": f, "is_route": f == "p", "score": s, "verdict": v, "report_score": -s, "report_verdict": "no route"}
            for f, s, v in (("p", 1.0, "route"), ("p", 0.9, "route"), ("n", 0.0, "no route"), ("n", 0.1, "no route"))]
    head = route_bench.summary(rows, ["p", "n"])
    assert head["heldout_auroc_min"] == 1.0 and head["verdict_accuracy"] == 1.0
    assert head["report_heldout_auroc_min"] == 0.0 and head["report_verdict_accuracy"] == 0.5
