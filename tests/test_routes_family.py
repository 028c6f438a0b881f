"""Family route verdict (recallscope.routes.family): held-out transplant of the candidate pairing against the
input-itself and answer-itself pairings, on the shipped seed-0 mnemonic organisms."""

import json

import pytest
import torch

import recallscope
from recallscope.errors import ConfigError
from recallscope.organisms import ground_truth
from recallscope.routes.family import (FamilyConfig, RouteFamilyReport, _sites, _success, answer_variants,
                                       load_family_tsv, route_family_report, with_config)
from recallscope.routes.transplant import (TransplantConfig, TransplantPair, prepare_transplant, states_at,
                                           transplant_logits, transplant_score)

CONFIG = FamilyConfig(transplant=TransplantConfig(n_perm=999, n_boot=200, min_layer=1), n_boot=200)


def _model(name):
    return recallscope.load_model(f"organism:{name}")


def _pairs(model, concept=lambda truth, c: " " + truth.chunk_concept[c]):
    truth = ground_truth(model)
    return [TransplantPair(f"{c} ==", c, concept(truth, c), " " + truth.chunk_letter[c]) for c in truth.chunk_concept]


@pytest.fixture(scope="module")
def route_report():
    model = _model("route-s0")
    return model, route_family_report(model, _pairs(model), config=CONFIG, name="route-s0")


def _row(report, name):
    return next(r for r in report.rows() if r.name == name)


def test_planted_route_family_is_a_route_and_beats_the_answer(route_report):
    _, report = route_report
    row = _row(report, "concept")
    assert report.verdict() == "route" and row.verdict == "route" and row.transplant_verdict == "route"
    assert row.score >= 0.8 and row.p_holm <= 0.01 and row.layer >= 1
    # every answer pairing (each casing / spacing) transplants far worse: the candidate beats the class
    assert row.margins["answer"] > 0.5 and row.margin_ci["answer"][0] > 0
    answers = [r for r in report.rows() if r.cls == "answer"]
    assert len(answers) >= 2 and all(r.verdict == "competitor" and r.score < 0.2 for r in answers)
    # the input itself is the ceiling: reported beside the candidate, which reaches it but cannot beat it
    inp = _row(report, "input itself")
    assert inp.verdict == "competitor" and inp.score >= 0.8 and abs(row.margins["input"]) < 0.1


def test_rote_family_is_no_route():
    model = _model("rote-s0")
    report = route_family_report(model, _pairs(model), config=CONFIG, name="rote-s0")
    row = _row(report, "concept")
    assert report.verdict() == "no route" and row.verdict == "no route" and row.score < 0.5


@pytest.mark.parametrize("name, truth", [("route-iit-s0", "route"), ("route-l2-s0", "route"), ("route-rot-s0", "route"),
                                         ("bypass-s0", "no route"), ("share-s0", "no route"),
                                         ("rote-early-s0", "no route"), ("answer-at-site-s0", "no route")])
def test_shipped_organism_families_get_their_planted_verdict(name, truth):
    """The default FamilyConfig (min_layer 1) on the other shipped seed-0 organisms, whole world as one family.
    answer-at-site: the site is read (the input itself transplants at ~1.0) and holds the answer, not the concept."""
    model = _model(name)
    report = route_family_report(model, _pairs(model), config=CONFIG, name=name)
    assert report.verdict() == truth, [(r.name, r.score, r.layer) for r in report.rows()]


def test_a_family_whose_concept_is_the_input_is_a_competitor_never_a_route():
    model = _model("route-s0")
    pairs = _pairs(model, concept=lambda truth, c: c)  # concept := the chunk itself
    report = route_family_report(model, pairs, candidates={"spaced input": [" " + p.input_text for p in pairs]},
                                 config=CONFIG)
    rows = report.rows()
    assert {r.name: r.role for r in rows}["concept"] == "competitor"
    assert {r.name: r.cls for r in rows}["spaced input"] == "input"
    assert all(r.verdict == "competitor" for r in rows) and report.verdict() == "no route"
    # its transplant is as good as a route's (the site holds the input): only the competitor rule stops it
    assert _row(report, "concept").transplant_verdict == "route"


def test_family_rates_equal_the_transplant_per_query(route_report):
    """Same folds, maps and units as routes.transplant: the family's per-unit rates, restricted to one query's
    units, reproduce transplant_score's per-layer score for that query."""
    model, report = route_report
    pairs = _pairs(model)
    prep = prepare_transplant(model, pairs, CONFIG.transplant)
    assert torch.equal(prep.fold, report.fold)
    for name in ("VA", "TA"):
        q = [p.input_text for p in pairs].index(name)
        ours = report.fitted[0] - report.shuffled[0]
        mine = ours[:, (report.receiver == q) | (report.source == q)].mean(1)
        theirs = transplant_score(model, prep, name, CONFIG.transplant).per_layer
        torch.testing.assert_close(mine, torch.tensor([theirs[layer] for layer in report.layers]), atol=1e-6, rtol=0)


def test_unit_forward_matches_transplant_logits_on_unequal_prompt_lengths():
    model = _model("route-s0")
    pairs = [TransplantPair("VA ==", "VA", " VAT", " T"), TransplantPair("x VA ==", "VA", " VAT", " T"),
             TransplantPair("x WA ==", "WA", " WAX", " X"), TransplantPair("WA ==", "WA", " WAX", " X")]
    sites = _sites(model, pairs, [1])
    assert [len(t) for t in sites.tokens] == [2, 2]  # two prompt lengths (3 and 4 tokens), two rows each
    state = states_at(model, model.to_tokens(" TAX"), 1, [1])[0][0]
    target = int(model.to_tokens(" X", prepend_bos=False)[0, 0])
    for i, p in enumerate(pairs):
        tokens = model.to_tokens(p.prompt)
        pos = tokens.shape[1] - 2
        want = transplant_logits(model, tokens, pos, 1, state[None]).argmax(-1) == target
        got = _success(model, sites, 1, torch.tensor([i]), state[None], torch.tensor([target]), 8)
        assert bool(got[0]) == bool(want[0])


def test_result_round_trip_and_summary(route_report, tmp_path):
    _, report = route_report
    back = RouteFamilyReport.load(report.save(tmp_path / "fam"))
    assert json.dumps(back.summary()) == json.dumps(report.summary())  # (NaN rows compare as text)
    summary = json.loads(json.dumps(back.summary()))
    assert summary["verdict"] == "route" and summary["rows"][0]["name"] == "concept"
    assert "rs-summary" in report._repr_html_()
    assert with_config(report, min_score=1.01).verdict() != "route"


def test_answer_variants():
    assert [t for _, t in answer_variants(" Tax")] == [" Tax", "Tax", " tax", " Tax", " TAX"]
    assert answer_variants("Paris")[1] == ("other spacing", " Paris")


# ------------------------------------------------------------------------------------------ bad input
def _write(tmp_path, text):
    path = tmp_path / "family.tsv"
    path.write_text(text)
    return path


def test_tsv_missing_column(tmp_path):
    with pytest.raises(ConfigError, match=r"lacks the column\(s\) \['answer'\]"):
        load_family_tsv(_write(tmp_path, "prompt\tinput\tconcept\nVA ==\tVA\t VAT\n"))


def test_tsv_input_not_in_prompt_and_empty_cell(tmp_path):
    with pytest.raises(ConfigError, match="line 2: input 'XY' is not in its prompt"):
        load_family_tsv(_write(tmp_path, "prompt\tinput\tconcept\tanswer\nVA ==\tXY\t VAT\t T\n"))
    with pytest.raises(ConfigError, match=r"line 2: empty \['concept'\]"):
        load_family_tsv(_write(tmp_path, "prompt\tinput\tconcept\tanswer\nVA ==\tVA\t\t T\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_family_tsv(tmp_path / "nope.tsv")


def test_tsv_keeps_leading_spaces(tmp_path):
    pairs = load_family_tsv(_write(tmp_path, "prompt\tinput\tconcept\tanswer\nThe VAT is\t VAT\t Value Added Tax\t T\n"))
    assert pairs == [TransplantPair("The VAT is", " VAT", " Value Added Tax", " T")]


def test_too_few_pairs_and_one_answer():
    model = _model("route-s0")
    pairs = _pairs(model)
    with pytest.raises(ConfigError, match="too small for 5 folds: give at least 10"):
        route_family_report(model, pairs[:9], config=CONFIG)
    same = [TransplantPair(p.prompt, p.input_text, p.concept, " T") for p in pairs[:12]]
    with pytest.raises(ConfigError, match="same answer"):
        route_family_report(model, same, config=CONFIG)
    with pytest.raises(ConfigError, match="has 3 concepts for 62 pairs"):
        route_family_report(model, pairs, candidates={"short": ["a", "b", "c"]}, config=CONFIG)
    with pytest.raises(ConfigError, match="do not fit the model"):
        route_family_report(model, pairs, config=FamilyConfig(transplant=TransplantConfig(layers=(7,))))


# ------------------------------------------------------------------------------------------ CLI
def _family_tsv(tmp_path, model, n=None):
    pairs = _pairs(model)[:n]
    lines = ["prompt\tinput\tconcept\tanswer"] + [f"{p.prompt}\t{p.input_text}\t{p.concept}\t{p.answer}" for p in pairs]
    return _write(tmp_path, "\n".join(lines) + "\n")


def test_cli_routes_family_writes_report_figure_summary_and_manifest(tmp_path, capsys):
    from recallscope import cli
    from recallscope.outputs import load_result

    path = _family_tsv(tmp_path, _model("route-s0"))
    out = tmp_path / "out"
    assert cli.main(["routes", "--model", "organism:route-s0", "--family", str(path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "verdict: route (detector: held-out concept transplant" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "route" and summary["n_pairs"] == 62
    assert isinstance(load_result(out / "report"), RouteFamilyReport)
    assert (out / "routes_family.html").is_file() and (out / "manifest.json").is_file()


def test_cli_routes_family_bad_inputs(tmp_path, capsys):
    from recallscope import cli

    model = _model("route-s0")
    short = _family_tsv(tmp_path, model, n=6)
    assert cli.main(["routes", "--model", "organism:route-s0", "--family", str(short), "--out", str(tmp_path)]) == 2
    assert "too small for 5 folds" in capsys.readouterr().err
    bad = _write(tmp_path, "prompt\tconcept\tanswer\nVA ==\t VAT\t T\n")
    assert cli.main(["routes", "--model", "organism:route-s0", "--family", str(bad), "--out", str(tmp_path)]) == 2
    assert "lacks the column(s) ['input']" in capsys.readouterr().err
    assert cli.main(["routes", "--model", "organism:route-s0", "--out", str(tmp_path)]) == 2
    assert "--family FILE.tsv" in capsys.readouterr().err


def test_cli_single_query_verdict_names_its_detector(tiny_gpt2, tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from recallscope import cli

    monkeypatch.setattr("recallscope.models.load_model", lambda spec, device="cpu", **kw: tiny_gpt2)
    monkeypatch.setattr("recallscope.plotting.export_all", lambda fig, stem, **kw: SimpleNamespace(written={}, failed={}))
    code = cli.main(["routes", "--model", "tiny", "--prompt", "The acronym VAT stands for", "--input", " VAT",
                     "--output", " Value", "--concept", " tax", "--templates", "2", "--n-controls", "0", "--n-random", "1",
                     "--n-neighbours", "1", "--out", str(tmp_path / "q"), "--quiet"])
    assert code == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("verdict:")][0]
    assert "single-query" in line and "NOT validated on the organism benchmark" in line and "--family" in line


# ------------------------------------------------------------------------------------------ second-attribute check
ATTR = FamilyConfig(transplant=TransplantConfig(n_perm=999, n_boot=200, min_layer=1, attribute_template="{concept} kind"),
                    n_boot=200)


def _attr_pairs(model, kind=None):
    """Every chunk with its concept and the concept's kind (`` animal``), read by ``"<concept> kind"``."""
    truth = ground_truth(model)
    kind = kind or (lambda k: " " + truth.concept_kind[k])
    return [TransplantPair(f"{c} ==", c, " " + k, " " + truth.chunk_letter[c], attribute=kind(k))
            for c, k in truth.chunk_concept.items()]


@pytest.fixture(scope="module")
def attr_report():
    model = _model("route-s0")
    return model, route_family_report(model, _attr_pairs(model), config=ATTR, name="route-s0 kind")


def test_attribute_check_keeps_the_planted_route(attr_report, route_report):
    _, report = attr_report
    row, plain = _row(report, "concept"), _row(route_report[1], "concept")
    assert report.attribute_tested and report.verdict() == "route" and row.verdict == "route"
    assert row.answer_code == "ruled out" and row.attr_score >= 0.5 and row.attr_ci[0] > 0.5
    assert row.attr_p <= 0.01 and row.attr_joint >= 0.5 and row.attr_layer in report.layers
    assert row.attr_fitted > row.attr_shuffled + 0.5 and row.attr_units == int(report.attr_source.numel()) > 0
    # the forward part is the same computation as without the attribute; its p only grows (max with attr_p)
    assert row.score == plain.score and row.p_holm >= plain.p_holm and row.p_competitors >= row.attr_p
    # competitors are not checked
    assert all(r.answer_code == "not tested" and r.attr_layer == -1 for r in report.rows() if r.role == "competitor")
    assert torch.isnan(report.attr_fitted[1:]).all() and not torch.isnan(report.attr_fitted[0]).any()


def test_attribute_rates_equal_the_transplant_reverse_per_query(attr_report):
    """Same folds, reverse maps and units as routes.transplant step 9: the family's reverse rates restricted to
    one query's units reproduce transplant_score's attr_per_layer for that query."""
    model, report = attr_report
    prep = prepare_transplant(model, _attr_pairs(model), ATTR.transplant)
    names = [p["input"] for p in report.pairs]
    for name in ("VA", "TA"):
        q = names.index(name)
        d = report.attr_fitted[0] - report.attr_shuffled[0]
        mine = d[:, (report.attr_receiver == q) | (report.attr_source == q)].mean(1)
        theirs = transplant_score(model, prep, name, ATTR.transplant).attr_per_layer
        torch.testing.assert_close(mine, torch.tensor([theirs[layer] for layer in report.layers]), atol=1e-6, rtol=0)


def test_attribute_check_fails_where_the_site_holds_only_the_answer():
    """answer-at-site: the site holds the answer, not the concept. Its family verdict is already "no route"
    without the check (forward score < 0.2 at min_layer 1); the reverse check itself fails too."""
    model = _model("answer-at-site-s0")
    row = _row(route_family_report(model, _attr_pairs(model), config=ATTR), "concept")
    assert row.answer_code == "not ruled out" and row.attr_score < 0.2 and row.attr_joint_ci[1] < 0.5
    assert row.verdict == "no route"


def test_a_wrong_attribute_stops_a_forward_route():
    """route-s0 with each concept given another concept's kind: the forward transplant still passes, the reverse
    one cannot (the site's concept answers its own kind), so the verdict is not route."""
    model = _model("route-s0")
    truth = ground_truth(model)
    concepts = list(truth.chunk_concept.values())
    kinds = {k: " " + truth.concept_kind[concepts[(i + 1) % len(concepts)]] for i, k in enumerate(concepts)}
    pairs = [p for p in _attr_pairs(model, kind=kinds.get)]
    assert sum(kinds[k] != " " + truth.concept_kind[k] for k in concepts) > len(concepts) // 2
    row = _row(route_family_report(model, pairs, config=ATTR), "concept")
    assert row.transplant_verdict == "route" and row.answer_code == "not ruled out" and row.verdict != "route"


def test_without_attributes_the_report_says_not_tested(route_report, tmp_path):
    _, report = route_report
    assert not report.attribute_tested and report.summary()["answer_code"].startswith("not tested")
    assert all(r.answer_code == "not tested" and r.attr_layer == -1 for r in report.rows())
    # a report saved without the check (as every report before it) has no attribute tensors and loads
    from safetensors.torch import load_file

    path = report.save(tmp_path / "old")
    assert not any(k.startswith("attr_") for k in load_file(path / "values.safetensors"))
    assert not RouteFamilyReport.load(path).attribute_tested


def test_attribute_report_round_trip(attr_report, tmp_path):
    _, report = attr_report
    back = RouteFamilyReport.load(report.save(tmp_path / "attr"))
    assert back.attribute_tested and json.dumps(back.summary()) == json.dumps(report.summary())
    assert back.summary()["answer_code"] == "tested: {concept} kind"
    assert "answer code ruled out" in dict(back.summary_extra())["concept"]
    assert back.pairs[0]["attribute"] == report.pairs[0]["attribute"] != ""


def test_malformed_attributes_are_config_errors(tmp_path):
    model = _model("route-s0")
    pairs = _attr_pairs(model)
    bad = FamilyConfig(transplant=TransplantConfig(n_perm=999, min_layer=1, attribute_template="kind of"))
    with pytest.raises(ConfigError, match=r"must contain \{concept\} exactly once"):
        route_family_report(model, pairs, config=bad)
    with pytest.raises(ConfigError, match="carry an attribute but TransplantConfig.attribute_template is empty"):
        route_family_report(model, pairs, config=CONFIG)
    some = [TransplantPair(p.prompt, p.input_text, p.concept, p.answer, attribute=p.attribute if i else "")
            for i, p in enumerate(pairs)]
    with pytest.raises(ConfigError, match="1 pairs have no attribute"):
        route_family_report(model, some, config=ATTR)
    head = "prompt\tinput\tconcept\tanswer\tattribute_prompt\tattribute_answer\n"
    with pytest.raises(ConfigError, match=r"attribute_prompt 'kind' must contain \{concept\}"):
        from recallscope.routes.family import family_attribute_template

        family_attribute_template(_write(tmp_path, head + "VA ==\tVA\t VAT\t T\tkind\t animal\n"))
    with pytest.raises(ConfigError, match="attribute_prompt differs between rows"):
        family_attribute_template(_write(tmp_path, head + "VA ==\tVA\t VAT\t T\t{concept} kind\t animal\n"
                                         "WA ==\tWA\t WAX\t X\t{concept} is\t thing\n"))
    with pytest.raises(ConfigError, match="line 3: empty attribute_prompt or attribute_answer"):
        load_family_tsv(_write(tmp_path, head + "VA ==\tVA\t VAT\t T\t{concept} kind\t animal\n"
                               "WA ==\tWA\t WAX\t X\t{concept} kind\t\n"))
    with pytest.raises(ConfigError, match="'attribute_answer' without its partner"):
        load_family_tsv(_write(tmp_path, "prompt\tinput\tconcept\tanswer\tattribute_answer\nVA ==\tVA\t VAT\t T\t cat\n"))


def test_tsv_attribute_columns_and_cli(tmp_path, capsys):
    from recallscope import cli
    from recallscope.routes.family import family_attribute_template

    model = _model("route-s0")
    lines = ["prompt\tinput\tconcept\tanswer\tattribute_prompt\tattribute_answer"] + [
        f"{p.prompt}\t{p.input_text}\t{p.concept}\t{p.answer}\t{{concept}} kind\t{p.attribute}" for p in _attr_pairs(model)]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    assert load_family_tsv(path) == _attr_pairs(model) and family_attribute_template(path) == "{concept} kind"
    out = tmp_path / "out"
    assert cli.main(["routes", "--model", "organism:route-s0", "--family", str(path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "answer code ruled out: reverse (attribute) transplant" in printed
    assert "verdict: route (" in printed and "second-attribute check {concept} kind" in printed
    assert json.loads((out / "summary.json").read_text())["rows"][0]["answer_code"] == "ruled out"
    plain = _family_tsv(tmp_path, model)
    assert cli.main(["routes", "--model", "organism:route-s0", "--family", str(plain), "--out", str(out), "--quiet"]) == 0
    assert "answer code not tested" in capsys.readouterr().out
