"""Human mnemonic cards: loading, keyword extraction and link-type classification.

Card files are Anki text exports (the format of ``cards.tsv``): lines starting with ``#`` are headers
(``#separator:tab``, ``#html:false``); every other non-empty line is one card with 3 to 5 tab-separated
fields ``term, mnemonic, definition[, examples[, synonyms]]``; a field holding quotes or tabs is quoted
CSV-style (a field ``Looks like "prodigy".`` is written ``"Looks like ""prodigy""."``).

Keyword extraction (:func:`extract_keywords`), in order, each rule adding keywords with a link type:

1. Etymology statements: ``From Latin loqui (talk)``, ``related to caprice``, ``noun of profound``,
   ``pugn = fight``: the root and its gloss are *meaning/etymology* keywords.
2. ``Looks like X`` / ``Sounds like X``: X (split on ``+``) is a *sound/orthographic* keyword.
3. Word-part formulas ``a + morph``, ``com + measure + ate = same measurement``: the content parts are
   keywords; *meaning/etymology* when the formula is glossed (``=``, parentheses), else *sound/orthographic*.
4. Sound-alike phrases in a story (``Car prices are unpredictable...`` for "capricious"): the 1-3 word
   n-gram most similar to the term in letters or sound (:func:`~recallscope.routes.text.similarity`
   >= ``min_similarity``), skipping the term itself and its inflections.
5. A short mnemonic (<= 3 words) left without a keyword is itself the keyword: *sound/orthographic* if it
   resembles the term ("separate" for "disparate"), else *meaning/etymology* (a synonym or gloss).

The primary keyword (:func:`primary_keyword`) is the first sound-alike keyword if there is one (the
hook the mnemonic is built on), else the first etymology keyword.
"""

import csv
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from recallscope.errors import DatasetFormatError, EmptyDatasetError
from recallscope.routes.text import letters, similarity

AFFIXES = frozenset("""a ab ad an ante anti com con de dis e ex im in ir un re pre pro per sub trans ob
    ate ize ise ish ous ious ness ly fy ify ion tion able ible ment al ic ist ism ity y ed er ent ant""".split())
"""Prefixes and suffixes that are not keywords on their own in a word-part formula."""


class LinkType(str, Enum):
    """How a mnemonic keyword links to the term."""

    SOUND = "sound/orthographic"
    """The keyword sounds or looks like (part of) the term: "car prices" for "capricious"."""
    MEANING = "meaning/etymology"
    """The keyword is a root, a gloss or a related meaning: "loqui (talk)" for "loquacious"."""


@dataclass(frozen=True)
class Keyword:
    """One keyword of a mnemonic: ``text``, its link type and the rule that found it."""

    text: str
    link: LinkType
    rule: str


@dataclass(frozen=True)
class Card:
    """One mnemonic card. ``line`` is its 1-based line number in ``source``."""

    term: str
    mnemonic: str
    definition: str
    examples: str = ""
    synonyms: str = ""
    source: str = ""
    line: int = 0
    keywords: tuple[Keyword, ...] = field(default=(), compare=False)

    @property
    def primary(self) -> Keyword | None:
        return primary_keyword(self.keywords)


def _parse_line(text: str, path: Path, number: int) -> list[str]:
    try:
        fields = next(csv.reader([text], delimiter="\t", quotechar='"', strict=True))
    except csv.Error as exc:
        raise DatasetFormatError(f"{path}:{number}: cannot parse the card ({exc}); fields holding quotes must "
                                 'be quoted with doubled inner quotes ("Looks like ""X""").') from exc
    if not 3 <= len(fields) <= 5:
        raise DatasetFormatError(
            f"{path}:{number}: a card needs 3 to 5 tab-separated fields (term, mnemonic, definition[, "
            f"examples[, synonyms]]) but this line has {len(fields)}. Export from Anki as 'Notes in Plain "
            "Text' with tabs, or fix the line.")
    if not fields[0].strip():
        raise DatasetFormatError(f"{path}:{number}: the term (field 1) is empty; every card needs a term.")
    return fields


def load_cards(path: str | os.PathLike, *, with_mnemonic: bool = True) -> list[Card]:
    """Read an Anki text export of mnemonic cards (see the module doc), extracting keywords.

    Args:
        path: the ``.tsv``/``.txt`` export.
        with_mnemonic: keep only cards whose mnemonic field is non-empty.

    Raises:
        DatasetFormatError: the file is not UTF-8 text, declares a non-tab separator, or a line does not
            hold 3-5 fields with a term; the message names the file and line.
        EmptyDatasetError: no card (with a mnemonic) was found.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"{path}: not UTF-8 text (byte {exc.start}); re-export the cards as UTF-8.") from exc
    except OSError as exc:
        raise DatasetFormatError(f"{path}: cannot read the card file ({exc.strerror or exc}).") from exc
    cards = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if line.startswith("#"):
            sep = re.match(r"#separator:(\S+)", line)
            if sep and sep.group(1).lower() not in ("tab", "\\t"):
                raise DatasetFormatError(f"{path}:{number}: separator {sep.group(1)!r} is not supported; "
                                         "export the cards with tabs (#separator:tab).")
            continue
        if not line.strip():
            continue
        fields = _parse_line(line, path, number) + [""] * 2
        term, mnemonic = fields[0].strip(), fields[1].strip()
        if with_mnemonic and not mnemonic:
            continue
        cards.append(Card(term=term, mnemonic=mnemonic, definition=fields[2].strip(), examples=fields[3].strip(),
                          synonyms=fields[4].strip(), source=str(path), line=number,
                          keywords=extract_keywords(term, mnemonic)))
    if not cards:
        raise EmptyDatasetError(f"{path}: no cards{' with a mnemonic' if with_mnemonic else ''} were found; "
                                "check that it is an Anki text export with term, mnemonic, definition fields.")
    return cards


_LANG = r"(?:latin|greek|french|old english|middle english|italian|german|old french|old norse)"
_ETYM_FROM = re.compile(rf"\bfrom\s+{_LANG}\b([^.;]*)", re.I)
_GLOSSED = re.compile(r"([A-Za-zÀ-ÿāēīōūǣ\-]+)\s*\(\s*(?:=\s*)?[\"“']?([^)\"”']+)[\"”']?\s*\)")
_RELATED = re.compile(r"\b(?:related to|noun of|adj(?:ective)? (?:for|of)|verb of|same (?:latin |greek )?root "
                      r"as|root (?:of|for) (?:the word )?)\s*[\"“']*([A-Za-z\-]+)", re.I)
_EQUALS = re.compile(r"^\s*([A-Za-z/\-]{2,20})\s*=\s*([^.;+]+)")
_LOOKS = re.compile(r"\b(?:looks?|sounds?)\s+like\s+[\"“”']*([^.\"“”;!?]+)", re.I)
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")


_NOT_KEYWORDS = frozenset("from latin greek french old english root same as like".split())


def _clean(text: str) -> str:
    """Words of ``text`` without parenthesised glosses and leading "From Latin"-style words."""
    words = _WORD.findall(re.sub(r"\([^)]*\)", " ", text).replace("-", " "))
    while words and words[0].lower() in _NOT_KEYWORDS:
        words = words[1:]
    return " ".join(words).strip()


def _content_parts(parts: list[str]) -> list[str]:
    out = []
    for p in parts:
        c = _clean(p)
        if c and letters(c) not in AFFIXES and len(letters(c)) >= 3:
            out.append(c)
    return out


def _is_term(term: str, word: str) -> bool:
    t, w = letters(term), letters(word)
    return w == t or w.startswith(t) or (t.startswith(w) and len(w) >= len(t) - 2)


def _etymology(term: str, mnemonic: str) -> list[Keyword]:
    found: list[Keyword] = []
    for m in _ETYM_FROM.finditer(mnemonic):
        for root, gloss in _GLOSSED.findall(m.group(1)):
            found += [Keyword(_clean(gloss), LinkType.MEANING, "etymology gloss"),
                      Keyword(_clean(root), LinkType.MEANING, "etymology root")]
        if not _GLOSSED.search(m.group(1)):
            found += [Keyword(w, LinkType.MEANING, "etymology root") for w in _content_parts(m.group(1).split("+"))[:1]]
    found += [Keyword(w, LinkType.MEANING, "related word") for w in _RELATED.findall(mnemonic)]
    eq = _EQUALS.match(mnemonic)
    if eq and "+" not in eq.group(1):
        found += [Keyword(_clean(eq.group(2)), LinkType.MEANING, "gloss"),
                  Keyword(_clean(eq.group(1).split("/")[0]), LinkType.MEANING, "root")]
    return found


def _looks_like(mnemonic: str) -> list[Keyword]:
    out = []
    for m in _LOOKS.finditer(mnemonic):
        parts = m.group(1).split("+")
        words = _content_parts(parts) if len(parts) > 1 else [_clean(m.group(1))]
        out += [Keyword(w, LinkType.SOUND, "looks/sounds like") for w in words if w]
    return out


def _formula(mnemonic: str) -> list[Keyword]:
    head = re.split(r"(?<![A-Za-z])\.(?=\s|$)|[;\n]", mnemonic)[0]
    if "+" not in head or len(head.split()) > 14:
        return []
    lhs, glossed = head, False
    for mark in ("=", ":"):
        if mark in lhs:
            lhs, glossed = lhs.split(mark)[0], True
    glossed = glossed or "(" in lhs
    link = LinkType.MEANING if glossed else LinkType.SOUND
    return [Keyword(w, link, "word parts") for w in _content_parts(lhs.split("+"))]


def _story(mnemonic: str) -> str:
    """The sentences of a mnemonic that are not etymology statements or word-part formulas."""
    sentences = re.split(r"(?<=[.!?;])\s+", mnemonic)
    return " ".join(s for s in sentences if "+" not in s and "=" not in s and not _ETYM_FROM.search(s)
                    and not _RELATED.search(s) and not _LOOKS.search(s))


def _sound_alike(term: str, mnemonic: str, min_similarity: float) -> list[Keyword]:
    words = _WORD.findall(re.sub(r"\([^)]*\)", " ", _story(mnemonic)).replace("-", " "))
    best, best_score = None, min_similarity
    for n in (1, 2, 3):
        for i in range(len(words) - n + 1):
            gram = words[i:i + n]
            if any(_is_term(term, w) for w in gram) or len(letters("".join(gram))) < 3:
                continue
            score = similarity(term, " ".join(gram)) - 0.02 * (n - 1)  # prefer shorter n-grams on ties
            if score > best_score:
                best, best_score = " ".join(gram), score
    return [Keyword(best, LinkType.SOUND, "sound-alike phrase")] if best else []


def _names_term(term: str, text: str) -> bool:
    """A keyword that is the term itself (or an inflection); a multi-word split ("a men able") is not."""
    words = text.split()
    return _is_term(term, text) if len(words) == 1 else any(_is_term(term, w) for w in words)


def extract_keywords(term: str, mnemonic: str, *, min_similarity: float = 0.5) -> tuple[Keyword, ...]:
    """The keywords a mnemonic links ``term`` to, each with its link type (see the module doc)."""
    if not mnemonic.strip():
        return ()
    found = _etymology(term, mnemonic) + _looks_like(mnemonic) + _formula(mnemonic)
    if not any(k.link is LinkType.SOUND for k in found):
        found += _sound_alike(term, mnemonic, min_similarity)
    if not found and len(mnemonic.split()) <= 3:
        short = _clean(mnemonic)
        link = LinkType.SOUND if similarity(term, short) >= min_similarity else LinkType.MEANING
        found.append(Keyword(short, link, "short mnemonic"))
    out, seen = [], set()
    for k in found:
        key = letters(k.text)
        if k.text and len(key) >= 2 and key not in seen and not _names_term(term, k.text):
            seen.add(key)
            out.append(k)
    return tuple(out)


def primary_keyword(keywords: tuple[Keyword, ...]) -> Keyword | None:
    """The first sound/orthographic keyword, else the first meaning/etymology keyword, else None."""
    for k in keywords:
        if k.link is LinkType.SOUND:
            return k
    return keywords[0] if keywords else None
