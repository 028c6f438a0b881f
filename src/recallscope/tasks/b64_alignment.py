"""Align a tokenizer's tokens to a base64 string: which blocks and decoded bytes each token carries.

Tokenisers ignore base64's block structure (SCIENCE.md, "Base64 facts"): under GPT-2 ``VA==`` is
``[VA, ==]`` and ``Qg==`` is ``[Q, g, ==]``, so a token rarely lines up with a 4-character block or with
the two characters that determine a decoded byte. The algorithm:

1. Tokenise the prompt that holds the base64 string and find each token's character span in it: the
   tokenizer's offset mapping (``return_offsets_mapping=True``) for fast tokenizers; otherwise decode the
   tokens one at a time and match their text left to right, grouping tokens that are only part of a UTF-8
   character until the group decodes to prompt text.
2. Keep the tokens that overlap the base64 string and clip their spans to it (base64 coordinates).
3. A token touches blocks ``start // 4 .. (stop - 1) // 4``; through the dependency map of
   :mod:`recallscope.tasks.b64_codec` (byte ``j`` of a block depends on its characters ``floor(4j/3)``
   and ``floor(4j/3) + 1``) it helps determine the union of its characters' bytes, and fully determines
   the bytes whose two characters it holds.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from recallscope.errors import ConfigError
from recallscope.tasks.b64_codec import bytes_for_char, chars_for_byte, decoded_length

AlignMethod = Literal["auto", "offsets", "decode"]


@dataclass(frozen=True)
class TokenOffsets:
    """A prompt's token ids and each token's ``(start, stop)`` character span in the prompt.

    ``method`` says how the spans were found: ``"offsets"`` (the tokenizer's offset mapping) or
    ``"decode"`` (decoding tokens one at a time and matching their text). Special tokens have empty spans.
    """

    ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    method: Literal["offsets", "decode"]

    def __post_init__(self) -> None:
        assert len(self.ids) == len(self.spans), "one span per token"


def token_offsets(
    tokenizer: Any, prompt: str, *, add_special_tokens: bool = False, method: AlignMethod = "auto"
) -> TokenOffsets:
    """Tokenise ``prompt`` and find each token's character span.

    ``method="auto"`` uses the offset mapping of fast (Rust-backed) tokenizers and falls back to
    decoding token by token otherwise; ``"offsets"`` or ``"decode"`` force one.
    """
    if method == "auto":
        method = "offsets" if getattr(tokenizer, "is_fast", False) else "decode"
    if method == "offsets":
        enc = tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        spans = tuple((int(a), int(b)) for a, b in enc["offset_mapping"])
        return TokenOffsets(tuple(int(i) for i in enc["input_ids"]), spans, "offsets")
    if method == "decode":
        ids = [int(i) for i in tokenizer.encode(prompt, add_special_tokens=add_special_tokens)]
        return TokenOffsets(tuple(ids), _spans_by_decoding(tokenizer, prompt, ids), "decode")
    raise ConfigError(f"unknown alignment method {method!r}; use 'auto', 'offsets' or 'decode'.")


def _spans_by_decoding(tokenizer: Any, prompt: str, ids: list[int]) -> tuple[tuple[int, int], ...]:
    """Spans by decoding token by token, left to right. Tokens that are only part of a UTF-8 character
    (they decode to U+FFFD) are grouped with their successors until the group decodes to prompt text;
    every token of a group gets the group's span (as fast tokenizers' offset mappings do)."""
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    spans: list[tuple[int, int]] = []
    cursor, pending = 0, list[int]()
    for pos, tid in enumerate(ids):
        if tid in special and not pending:
            spans.append((cursor, cursor))
            continue
        pending.append(pos)
        piece = tokenizer.decode([ids[p] for p in pending])
        found = _match_piece(prompt, piece, cursor)
        if found is None and len(pending) < 4:
            continue
        if found is None:
            raise ConfigError(
                f"cannot align tokens {pending} (decoded {piece!r}) to the prompt at character {cursor} "
                f"({prompt[cursor:cursor + 20]!r}): the tokenizer's decode does not reproduce the prompt. "
                "Use a fast tokenizer (method='offsets'), or a prompt the tokenizer round-trips."
            )
        spans.extend([found] * len(pending))
        cursor, pending = found[1], []
    if pending:
        raise ConfigError(f"the last tokens {pending} of the prompt could not be matched to its text.")
    return tuple(spans)


def _match_piece(prompt: str, piece: str, cursor: int) -> tuple[int, int] | None:
    """Where the decoded ``piece`` sits in ``prompt`` at ``cursor``, tolerating decoders that drop or
    normalise the whitespace around a token (SentencePiece's leading space, clean-up of " .")."""
    if piece and prompt.startswith(piece, cursor):
        return cursor, cursor + len(piece)
    core = piece.strip()
    start = cursor
    while start < len(prompt) and prompt[start].isspace() and (core or start - cursor < len(piece)):
        start += 1
    if not core:
        return cursor, start
    if prompt.startswith(core, start):
        return cursor, start + len(core)
    return None


@dataclass(frozen=True)
class AlignedToken:
    """One token overlapping the base64 string, described in base64 coordinates.

    Attributes:
        index: the token's position in the tokenised prompt (special tokens counted iff the alignment
            was made with ``add_special_tokens=True``).
        token_id: vocabulary id.
        text: the prompt text the token covers (may reach past the base64, e.g. a leading space).
        prompt_span: ``(start, stop)`` character span in the prompt.
        char_span: ``(start, stop)`` character span within the base64 string, clipped to it.
        blocks: indices of the 4-character blocks the token touches.
        byte_indices: decoded bytes at least one of its characters helps determine.
        complete_bytes: decoded bytes whose two determining characters both lie inside the token.
    """

    index: int
    token_id: int
    text: str
    prompt_span: tuple[int, int]
    char_span: tuple[int, int]
    blocks: tuple[int, ...]
    byte_indices: tuple[int, ...]
    complete_bytes: tuple[int, ...]

    def __post_init__(self) -> None:
        assert 0 <= self.char_span[0] < self.char_span[1], f"empty or negative span {self.char_span}"

    @property
    def n_chars(self) -> int:
        """Number of base64 characters in the token."""
        return self.char_span[1] - self.char_span[0]

    @property
    def covers_one_block(self) -> bool:
        """True when the token's base64 characters are exactly one 4-character block."""
        return self.char_span[0] % 4 == 0 and self.n_chars == 4


@dataclass(frozen=True)
class Base64Alignment:
    """How a tokenizer's tokens sit on a base64 string inside a prompt.

    Attributes:
        b64: the base64 string.
        prompt: the prompt holding it (``b64`` itself when aligned alone).
        offset: character index of ``b64`` in ``prompt``.
        n_bytes: decoded length of ``b64``.
        n_prompt_tokens: number of tokens in the whole prompt.
        method: how token spans were found (``"offsets"`` or ``"decode"``).
        tokens: the tokens overlapping ``b64``, in order; their character spans tile ``b64``.
    """

    b64: str
    prompt: str
    offset: int
    n_bytes: int
    n_prompt_tokens: int
    method: Literal["offsets", "decode"]
    tokens: tuple[AlignedToken, ...]

    def __post_init__(self) -> None:
        assert self.prompt[self.offset : self.offset + len(self.b64)] == self.b64, "b64 is not at offset"
        edges = [t.char_span for t in self.tokens]
        tiles = bool(edges) and edges[0][0] == 0 and edges[-1][1] == len(self.b64)
        if not (tiles and all(a[1] == b[0] for a, b in zip(edges, edges[1:]))):
            raise ConfigError(
                f"the tokenizer's token spans {edges} do not tile the base64 string {self.b64[:40]!r}: "
                "tokens overlap or leave gaps. Align the base64 string alone, or use method='decode'."
            )

    @property
    def token_range(self) -> tuple[int, int]:
        """``(first, stop)`` token positions of the base64 string in the tokenised prompt."""
        return self.tokens[0].index, self.tokens[-1].index + 1

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Interior token boundaries, as character indices into ``b64`` (each in ``1..len(b64)-1``)."""
        return tuple(t.char_span[0] for t in self.tokens[1:])

    @property
    def chars_per_token(self) -> float:
        """Base64 characters per token."""
        return len(self.b64) / len(self.tokens)

    def tokens_for_chars(self, chars: Iterable[int]) -> tuple[int, ...]:
        """Positions (``AlignedToken.index``) of the tokens holding any of the base64 characters ``chars``."""
        wanted = set(chars)
        return tuple(
            t.index for t in self.tokens if any(t.char_span[0] <= c < t.char_span[1] for c in wanted)
        )

    def tokens_for_byte(self, byte_index: int) -> tuple[int, ...]:
        """Positions of the tokens holding the characters that determine decoded byte ``byte_index``."""
        return self.tokens_for_chars(chars_for_byte(byte_index))


def align_tokens(
    tokenizer: Any,
    b64: str,
    *,
    prompt: str | None = None,
    offset: int | None = None,
    add_special_tokens: bool = False,
    method: AlignMethod = "auto",
) -> Base64Alignment:
    """Align ``tokenizer``'s tokens to the base64 string ``b64``, alone or inside ``prompt``.

    Args:
        tokenizer: any Hugging Face tokenizer (fast ones give exact offsets; others are decoded).
        b64: a valid base64 string (non-canonical trailing bits are tolerated).
        prompt: text containing ``b64``; None aligns ``b64`` tokenised on its own.
        offset: index of ``b64`` in ``prompt``; found by search when None (it must then occur once).
        add_special_tokens: tokenise with special tokens (e.g. BOS), shifting ``AlignedToken.index``.
        method: ``"auto"``, ``"offsets"`` or ``"decode"`` (see :func:`token_offsets`).
    """
    if not b64:
        raise ConfigError("the base64 string is empty: there is nothing to align. Pass a non-empty string.")
    n_bytes = decoded_length(b64)
    prompt, offset = _locate(b64, prompt, offset)
    offs = token_offsets(tokenizer, prompt, add_special_tokens=add_special_tokens, method=method)
    tokens = tuple(
        _aligned_token(i, tid, span, prompt, offset, b64, n_bytes)
        for i, (tid, span) in enumerate(zip(offs.ids, offs.spans))
        if span[0] < offset + len(b64) and span[1] > offset
    )
    return Base64Alignment(b64, prompt, offset, n_bytes, len(offs.ids), offs.method, tokens)


def _aligned_token(
    index: int, token_id: int, span: tuple[int, int], prompt: str, offset: int, b64: str, n_bytes: int
) -> AlignedToken:
    start, stop = max(span[0] - offset, 0), min(span[1] - offset, len(b64))
    chars = range(start, stop)
    touched = sorted(set().union(*(bytes_for_char(c, n_bytes=n_bytes) for c in chars)))
    return AlignedToken(
        index=index,
        token_id=token_id,
        text=prompt[span[0] : span[1]],
        prompt_span=span,
        char_span=(start, stop),
        blocks=tuple(range(start // 4, (stop - 1) // 4 + 1)),
        byte_indices=tuple(touched),
        complete_bytes=tuple(j for j in touched if chars_for_byte(j) <= set(chars)),
    )


def _locate(b64: str, prompt: str | None, offset: int | None) -> tuple[str, int]:
    if prompt is None:
        if offset not in (None, 0):
            raise ConfigError(
                f"offset={offset} was given without a prompt; pass the prompt that holds the base64."
            )
        return b64, 0
    hits = [i for i in range(len(prompt) - len(b64) + 1) if prompt.startswith(b64, i)]
    if offset is None:
        if len(hits) != 1:
            where = "does not occur" if not hits else f"occurs {len(hits)} times (at {hits[:10]})"
            raise ConfigError(
                f"the base64 string {b64[:40]!r} {where} in the prompt. Pass offset= (its character index "
                "in the prompt) to say which occurrence to align."
            )
        return prompt, hits[0]
    if offset not in hits:
        raise ConfigError(
            f"prompt[{offset}:{offset + len(b64)}] is {prompt[offset:offset + len(b64)]!r}, not the base64 "
            f"string {b64[:40]!r} (which occurs at {hits[:10]}). Fix offset."
        )
    return prompt, offset
