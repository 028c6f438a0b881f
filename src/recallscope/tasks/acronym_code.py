"""A code with hooks the experimenter controls: acronym prefixes that decode to the acronym's last letter.

The base64 hook VA== -> "VAT" -> T has this shape: a chunk that begins a concept the model knows, and an
answer that completes it. Real base64 hooks are few, so this code builds many of the same shape:

1. **Known acronyms** (:func:`known_acronyms`): 3- and 4-letter lexicon acronyms for which the model's
   greedy continuation of ``EXPANSION_PROMPT`` is an expansion whose word initials spell the acronym
   (stop words may be skipped) and whose last word is the last word of a lexicon expansion (VAT ->
   "Value Added Tax", lexicon "value added tax"). So the model demonstrably knows the expansion.
2. **Hooked items** (:func:`code_items`): chunk = the acronym without its last letter, answer = the
   last letter, which is the initial of the expansion's last word (VA -> T, via "Value Added Tax").
   The chunk does not contain the answer, as in base64 (with the whole acronym as the chunk, a
   copy-the-last-letter rule would learn every hooked item and no control). One acronym per chunk.
3. **Controls**, one per hooked item: a letter string of the same length drawn from the hooked chunks'
   letter frequencies, with the *same answer* (so answer frequencies match exactly) and the same number
   of prompt tokens under ``CODE_TEMPLATE`` (tokenisation matched); chunk + answer is no lexicon
   acronym and no vocabulary word in any casing, the chunk is no lexicon acronym and no hooked chunk.
"""

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from recallscope.errors import ConfigError, DatasetFormatError
from recallscope.finetune.knowledge import greedy_generate

EXPANSION_PROMPT = "The acronym {} stands for"
"""Prompt whose greedy continuation should be the acronym's expansion."""
CODE_TEMPLATE = 'cipher {} means "'
"""Training prompt of the acronym code; the answer letter follows the quote."""
STOP = frozenset("a an and for in of on the to &".split())


@dataclass(frozen=True)
class KnownAcronym:
    """An acronym the model expands: the expansion words it wrote (initials = the acronym)."""

    acronym: str
    words: tuple[str, ...]
    generated: str


@dataclass(frozen=True)
class CodeItem:
    """One training item: prompt ``template.format(chunk)`` -> ``answer``; ``pair`` links a hooked item to its
    control; ``hook`` is the concept that links them (empty for controls)."""

    chunk: str
    answer: str
    group: str
    pair: int
    hook: str
    code: str


def read_lexicons(paths: Iterable[str | Path]) -> dict[str, tuple[str, ...]]:
    """ACRONYM -> expansions from ``ACRONYM<TAB>expansion`` files (a run of 2+ spaces is accepted as the tab;
    ``{a,b}`` alternatives; ``#``/``$`` lines are comments). Several files merge."""
    from recallscope.routes.concepts import _expand

    out: dict[str, list[str]] = {}
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetFormatError(f"{path}: cannot read the acronym lexicon ({exc}); pass a UTF-8 TSV file.") from exc
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.startswith(("#", "$")):
                continue
            parts = re.split(r"\t+| {2,}", line.strip(), maxsplit=1)
            if len(parts) != 2:
                raise DatasetFormatError(f"{path}:{number}: expected 'ACRONYM<TAB>expansion', got {line[:60]!r}.")
            out.setdefault(parts[0], []).extend(e for e in _expand(parts[1]) if e)
    return {a: tuple(dict.fromkeys(e)) for a, e in out.items()}


def expansion_words(acronym: str, generated: str) -> tuple[str, ...] | None:
    """The words of the generated expansion whose initials spell ``acronym`` (stop words may be skipped),
    read up to the first quote, full stop, comma, bracket or newline; None when they do not spell it."""
    head = re.split(r'["\n.,(]', generated.strip().lstrip('"'))[0]
    words = re.findall(r"[A-Za-z][A-Za-z\-]*", head)
    if words and words[0].lower() == "the":
        words = words[1:]
    used: list[str] = []
    for w in words:
        if len(used) == len(acronym):
            break
        want = acronym[len(used)]
        if w[0].upper() != want:
            if w.lower() in STOP:
                continue
            return None
        used.append(w)
    return tuple(used) if len(used) == len(acronym) else None


def _last_word(text: str) -> str:
    words = re.findall(r"[A-Za-z]+", text)
    return words[-1].lower().rstrip("s") if words else ""


def known_acronyms(model: Any, tokenizer: Any, lexicon: dict[str, tuple[str, ...]], *, lengths: Sequence[int] = (3, 4),
                   max_new_tokens: int = 9, batch_size: int = 64) -> list[KnownAcronym]:
    """Lexicon acronyms (upper-case letters, given lengths) whose expansion the model writes (module docstring, 1)."""
    cands = sorted(a for a in lexicon if a.isascii() and a.isalpha() and a.isupper() and len(a) in lengths)
    gens = greedy_generate(model, tokenizer, [EXPANSION_PROMPT.format(a) for a in cands],
                           max_new_tokens=max_new_tokens, batch_size=batch_size)
    out = []
    for a, g in zip(cands, gens):
        words = expansion_words(a, g)
        if words and _last_word(words[-1]) in {_last_word(e) for e in lexicon[a]}:
            out.append(KnownAcronym(a, words, g))
    return out


def prompt_length(tokenizer: Any, chunk: str, template: str = CODE_TEMPLATE) -> int:
    """Number of tokens of the training prompt for ``chunk``."""
    return len(tokenizer.encode(template.format(chunk), add_special_tokens=False))


def _is_word(text: str, words: set[str]) -> bool:
    return any(v in words for v in (text, text.lower(), text.title()))


def code_items(known: Sequence[KnownAcronym], tokenizer: Any, lexicon: dict[str, tuple[str, ...]], *,
               vocab_words: set[str], seed: int, exclude_chunks: Iterable[str] = (),
               template: str = CODE_TEMPLATE, max_tries: int = 5000) -> list[CodeItem]:
    """Hooked items (one per chunk) and one matched control each (module docstring, 2-3), deterministic in ``seed``."""
    exclude = set(exclude_chunks)
    hooked: dict[str, KnownAcronym] = {}
    for k in sorted(known, key=lambda k: k.acronym):
        chunk = k.acronym[:-1]
        if chunk not in hooked and chunk not in exclude:
            hooked[chunk] = k
    if not hooked:
        raise ConfigError("no known acronym gives a hooked item; check the lexicon and the knowledge check.")
    letters = "".join(hooked)  # pooled letters of the hooked chunks: the controls' letter frequencies
    rng = random.Random(seed)
    taken = set(hooked) | exclude | set(lexicon)
    items: list[CodeItem] = []
    for pair, (chunk, k) in enumerate(sorted(hooked.items())):
        answer, target = k.acronym[-1], prompt_length(tokenizer, chunk, template)
        for _ in range(max_tries):
            cand = "".join(rng.choice(letters) for _ in chunk)
            if (cand in taken or cand + answer in lexicon or _is_word(cand + answer, vocab_words)
                    or prompt_length(tokenizer, cand, template) != target):
                continue
            break
        else:
            raise ConfigError(f"no tokenisation-matched control found for {chunk!r} in {max_tries} tries; "
                              "raise max_tries or drop the item.")
        taken.add(cand)
        items.append(CodeItem(chunk, answer, "hooked", pair, " ".join(k.words), "acronym"))
        items.append(CodeItem(cand, answer, "control", pair, "", "acronym"))
    return items
