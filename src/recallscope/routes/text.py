"""String similarity for mnemonic keywords and vocabulary candidates: letters and (rough) sound.

- :func:`letters` keeps lowercase ASCII letters (``"Car prices!"`` -> ``"carprices"``).
- :func:`phonetic_key` is a small English sound key in the spirit of Metaphone: it folds spellings
  that sound alike (``ph``->``f``, ``c``/``q``/``ck``->``k`` before back vowels, ``ch``/``sh``/``ti``->``X``,
  ``z``->``s``, doubled letters collapse) and keeps only the first vowel's place (``V``).
- :func:`bigram_dice` is the Dice coefficient of letter bigrams (orthographic overlap).
- :func:`common_run` is the length of the longest run of letters two texts share ("impenetrable" and
  "penetrate": 7), the overlap that lets a keyword's representation carry the term's own sub-word tokens.
- :func:`similarity` is the mean of the letter-bigram Dice and the ratio of the sound keys (difflib's
  matching-block ratio), in ``[0, 1]``. Either alone misleads: sound keys of unrelated words of the same
  shape match well ("austere"/"luxury": 0.77) and spelling misses true sound-alikes ("bucolic"/"blue
  collar": 0.27); the mean separates the mnemonic keywords of ``cards.tsv`` from other words of their
  stories at about 0.5.
"""

import re
from difflib import SequenceMatcher

_RULES: tuple[tuple[str, str], ...] = (
    ("ph", "f"), ("gh", "g"), ("ck", "k"), ("sch", "sk"), ("x", "ks"), ("tch", "X"), ("ch", "X"), ("sh", "X"),
    ("tio", "Xo"), ("tia", "Xa"), ("cia", "Xa"), ("cio", "Xo"), ("ce", "se"), ("ci", "si"), ("cy", "sy"),
    ("c", "k"), ("q", "k"), ("z", "s"), ("wh", "w"), ("dg", "j"), ("ge", "je"), ("gi", "ji"),
    ("kn", "n"), ("wr", "r"), ("mb", "m"),
)


def letters(text: str) -> str:
    """Lowercase ASCII letters of ``text`` only."""
    return re.sub(r"[^a-z]", "", text.lower())


def phonetic_key(text: str) -> str:
    """A rough sound key: consonant skeleton with vowel groups folded to ``V`` (see the module doc)."""
    s = letters(text)
    for a, b in _RULES:
        s = s.replace(a, b)
    s = re.sub(r"(.)\1+", r"\1", s)  # doubled letters sound single
    s = re.sub(r"[aeiouy]+", "V", s)
    s = re.sub(r"(?<=.)h", "", s)  # a silent h after anything
    return s


def bigram_dice(a: str, b: str) -> float:
    """Dice coefficient of the letter bigrams of ``a`` and ``b`` (multiset), 0 when either is too short."""
    x, y = letters(a), letters(b)
    ba = [x[i:i + 2] for i in range(len(x) - 1)]
    bb = [y[i:i + 2] for i in range(len(y) - 1)]
    if not ba or not bb:
        return 0.0
    pool = list(bb)
    shared = 0
    for g in ba:
        if g in pool:
            pool.remove(g)
            shared += 1
    return 2.0 * shared / (len(ba) + len(bb))


def sound_ratio(a: str, b: str) -> float:
    """Similarity of the sound keys of ``a`` and ``b`` (difflib ratio, 0..1)."""
    ka, kb = phonetic_key(a), phonetic_key(b)
    if not ka or not kb:
        return 0.0
    return SequenceMatcher(None, ka, kb, autojunk=False).ratio()


def similarity(a: str, b: str) -> float:
    """Orthographic-and-sound similarity: the mean of :func:`bigram_dice` and :func:`sound_ratio`."""
    return 0.5 * (bigram_dice(a, b) + sound_ratio(a, b))


def common_run(a: str, b: str) -> int:
    """Length of the longest common substring of the letters of ``a`` and ``b``."""
    x, y = letters(a), letters(b)
    if not x or not y:
        return 0
    return SequenceMatcher(None, x, y, autojunk=False).find_longest_match(0, len(x), 0, len(y)).size
