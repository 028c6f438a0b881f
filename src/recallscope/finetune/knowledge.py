"""What a pretrained causal LM already knows: batched teacher-forced checks and greedy generations.

1. :func:`left_pad` turns token lists into a left-padded batch (ids, attention mask); positions count
   from the first real token (:func:`position_ids`), so a padded row computes what the unpadded one does.
2. :func:`teacher_forced` appends each continuation (tokenised on its own, as a continuation) to its
   prompt and runs one forward per batch. Greedy decoding writes the continuation, in this tokenisation,
   exactly when every continuation token is the argmax at its position; the summed log-prob and the
   argmax token after the continuation are returned too (so a caller can ask "and then the word ends").
3. :func:`greedy_generate`: ``max_new_tokens`` greedy tokens per prompt (batched, left-padded, with the
   model's key-value cache).

Works on any Hugging Face ``*ForCausalLM`` (not a TransformerBridge): the fine-tuning code trains the
Hugging Face module directly.
"""

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from recallscope.errors import ConfigError


@dataclass(frozen=True)
class Forced:
    """One teacher-forced continuation: summed log-prob, whether greedy writes it, and the next token."""

    logp: float
    greedy: bool
    next_text: str


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id (padding is masked, so its value does not matter)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token_id.")
    return int(pid)


def left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-padded ids and attention mask for token lists of different lengths."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ConfigError("left_pad needs at least one sequence and no empty sequence.")
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long)
    return ids, mask


def position_ids(mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Positions counted from each row's first real token (0 on the padding)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def teacher_forced(model: Any, tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str], *,
                   batch_size: int = 64) -> list[Forced]:
    """Log-prob of each continuation after its prompt, whether greedy decoding writes it, and the next token."""
    if len(prompts) != len(continuations):
        raise ConfigError(f"{len(prompts)} prompts but {len(continuations)} continuations; pass one each.")
    out: list[Forced] = []
    for start in range(0, len(prompts), batch_size):
        ps = [tokenizer.encode(p, add_special_tokens=False) for p in prompts[start:start + batch_size]]
        cs = [tokenizer.encode(c, add_special_tokens=False) for c in continuations[start:start + batch_size]]
        if any(not c for c in cs):
            raise ConfigError("an empty continuation cannot be checked; drop it.")
        ids, mask = left_pad([p + c for p, c in zip(ps, cs)], pad_id(tokenizer))
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits.float()
        width = ids.shape[1]
        for row, cont in enumerate(cs):
            n = len(cont)
            pred = logits[row, width - n - 1:width - 1]  # [n, vocab]: predictions of the continuation tokens
            target = torch.tensor(cont)
            logp = torch.log_softmax(pred, -1).gather(1, target[:, None]).sum()
            greedy = bool((pred.argmax(-1) == target).all())
            nxt = tokenizer.decode([int(logits[row, width - 1].argmax())])
            out.append(Forced(float(logp), greedy, nxt))
    return out


@torch.no_grad()
def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 8,
                    batch_size: int = 64) -> list[str]:
    """The greedy continuation (``max_new_tokens`` tokens, decoded) of every prompt (left-padded batches; the
    model's ``generate`` with its key-value cache, so each new token costs one position)."""
    out: list[str] = []
    pid = pad_id(tokenizer)
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad([tokenizer.encode(p, add_special_tokens=False) for p in prompts[start:start + batch_size]],
                             pid)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pid)
        out += [tokenizer.decode(row) for row in gen[:, ids.shape[1]:].tolist()]
    return out
