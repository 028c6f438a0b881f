"""Tokenizer helpers that work offline.

Offline, ``GPT2TokenizerFast.from_pretrained("gpt2")`` can silently return an empty tokenizer, so
every loader here checks the vocabulary size before handing a tokenizer back.
"""

import json
from pathlib import Path
from typing import Any

from recallscope.errors import WeightsUnavailableError

GPT2_VOCAB_SIZE = 50257


def check_vocab(tokenizer: Any, *, expected: int | None = None, source: str = "tokenizer") -> Any:
    """Raise if ``tokenizer`` is empty (or not of the expected size); return it otherwise."""
    size = len(tokenizer)
    if size == 0 or (expected is not None and size != expected):
        want = f"{expected} tokens" if expected is not None else "a non-empty vocabulary"
        raise WeightsUnavailableError(
            f"{source} loaded with {size} tokens, expected {want}. Offline, transformers can return "
            "an empty tokenizer instead of failing: point it at a local directory that holds the "
            "tokenizer files (tokenizer.json or vocab/merges), or connect to the hub once to cache them."
        )
    return tokenizer


def gpt2_tokenizer_from_bpe_files(encoder_json: str | Path, vocab_bpe: str | Path) -> Any:
    """Build GPT-2's fast tokenizer from its two BPE files (``encoder.json``, ``vocab.bpe``)."""
    from transformers import GPT2TokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
    lines = Path(vocab_bpe).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line.strip()]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = GPT2TokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    return check_vocab(tok, expected=GPT2_VOCAB_SIZE, source=f"GPT-2 tokenizer from {encoder_json}")
