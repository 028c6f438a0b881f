"""The human-mnemonic comparison end to end on a tiny model, and the CLI's error path."""

import pytest
import torch

from recallscope.cli import main
from recallscope.routes.human import SCORES, HumanComparison, HumanConfig, clean_definition, compare_human
from recallscope.routes.mnemonics import load_cards
from recallscope.routes.text import similarity

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
    config = HumanConfig(n_controls=3, own_vocabulary=20, n_perm=300, definition_tokens=3, own_top=2)
    return compare_human(tiny_gpt2, cards, config=config, progress=False), cards


def test_compare_human_scores_every_card(result, tmp_path):
    res, cards = result
    assert isinstance(res, HumanComparison)
    n = len(res.rows) + len(res.skipped)
    assert n == len(cards) and len(res.rows) >= 6
    assert res.scores.shape == (len(res.rows), 4, len(SCORES))
    keywords = {c.primary.text for c in cards}
    for row, s in zip(res.rows, res.scores):
        assert len(row["controls"]) == 3 and set(row["controls"]) <= keywords - {row["keyword"]}
        assert float(s[0, SCORES.index("string")]) == pytest.approx(similarity(row["term"], " " + row["keyword"]))
        assert row["keyword_effect"] == pytest.approx(float(s[0, 0]))
        assert len(row["own"]) == 2
    summary = res.summary()
    for score in SCORES:
        stats = summary["agreement"][score]["all"]
        assert stats["n_cards"] == len(res.rows) and 0 <= stats["mean_percentile"] <= 1
        assert 0 < stats["p_value"] <= 1 and stats["top1_chance"] == pytest.approx(0.25)
    # text similarity picks the sound-alike keywords, the text-only reference agreement is high
    assert summary["agreement"]["string"]["all"]["mean_percentile"] > 0.7
    back = HumanComparison.load(res.save(tmp_path / "human"))
    torch.testing.assert_close(back.scores, res.scores)
    assert back.rows == res.rows
    assert len(res.plot().data) == 2 * 3 * 1  # (percentile, top-1) x (all, sound, meaning)


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
