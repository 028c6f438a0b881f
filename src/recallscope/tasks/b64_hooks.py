"""Real base64 mnemonic hooks: words that start with a chunk, contain its decoded text, and that the model knows.

A hook links a base64 chunk to its decoded text: ``VA`` begins every group that decodes to ``T`` first, and
"VAT" is ``VA`` + ``T``. The search:

1. **Chunks.** A 2-character prefix fixes the first byte of its group (6 bits of the first character, the
   top 2 of the second: :func:`first_byte`); the 256 prefixes whose second character has a zero low nibble
   are also complete ``XY==`` encodings (``canonical_2``). A 4-character group decodes to 3 bytes.
2. **Candidates** (:func:`hook_candidates`): (chunk, word) pairs where the word starts with the chunk
   (case-sensitive) and the decoded text, all printable ASCII, occurs in the rest of the word
   (case-sensitive, so the hook carries the exact decoded character).
3. **Knowledge** (:func:`check_hooks`): the word is known when, after at least one neutral prompt ending
   in the chunk (``HOOK_TEMPLATES``), greedy decoding writes the rest of the word and then a token that
   does not continue it (not alphanumeric). The summed log-prob of the rest is kept as a graded score.
"""

import string
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from recallscope.finetune.knowledge import teacher_forced
from recallscope.tasks.b64_codec import ALPHABET, decode

HOOK_TEMPLATES: tuple[str, ...] = ("The word {}", "The abbreviation {}", "{}")
"""Prompts whose continuation should complete a known word from its first characters."""
PRINTABLE = frozenset(string.ascii_letters + string.digits + string.punctuation + " ")


@dataclass(frozen=True)
class HookCandidate:
    """A word that starts with a base64 chunk and contains the chunk's decoded text after it."""

    chunk: str
    size: int
    decoded: str
    word: str
    canonical_2: bool


def first_byte(chunk: str) -> str:
    """The byte fixed by a 2-character prefix: 6 bits of the first character, the top 2 of the second."""
    if len(chunk) != 2 or not set(chunk) <= set(ALPHABET):
        raise ValueError(f"first_byte needs two base64 alphabet characters, got {chunk!r}.")
    v1, v2 = ALPHABET.index(chunk[0]), ALPHABET.index(chunk[1])
    return chr((v1 << 2) | (v2 >> 4))


def vocabulary_words(tokenizer: Any, extra: Iterable[str] = ()) -> list[str]:
    """ASCII alphanumeric words (3+ characters, space marker dropped) from the vocabulary, plus ``extra``."""
    words = set(extra)
    for tok in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([tok]).strip()
        if len(text) >= 3 and text.isascii() and text.isalnum():
            words.add(text)
    return sorted(words)


def hook_candidates(words: Iterable[str]) -> list[HookCandidate]:
    """(chunk, word) pairs for 2- and 4-character chunks whose decoded text follows the chunk in the word."""
    out = []
    alphabet = set(ALPHABET)
    for word in words:
        for size in (2, 4):
            chunk = word[:size]
            if len(word) <= size or not set(chunk) <= alphabet:
                continue
            text = first_byte(chunk) if size == 2 else decode(chunk).decode("latin-1")
            if set(text) <= PRINTABLE and text in word[size:]:
                out.append(HookCandidate(chunk, size, text, word, size == 2 and ALPHABET.index(chunk[1]) % 16 == 0))
    return out


def check_hooks(model: Any, tokenizer: Any, cands: list[HookCandidate], *,
                templates: tuple[str, ...] = HOOK_TEMPLATES, batch_size: int = 64) -> list[dict]:
    """Per candidate: known (greedy writes the rest of the word, then stops, after some template) and per-template
    log-probs. Returns one JSON-ready dict per candidate, in order."""
    prompts = [t.format(c.chunk) for c in cands for t in templates]
    rests = [c.word[len(c.chunk):] for c in cands for _ in templates]
    forced = teacher_forced(model, tokenizer, prompts, rests, batch_size=batch_size)
    out = []
    for i, c in enumerate(cands):
        per = {}
        for j, t in enumerate(templates):
            f = forced[i * len(templates) + j]
            per[t] = {"completes": f.greedy and not f.next_text[:1].isalnum(), "logp_rest": f.logp, "next": f.next_text}
        out.append({**asdict(c), "known": any(v["completes"] for v in per.values()),
                    "best_logp_rest": max(v["logp_rest"] for v in per.values()), "templates": per})
    return out
