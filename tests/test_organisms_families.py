"""Held-out organism families (recallscope.organisms.families) and the route-detection harness."""

import dataclasses
from pathlib import Path

import pytest
import torch

from recallscope.errors import ConfigError
from recallscope.bench import route_bench
from recallscope.organisms import families
from recallscope.organisms.core import ArchConfig, state_sha256
from recallscope.organisms.mnemonic import RouteTruth

pytestmark = pytest.mark.usefixtures("organism_determinism")
DETECTOR = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "route_detector.toml"


def _tiny(family: str, steps: int = 3) -> families.FamilyConfig:
    cfg = families.family_config(family, 0)
    arch = ArchConfig(n_layers=3, d_model=16, n_heads=2, n_ctx=4)
    return dataclasses.replace(cfg, arch=arch, train=dataclasses.replace(cfg.train, steps=steps, batch_size=8,
                                                                         warmup=1))


@pytest.mark.parametrize("family", families.FAMILIES)
def test_every_family_trains_deterministically_and_reports_its_checks(family):
    cfg = _tiny(family)
    net1, rec1 = families.train_family(cfg)
    net2, _ = families.train_family(cfg)
    assert state_sha256(net1.state_dict()) == state_sha256(net2.state_dict())
    assert {"decode_train", "decode_test", "concept_facts", "swap_follow", "kind_transplant", "site_read",
            "site_cos_concept"} <= set(rec1)
    truth = families.family_truth(cfg)
    assert RouteTruth.from_dict(truth.to_dict()) == truth
    assert truth.is_route == (family in families.POSITIVE) and truth.family == family
    if family == "bypass":  # the cut is exact: the site cannot reach the output, and attn.o stays zero
        assert rec1["site_swap_max_logit_change"] == 0.0
        assert all(float(p.abs().max()) == 0 for n, p in net1.named_parameters()
                   if ".attn.o." in n and int(n.split(".")[1]) >= cfg.site_layer)


def test_rotation_is_a_fixed_orthogonal_matrix():
    cfg = families.family_config("route-rot", 0)
    r = families.rotation(cfg)
    assert torch.allclose(r @ r.T, torch.eye(cfg.arch.d_model), atol=1e-5)
    assert torch.equal(r, families.rotation(families.family_config("route-rot", 3)))  # same R for every seed
    assert not torch.allclose(r, torch.eye(cfg.arch.d_model), atol=0.1)


def test_share_truth_aligns_chunks_with_their_same_letter_distractor():
    truth = families.family_truth(families.family_config("share", 0))
    assert not truth.is_route
    for chunk, distractor in truth.aligned_concept.items():
        assert distractor != truth.chunk_concept[chunk]
        assert truth.concept_letter[distractor] == truth.chunk_letter[chunk]


def test_answer_at_site_plants_a_read_site_that_holds_only_the_answer():
    """The shipped answer-at-site-s0 (family g): decode and concept facts right, the site is read (another
    chunk's site state makes the decode give that chunk's letter) but carries no concept (its state in a
    concept's kind prompt gives the chunk's concept's kind at about chance, 1/8)."""
    model, where = route_bench.organism_model("answer-at-site-s0")
    assert where == "shipped"
    cfg = families.family_config("answer-at-site", 0)
    checks = families.family_checks(model, cfg)
    assert checks["decode_train"] == 1.0 and checks["decode_test"] == 1.0 and checks["concept_facts"] == 1.0
    assert checks["site_read"] >= 0.95
    assert checks["kind_transplant"] <= 0.25
    truth = families.family_truth(cfg)
    assert not truth.is_route and truth.family == "answer-at-site" and truth.site_layer == 1


def test_any_seed_has_a_recipe():
    from recallscope.errors import UnknownModelError
    from recallscope.organisms.recipes import get_recipe

    assert get_recipe("answer-at-site-s12").config.train.seed == 12
    assert get_recipe("route-s11").config.train.seed == 11 and get_recipe("route-s11").config.kind == "route"
    with pytest.raises(UnknownModelError, match="no organism recipe"):
        get_recipe("nofamily-s3")


def test_unknown_family_and_bad_site_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown organism family"):
        families.family_config("nope", 0)
    with pytest.raises(ConfigError, match="site_layer"):
        families.train_family(dataclasses.replace(_tiny("route-iit"), site_layer=3))


def test_family_metrics_arithmetic():
    rows = ([{"family": "p", "is_route": True, "score": s, "verdict": v} for s, v in
             ((0.9, "route"), (0.8, "route"), (0.1, "inconclusive"), (0.7, "no route"))]
            + [{"family": "n", "is_route": False, "score": s, "verdict": v} for s, v in
               ((0.2, "no route"), (0.85, "route"), (0.0, "no route"), (0.05, "no route"))])
    m = route_bench.family_metrics(rows)
    assert m["p"]["verdict_accuracy"] == 0.5 and m["p"]["route_rate"] == 0.5
    assert m["n"]["route_rate"] == 0.25 and m["n"]["verdict_accuracy"] == 0.75
    # positives beat negatives in 13 of 16 pairs (0.1 < 0.2, 0.85 beats 0.1, 0.7, 0.8)
    assert m["p"]["auroc"] == pytest.approx(12 / 16) and m["n"]["auroc"] == m["p"]["auroc"]
    s = route_bench.summary(rows, ["n"])
    assert s["false_route_rate_max"] == 0.25 and s["verdict_accuracy"] == 0.75 and s["old_verdict_accuracy"] == 0.5


def test_detector_file_is_read_and_checked(tmp_path):
    spec = route_bench.load_detector(DETECTOR)
    assert spec.route_config["test_unit"] == "alternative" and spec.baseline == "vocabulary"
    assert spec.n_hook_alternatives == 8
    # v2 (pre-registered before seeds 10-14): the transplant with the second-attribute check, no layer 0
    assert spec.use == "transplant" and spec.transplant["attribute_template"] == "{concept} kind"
    assert spec.transplant["min_layer"] == 1
    bad = tmp_path / "d.toml"
    bad.write_text("[route_config]\nn_controls = 3\nno_such_field = 1\n")
    with pytest.raises(ConfigError, match="no_such_field"):
        route_bench.load_detector(bad)


def _verdicts(name: str, chunks: list[str]) -> list[str]:
    model, _ = route_bench.organism_model(name)
    spec = route_bench.load_detector(DETECTOR)
    return [route_bench.detect(model, c, spec, seed=0)["verdict"] for c in chunks]


def test_rotated_route_gets_route():
    # Neither route_report detector sees it (old 45b032c: 0/8; issue-13 interchange detector: 0/8, mediation
    # <= 0.06); the committed detector file (v2) uses the held-out concept transplant (a fitted, cross-fitted
    # map learns the rotation, forward and back: the attribute check passes too).
    assert _verdicts("route-rot-s0", ["VA", "TA"]) == ["route", "route"]


def test_aligned_but_bypassed_gets_no_route():
    assert _verdicts("bypass-s0", ["VA", "TA"]) == ["no route", "no route"]


def test_answer_at_site_gets_no_route_under_the_committed_detector():
    assert _verdicts("answer-at-site-s0", route_bench.hook_chunks()) == ["no route"] * 8


def test_harness_and_figures_rows_agree_on_the_shipped_route_organism():
    from recallscope.bench.organism_figures import mnemonic_route_rows

    model, where = route_bench.organism_model("route-s0")
    assert where == "shipped"
    spec = dataclasses.replace(route_bench.load_detector(DETECTOR), use="report")  # the route_report path
    mine = route_bench.detect(model, "VA", spec, seed=0)
    old = mnemonic_route_rows(model, ["VA"], n_controls=8, n_boot=1000, seed=0)[0]
    assert mine["concept"] == "VAT" and mine["is_route"]
    assert mine["score"] == pytest.approx(old["score"], abs=1e-5)  # same detector call, same settings
    assert mine["verdict"] == old["verdict"]
