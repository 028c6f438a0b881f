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

    def __post_init__(self) -> None:
        for name in ("clean", "corrupt", "answer", "wrong"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (name == "wrong" and value is None):
                raise ConfigError(f"PromptPair.{name} must be a string, got {type(value).__name__} {value!r}; "
                                  f"write it as text, e.g. answer=' Paris' (leading space included).")


def check_pairs(pairs: Any) -> None:
    """Raise :class:`ConfigError` unless ``pairs`` is a sequence of :class:`PromptPair` (not tuples or dicts)."""
    if isinstance(pairs, (str, PromptPair)):
        raise ConfigError(f"expected a list of PromptPair, got a single {type(pairs).__name__}; wrap it in a list.")
    for i, p in enumerate(pairs):
        if not isinstance(p, PromptPair):
            raise ConfigError(f"pairs[{i}] is a {type(p).__name__} ({str(p)[:60]}), not a PromptPair; build it with "
                              "PromptPair(clean, corrupt, answer, wrong) (recallscope.tasks.pairs) or load pairs with "
                              "recallscope.tasks.load_prompt_pairs.")


def check_counterfactual(tp: "TokenizedPairs") -> None:
    """Raise :class:`ConfigError` if a pair's clean and corrupt prompts are the same tokens: patching one into
    the other changes nothing, so every effect is 0 and every normalised effect 0/0."""
    same = (tp.clean == tp.corrupt).all(dim=1)
    if bool(same.any()):
        idx = same.nonzero().flatten().tolist()
        raise ConfigError(f"pairs {idx[:5]} have identical clean and corrupt prompts ({tp.pairs[idx[0]].clean!r}): "
                          "patching cannot change anything, so every effect would be 0 (and normalised effects "
                          "0/0). Give each pair a counterfactual corrupt prompt (tasks.facts.counterfactual_pairs "
                          "makes them) or ablate instead (direction='noising', corruption='zero' or 'mean').")


def check_known_tokens(model: Any, text: str, what: str) -> None:
    """Raise :class:`ConfigError` if the tokenizer maps part of ``text`` to its unknown token: the model would
    read placeholders (an organism's tokenizer knows only its task's format) and report plausible nonsense."""
    tok = model.tokenizer
    unk, unk_text = getattr(tok, "unk_token_id", None), getattr(tok, "unk_token", None)
    if unk is None or not unk_text or unk_text in text:
        return
    ids = tok.encode(text, add_special_tokens=False)
    n = sum(1 for i in ids if i == unk)
    if n:
        raise ConfigError(f"{what} {text[:60]!r}: {n} of its {len(ids)} tokens are unknown to this model's tokenizer "
                          f"(they become {unk_text!r}), so the model cannot read it. Write prompts in the model's "
                          "own vocabulary (an organism reads only its task's format, e.g. base64 chunks for "
                          "organism:b64-decoder), or use another model.")


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
    check_known_tokens(model, text, what)
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
        check_known_tokens(model, p, "prompt")
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
    check_pairs(pairs)
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
    check_pairs(pairs)
    groups: dict[int, list[PromptPair]] = {}
    for p, toks in zip(pairs, to_tokens(model, [p.clean for p in pairs])):
        groups.setdefault(int(toks.shape[0]), []).append(p)
    return dict(sorted(groups.items()))
