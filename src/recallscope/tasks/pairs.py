"""Clean/corrupt prompt pairs: the common currency between task suites and methods.

Every task suite (facts, base64, user files) produces :class:`PromptPair` items; :func:`tokenize_pairs`
turns them into the tensors a method needs and checks what must hold (equal token lengths, single-token
answers where required, prompts inside the context window).
"""

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from recallscope.errors import (
    ConfigError,
    EmptyDatasetError,
    LengthMismatchError,
    MultiTokenAnswerError,
    PromptTooLongError,
)


@dataclass(frozen=True)
class PromptPair:
    """One clean prompt, its corrupted counterpart, and the answers each should produce.

    Attributes:
        clean: the prompt whose answer we trace (e.g. "The capital of France is").
        corrupt: the counterfactual prompt, same token length (e.g. "The capital of Spain is").
        answer: the clean answer as the model would continue, leading space included (" Paris").
        wrong: the corrupt prompt's answer (" Madrid"), or None when there is no counterfactual answer.
        spans: named token spans of the clean prompt, ``name -> (start, stop)`` in model tokens
            (BOS included when the model prepends one); filled by the task suite when it can.
        meta: free-form provenance (relation, subject, source file...).
    """

    clean: str
    corrupt: str
    answer: str
    wrong: str | None = None
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenizedPairs:
    """Tensors for a batch of pairs. All prompts in one batch have the same token length."""

    clean: Int[Tensor, "batch pos"]
    corrupt: Int[Tensor, "batch pos"]
    answer: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"] | None
    pairs: tuple[PromptPair, ...]

    @property
    def n_pos(self) -> int:
        return int(self.clean.shape[1])


def check_text(text: str, what: str) -> str:
    """``text`` if the tokenizer can take it, else :class:`ConfigError` (a lone surrogate has no UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(f"{what} {text[:40]!r} holds an unpaired surrogate at index {err.start}, which has no "
                          "UTF-8 encoding (no tokenizer accepts it). Fix the text's encoding (decode the source "
                          "bytes as UTF-8).") from None
    return text


def single_token_id(model: Any, text: str, *, what: str = "answer") -> int:
    """The id of ``text`` if it is exactly one token for this model's tokenizer, else a clear error."""
    check_text(text, what)
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = model.tokenizer.convert_ids_to_tokens(ids)
        raise MultiTokenAnswerError(
            f"{what} {text!r} is {len(ids)} tokens for this tokenizer ({pieces}), but this method needs a "
            "single-token answer. Use the answer's first token (e.g. "
            f"{model.tokenizer.decode(ids[:1])!r}), pick a single-token answer, or use a sequence "
            "metric such as metrics.SequenceLogProb for multi-token answers."
        )
    return int(ids[0])


def to_tokens(model: Any, prompts: Sequence[str]) -> list[Int[Tensor, " pos"]]:
    """Tokenise each prompt the way the model does (BOS included if it prepends one), checking length."""
    n_ctx = int(model.cfg.n_ctx)
    out = []
    for p in prompts:
        toks = model.to_tokens(check_text(p, "prompt"), truncate=False)[0]
        if toks.shape[0] > n_ctx:
            raise PromptTooLongError(
                f"prompt of {toks.shape[0]} tokens exceeds the model's context of {n_ctx} tokens: "
                f"{p[:60]!r}... Shorten the prompt or use a model with a longer context."
            )
        out.append(toks)
    return out


def tokenize_pairs(model: Any, pairs: Sequence[PromptPair], *, need_wrong: bool = False) -> TokenizedPairs:
    """Tokenise ``pairs`` into equal-length clean/corrupt batches with single-token answers."""
    if len(pairs) == 0:
        raise EmptyDatasetError("no prompt pairs were given; pass at least one PromptPair.")
    clean = to_tokens(model, [p.clean for p in pairs])
    corrupt = to_tokens(model, [p.corrupt for p in pairs])
    n = clean[0].shape[0]
    for i, (c, k, p) in enumerate(zip(clean, corrupt, pairs)):
        if c.shape[0] != k.shape[0]:
            raise LengthMismatchError(
                f"pair {i}: clean prompt {p.clean!r} is {c.shape[0]} tokens but corrupt prompt "
                f"{p.corrupt!r} is {k.shape[0]}. Position-wise patching needs equal lengths: choose a "
                "counterfactual whose subject has the same token count (tasks.facts.counterfactual_pairs "
                "does this), or pad the shorter prompt."
            )
        if c.shape[0] != n:
            raise LengthMismatchError(
                f"pair {i} is {c.shape[0]} tokens but pair 0 is {n}: one batch needs one length. Group "
                "pairs by length first (tasks.group_by_length) and run each group separately."
            )
    answer = torch.tensor([single_token_id(model, p.answer) for p in pairs])
    wrong = None
    if need_wrong or all(p.wrong is not None for p in pairs):
        missing = [i for i, p in enumerate(pairs) if p.wrong is None]
        if missing:
            raise MultiTokenAnswerError(
                f"pairs {missing[:5]} have no wrong (counterfactual) answer, which a logit-difference "
                "metric needs. Give each PromptPair a `wrong` answer or use a log-prob metric."
            )
        wrong = torch.tensor([single_token_id(model, p.wrong, what="wrong answer") for p in pairs])
    return TokenizedPairs(
        clean=torch.stack(clean), corrupt=torch.stack(corrupt), answer=answer, wrong=wrong, pairs=tuple(pairs)
    )


def group_by_length(model: Any, pairs: Sequence[PromptPair]) -> dict[int, list[PromptPair]]:
    """Split pairs into groups of equal clean-prompt token length (sorted by length)."""
    groups: dict[int, list[PromptPair]] = {}
    for p, toks in zip(pairs, to_tokens(model, [p.clean for p in pairs])):
        groups.setdefault(int(toks.shape[0]), []).append(p)
    return dict(sorted(groups.items()))
