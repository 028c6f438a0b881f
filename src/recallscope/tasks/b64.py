"""The base64 task suite: few-shot decoding prompts and token-length-matched counterfactual pairs.

This module is the suite's front door. It re-exports the exact codec and dependency map
(:mod:`~recallscope.tasks.b64_codec`), token alignment (:mod:`~recallscope.tasks.b64_alignment`) and
stimuli (:mod:`~recallscope.tasks.b64_stimuli`), and adds:

1. **Few-shot prompts** (:func:`few_shot_prompt`). A :class:`FewShotTemplate` lays a prompt out as an
   instruction line, ``n_shots`` solved examples and the query::

       Decode base64.
       SGk= -> Hi
       VA== ->

   The answer is ``answer_prefix + text`` (" T"): the leading-space convention of
   :class:`~recallscope.tasks.pairs.PromptPair`. Shots are drawn from a pool with ``random.Random(seed)``
   and never include the query (nor any text passed in ``exclude``).
2. **Counterfactual pairs** (:func:`counterfactual_pairs`). For each stimulus: draw the shots once, then
   try corruptions in a seeded order (characters of the first answer token first). A corruption replaces
   one letter or digit of the text by another of the same class (upper case, lower case, digit), so
   exactly one decoded character changes; the corrupt prompt differs from the clean one only in the
   query's base64 (in the block holding the changed byte). Skip a candidate if the corrupt prompt's
   token count differs from the clean one, if its text is one of the shots, or (by default) if the first
   answer token does not change. The first survivor becomes a :class:`PromptPair` whose answer/wrong are
   the first tokens the model would produce after each prompt.
"""

import itertools
import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from recallscope.errors import ConfigError, EmptyDatasetError
from recallscope.tasks.b64_alignment import (
    AlignedToken,
    Base64Alignment,
    TokenOffsets,
    align_tokens,
    token_offsets,
)
from recallscope.tasks.b64_codec import (
    ALPHABET,
    PAD,
    DependencyMap,
    bytes_for_char,
    chars_for_byte,
    decode,
    decode_text,
    decoded_length,
    dependency_map,
    encode,
    encoded_length,
)
from recallscope.tasks.b64_stimuli import (
    CHARS,
    MNEMONIC_HOOKS,
    WORDS,
    Base64Stimulus,
    StimulusKind,
    char_stimuli,
    make_stimulus,
    sentence_stimuli,
    word_stimuli,
)
from recallscope.tasks.pairs import PromptPair


@dataclass(frozen=True)
class FewShotTemplate:
    """Layout of a few-shot decoding prompt.

    Attributes:
        instruction: first line ("" for none).
        query_format: a query line; ``{b64}`` marks where the base64 goes (exactly once).
        answer_prefix: text between a query line and its answer in shots; the model's answer starts with it.
        separator: between lines.
    """

    instruction: str = "Decode base64."
    query_format: str = "{b64} ->"
    answer_prefix: str = " "
    separator: str = "\n"

    def __post_init__(self) -> None:
        if self.query_format.count("{b64}") != 1:
            raise ConfigError(
                f"query_format {self.query_format!r} must contain '{{b64}}' exactly once, marking where the "
                "base64 string goes, e.g. '{b64} ->'."
            )

    def render(self, shots: Sequence[Base64Stimulus], b64: str) -> tuple[str, int]:
        """The prompt for query ``b64`` after ``shots``, and the character offset of ``b64`` in it."""
        lines = [self.instruction] if self.instruction else []
        lines += [self.query_format.replace("{b64}", s.b64) + self.answer_prefix + s.text for s in shots]
        head = self.separator.join(lines) + (self.separator if lines else "")
        offset = len(head) + self.query_format.index("{b64}")
        return head + self.query_format.replace("{b64}", b64), offset


DEFAULT_TEMPLATE = FewShotTemplate()
"""``Decode base64.`` / ``SGk= -> Hi`` / ... / ``VA== ->``, answers with a leading space."""


@dataclass(frozen=True)
class FewShotPrompt:
    """A rendered few-shot prompt.

    Attributes:
        text: the prompt.
        query: the stimulus being decoded.
        shots: the solved examples, in prompt order.
        query_offset: character index of ``query.b64`` in ``text``.
        answer_text: the full expected continuation (``answer_prefix + query.text``).
    """

    text: str
    query: Base64Stimulus
    shots: tuple[Base64Stimulus, ...]
    query_offset: int
    answer_text: str

    def __post_init__(self) -> None:
        b64 = self.query.b64
        assert self.text[self.query_offset : self.query_offset + len(b64)] == b64, "query not at offset"
        assert all(s.text != self.query.text for s in self.shots), "a shot repeats the query"


def few_shot_prompt(
    query: Base64Stimulus,
    pool: Sequence[Base64Stimulus],
    *,
    n_shots: int = 3,
    seed: int,
    template: FewShotTemplate = DEFAULT_TEMPLATE,
    exclude: Sequence[str] = (),
) -> FewShotPrompt:
    """A few-shot prompt decoding ``query``, with ``n_shots`` examples drawn from ``pool``.

    Shots are sampled with ``random.Random(seed)`` from the distinct texts of ``pool`` other than the
    query's and those in ``exclude``. The same seed and pool give the same shots for any query they allow.
    """
    banned = {query.text, *exclude}
    candidates = list({s.text: s for s in pool if s.text not in banned}.values())
    if not 0 <= n_shots <= len(candidates):
        raise ConfigError(
            f"n_shots={n_shots}, but the pool holds {len(candidates)} usable examples once the query "
            f"{query.text!r} (and excluded texts) are left out. Use fewer shots or a larger pool."
        )
    shots = tuple(random.Random(seed).sample(candidates, n_shots))
    text, offset = template.render(shots, query.b64)
    return FewShotPrompt(text, query, shots, offset, template.answer_prefix + query.text)


def few_shot_prompts(
    queries: Sequence[Base64Stimulus],
    pool: Sequence[Base64Stimulus] | None = None,
    *,
    n_shots: int = 3,
    seed: int,
    template: FewShotTemplate = DEFAULT_TEMPLATE,
) -> tuple[FewShotPrompt, ...]:
    """One prompt per query; shots come from ``pool`` (default: the queries), seeds from ``seed``."""
    rng = random.Random(seed)
    pool = queries if pool is None else pool
    return tuple(
        few_shot_prompt(q, pool, n_shots=n_shots, seed=rng.randrange(2**32), template=template)
        for q in queries
    )


def continuation_token(tokenizer: Any, prompt: str, continuation: str) -> str:
    """The first token the model would produce if it continued ``prompt`` with ``continuation``.

    Tokenises ``prompt + continuation`` and takes the first token after the prompt's own tokens; if the
    two merge across the boundary, falls back to the first token of ``continuation`` tokenised alone.
    """
    if not continuation:
        raise ConfigError("the continuation is empty, so it has no first token. Pass a non-empty answer.")
    head = tokenizer.encode(prompt, add_special_tokens=False)
    full = tokenizer.encode(prompt + continuation, add_special_tokens=False)
    if len(full) > len(head) and full[: len(head)] == head:
        return tokenizer.decode(full[len(head) : len(head) + 1])
    return tokenizer.decode(tokenizer.encode(continuation, add_special_tokens=False)[:1])


def _same_class_replacements(c: str) -> str:
    for group in (string.ascii_uppercase, string.ascii_lowercase, string.digits):
        if c in group:
            return group.replace(c, "")
    return ""  # spaces and punctuation are kept


def _corruptions(text: str, rng: random.Random, *, first: int = 0) -> Iterator[tuple[int, str]]:
    """Every (index, replacement) single-character change to ``text``, in an order fixed by ``rng``;
    positions below ``first`` (the characters of the first answer token) are tried before the rest."""
    positions = [i for i, c in enumerate(text) if _same_class_replacements(c)]
    head, tail = [i for i in positions if i < first], [i for i in positions if i >= first]
    rng.shuffle(head)
    rng.shuffle(tail)
    for i in head + tail:
        options = list(_same_class_replacements(text[i]))
        rng.shuffle(options)
        for c in options:
            yield i, c


def counterfactual_pairs(
    stimuli: Sequence[Base64Stimulus],
    tokenizer: Any,
    *,
    seed: int,
    n_shots: int = 3,
    pool: Sequence[Base64Stimulus] | None = None,
    template: FewShotTemplate = DEFAULT_TEMPLATE,
    prepend_bos: bool = False,
    require_different_answer: bool = True,
    max_candidates: int = 500,
) -> list[PromptPair]:
    """Clean/corrupt few-shot prompts that differ in one decoded character and have equal token counts.

    Args:
        stimuli: the clean queries.
        tokenizer: the model's tokenizer; token counts and answers are measured with it.
        seed: fixes shots and the order in which corruptions are tried.
        n_shots: solved examples per prompt (the same shots in clean and corrupt).
        pool: where shots come from (default: ``stimuli``); neither query is ever a shot.
        template: prompt layout.
        prepend_bos: shift ``PromptPair.spans`` by one for models that prepend a BOS token.
        require_different_answer: skip corruptions that leave the first answer token unchanged.
        max_candidates: corruptions tried per stimulus before it is skipped.

    Returns:
        One pair per stimulus for which a corruption passed (others are skipped; see ``meta``).
        ``spans``: ``"b64"`` (the query's tokens), ``"changed"`` (tokens holding changed base64
        characters, clean prompt), ``"final"`` (the last token).
    """
    if not stimuli:
        raise EmptyDatasetError("no stimuli were given; pass at least one Base64Stimulus.")
    rng = random.Random(seed)
    pool = stimuli if pool is None else pool
    pairs = []
    for stim in stimuli:
        pair = _pair_for(
            stim,
            tokenizer,
            pool,
            seed=rng.randrange(2**32),
            n_shots=n_shots,
            template=template,
            prepend_bos=prepend_bos,
            require_different_answer=require_different_answer,
            max_candidates=max_candidates,
        )
        if pair is not None:
            pairs.append(pair)
    if not pairs:
        raise EmptyDatasetError(
            f"none of the {len(stimuli)} stimuli has a corruption with an equal token count (tried up to "
            f"{max_candidates} each). Use longer stimuli, raise max_candidates, or set "
            "require_different_answer=False."
        )
    return pairs


def _pair_for(
    stim: Base64Stimulus, tokenizer: Any, pool: Sequence[Base64Stimulus], *, seed: int, n_shots: int,
    template: FewShotTemplate, prepend_bos: bool, require_different_answer: bool, max_candidates: int,
) -> PromptPair | None:
    rng = random.Random(seed)
    clean = few_shot_prompt(stim, pool, n_shots=n_shots, seed=rng.randrange(2**32), template=template)
    n_tokens = len(tokenizer.encode(clean.text, add_special_tokens=False))
    answer = continuation_token(tokenizer, clean.text, clean.answer_text)
    shot_texts = {s.text for s in clean.shots}
    first = len(answer) - len(template.answer_prefix)  # text characters inside the first answer token
    for index, char in itertools.islice(_corruptions(stim.text, rng, first=first), max_candidates):
        text = stim.text[:index] + char + stim.text[index + 1 :]
        if text in shot_texts:
            continue
        corrupt = make_stimulus(text, stim.kind)
        corrupt_text, _ = template.render(clean.shots, corrupt.b64)
        wrong = continuation_token(tokenizer, corrupt_text, template.answer_prefix + text)
        if require_different_answer and wrong == answer:
            continue
        if len(tokenizer.encode(corrupt_text, add_special_tokens=False)) != n_tokens:
            continue
        bos = int(prepend_bos)
        return _make_pair(tokenizer, clean, corrupt, corrupt_text, answer, wrong, seed=seed, bos=bos)
    return None


def _make_pair(
    tokenizer: Any, clean: FewShotPrompt, corrupt: Base64Stimulus, corrupt_text: str, answer: str, wrong: str,
    *, seed: int, bos: int,
) -> PromptPair:
    a, b = clean.query.b64, corrupt.b64
    changed_chars = tuple(i for i in range(len(a)) if a[i] != b[i])
    clean_bytes, corrupt_bytes = decode(a), decode(b)
    alignment = align_tokens(tokenizer, a, prompt=clean.text, offset=clean.query_offset)
    touched = alignment.tokens_for_chars(changed_chars)
    first, stop = alignment.token_range
    spans = {
        "b64": (first + bos, stop + bos),
        "changed": (min(touched) + bos, max(touched) + 1 + bos),
        "final": (alignment.n_prompt_tokens - 1 + bos, alignment.n_prompt_tokens + bos),
    }
    meta = {
        "task": "base64",
        "kind": clean.query.kind.value,
        "clean_text": clean.query.text,
        "corrupt_text": corrupt.text,
        "clean_b64": a,
        "corrupt_b64": b,
        "changed_b64_chars": changed_chars,
        "changed_bytes": tuple(j for j in range(len(clean_bytes)) if clean_bytes[j] != corrupt_bytes[j]),
        "hook": clean.query.hook,
        "shots": tuple(s.text for s in clean.shots),
        "query_offset": clean.query_offset,
        "seed": seed,
    }
    return PromptPair(
        clean=clean.text, corrupt=corrupt_text, answer=answer, wrong=wrong, spans=spans, meta=meta
    )


__all__ = [
    "ALPHABET", "PAD", "CHARS", "MNEMONIC_HOOKS", "WORDS", "DEFAULT_TEMPLATE",
    "AlignedToken", "Base64Alignment", "Base64Stimulus", "DependencyMap", "FewShotPrompt", "FewShotTemplate",
    "StimulusKind", "TokenOffsets",
    "align_tokens", "bytes_for_char", "char_stimuli", "chars_for_byte", "continuation_token",
    "counterfactual_pairs", "decode", "decode_text", "decoded_length", "dependency_map", "encode",
    "encoded_length", "few_shot_prompt", "few_shot_prompts", "make_stimulus", "sentence_stimuli",
    "token_offsets", "word_stimuli",
]
