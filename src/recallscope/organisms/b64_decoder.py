"""The base64-decoding organism: a small transformer that decodes base64 whose tokens are 2-character chunks.

Task (everything derived from the exact codec in :mod:`recallscope.tasks.b64_codec`):

1. A plaintext is ``n`` lowercase letters, ``n`` in ``{7, 8, 9}``; its base64 is 12 characters (3
   blocks, the last padded with ``==`` or ``=`` when ``n < 9``).
2. The base64 is cut into six 2-character chunks (``"YWJj" -> "YW", "Jj"``), like BPE tokens that
   each cover part of a block; chunks are the input tokens. Decoding is therefore a lookup: output byte
   ``j`` of a block takes its bits from characters ``floor(4j/3)`` and ``floor(4j/3) + 1``, so byte 0
   reads chunk 0 of its block, byte 1 reads both chunks, byte 2 reads chunk 1.
3. Sequence: ``<s> c1 .. c6 : p1 .. pn <eos>``. The model is trained with next-token cross-entropy on
   the plaintext letters and ``<eos>``; decoding is greedy from ``<s> c1 .. c6 :``.
4. Held-out strings (a fixed set drawn from a separate generator) are never trained on; exact-match on
   them is the accuracy bar (>= 95%).

Ground truth (:meth:`B64Truth.dependency`): output byte ``j`` depends on exactly the chunk tokens that hold
characters ``floor(4j/3)`` and ``floor(4j/3) + 1`` of its block (the codec's dependency map, mapped from
characters to chunk tokens). Input chunk ``i`` sits at model position ``1 + i``.
"""

import functools
import os
import string
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.organisms.core import SPECIALS, ArchConfig, TrainConfig, build_net, deterministic, train_loop, vocabulary
from recallscope.tasks.b64_codec import ALPHABET as B64_ALPHABET
from recallscope.tasks.b64_codec import dependency_map, encode
from recallscope.tasks.pairs import PromptPair

LETTERS = string.ascii_lowercase
"""The plaintext alphabet."""
SEP = ":"
EOS = "<eos>"
N_CHUNKS = 6
"""Input chunk tokens per example (12 base64 characters)."""
CHUNK_CHARS = 2
LENGTHS = (7, 8, 9)
"""Plaintext lengths; all encode to 12 base64 characters."""
PREFIX_LEN = 1 + N_CHUNKS + 1  # <s>, chunks, ':'
SEQ_LEN = PREFIX_LEN + max(LENGTHS) + 1  # ... letters, <eos>


@dataclass(frozen=True)
class B64Config:
    """Recipe of the base64 organism."""

    arch: ArchConfig = ArchConfig(n_layers=2, d_model=64, n_heads=4, n_ctx=SEQ_LEN)
    """Transformer shape."""
    train: TrainConfig = TrainConfig(steps=800, batch_size=128, lr=3e-3, warmup=100, seed=0)
    """Optimiser settings (seed included)."""
    n_heldout: int = 2000
    """Held-out strings for the exact-match bar (never trained on)."""


@functools.lru_cache(maxsize=1)
def chunk_vocab() -> tuple[str, ...]:
    """Every 2-character chunk a lowercase plaintext can produce, sorted (padding chunks included)."""
    chunks: set[str] = set()
    for a in LETTERS:
        for b in LETTERS:
            for c in LETTERS:
                e = encode(a + b + c)
                chunks.update((e[:2], e[2:]))
            e = encode(a + b)
            chunks.add(e[2:])
        e = encode(a)
        chunks.update((e[:2], e[2:]))
    return tuple(sorted(chunks))


def vocab_words() -> list[str]:
    """The organism's vocabulary after the specials: separator, end, chunks, letters."""
    return [SEP, EOS, *chunk_vocab(), *LETTERS]


@functools.lru_cache(maxsize=1)
def _ids() -> dict[str, int]:
    return vocabulary(vocab_words())


@dataclass(frozen=True)
class B64Truth:
    """Ground truth of the base64 organism.

    Attributes:
        lengths: plaintext lengths the organism was trained on.
        n_chunks: input chunk tokens per example (chunk ``i`` at model position ``1 + i``).
        chunk_chars: base64 characters per chunk.
        first_output_pos: model position whose next-token prediction is output byte 0 (the ``:``).
    """

    lengths: tuple[int, ...] = LENGTHS
    n_chunks: int = N_CHUNKS
    chunk_chars: int = CHUNK_CHARS
    first_output_pos: int = PREFIX_LEN - 1
    kind: str = field(default="b64", init=False)

    def dependency(self, n_bytes: int) -> Bool[Tensor, "byte chunk"]:
        """``M[j, i]``: output byte ``j`` depends on input chunk ``i`` (model position ``1 + i``)."""
        if n_bytes not in self.lengths:
            raise ConfigError(f"this organism decodes plaintexts of {self.lengths} bytes, not {n_bytes}.")
        chars = dependency_map(n_bytes).matrix()  # [byte, char]
        return chars.view(n_bytes, self.n_chunks, self.chunk_chars).any(-1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "B64Truth":
        return cls(tuple(d["lengths"]), d["n_chunks"], d["chunk_chars"], d["first_output_pos"])


# ------------------------------------------------------------------------------------------ data
@functools.lru_cache(maxsize=1)
def _pair_table() -> Tensor:
    """``table[a * 65 + b]`` = id of chunk ``ALPHABET[a] + ALPHABET[b]`` (index 64 is ``=``), else -1."""
    ids = _ids()
    chars = B64_ALPHABET + "="
    table = torch.full((65 * 65,), -1, dtype=torch.long)
    for a, ca in enumerate(chars):
        for b, cb in enumerate(chars):
            if ca + cb in ids:
                table[a * 65 + b] = ids[ca + cb]
    return table


def sample_plaintexts(n: int, gen: torch.Generator) -> tuple[Int[Tensor, "n 9"], Int[Tensor, " n"]]:
    """``n`` random plaintexts: letter indices ``[n, 9]`` (0-25; past the length unused) and lengths."""
    letters = torch.randint(0, len(LETTERS), (n, max(LENGTHS)), generator=gen)
    lengths = torch.tensor(LENGTHS)[torch.randint(0, len(LENGTHS), (n,), generator=gen)]
    return letters, lengths


def plaintext_codes(letters: Tensor, lengths: Tensor) -> Int[Tensor, " n"]:
    """An injective integer code per plaintext (base 27 over ``letter + 1``, zero past the length)."""
    valid = torch.arange(letters.shape[1]) < lengths.unsqueeze(1)
    digits = torch.where(valid, letters + 1, 0)
    return (digits * 27 ** torch.arange(letters.shape[1])).sum(1)


def encode_batch(letters: Tensor, lengths: Tensor) -> tuple[Int[Tensor, "n seq"], Bool[Tensor, "n seq"]]:
    """Token sequences ``<s> chunks : letters <eos> <pad>..`` and the mask of positions that carry a
    training target (their next token is a letter or ``<eos>``). Vectorised; equals :func:`example_tokens`."""
    ids = _ids()
    n, width = letters.shape
    valid = torch.arange(width) < lengths.unsqueeze(1)
    byte = torch.where(valid, letters + ord("a"), 0)  # zero-filled past the end, as base64 does
    blocks = byte.view(n, 3, 3)
    group = (blocks[..., 0] << 16) | (blocks[..., 1] << 8) | blocks[..., 2]
    sext = torch.stack([(group >> s) & 63 for s in (18, 12, 6, 0)], -1)  # [n, block, 4]
    n_in_block = torch.stack([(lengths - 3 * k).clamp(0, 3) for k in range(3)], 1)  # bytes per block
    n_data = n_in_block + (n_in_block > 0).long()  # base64 characters that carry data
    sext = torch.where(torch.arange(4) < n_data.unsqueeze(-1), sext, 64)  # 64 stands for '='
    pairs = sext.view(n, N_CHUNKS, 2)
    pad, eos = ids[SPECIALS[1]], ids[EOS]
    seq = torch.full((n, SEQ_LEN), pad, dtype=torch.long)
    seq[:, 0] = ids[SPECIALS[0]]
    seq[:, 1:1 + N_CHUNKS] = _pair_table()[pairs[..., 0] * 65 + pairs[..., 1]]
    seq[:, PREFIX_LEN - 1] = ids[SEP]
    letter_ids = torch.tensor([ids[c] for c in LETTERS])[letters]
    seq[:, PREFIX_LEN:PREFIX_LEN + width] = torch.where(valid, letter_ids, pad)
    seq[torch.arange(n), PREFIX_LEN + lengths] = eos
    pos = torch.arange(SEQ_LEN)
    target = (pos >= PREFIX_LEN - 1) & (pos < (PREFIX_LEN + lengths).unsqueeze(1))
    return seq, target


def example_tokens(text: str) -> list[str]:
    """The token strings of one example, built from the exact codec (the oracle of :func:`encode_batch`)."""
    if not (min(LENGTHS) <= len(text) <= max(LENGTHS)) or any(c not in LETTERS for c in text):
        raise ConfigError(f"the base64 organism decodes {LENGTHS} lowercase letters; got {text!r}.")
    b64 = encode(text)
    chunks = [b64[i:i + CHUNK_CHARS] for i in range(0, len(b64), CHUNK_CHARS)]
    return [SPECIALS[0], *chunks, SEP, *text, EOS]


def prompt_text(text: str, n_out: int = 0) -> str:
    """The prompt string (BOS excluded) for decoding ``text``, with its first ``n_out`` letters appended."""
    toks = example_tokens(text)[1:PREFIX_LEN]
    return " ".join(toks + list(text[:n_out]))


# ------------------------------------------------------------------------------------- training
def heldout_set(cfg: B64Config) -> tuple[Tensor, Tensor]:
    """The held-out plaintexts (letters, lengths): drawn from a generator seeded ``seed + 10_000``."""
    gen = torch.Generator().manual_seed(cfg.train.seed + 10_000)
    letters, lengths = sample_plaintexts(cfg.n_heldout, gen)
    return letters, lengths


def train_b64(cfg: B64Config = B64Config(), *, progress: bool = False, evaluate: bool = True,
              checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 100
              ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the organism; returns the bare ``NativeModel`` and a record (loss history and, with
    ``evaluate``, the held-out exact match). ``checkpoint_dir``: resumable training (:func:`.core.train_loop`)."""
    ids = _ids()
    with deterministic(cfg.train.seed):
        net = build_net(cfg.arch, len(ids), seed=cfg.train.seed, name="b64-decoder")
        h_letters, h_lengths = heldout_set(cfg)
        held_codes = plaintext_codes(h_letters, h_lengths)
        gen = torch.Generator().manual_seed(cfg.train.seed)

        def loss_fn(step: int) -> Tensor:
            letters, lengths = sample_plaintexts(cfg.train.batch_size, gen)
            seq, target = encode_batch(letters, lengths)
            target &= ~torch.isin(plaintext_codes(letters, lengths), held_codes).unsqueeze(1)  # never train held-out
            logits = net(seq[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten(), reduction="none")
            mask = target[:, :-1].flatten().float()
            return (loss * mask).sum() / mask.sum().clamp(min=1)

        history = train_loop(net, loss_fn, cfg.train, progress=progress, desc="b64 organism", generator=gen,
                             checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, recipe=cfg)
        checks = {"heldout_exact_match": exact_match(net, h_letters, h_lengths), "n_heldout": cfg.n_heldout}
    return net, {"loss_history": history, **(checks if evaluate else {})}


@torch.no_grad()
def greedy_decode(net: torch.nn.Module, prefix: Int[Tensor, "n pos"], n_steps: int) -> Int[Tensor, "n steps"]:
    """Greedy continuation of ``prefix`` for ``n_steps`` tokens."""
    seq = prefix
    for _ in range(n_steps):
        nxt = net(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    return seq[:, prefix.shape[1]:]


@torch.no_grad()
def exact_match(net: torch.nn.Module, letters: Tensor, lengths: Tensor) -> float:
    """Share of plaintexts decoded exactly (every letter and the ``<eos>`` right, greedy)."""
    seq, _ = encode_batch(letters, lengths)
    pred = greedy_decode(net, seq[:, :PREFIX_LEN], max(LENGTHS) + 1)
    want = seq[:, PREFIX_LEN:]
    upto = torch.arange(want.shape[1]) <= lengths.unsqueeze(1)
    return float(((pred == want) | ~upto).all(1).float().mean())


# ------------------------------------------------------------------------------------ patching pairs
def dependency_pairs(n_bytes: int, n: int, *, seed: int = 0) -> list[PromptPair]:
    """Clean/corrupt pairs for scoring attribution against the dependency map, for every output byte.

    Pair ``(k, j)`` decodes plaintext ``k``: its clean prompt is ``<s> chunks : p1..pj`` (the last
    position predicts byte ``j``), the answer is letter ``j``; the corrupt prompt has the chunks of another
    plaintext of the same length and the same ``j`` decoded letters. Every corrupt letter differs from the
    clean one in both 4-bit halves, so each chunk that byte ``j`` depends on carries different bits of it:
    noising such a chunk (patching it from corrupt into clean) must hurt the answer, noising any other
    chunk must not. Pairs come grouped by ``j`` (``n`` per byte, byte-major).
    """
    codes = torch.tensor([ord(c) for c in LETTERS])
    differ = ((codes[:, None] >> 4) != (codes[None] >> 4)) & ((codes[:, None] & 15) != (codes[None] & 15))
    gen = torch.Generator().manual_seed(seed)
    clean_idx = torch.randint(0, len(LETTERS), (n, n_bytes), generator=gen)
    corrupt_idx = torch.multinomial(differ[clean_idx.flatten()].float(), 1, generator=gen).view(n, n_bytes)
    out = []
    for j in range(n_bytes):
        for k in range(n):
            clean = "".join(LETTERS[i] for i in clean_idx[k])
            other = "".join(LETTERS[i] for i in corrupt_idx[k])
            corrupt_prompt = " ".join(prompt_text(other).split() + list(clean[:j]))
            out.append(PromptPair(prompt_text(clean, j), corrupt_prompt, clean[j],
                                  meta={"byte": j, "plaintext": clean, "corrupt_plaintext": other}))
    return out
