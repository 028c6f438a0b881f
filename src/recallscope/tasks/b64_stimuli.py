"""Base64 stimuli: single characters, words and short sentences with their encodings.

Three sets, each deterministic (sampling uses ``random.Random(seed)``, never the global RNG):

1. **Characters** (:func:`char_stimuli`): every ASCII letter and digit. One byte encodes to a single
   ``XX==`` block. Many of these encodings start with a common two-letter abbreviation (``VA==`` = T, with
   VA as in VAT or Virginia; TA = L, SA = H, RA = D, MA = 0, NA = 4, WA = X, UA = P; SCIENCE.md, "Base64
   facts"). A human decoder can use such a pair as a mnemonic hook, and these stimuli test whether a model
   routes the recall through the abbreviation too. They carry ``hook``; the other characters are the
   controls.
2. **Words** (:func:`word_stimuli`): common English words, sampled without replacement.
3. **Sentences** (:func:`sentence_stimuli`): short sentences "subject verb object.", built from a small
   grammar by drawing distinct (subject, verb, object) triples.
"""

import random
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from recallscope.errors import ConfigError
from recallscope.tasks.b64_codec import encode

MNEMONIC_HOOKS: frozenset[str] = frozenset({"VA", "TA", "SA", "RA", "MA", "NA", "WA", "UA"})
"""Common two-letter abbreviations that begin single-character encodings (VA== = T, TA== = L, ...)."""

CHARS = string.ascii_letters + string.digits
"""The characters of :func:`char_stimuli`: ASCII letters and digits."""

WORDS: tuple[str, ...] = tuple(
    """
    the and for are but not you all any can her was one our out day get has him his how man new now old
    see two way who boy did its let put say she too use cat dog sun red big hot run sit top yes
    about after again apple basic black bread bring brown chair clean clock cloud color dance dream
    drink early earth field fight floor fruit glass grass green happy heart horse house light lucky
    money month music night ocean paper party peace plant queen quick quiet radio river round sheep
    smile snake sound space storm sugar table teeth thing tiger today train truth uncle voice water
    whale white woman world young zebra
    animal answer banana basket bottle bridge butter camera candle castle circle coffee cookie corner
    doctor dragon engine family father finger flower forest friend garden guitar hammer island jacket
    kitten ladder letter market mirror monkey mother number orange pencil pepper person pillow planet
    pocket rabbit school silver sister spring summer ticket tomato turtle wallet window winter yellow
    Paris London Berlin Tokyo Alice Bob Monday Friday
    """.split()
)
"""Common English words (3-6 letters, a few capitalised names) for :func:`word_stimuli`."""

_SUBJECTS = (
    "The cat", "A dog", "My friend", "The old man", "Her sister", "The teacher", "A small bird",
    "Our team", "The farmer", "His mother", "The child", "A young girl",
)
_VERBS = ("sees", "likes", "found", "made", "wants", "helped", "painted", "carried", "lost", "opened")
_OBJECTS = (
    "the ball", "a red apple", "the old house", "some bread", "a blue car", "the letter", "the door",
    "a green hat", "the map", "two cups", "the garden", "a big box",
)


class StimulusKind(Enum):
    """What a base64 stimulus encodes."""

    CHAR = "char"
    """One ASCII letter or digit: a single ``XX==`` block."""
    WORD = "word"
    """One English word."""
    SENTENCE = "sentence"
    """A short English sentence."""


@dataclass(frozen=True)
class Base64Stimulus:
    """A text and its base64 encoding.

    Attributes:
        text: the plain text (what a decoder should output).
        b64: ``encode(text)``.
        kind: character, word or sentence.
        hook: the two-letter abbreviation the encoding begins with (``"VA"`` for ``VA==``), or None.
    """

    text: str
    b64: str
    kind: StimulusKind
    hook: str | None = None

    def __post_init__(self) -> None:
        assert encode(self.text) == self.b64, f"{self.b64!r} is not the encoding of {self.text!r}"
        assert self.hook is None or self.b64.startswith(self.hook), "hook must begin the encoding"

    @property
    def mnemonic_hook(self) -> bool:
        """True when the encoding starts with a common two-letter abbreviation."""
        return self.hook is not None


def make_stimulus(
    text: str, kind: StimulusKind = StimulusKind.WORD, *, hooks: Iterable[str] = MNEMONIC_HOOKS
) -> Base64Stimulus:
    """Encode ``text`` and flag a mnemonic hook if the encoding's first two characters are in ``hooks``."""
    if not text:
        raise ConfigError("a stimulus needs non-empty text; the encoding of '' is '', which has no tokens.")
    b64 = encode(text)
    return Base64Stimulus(text, b64, kind, b64[:2] if b64[:2] in set(hooks) else None)


def char_stimuli(chars: str = CHARS, *, hooks: Iterable[str] = MNEMONIC_HOOKS) -> tuple[Base64Stimulus, ...]:
    """One stimulus per character of ``chars`` (default: all ASCII letters and digits), in that order.

    Every character must be a distinct ASCII character, so that each encodes to one ``XX==`` block.
    """
    bad = [c for c in chars if not c.isascii()]
    if bad:
        raise ConfigError(
            f"characters {bad[:5]} are not ASCII: they encode to more than one byte, not one 'XX==' block. "
            "Use word_stimuli/make_stimulus for multi-byte text."
        )
    if len(set(chars)) != len(chars):
        raise ConfigError(f"{chars!r} repeats characters; pass each character once.")
    hooks = frozenset(hooks)
    return tuple(make_stimulus(c, StimulusKind.CHAR, hooks=hooks) for c in chars)


def word_stimuli(
    n: int | None = None, *, seed: int, words: Sequence[str] = WORDS, hooks: Iterable[str] = MNEMONIC_HOOKS
) -> tuple[Base64Stimulus, ...]:
    """``n`` distinct words drawn from ``words`` with ``random.Random(seed)`` (all, shuffled, if None)."""
    pool = list(dict.fromkeys(words))
    picked = random.Random(seed).sample(pool, _count(n, len(pool), "words"))
    return tuple(make_stimulus(w, StimulusKind.WORD, hooks=hooks) for w in picked)


def sentence_stimuli(
    n: int | None = None, *, seed: int, hooks: Iterable[str] = MNEMONIC_HOOKS
) -> tuple[Base64Stimulus, ...]:
    """``n`` distinct short sentences ("The cat sees the ball.") drawn with ``random.Random(seed)``."""
    shape = (len(_SUBJECTS), len(_VERBS), len(_OBJECTS))
    total = shape[0] * shape[1] * shape[2]
    picked = random.Random(seed).sample(range(total), _count(n, total, "sentences"))
    out = []
    for k in picked:
        rest, o = divmod(k, shape[2])
        s, v = divmod(rest, shape[1])
        text = f"{_SUBJECTS[s]} {_VERBS[v]} {_OBJECTS[o]}."
        out.append(make_stimulus(text, StimulusKind.SENTENCE, hooks=hooks))
    return tuple(out)


def _count(n: int | None, available: int, what: str) -> int:
    if n is None:
        return available
    if not 0 < n <= available:
        raise ConfigError(
            f"asked for {n} {what}, but between 1 and {available} are available. Pass n in that range."
        )
    return n
