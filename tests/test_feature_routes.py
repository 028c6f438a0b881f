"""Features and supernodes as route concepts (recallscope.features.concepts) and the family concept transplant
read through a feature set against matched placebo feature sets (recallscope.features.routes), on mnemonic
organisms whose truth is known. Each organism gets its own small transcoder set, trained here in seconds."""

from dataclasses import replace

import pytest
import torch

import recallscope
from recallscope.errors import ConfigError
from recallscope.features.concepts import (FeatureSet, feature_concept, feature_controls, feature_stats,
                                           matched_placebos, supernode_concept)
from recallscope.features.data import training_tokens
from recallscope.features.interventions import Supernode
from recallscope.features.routes import (FeatureRouteConfig, FeatureRouteReport, _heldout_score, _Reader, crossfit_split,
                                         feature_family_crossfit, feature_family_report, planted_route_features)
from recallscope.features.train import TranscoderTrainConfig, train_set
from recallscope.organisms import ground_truth
from recallscope.routes.concepts import ConceptSource
from recallscope.routes.family import FamilyConfig, route_family_report
from recallscope.routes.transplant import TransplantConfig, TransplantPair

FAMILY = FamilyConfig(transplant=TransplantConfig(n_perm=999, n_boot=200, min_layer=1), n_boot=200)
CONFIG = FeatureRouteConfig(family=FAMILY, n_placebo=49, swap=False)
QUICK = FeatureRouteConfig(family=FAMILY, n_placebo=19, swap=False)
"""For sets whose verdict is decided by the family test (no route); 19 placebos keep the file fast."""
PLANTED_SIZE = 24
"""Features in the planted set (of d_model 32): smaller planted sets transplant too little to pass the family
verdict or do not beat random sets of their size (measured: 16 -> 0.62 vs placebo median 0.50, p 0.08)."""


@pytest.fixture(scope="module")
def organisms(tmp_path_factory):
    """name -> (model, transcoder set, pairs) for route-s0, rote-s0 and answer-at-site-s0."""
    out = {}
    for name in ("route-s0", "rote-s0", "answer-at-site-s0"):
        model = recallscope.load_model(f"organism:{name}")
        cfg = TranscoderTrainConfig(d_sae=128, k=8, steps=300, batch_size=256, lr=3e-3)
        tset, _ = train_set(model, training_tokens(model, 400, seed=0), cfg, tmp_path_factory.mktemp(name),
                            progress=False)
        truth = ground_truth(model)
        pairs = [TransplantPair(f"{c} ==", c, " " + k, " " + truth.chunk_letter[c]) for c, k in truth.chunk_concept.items()]
        out[name] = (model, tset, pairs)
    return out


def _planted(organisms, name, size=PLANTED_SIZE):
    model, tset, pairs = organisms[name]
    sel, test = crossfit_split(len(pairs), 20, 0)
    planted, fs = planted_route_features(model, tset, [pairs[i] for i in sel], 1, size)
    return model, planted, fs, [pairs[i] for i in test]


# ------------------------------------------------------------------------------------------ concepts
def test_feature_concept_is_the_sum_of_unit_decoder_rows_and_is_labelled(organisms):
    _, tset, _ = organisms["route-s0"]
    c = feature_concept(tset, 1, [3, 5])
    rows = tset[1].W_dec[0, [3, 5]].detach()
    torch.testing.assert_close(c.direction, (rows / rows.norm(dim=-1, keepdim=True)).sum(0))
    assert c.name == "L1/F3+F5" and c.source == ConceptSource.FEATURE and c.text is None
    assert feature_concept(tset, 0, 37).name == "L0/F37"
    w = feature_concept(tset, 1, [3, 5], weights=[2.0, 0.0])
    torch.testing.assert_close(w.direction, 2 * rows[0] / rows[0].norm())


def test_supernode_concept_weights_members_by_their_activation_on_the_prompt(organisms):
    model, tset, _ = organisms["route-s0"]
    tokens = model.to_tokens("VA ==")[0]
    _, cache = model.run_with_cache(tokens[None], names_filter=[tset.input_hook(0)])
    acts = tset.activations(0, cache[tset.input_hook(0)].float())[0, 1]
    live = acts.nonzero().squeeze(1)[:2].tolist()
    node = Supernode("chunk VA", tuple((0, 1, f) for f in live))
    c = supernode_concept(tset, node, model=model, tokens=tokens)
    rows = tset[0].W_dec[0, live].detach()
    expected = (acts[live, None] * rows / rows.norm(dim=-1, keepdim=True)).sum(0)
    torch.testing.assert_close(c.direction, expected)
    assert c.name == "chunk VA" and c.source == ConceptSource.FEATURE


def test_bad_feature_sets_get_clear_errors(organisms):
    model, tset, pairs = organisms["route-s0"]
    with pytest.raises(ConfigError, match="empty"):
        feature_concept(tset, 1, [])
    with pytest.raises(ConfigError, match="out of range"):
        feature_concept(tset, 1, [tset[1].spec.d_sae])
    with pytest.raises(ConfigError, match="has no transcoder"):
        feature_concept(tset, 7, [0])
    with pytest.raises(ConfigError, match="repeats"):
        feature_concept(tset, 1, [2, 2])
    with pytest.raises(ConfigError, match="n_placebo"):
        FeatureRouteConfig(n_placebo=5)
    with pytest.raises(ConfigError, match="has no transcoder"):
        feature_family_report(model, tset, pairs, (9, [0]), config=CONFIG)


def test_feature_controls_are_matched_disjoint_and_seeded(organisms):
    model, tset, pairs = organisms["route-s0"]
    texts = [p.prompt for p in pairs] + [p.concept for p in pairs]
    members = ((1, 3), (1, 10), (1, 40))
    stats = {1: feature_stats(model, tset, 1, texts)}
    sets = matched_placebos(stats, members, 50, seed=0)
    assert sets == matched_placebos(stats, members, 50, seed=0) != matched_placebos(stats, members, 50, seed=1)
    rank = stats[1].frequency.argsort().argsort().float()
    gaps = []
    for s in sets:
        assert len(s) == 3 and len(set(s)) == 3 and not set(s) & set(members) and {lyr for lyr, _ in s} == {1}
        gaps += [abs(float(rank[g] - rank[f])) for (_, f), (_, g) in zip(members, s)]
    # matched: the frequency-rank gap is far below a random feature's (about d_sae / 3)
    assert sum(gaps) / len(gaps) < 0.1 * tset[1].spec.d_sae
    ctrls = feature_controls(model, tset, (1, [3, 10, 40]), texts, n=4)
    assert len(ctrls) == 4 and all(c.source == ConceptSource.FEATURE_PLACEBO for c in ctrls)


def test_route_report_scores_a_feature_concept_with_its_feature_controls(organisms):
    from recallscope.routes import RouteConfig, RouteQuery, route_report

    model, tset, pairs = organisms["route-s0"]
    concept = feature_concept(tset, 0, [3, 10])
    ctrls = feature_controls(model, tset, (0, [3, 10]), [p.prompt for p in pairs], n=3)
    query = RouteQuery(("VA ==",), "VA", " " + ground_truth(model).chunk_letter["VA"], ("MA", "NA", "RA", "SA"))
    config = RouteConfig(n_templates=0, test_unit="alternative", n_alternatives=0, prefixes=("",), n_random=2,
                         n_neighbours=1, n_perm=199, n_boot=100)
    report = route_report(model, query, [concept], controls={concept.name: ctrls}, config=config, progress=False)
    by_name = dict(zip(report.names, report.sources))
    assert by_name["L0/F3+F10"] == "feature"
    assert [by_name[c.name] for c in ctrls] == ["feature placebo"] * 3
    assert [r.name for r in report.routes()] == ["L0/F3+F10"]


# ------------------------------------------------------------------------------------------ the family test
def test_the_placebo_statistic_is_the_family_reports_heldout_score(organisms):
    model, tset, pairs = organisms["route-s0"]
    fs = FeatureSet(tuple((1, f) for f in range(8)))
    cfg = FamilyConfig(transplant=TransplantConfig(n_perm=999, n_boot=200, layers=(1, 2)), n_boot=200)
    reader = _Reader(model, tset, [1], "pre")
    report = route_family_report(model, pairs, config=cfg, concept_reader=reader.for_members(fs.members))
    row = next(r for r in report.rows() if r.name == "concept")
    from recallscope.routes import family as fam

    x = reader.for_members(fs.members)(model, [p.concept for p in pairs], (1, 2), "")
    assert x.shape == (2, len(pairs), 8)
    assert _heldout_score(model, pairs, x, (1, 2), cfg, fam._sites(model, pairs, (1, 2))) == pytest.approx(row.heldout)
    assert torch.isnan(report.identity).all()  # an 8-wide reading cannot be put into a 32-wide site as is


def test_a_reader_of_the_wrong_shape_is_a_clear_error(organisms):
    model, _, pairs = organisms["route-s0"]
    with pytest.raises(ConfigError, match="concept reader returned shape"):
        route_family_report(model, pairs, config=FAMILY, concept_reader=lambda m, t, lay, p: torch.zeros(len(t), 4))


def test_planted_feature_set_in_a_route_organism_is_a_route_and_beats_its_placebos(organisms):
    model, planted, fs, test_pairs = _planted(organisms, "route-s0")
    rnd = FeatureSet(tuple((1, int(f)) for f in torch.randperm(128, generator=torch.Generator().manual_seed(3))
                           [:PLANTED_SIZE]), "random")
    report = feature_family_report(model, planted, test_pairs, {"planted": fs}, config=CONFIG)
    row = report.row("planted")
    assert row.verdict == "route" and row.family_verdict == "route", row
    assert row.heldout > max(row.placebo_scores) and row.p_placebo == pytest.approx(1 / 50)
    assert row.margin_answer > 0.5 and len(row.placebo_scores) == 49
    assert all(len(p) == PLANTED_SIZE and {lyr for lyr, _ in p} == {1} for p in row.placebo_sets)
    random_row = feature_family_report(model, planted, test_pairs, {"random": rnd}, config=QUICK).row("random")
    assert random_row.verdict != "route", random_row  # a random set of the same size is not called a route


@pytest.mark.parametrize("name", ["rote-s0", "answer-at-site-s0"])
def test_the_same_construction_in_non_route_organisms_is_no_route(organisms, name):
    """The planted construction and a cross-fitted attribution-selected set (both chosen on the same 20 selection
    pairs, tested on the other 42) are no route."""
    model, planted, fs, _ = _planted(organisms, name)
    pairs = organisms[name][2]
    report = feature_family_crossfit(model, planted, pairs, 1, PLANTED_SIZE, n_select=20, config=QUICK,
                                     extra={"planted": fs})
    assert not set(report.pairs_tested) & set(report.pairs_selected_on)
    assert len(report.pairs_tested) + len(report.pairs_selected_on) == len(pairs)
    assert [r.name for r in report.rows] == ["attribution", "planted"]
    for row in report.rows:
        assert row.verdict == "no route" and row.family_verdict == "no route" and row.score < 0.2, row


def test_the_batched_site_swap_equals_the_intervention_oracle(organisms):
    from recallscope.features.interventions import FeatureEdit, run_intervention
    from recallscope.features.routes import _site_acts, swap_logits

    model, tset, pairs = organisms["route-s0"]
    sub = pairs[:4]
    site = _site_acts(model, tset, 0, sub)
    feats = site[2][1].nonzero().squeeze(1).tolist() + site[2][0].nonzero().squeeze(1).tolist()[:3]
    units = (torch.tensor([0, 2, 3]), torch.tensor([1, 1, 0]))
    logits, norm = swap_logits(model, tset, 0, feats, site, units)
    for u, (r, s) in enumerate(zip(*units)):
        pos = int(site[1][r])
        edits = [FeatureEdit(0, f, pos, value=float(site[2][s, f])) for f in feats]
        oracle = run_intervention(model, tset, site[0][r], edits)
        torch.testing.assert_close(logits[u], oracle.logits[-1], atol=1e-4, rtol=1e-4)
    assert bool((norm > 0).all())


def test_the_report_carries_the_causal_half_for_one_layer_sets_and_round_trips(organisms, tmp_path):
    model, planted, fs, test_pairs = _planted(organisms, "route-s0")
    report = feature_family_report(model, planted, test_pairs, fs, config=replace(QUICK, swap=True))
    row = report.rows[0]
    assert set(row.swap) >= {"score", "edit_norm", "placebo_scores", "p_placebo", "n_units"}
    assert len(row.swap["placebo_scores"]) == 19 and row.swap["n_units"] > 1000
    # measured: the planted 24 features carry nothing causal at the site (the chunk is in the embedding path)
    assert row.swap["score"] < 0.05
    back = FeatureRouteReport.load(report.save(tmp_path / "fr"))
    assert back.rows == report.rows and back.verdict() == report.verdict()
    torch.testing.assert_close(back.reports[row.name].fitted, report.reports[row.name].fitted)
    assert (tmp_path / "fr" / "feature_routes.json").is_file() and report.plot().data
