"""Candidate route concepts for an input (a base64 chunk "VA", an acronym "VAT", a word "capricious").

Sources, each a function returning :class:`Concept` objects tagged with their :class:`ConceptSource`:

1. :func:`vocabulary_candidates`: whole-word tokens of the model's vocabulary that extend the input
   (prefix: "VA" -> " VAT"), share its letters (bigram Dice) or its sound (:mod:`~recallscope.routes.text`).
   Vocabulary order stands in for frequency (BPE merges frequent strings first).
2. :func:`lexicon_candidates`: an acronym lexicon: an acronym's expansions ("VAT" -> " value added tax"),
   and the acronyms a chunk begins ("VA" -> " VAT"). :func:`load_acronym_lexicon` reads recallscope's own
   lexicon (``recallscope/data/acronyms.tsv``) or any file in the same format.
3. Human mnemonics: :class:`Concept` with ``source=ConceptSource.HUMAN`` (see :mod:`.mnemonics`).
4. :func:`model_candidates`: what the model itself says, e.g. its greedy continuation of
   "The acronym VAT stands for".

A concept is text (read by lenses, represented by the model in neutral contexts) or a direction vector
(from a probe or a planted organism), or both.
"""

import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.errors import ConfigError, DatasetFormatError
from recallscope.routes.text import bigram_dice, letters, sound_ratio


class ConceptSource(str, Enum):
    """Where a candidate concept came from."""

    USER = "user"
    """Given by the caller."""
    VOCAB_PREFIX = "vocabulary: prefix"
    """A vocabulary word the input begins ("VA" -> "VAT")."""
    VOCAB_LETTERS = "vocabulary: letters"
    """A vocabulary word sharing the input's letters."""
    VOCAB_SOUND = "vocabulary: sound"
    """A vocabulary word that sounds like the input."""
    VOCABULARY = "vocabulary"
    """A whole-word token from a sample of the vocabulary."""
    LEXICON = "lexicon"
    """An acronym lexicon entry (expansion or acronym)."""
    HUMAN = "human mnemonic"
    """A keyword of a human-written mnemonic."""
    MODEL = "model"
    """The model's own continuation of a prompt about the input."""
    CONTROL = "control"
    """A control concept matched on frequency and token count."""
    FEATURE = "feature"
    """Transcoder features or a supernode: the direction is their decoder rows
    (:mod:`recallscope.features.concepts`)."""
    FEATURE_PLACEBO = "feature placebo"
    """A size-matched placebo feature set (same layer, matched activation frequency and decoder norm)."""
    INPUT = "competitor: input"
    """The input itself (a competitor, never a route)."""
    OUTPUT = "competitor: output"
    """The output in some casing or spacing (a competitor, never a route)."""
    NEIGHBOUR = "competitor: output neighbour"
    """A nearest neighbour of the output in the unembedding (a competitor)."""
    RANDOM = "competitor: matched random"
    """A random direction matched in cosine to the state and in edit norm (a competitor)."""


@dataclass(frozen=True, eq=False)
class Concept:
    """A candidate route concept.

    Attributes:
        text: how the concept is written in running text, usually with a leading space (" value added
            tax"); None when only a direction is known.
        source: where it came from.
        direction: optional ``[d_model]`` (every layer) or ``[n_layers + 1, d_model]`` (per hidden-state
            layer) vector; when given it is used instead of the model's representation of ``text``.
        label: display name (default: the stripped text).
    """

    text: str | None = None
    source: ConceptSource = ConceptSource.USER
    direction: Float[Tensor, "*layer d_model"] | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if (self.text is None or not self.text.strip()) and self.direction is None:
            raise ConfigError("a Concept needs non-empty text or a direction vector.")
        if self.direction is not None and self.direction.ndim not in (1, 2):
            raise ConfigError(f"a concept direction must be [d_model] or [n_layers + 1, d_model], got shape "
                              f"{tuple(self.direction.shape)}.")

    @property
    def name(self) -> str:
        return self.label or (self.text or "").strip() or "direction"

    def key(self) -> str:
        """Identity used to de-duplicate candidates: the lowercased letters of the text."""
        return letters(self.text or self.label) or self.name


def as_concept(c: "Concept | str", source: ConceptSource = ConceptSource.USER) -> Concept:
    """A :class:`Concept` from a concept or a text (a bare word gets a leading space)."""
    if isinstance(c, Concept):
        return c
    return Concept(text=c if c.startswith((" ", "\n")) else " " + c, source=source)


def dedupe(concepts: Sequence[Concept], *, exclude: Sequence[str] = ()) -> list[Concept]:
    """First occurrence of each concept key, dropping those whose key is in ``exclude`` texts' keys."""
    seen = {letters(e) for e in exclude}
    out = []
    for c in concepts:
        if c.key() not in seen:
            seen.add(c.key())
            out.append(c)
    return out


# ------------------------------------------------------------------------------------------ vocabulary


def word_vocabulary(model: Any) -> list[tuple[int, str]]:
    """``(id, text)`` of the vocabulary's whole-word tokens (space-prefixed, letters only, >= 2 letters),
    in id order; cached on the model."""
    cached = getattr(model, "_recallscope_word_vocab", None)
    if cached is not None:
        return cached
    tok = model.tokenizer
    vocab = tok.get_vocab()
    # byte-level BPE marks a leading space with "Ġ", SentencePiece with "▁": read words off the vocabulary
    words = sorted((i, " " + t[1:]) for t, i in vocab.items() if re.fullmatch(r"[Ġ▁][A-Za-z]{2,}", t))
    if not words:  # another scheme: decode every token (slower)
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        words = [(i, t) for i, t in enumerate(texts) if re.fullmatch(r" [A-Za-z]{2,}", t)]
    model._recallscope_word_vocab = words
    return words


def vocabulary_candidates(model: Any, text: str, *, k: int = 4, min_letters: float = 0.5,
                          min_sound: float = 0.85) -> list[Concept]:
    """Up to ``k`` whole-word tokens per kind (prefix, letters, sound) related to ``text``, most frequent
    (lowest id) first. The prefix match keeps case when ``text`` has capitals (acronyms, base64 chunks)."""
    key = letters(text)
    if not key:
        return []
    found: dict[ConceptSource, list[Concept]] = {s: [] for s in (ConceptSource.VOCAB_PREFIX,
                                                                ConceptSource.VOCAB_LETTERS, ConceptSource.VOCAB_SOUND)}
    cased = text.strip() if any(ch.isupper() for ch in text) else None  # "VA" -> "VAT", not "value"
    for _, word in word_vocabulary(model):
        w = letters(word)
        if w == key:
            continue
        if word.strip().startswith(cased) if cased else w.startswith(key):
            kind = ConceptSource.VOCAB_PREFIX
        elif len(key) >= 3 and bigram_dice(w, key) >= min_letters:
            kind = ConceptSource.VOCAB_LETTERS
        elif len(key) >= 3 and sound_ratio(w, key) >= min_sound:
            kind = ConceptSource.VOCAB_SOUND
        else:
            continue
        if len(found[kind]) < k:
            found[kind].append(Concept(text=word, source=kind))
        if all(len(v) >= k for v in found.values()):
            break
    return [c for v in found.values() for c in v]


# --------------------------------------------------------------------------------------------- lexicon


def _expand(field: str) -> list[str]:
    """``"{a,b}"`` alternatives -> ``["a", "b"]``; ``"x {a,b} y"`` -> ``["x a y", "x b y"]``."""
    m = re.search(r"\{([^{}]*)\}", field)
    if not m:
        return [field.strip()]
    return [e for alt in m.group(1).split(",") for e in _expand(field[:m.start()] + alt + field[m.end():])]


def load_acronym_lexicon(path: str | os.PathLike | None = None, *, skip_bad_lines: bool = False
                         ) -> dict[str, tuple[str, ...]]:
    """Acronym -> expansions from a ``ACRONYM<TAB>expansion`` file (``{a,b}`` = alternatives; lines
    starting with ``#`` or ``$`` are comments). Default: recallscope's own ``data/acronyms.tsv``.

    With ``skip_bad_lines=True`` a line without a tab-separated acronym and expansion is left out and
    reported in one :class:`UserWarning` (count and first line numbers) instead of raising; a lexicon with a
    stray space-separated line (``GVFS    git virtual file system``) then loads without it.

    Raises:
        DatasetFormatError: a line without a tab-separated acronym and expansion (names file and line),
            unless ``skip_bad_lines``; an unreadable file.
    """
    if path is None:
        from importlib.resources import files

        text = (files("recallscope") / "data" / "acronyms.tsv").read_text(encoding="utf-8")
        where = "recallscope/data/acronyms.tsv"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetFormatError(f"{path}: cannot read the acronym lexicon as UTF-8 text ({exc}).") from exc
        where = str(path)
    lexicon: dict[str, list[str]] = {}
    bad: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith(("#", "$")):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            if not skip_bad_lines:
                raise DatasetFormatError(f"{where}:{number}: expected 'ACRONYM<TAB>expansion', got {line[:60]!r}; "
                                         "fix the line or pass skip_bad_lines=True to leave such lines out.")
            bad.append(number)
            continue
        lexicon.setdefault(parts[0].strip(), []).extend(e for e in _expand(parts[1]) if e)
    if bad:
        import warnings

        warnings.warn(f"{where}: left out {len(bad)} line(s) without 'ACRONYM<TAB>expansion' (lines "
                      f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''}).", UserWarning, stacklevel=2)
    return {a: tuple(dict.fromkeys(e)) for a, e in lexicon.items()}


def lexicon_candidates(text: str, lexicon: dict[str, tuple[str, ...]], *, k: int = 6) -> list[Concept]:
    """Expansions of ``text`` if it is an acronym, then acronyms that begin with it (up to ``k`` each)."""
    key = text.strip()
    out = [Concept(text=" " + e, source=ConceptSource.LEXICON, label=f"{e} ({key})")
           for e in lexicon.get(key, ())[:k]]
    longer = sorted((a for a in lexicon if a.startswith(key) and a != key), key=lambda a: (len(a), a))
    out += [Concept(text=" " + a, source=ConceptSource.LEXICON) for a in longer[:k]]
    return out


# ------------------------------------------------------------------------------------------ the model


def model_candidates(model: Any, text: str, *, templates: Sequence[str] = ("The acronym {} stands for",),
                     max_new_tokens: int = 6) -> list[Concept]:
    """The model's greedy continuation of each template (``{}`` = the input), cut at punctuation."""
    from recallscope.models.forward import run
    from recallscope.models.selfcheck import checked_stack

    stack = checked_stack(model, "concept directions")
    out = []
    for template in templates:
        tokens = model.to_tokens(template.format(text.strip()), truncate=False)
        new: list[int] = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits, _ = run(stack, tokens, read_pos=torch.tensor([tokens.shape[1] - 1]))
                new.append(int(logits[0, -1].argmax()))
                tokens = torch.cat([tokens, torch.tensor([[new[-1]]])], dim=1)
        phrase = re.split(r"[.,;:()\"\n]", model.tokenizer.decode(new))[0].rstrip()
        if letters(phrase):
            out.append(Concept(text=phrase if phrase.startswith(" ") else " " + phrase, source=ConceptSource.MODEL,
                               label=f"{phrase.strip()} (model: {template.format(text.strip())})"))
    return out


def candidate_concepts(model: Any, text: str, *, lexicon: dict[str, tuple[str, ...]] | None = None,
                       human: Sequence[str] = (), templates: Sequence[str] = ("The acronym {} stands for",),
                       k: int = 4) -> list[Concept]:
    """All sources together, de-duplicated, never the input itself: human keywords first, then the
    lexicon, the model's own continuation and the vocabulary."""
    lexicon = load_acronym_lexicon() if lexicon is None else lexicon
    found = [Concept(text=h if h.startswith(" ") else " " + h, source=ConceptSource.HUMAN) for h in human]
    found += lexicon_candidates(text, lexicon, k=k)
    found += model_candidates(model, text, templates=templates) if templates else []
    found += vocabulary_candidates(model, text, k=k)
    return dedupe(found, exclude=[text])
