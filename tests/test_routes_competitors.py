"""The route verdict's evidence standard (issue 13): competitors, matched random directions, paired tests
with p far below alpha, Holm, held-out peaks, template expansion, the detector's config file."""

import pytest
import torch

from recallscope.errors import ConfigError
from recallscope.lens import hidden_states
from recallscope.models.stack import build_stack
from recallscope.routes import (
    Concept,
    RouteConfig,
    RouteQuery,
    concept_directions,
    control_pool,
    expand_prompts,
    matched_random,
    output_variants,
    route_report,
)
from recallscope.routes.competitors import competitor_class
from recallscope.routes.verdict import cross_fitted, holm, sign_flip_max_t
from recallscope.tasks.b64_stimuli import WORDS
from test_routes_planted import QUERY, Planted

CONFIG = RouteConfig(n_controls=4, n_boot=300)


@pytest.fixture(scope="module")
def planted(gpt2_tokenizer):
    return Planted(gpt2_tokenizer)


@pytest.fixture(scope="module")
def pool(planted):
    return control_pool(planted.model, WORDS[:80])


def test_output_variants_and_competitor_classes():
    variants = output_variants(" Value")
    assert {" Value", "Value", " value", "value", " VALUE", "VALUE"} <= set(variants) and variants[0] == " Value"
    assert {" value", "value"} <= set(output_variants(" value added tax"))  # the first word's variants too
    for text in (" value", "VALUE", "Value", " Value"):
        assert competitor_class(text, " VAT", " Value") == "output"
    for text in (" VAT", "vat", " Vat"):
        assert competitor_class(text, " VAT", " Value") == "input"
    assert competitor_class(" value", " VAT", " value added tax") == "output"
    assert competitor_class(" price", " VAT", " Value") is None
    assert competitor_class(" value added tax", " VAT", " Value") is None  # a phrase: a candidate that must win
    # digits count: the hook concept "MA0" of the chunk "MA" is a candidate, not the input itself
    assert competitor_class("MA0", "MA", "0") is None and competitor_class("NA4", "NA", "4") is None
    assert competitor_class(" ma", "MA", "0") == "input" and competitor_class("0", "MA", "0") == "output"


def test_a_multi_token_output_competes_with_its_first_token(tiny_gpt2):
    from recallscope.routes.competitors import output_neighbours, variant_concepts

    ids = tiny_gpt2.tokenizer.encode(" Deoxyribonucleic", add_special_tokens=False)
    first = tiny_gpt2.tokenizer.decode(ids[:1])
    assert len(ids) > 1
    variants = {c.text: c for c in variant_concepts(tiny_gpt2, " Deoxyribonucleic")}
    assert first in variants and "first token" in variants[first].name
    neighbours = output_neighbours(tiny_gpt2, " Deoxyribonucleic", 5)
    assert len(neighbours) == 5 and all(c.text != first for c in neighbours)


def test_matched_random_has_the_same_cosine_at_every_layer():
    gen = torch.Generator().manual_seed(0)
    unit, state = torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen)
    r = matched_random(unit, state, 5, gen)
    want = torch.nn.functional.cosine_similarity(unit, state, dim=-1)
    got = torch.nn.functional.cosine_similarity(r, state[None], dim=-1)
    torch.testing.assert_close(got, want.expand(5, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.norm(dim=-1), torch.ones(5, 3), atol=1e-5, rtol=1e-5)
    assert (r[0] - r[1]).norm() > 0.1  # different draws


def test_holm_matches_hand_computation():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.4, 0.9]) == pytest.approx([0.8, 0.9])
    assert holm([0.3]) == [0.3]


def test_sign_flip_p_falls_far_below_alpha_with_enough_prompts():
    gen = torch.Generator().manual_seed(0)
    strong8 = 1.0 + 0.1 * torch.randn(8, 4, generator=gen)
    assert sign_flip_max_t(strong8) == pytest.approx(1 / 256)  # exact: every sign pattern of 8 prompts
    strong12 = 1.0 + 0.1 * torch.randn(12, 4, generator=gen)
    assert sign_flip_max_t(strong12, n_perm=1999) == pytest.approx(1 / 2000)  # 1999 random flips
    assert sign_flip_max_t(strong12, n_perm=1999) < 0.01
    null = [sign_flip_max_t(torch.randn(10, 4, generator=gen), n_perm=499, seed=s) for s in range(40)]
    assert sum(p <= 0.05 for p in null) <= 6  # calibrated: about 5% of null draws reach 0.05
    assert sign_flip_max_t(-strong8) == 1.0


def test_cross_fitted_peak_is_chosen_on_the_other_prompts():
    d = torch.zeros(4, 3)
    d[:, 1] = torch.tensor([1.0, 1.1, 0.9, 1.0])
    d[0, 2] = 50.0  # one prompt's outlier window is not chosen for itself
    window, held, extra = cross_fitted(d, d * 2)
    assert window.tolist() == [1, 1, 1, 1]
    torch.testing.assert_close(held, d[:, 1])
    torch.testing.assert_close(extra, 2 * d[:, 1])


def test_expand_prompts_makes_templates_from_one_prompt(tiny_gpt2):
    out = expand_prompts(("The acronym VAT stands for",), 8, model=tiny_gpt2)
    assert len(out) == 8 and len(set(out)) == 8 and out[0] == "The acronym VAT stands for"
    assert all(p.endswith("The acronym VAT stands for") for p in out)
    assert expand_prompts(("a", "b"), 0) == ("a", "b")
    with pytest.raises(ConfigError, match="n_templates"):
        expand_prompts(("x VAT",), 8, prefixes=("A ",))


def test_route_config_round_trips_through_toml(tmp_path):
    config = RouteConfig(n_random=6, layers=(0, 2), template_prefixes=("Q: ",), alpha=0.01)
    path = tmp_path / "detector.toml"
    path.write_text("# the detector\n" + config.to_toml())
    assert RouteConfig.from_toml(path) == config
    path.write_text("[route_config]\nn_randoms = 3\n")
    with pytest.raises(ConfigError, match="n_randoms"):
        RouteConfig.from_toml(path)
    with pytest.raises(ConfigError, match="route_config"):
        RouteConfig.from_toml(path, table="nope")


def test_input_and_output_passed_as_concepts_are_competitors(planted, pool):
    """A user's " VAT" (the input), " value" and "Value" (the output in other casings/spacings) are reported
    as competitors, never as routes; the planted concept still wins; Holm covers the candidates only."""
    report = route_report(planted.model, QUERY, [" tax", " value", " VAT", "Value", " house"], pool=pool,
                          config=CONFIG, progress=False)
    routes = {r.name: r for r in report.routes()}
    comps = {r.name: r for r in report.competitor_rows()}
    assert set(routes) == {"tax", "house"}
    assert {"value", "VAT", "Value"} <= set(comps) and all(r.verdict == "competitor" for r in comps.values())
    assert comps["VAT"].role == "competitor" and comps["VAT"].interchange > 1.0  # the input carries the route
    assert routes["tax"].verdict == "route" and routes["house"].verdict != "route"
    assert routes["tax"].p_holm == pytest.approx(min(1.0, 2 * routes["tax"].p_value)) or \
        routes["tax"].p_holm == pytest.approx(routes["house"].p_holm)
    assert {"input", "output", "neighbour", "random"} <= set(routes["tax"].margins)
    assert report.summary()["competitors"] and report.verdict() == "route"
    only = route_report(planted.model, QUERY, [" VAT", " Value"], pool=pool, config=CONFIG, progress=False)
    assert only.routes() == [] and only.verdict() == "inconclusive"


def test_cosine_matched_random_direction_does_not_get_route(planted, pool):
    """A random direction close to the input's state (cos 0.95 at every layer, as organisms' concept states
    are), carrying no concept, moves the output under interchange and under mean ablation (the old
    detector's evidence) but is not a route: the input itself and its own matched random directions do as well."""
    model = planted.model
    dirs = concept_directions(model, [Concept(" tax")])
    tokens = model.to_tokens(QUERY.prompts[0])
    state = hidden_states(build_stack(model), tokens)[:, 0, -1] - dirs.baseline  # the input is the last token
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(state.shape, generator=gen)
    target = state / state.norm(dim=-1, keepdim=True) + 0.33 * noise / noise.norm(dim=-1, keepdim=True)
    look_alike = matched_random(target, state, 1, gen)[0]
    cos = torch.nn.functional.cosine_similarity(look_alike, state, dim=-1)
    want = torch.nn.functional.cosine_similarity(target, state, dim=-1)
    torch.testing.assert_close(cos, want, atol=1e-5, rtol=1e-5)
    assert (cos > 0.9).all()
    report = route_report(model, QUERY, [Concept(direction=look_alike, label="look-alike"), " tax"], pool=pool,
                          config=CONFIG, progress=False)
    rows = {r.name: r for r in report.routes()}
    assert rows["look-alike"].verdict != "route"
    assert rows["look-alike"].interchange > 1.0 and rows["look-alike"].ablation > 1.0  # it does move the output
    assert rows["tax"].verdict == "route"


def test_no_verdict_rests_on_mean_ablation_alone(planted, pool):
    config = RouteConfig(n_controls=4, n_boot=100, mediation=False)
    report = route_report(planted.model, QUERY, [" tax"], pool=pool, config=config, progress=False)
    row = report.routes()[0]
    assert row.ablation > 1.0 and row.verdict == "inconclusive"


def test_alternatives_as_test_units_for_a_single_prompt(planted, pool):
    """A model that admits no other templates (4-token organisms): one prompt, 8 alternative inputs, the
    paired test over (prompt, alternative) units still reaches p < 0.01 and finds the planted route."""
    alts = (" house", " table", " river", " paper", " music", " water", " garden", " doctor")
    query = RouteQuery(QUERY.prompts[:1], " VAT", " Value", alts)
    config = RouteConfig(n_controls=4, n_boot=200, n_templates=0, test_unit="alternative")
    report = route_report(planted.model, query, [" tax"], pool=pool, config=config, progress=False)
    row = report.routes()[0]
    assert report.interchange.shape[0] == 8 and len(report.query["prompts"]) == 1
    assert row.verdict == "route" and row.p_value < 0.01 and row.n_prompts == 8
    with pytest.raises(Exception, match="test_unit"):  # ConfigError (beartype, under the tests, comes first)
        RouteConfig(test_unit="card")


def test_cli_reports_input_and_output_concepts_as_competitors(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """`recallscope routes --concept " VAT" --concept " value"` (the input; the output " Value" in lower case):
    both come back in summary.json's competitors with verdict 'competitor', never among the routes."""
    import json
    from types import SimpleNamespace

    from recallscope.cli import main

    monkeypatch.setattr("recallscope.models.load_model", lambda spec, device="cpu", **kw: tiny_gpt2)
    monkeypatch.setattr("recallscope.plotting.export_all", lambda fig, stem, **kw: SimpleNamespace(written={}, failed={}))
    argv = ["routes", "--model", "tiny", "--quiet", "--prompt", "The acronym VAT stands for", "--input", " VAT",
            "--output", " Value", "--concept", " VAT", "--concept", " value", "--concept", " tax", "--n-controls", "2",
            "--n-random", "1", "--n-neighbours", "1", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["name"] for r in summary["routes"]] == ["tax"]
    comps = {r["name"]: r["verdict"] for r in summary["competitors"]}
    assert comps["VAT"] == comps["value"] == "competitor"
    assert "8 templates" in capsys.readouterr().out
