"""How tokenizers cut base64: characters per token, block-edge boundaries, single-block tokens.

For each tokenizer and each text:

1. Encode the text to base64 and tokenise it (after an optional ``prefix``, e.g. ``" "``), aligning the
   tokens to the base64 characters (:func:`recallscope.tasks.b64_alignment.align_tokens`).
2. Count characters and tokens; characters per token is their ratio over all texts.
3. Interior token boundaries are the character indices ``1..L-1`` at which a new token starts. One falls
   on a block edge when its index is a multiple of 4. Pooled over texts, that count over all boundaries
   is the block-edge fraction.
4. Chance rate: the fraction a boundary placed uniformly at random among a text's interior positions
   would hit, ``(L/4 - 1) / (L - 1)`` for a text of ``L`` characters, averaged over texts weighted by their
   boundary counts. It approaches 1/4 for long strings.
5. Single-block tokens: tokens whose base64 characters are exactly one 4-character block.

SCIENCE.md ("Base64 facts") reports, on English text: GPT-2 1.37 characters per token and 23% of
boundaries on block edges (chance 25%), and no token covering exactly one block.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from recallscope.errors import ConfigError, EmptyDatasetError
from recallscope.tasks.b64_alignment import Base64Alignment, align_tokens
from recallscope.tasks.b64_codec import encode


@dataclass(frozen=True)
class TokenizerB64Stats:
    """Pooled tokenisation statistics of base64 strings under one tokenizer.

    Attributes:
        name: the tokenizer's name in the report.
        n_texts: number of base64 strings.
        n_chars: base64 characters in total.
        n_tokens: tokens overlapping the base64 strings, in total.
        n_boundaries: interior token boundaries in total.
        n_block_edge_boundaries: those falling on a 4-character block edge.
        chance_block_edge: the block-edge fraction expected if boundaries fell at random (NaN if none).
        n_single_block_tokens: tokens covering exactly one block.
    """

    name: str
    n_texts: int
    n_chars: int
    n_tokens: int
    n_boundaries: int
    n_block_edge_boundaries: int
    chance_block_edge: float
    n_single_block_tokens: int

    def __post_init__(self) -> None:
        assert 0 <= self.n_block_edge_boundaries <= self.n_boundaries < max(self.n_chars, 1)
        assert self.n_single_block_tokens <= self.n_tokens <= self.n_chars

    @property
    def chars_per_token(self) -> float:
        """Base64 characters per token."""
        return self.n_chars / self.n_tokens

    @property
    def block_edge_fraction(self) -> float:
        """Share of interior token boundaries that fall on block edges (NaN if there are none)."""
        return self.n_block_edge_boundaries / self.n_boundaries if self.n_boundaries else math.nan


@dataclass(frozen=True)
class TokenizationReport:
    """Tokenisation statistics of the same base64 strings under several tokenizers.

    Attributes:
        texts: the plain texts.
        b64: their encodings.
        prefix: text placed before each base64 string when tokenising ("" for none).
        stats: one entry per tokenizer, in the order given.
    """

    texts: tuple[str, ...]
    b64: tuple[str, ...]
    prefix: str
    stats: tuple[TokenizerB64Stats, ...]

    def __post_init__(self) -> None:
        assert len(self.texts) == len(self.b64)
        assert len({s.name for s in self.stats}) == len(self.stats), "tokenizer names must be unique"

    def __getitem__(self, name: str) -> TokenizerB64Stats:
        for s in self.stats:
            if s.name == name:
                return s
        raise KeyError(f"no tokenizer named {name!r} in this report; it has {[s.name for s in self.stats]}.")

    def to_rows(self) -> list[dict[str, str | int | float]]:
        """One flat dict per tokenizer, for tables and CSV."""
        return [
            {
                "tokenizer": s.name,
                "texts": s.n_texts,
                "chars": s.n_chars,
                "tokens": s.n_tokens,
                "chars_per_token": s.chars_per_token,
                "boundaries": s.n_boundaries,
                "block_edge_fraction": s.block_edge_fraction,
                "chance_block_edge": s.chance_block_edge,
                "single_block_tokens": s.n_single_block_tokens,
            }
            for s in self.stats
        ]


def tokenization_report(
    texts: Sequence[str], tokenizers: Mapping[str, Any], *, prefix: str = ""
) -> TokenizationReport:
    """Encode each text to base64 and measure how each tokenizer cuts the encodings.

    Args:
        texts: plain texts (non-empty), encoded as UTF-8 base64.
        tokenizers: name -> Hugging Face tokenizer.
        prefix: text put before each base64 string when tokenising (e.g. " " to see in-context cuts).
    """
    if not texts or not tokenizers:
        raise EmptyDatasetError(
            f"got {len(texts)} texts and {len(tokenizers)} tokenizers; pass at least one of each."
        )
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise ConfigError(f"texts {empty[:5]} are empty; their encoding has no tokens. Drop them.")
    b64 = tuple(encode(t) for t in texts)
    stats = tuple(
        _stats(name, [align_tokens(tok, s, prompt=prefix + s, offset=len(prefix)) for s in b64])
        for name, tok in tokenizers.items()
    )
    return TokenizationReport(tuple(texts), b64, prefix, stats)


def _stats(name: str, alignments: Sequence[Base64Alignment]) -> TokenizerB64Stats:
    n_bound = [len(a.boundaries) for a in alignments]
    chance = [(len(a.b64) // 4 - 1) / (len(a.b64) - 1) for a in alignments]
    weight = sum(n_bound)
    return TokenizerB64Stats(
        name=name,
        n_texts=len(alignments),
        n_chars=sum(len(a.b64) for a in alignments),
        n_tokens=sum(len(a.tokens) for a in alignments),
        n_boundaries=weight,
        n_block_edge_boundaries=sum(1 for a in alignments for b in a.boundaries if b % 4 == 0),
        chance_block_edge=sum(n * c for n, c in zip(n_bound, chance)) / weight if weight else math.nan,
        n_single_block_tokens=sum(1 for a in alignments for t in a.tokens if t.covers_one_block),
    )
