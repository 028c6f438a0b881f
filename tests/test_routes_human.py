"""The human-mnemonic comparison end to end on a tiny model, and the CLI's error path."""

import pytest
import torch

from recallscope.cli import main
from recallscope.routes.human import SCORES, HumanComparison, HumanConfig, clean_definition, compare_human
from recallscope.routes.mnemonics import load_cards
from recallscope.routes.human_match import definition_overlap
from recallscope.routes.text import common_run, letters, similarity

CARDS = "\n".join([
    "#separator:tab",
    "capricious\tCar prices are unpredictable\tgiven to sudden changes of mood",
    "calumny\tThey dare write columns to slander me\tthe making of false statements",
    "venal\tLooks like venue. A corrupt venue\tshowing a willingness to be bribed",
    "deify\tdeity + fy\tworship or regard as a god",
    "tractable\tTractor makes it easy to manage the field\teasy to control or influence",
    "prosaic\tProse in a book seems dull\thaving the style of prose; lacking imagination",
    "edify\tEdit it to improve it\tinstruct or improve someone morally",
    "restive\trestless\tunable to keep still or silent",
])


@pytest.fixture(scope="module")
def result(tiny_gpt2, tmp_path_factory):
    path = tmp_path_factory.mktemp("cards") / "cards.tsv"
    path.write_text(CARDS)
    cards = load_cards(path)
    config = HumanConfig(n_controls=3, own_vocabulary=20, n_perm=300, definition_tokens=3, own_top=2, n_boot=50)
    return compare_human(tiny_gpt2, cards, config=config, progress=False), cards


def test_compare_human_scores_every_card(result, tmp_path):
    res, cards = result
    assert isinstance(res, HumanComparison)
    n = len(res.rows) + len(res.skipped)
    assert n == len(cards) and len(res.rows) >= 6
    assert res.scores.shape == (len(res.rows), 4, len(SCORES))
    by_term = {c.term: c for c in cards}
    for row, s in zip(res.rows, res.scores):
        card = by_term[row["term"]]
        assert len(row["controls"]) == 3 and row["keyword"] not in row["controls"]
        for control in row["controls"]:  # matched controls never overlap the definition or name the term
            assert not definition_overlap(control, clean_definition(card.definition))
            assert letters(card.term) not in {letters(w) for w in control.split()}
        assert float(s[0, SCORES.index("string")]) == pytest.approx(similarity(row["term"], " " + row["keyword"]))
        assert row["keyword_effect"] == pytest.approx(float(s[0, 0]))
        assert len(row["own"]) == 2
        assert len(row["alternatives"]) <= 4 and row["term"] not in row["alternatives"]
        assert (row["term_effect"] != row["term_effect"]) == (not row["alternatives"])  # NaN iff none
    summary = res.summary()
    for score in SCORES:
        stats = summary["agreement"][score]["all"]
        assert stats["n_cards"] == len(res.rows) and 0 <= stats["mean_percentile"] <= 1
        assert 0 < stats["p_value"] <= 1 and stats["top1_chance"] == pytest.approx(0.25)
    # controls are matched on string similarity to the term (and frequency, relatedness): closer than
    # random pool texts, so text similarity alone no longer singles out the keyword
    smd = res.matching["standardised_mean_difference"]
    for name in ("logfreq", "relatedness", "string"):
        assert abs(smd[name]["matched"]) < abs(smd[name]["unmatched"]), (name, smd)
    assert summary["agreement"]["string"]["all"]["mean_percentile"] < 0.7
    adjusted = summary["adjusted"]
    assert {"keyword_effect", "ci", "p", "n_cards", "by_link"} <= set(adjusted)
    assert adjusted["n_cards"] == len(res.rows) and adjusted["ci"][0] <= adjusted["keyword_effect"] <= adjusted["ci"][1]
    assert 0 < adjusted["p"] <= 1 and adjusted["p_holm"] >= adjusted["p"]
    assert sum(f["n_cards"] for f in adjusted["by_link"].values()) == len(res.rows)
    back = HumanComparison.load(res.save(tmp_path / "human"))
    torch.testing.assert_close(back.scores, res.scores)
    assert back.rows == res.rows
    fig = res.plot()
    assert len(fig.data) == 2 * 3 * 1  # (percentile, top-1) x (all, sound, meaning)
    assert "interchange (causal)" in fig.data[0].x and "causal" not in fig.data[0].x


def test_clean_definition():
    assert clean_definition("(of an appearance) fail to give a true impression.") == "fail to give a true impression"
    assert clean_definition("1. vibrations that travel 2. an idea") == "vibrations that travel"
    assert clean_definition("having the style of prose; lacking imagination") == "having the style of prose"


def test_cli_reports_malformed_cards(tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("#separator:tab\nterm\tonly two\n")
    assert main(["compare-human", "--cards", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "3 to 5 tab-separated fields" in err


def _same_shape_preps(model, terms, outputs, n_out=3, alternatives=None):
    from recallscope.routes.batched import shape_key
    from recallscope.routes.scores import RouteQuery, prepare_prompt

    preps = []
    for term, out, alts in zip(terms, outputs, alternatives or [()] * len(terms)):
        prompt = f'The word "{term}" means'
        preps.append(prepare_prompt(model, prompt, RouteQuery((prompt,), term, out, alts), max_output_tokens=n_out,
                                    n_alternatives=0, seed=0))
    assert len({shape_key(p) for p in preps}) == 1, "the test prompts must share one shape"
    return preps


def test_batched_runner_matches_one_span_runner_per_prompt(tiny_llama):
    """The fast path of compare_human (one batch of prompts) against the reference: a SpanRunner per prompt
    with exact ablation, its gradient estimate and the readout, on a rotary model (positions matter)."""
    from recallscope.lens.base import LogitLens
    from recallscope.models.stack import build_stack
    from recallscope.routes.batched import BatchRunner
    from recallscope.routes.scores import SpanRunner, ablation_attribution, ablation_exact, readout_ranks

    from recallscope.routes.scores import alternative_runs

    model = tiny_llama
    preps = _same_shape_preps(model, ["cat", "dog", "sun"], [" a small pet animal", " a loyal pet", " the star we see"],
                              alternatives=(("dog", "sun"), ("sun",), ()))
    stack = build_stack(model)
    n, d = stack.n_layers, stack.d_model
    gen = torch.Generator().manual_seed(0)
    shared = torch.nn.functional.normalize(torch.randn(5, n + 1, d, generator=gen), dim=-1)
    shared_absent = torch.randn(5, n + 1, generator=gen)
    own = torch.nn.functional.normalize(torch.randn(3, 4, n + 1, d, generator=gen), dim=-1)  # per prompt
    own_absent = torch.randn(3, 4, n + 1, generator=gen)
    batch = BatchRunner(model, preps)
    ablated = batch.ablation(own, own_absent, batch_size=5)  # rows split over chunks across prompts
    attr_shared, attr_own = batch.attribution(shared, shared_absent), batch.attribution(own, own_absent)
    lens = LogitLens(model)
    total = batch.total_effect(batch_size=2)
    assert torch.isnan(total[2])  # no alternatives
    for b, prep in enumerate(preps):
        ref = SpanRunner(stack, prep)
        assert float(batch.clean[b]) == pytest.approx(ref.clean, abs=1e-5)
        if prep.alt_tokens.shape[0]:
            assert float(total[b]) == pytest.approx(float(ref.clean - alternative_runs(ref)[1].mean()), abs=1e-4)
        torch.testing.assert_close(batch.states[:, b], ref.states[:, 0], atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            want = ablation_exact(ref, own[b], own_absent[b], (0,), n, 64)[:, 0]
        torch.testing.assert_close(ablated[b], want, atol=1e-4, rtol=1e-4)
        layers = tuple(range(n))
        torch.testing.assert_close(attr_shared[b], ablation_attribution(model, ref, shared, shared_absent, layers, 1),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(attr_own[b], ablation_attribution(model, ref, own[b], own_absent[b], layers, 1),
                                   atol=1e-5, rtol=1e-4)
        last = prep.span[1] - 1
        ids = torch.tensor([5, 17, -1])
        torch.testing.assert_close(readout_ranks(lens, batch.states[:, b, last:last + 1], ids),
                                   readout_ranks(lens, ref.states[:, 0, last:last + 1], ids), equal_nan=True)


def test_batched_runner_rejects_mixed_shapes(tiny_gpt2):
    from recallscope.errors import LengthMismatchError
    from recallscope.routes.batched import BatchRunner

    a = _same_shape_preps(tiny_gpt2, ["cat"], [" a small pet animal"])
    b = _same_shape_preps(tiny_gpt2, ["cat"], [" a small pet animal"], n_out=2)
    with pytest.raises(LengthMismatchError, match="shape_key"):
        BatchRunner(tiny_gpt2, a + b)


def test_compare_human_does_not_depend_on_the_batching(result, tiny_gpt2, tmp_path):
    res, cards = result
    config = HumanConfig(n_controls=3, own_vocabulary=20, n_perm=300, definition_tokens=3, own_top=2,
                         cards_per_batch=1, n_boot=50)
    one = compare_human(tiny_gpt2, cards, config=config, progress=False)
    torch.testing.assert_close(one.scores, res.scores, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one.profile, res.profile, atol=1e-4, rtol=1e-4)
    assert [r["term"] for r in one.rows] == [r["term"] for r in res.rows]
    assert [r["controls"] for r in one.rows] == [r["controls"] for r in res.rows]


# Self-written cards (not from ../shared) in the Anki text-export format of the NOTICE: header lines,
# 3 to 5 tab-separated fields, a quoted field with doubled quotes, a card without a mnemonic.
UNSEEN = "\n".join([
    "#separator:tab",
    "#html:false",
    "garrulous\tSounds like gorilla. A gorilla that never stops chattering\texcessively talkative\t"
    "a garrulous neighbour\tchatty, talkative",
    "lethargic\tFrom Greek lethe (forgetfulness)\tsluggish and apathetic\the felt lethargic after lunch",
    "benevolent\tbene + volent = well wishing\twell meaning and kindly",
    "ostracize\tAn ostrich hides its head and shuns everyone\texclude from a society or group",
    "sedate\t\"Looks like \"\"seat\"\"; you stay calmly in your seat\"\tcalm and unhurried",
    "pungent\tpun + gent\thaving a sharply strong taste or smell",
    "placid\tcalm\tnot easily upset or excited",
    "voracious\tA vulture races to eat everything\twanting great quantities of food",
    "tenacious\tSounds like ten ants. Ten ants hold on to the crumb\tholding fast; persistent",
    "obsolete\t\tno longer produced or used",
])


def test_cli_compare_human_runs_on_unseen_cards(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """`recallscope compare-human` end to end on cards it has never seen, in the NOTICE's format."""
    import json

    from recallscope.models import organisms_registry

    monkeypatch.setitem(organisms_registry._LOADERS, "tiny-cards", lambda **kw: tiny_gpt2)
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-browser"))  # no Chromium: figures as HTML
    path = tmp_path / "my_cards.txt"
    path.write_text(UNSEEN + "\n", encoding="utf-8")
    out = tmp_path / "out"
    rc = main(["compare-human", "--model", "organism:tiny-cards", "--cards", str(path), "--out", str(out),
               "--n-controls", "3", "--examples", "1", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cards_scored"] + summary["n_cards_skipped"] == 9  # the card without a mnemonic is not read
    assert summary["n_cards_scored"] >= 7
    for link in ("all", "sound", "meaning"):
        stats = summary["agreement"]["causal"][link]
        assert stats["n_cards"] > 0 and 0 < stats["p_value"] <= 1 and stats["top1_chance"] == pytest.approx(0.25)
    assert summary["links"]["sound/orthographic"] > 0 and summary["links"]["meaning/etymology"] > 0
    example = summary["examples_best"][0]
    assert example["term"] in UNSEEN and example["route_report"] and len(example["own"]) == 3
    assert (out / "agreement.html").exists() and (out / "examples" / f"{example['term']}.html").exists()
    assert HumanComparison.load(out / "result").rows[0]["term"] in UNSEEN


def test_low_overlap_agreement_and_term_alternatives(result, tiny_gpt2):
    """The summary's confound check keeps exactly the cards whose keyword shares at most 3 consecutive
    letters with the term; worked examples get same-shape alternative terms."""
    from recallscope.routes.agreement import agreement
    from recallscope.routes.human import term_alternatives
    from recallscope.routes.scores import input_span

    assert (common_run("impenetrable", "penetrate"), common_run("capricious", "car prices"), common_run("a", "")) == (7, 4, 0)
    res, cards = result
    low = res.summary()["agreement_low_overlap"]
    assert low["max_common_letters"] == 3 and "string" not in low
    recalled = res.summary()["agreement_recalled"]["causal"]["all"]
    assert recalled["n_cards"] == sum(r["term_effect"] >= 0.5 for r in res.rows)
    keep = [i for i, r in enumerate(res.rows) if common_run(r["term"], r["keyword"]) <= 3]
    assert low["causal"]["all"]["n_cards"] == len(keep)
    if keep:
        want = agreement(res.scores[keep, :, 0], n_perm=300)
        assert low["causal"]["all"]["mean_percentile"] == pytest.approx(want["mean_percentile"])
        assert low["causal"]["all"]["top1"] == pytest.approx(want["top1"])
    template = 'The word "{term}" means'
    for card in cards:
        alts = term_alternatives(tiny_gpt2, card, cards, n=2)
        assert len(alts) <= 2 and card.term not in alts
        ids, span = input_span(tiny_gpt2, template.format(term=card.term), card.term)
        for alt in alts:
            alt_ids, alt_span = input_span(tiny_gpt2, template.format(term=alt), alt)
            assert (len(alt_ids), alt_span) == (len(ids), span)
