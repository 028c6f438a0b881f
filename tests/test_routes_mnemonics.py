"""Mnemonic cards: Anki-export parsing with clear errors, keyword extraction and link types."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recallscope.errors import DatasetFormatError, EmptyDatasetError
from recallscope.routes.mnemonics import LinkType, extract_keywords, load_cards, primary_keyword
from recallscope.routes.text import bigram_dice, phonetic_key, similarity

SHARED_CARDS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnemonics" / "cards.tsv"

GOOD = (
    "#separator:tab\n#html:false\n"
    "capricious\trelated to caprice. Car prices are unpredictable like a moody child\tgiven to sudden changes of "
    "mood\tex\tfickle\n"
    "amorphous\ta + morph: no form\twithout a clearly defined shape\n"
    "prodigal\t\"Looks like \"\"prodigy.\"\" That prodigal prodigy is wasteful\"\tspending money recklessly\t\t\n"
    "loquacious\tFrom Latin loqui (talk) + -ious\ttending to talk a great deal\n"
    "abound\t\texist in large numbers\n"
)


def _write(tmp_path, text, name="cards.tsv", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_load_cards_parses_fields_quotes_and_keywords(tmp_path):
    cards = load_cards(_write(tmp_path, GOOD))
    assert [c.term for c in cards] == ["capricious", "amorphous", "prodigal", "loquacious"]  # abound: no mnemonic
    assert cards[0].line == 3 and cards[0].synonyms == "fickle"
    assert cards[2].mnemonic.startswith('Looks like "prodigy."')
    got = {c.term: (c.primary.text, c.primary.link) for c in cards}
    assert got["capricious"] == ("Car prices", LinkType.SOUND)
    assert got["amorphous"] == ("morph", LinkType.MEANING)
    assert got["prodigal"] == ("prodigy", LinkType.SOUND)
    assert got["loquacious"] == ("talk", LinkType.MEANING)
    assert len(load_cards(_write(tmp_path, GOOD), with_mnemonic=False)) == 5


@pytest.mark.parametrize("bad, where", [
    ("#separator:tab\nterm\tonly two fields\n", ":2:"),
    ("ok\tmnemonic\tdefinition\nx\ty\tz\ta\tb\tc\n", ":2:"),
    ("\tmnemonic\tdefinition\n", ":1:"),
    ("#separator:comma\na,b,c\n", ":1:"),
    ('word\t"unclosed quote\tdefinition\n', ":1:"),
])
def test_malformed_cards_name_file_and_line(tmp_path, bad, where):
    path = _write(tmp_path, bad)
    with pytest.raises(DatasetFormatError) as err:
        load_cards(path)
    assert str(path) + where in str(err.value)


def test_unreadable_and_empty_card_files(tmp_path):
    with pytest.raises(DatasetFormatError, match="UTF-8"):
        load_cards(_write(tmp_path, "caf\xe9\tmn\tdef\n", encoding="latin-1"))
    with pytest.raises(EmptyDatasetError):
        load_cards(_write(tmp_path, "#separator:tab\nabound\t\texist\n"))
    with pytest.raises(DatasetFormatError):
        load_cards(tmp_path / "missing.tsv")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40), max_size=6))
def test_any_text_loads_or_fails_cleanly(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "cards.tsv"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        cards = load_cards(path)
    except (DatasetFormatError, EmptyDatasetError):
        return
    assert all(c.term and c.mnemonic for c in cards)


def test_keyword_rules():
    assert primary_keyword(extract_keywords("calumny", "They dare write columns to slander me")).text == "columns"
    kw = extract_keywords("venal", "Looks like venue. This huge venue is sponsored by a corrupt businessman")
    assert kw[0] == kw[0].__class__("venue", LinkType.SOUND, "looks/sounds like")
    assert primary_keyword(extract_keywords("negligent", "adj for neglect")).link is LinkType.MEANING
    assert primary_keyword(extract_keywords("amenable", "A men able to respond will succeed")).text == "A men able"
    # the term itself is never its own keyword
    assert all(k.text.lower() != "bucolic" for k in extract_keywords("bucolic", "bucolic bucolic"))
    assert extract_keywords("x", "") == ()


def test_similarity_separates_sound_alikes_from_story_words():
    assert similarity("capricious", "car prices") > 0.6 > similarity("capricious", "unpredictable")
    assert similarity("bucolic", "blue collar") > 0.5 > similarity("austere", "luxury")
    assert phonetic_key("phone") == phonetic_key("fone")
    assert bigram_dice("night", "nacht") == pytest.approx(0.25)


@pytest.mark.skipif(not SHARED_CARDS.exists(), reason="../shared/data/mnemonics/cards.tsv is absent")
def test_shared_cards_keyword_coverage():
    cards = load_cards(SHARED_CARDS)
    assert len(cards) == 546
    with_kw = [c for c in cards if c.primary is not None]
    assert len(with_kw) >= 450
    by_term = {c.term: c for c in cards}
    assert by_term["capricious"].primary.text.lower() == "car prices"
    assert {LinkType.SOUND, LinkType.MEANING} <= {c.primary.link for c in with_kw}
