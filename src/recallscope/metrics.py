"""Metrics: callables from logits to one value per prompt.

A metric is bound to its answers when constructed and reads logits only at the positions it names,
so engines unembed nothing else. Calling convention::

    metric.read_positions(n_pos) -> list[int]          # absolute positions to unembed
    metric(logits) -> values                           # logits [*lead, batch, read, vocab] -> [*lead, batch]

``*lead`` are extra leading axes (sweep cells, noise samples); answers broadcast over them.

Multi-token answers (a decoded base64 string) use :class:`SequenceLogProb`: the prompt is followed by
the answer tokens (teacher forcing) and the metric sums the log-probs of each answer token.

Every method turns a metric *name* into a metric object with :func:`resolve`, so one name means the same
thing, and an unknown name gets the same error, everywhere.
"""

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError


def _last(n_pos: int) -> list[int]:
    return [n_pos - 1]


def _gather(logprobs: Tensor, ids: Tensor) -> Tensor:
    """``logprobs[..., batch, vocab]`` at ``ids[batch]`` -> ``[..., batch]``."""
    index = ids.to(logprobs.device).expand(*logprobs.shape[:-1]).unsqueeze(-1)
    return logprobs.gather(-1, index).squeeze(-1)


@dataclass(frozen=True)
class LogitDiff:
    """logit(answer) - logit(wrong) at the last position: the standard patching metric."""

    answer: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"]
    name: str = "logit_diff"

    def read_positions(self, n_pos: int) -> list[int]:
        return _last(n_pos)

    def __call__(self, logits: Float[Tensor, "*lead batch read vocab"]) -> Float[Tensor, "*lead batch"]:
        last = logits[..., -1, :]
        return _gather(last, self.answer) - _gather(last, self.wrong)


@dataclass(frozen=True)
class Logit:
    """The answer's logit at the last position (a linear function of the residual stream, like LogitDiff)."""

    answer: Int[Tensor, " batch"]
    name: str = "logit"

    def read_positions(self, n_pos: int) -> list[int]:
        return _last(n_pos)

    def __call__(self, logits: Float[Tensor, "*lead batch read vocab"]) -> Float[Tensor, "*lead batch"]:
        return _gather(logits[..., -1, :], self.answer)


@dataclass(frozen=True)
class LogProb:
    """log p(answer) at the last position."""

    answer: Int[Tensor, " batch"]
    name: str = "logprob"

    def read_positions(self, n_pos: int) -> list[int]:
        return _last(n_pos)

    def __call__(self, logits: Float[Tensor, "*lead batch read vocab"]) -> Float[Tensor, "*lead batch"]:
        return _gather(torch.log_softmax(logits[..., -1, :].float(), dim=-1), self.answer)


@dataclass(frozen=True)
class Prob:
    """p(answer) at the last position (ROME's causal-trace metric)."""

    answer: Int[Tensor, " batch"]
    name: str = "prob"

    def read_positions(self, n_pos: int) -> list[int]:
        return _last(n_pos)

    def __call__(self, logits: Float[Tensor, "*lead batch read vocab"]) -> Float[Tensor, "*lead batch"]:
        return _gather(torch.softmax(logits[..., -1, :].float(), dim=-1), self.answer)


@dataclass(frozen=True)
class Rank:
    """0-based rank of the answer among all tokens at the last position (0 = top-1)."""

    answer: Int[Tensor, " batch"]
    name: str = "rank"

    def read_positions(self, n_pos: int) -> list[int]:
        return _last(n_pos)

    def __call__(self, logits: Float[Tensor, "*lead batch read vocab"]) -> Float[Tensor, "*lead batch"]:
        last = logits[..., -1, :]
        own = _gather(last, self.answer).unsqueeze(-1)
        return (last > own).sum(-1).to(last.dtype)


@dataclass(frozen=True)
class KL:
    """KL(reference || model) of the next-token distribution at the last position."""

    reference_logprobs: Float[Tensor, "batch vocab"]
    name: str = "kl"

    def read_positions(self, n_pos: int) -> list[int]:
        return _last(n_pos)

    def __call__(self, logits: Float[Tensor, "*lead batch read vocab"]) -> Float[Tensor, "*lead batch"]:
        logq = torch.log_softmax(logits[..., -1, :].float(), dim=-1)
        logp = self.reference_logprobs.to(logq.device)
        return (logp.exp() * (logp - logq)).sum(-1)


@dataclass(frozen=True)
class SequenceLogProb:
    """Teacher-forced log-prob of a multi-token answer: sum_i log p(a_i | prompt, a_<i).

    The tokens fed to the model are ``prompt + answer[:-1]``; ``answer_len`` answer tokens are
    predicted at the last ``answer_len`` positions. ``targets[batch, answer_len]`` are their ids.
    """

    targets: Int[Tensor, "batch answer_len"]
    name: str = "seq_logprob"

    def read_positions(self, n_pos: int) -> list[int]:
        k = self.targets.shape[-1]
        return list(range(n_pos - k, n_pos))

    def __call__(self, logits: Float[Tensor, "*lead batch read vocab"]) -> Float[Tensor, "*lead batch"]:
        logp = torch.log_softmax(logits.float(), dim=-1)
        index = self.targets.to(logp.device).expand(*logp.shape[:-1]).unsqueeze(-1)
        return logp.gather(-1, index).squeeze(-1).sum(-1)


def teacher_forced(prompt_tokens: Int[Tensor, "batch pos"], answer_tokens: Int[Tensor, "batch answer_len"]
                   ) -> tuple[Int[Tensor, "batch full"], SequenceLogProb]:
    """Tokens ``prompt + answer[:-1]`` and the matching :class:`SequenceLogProb` metric."""
    tokens = torch.cat([prompt_tokens, answer_tokens[:, :-1]], dim=1)
    return tokens, SequenceLogProb(answer_tokens)


def on_full_logits(metric, n_pos: int):
    """Adapt a recallscope metric to a function of full logits ``[batch, pos, vocab]`` returning the
    mean over the batch (the form TransformerLens's patching functions expect)."""
    read = metric.read_positions(n_pos)

    def fn(logits: Tensor) -> Tensor:
        return metric(logits[:, read]).mean()

    return fn


NAMES: dict[str, str] = {
    "logit_diff": "logit(answer) - logit(wrong) at the last position (needs a wrong answer in every pair)",
    "logit": "the answer's logit at the last position",
    "logprob": "log p(answer) at the last position",
    "prob": "p(answer) at the last position",
    "rank": "0-based rank of the answer at the last position",
}
"""Every metric name :func:`resolve` knows, with what it measures."""

_BY_ANSWER = {"logit": Logit, "logprob": LogProb, "prob": Prob, "rank": Rank}


def resolve(metric: Any, pairs: Any, *, allowed: tuple[str, ...] | None = None,
            method: str = "this method") -> Any:
    """The metric object for ``metric``, bound to the answers of ``pairs``.

    ``metric``: a name from :data:`NAMES`, or a metric object (anything with ``read_positions`` and
    ``__call__``, e.g. :class:`LogitDiff`), which is returned as it is. ``pairs``: tokenized pairs (an object
    with ``answer`` and ``wrong`` id tensors, :class:`recallscope.tasks.pairs.TokenizedPairs`) or a tensor of
    answer ids. ``allowed``: the names ``method`` supports (default: all); a metric object must carry one of
    them as its ``name``. Raises :class:`ConfigError` naming the choices for anything else.
    """
    names = tuple(NAMES) if allowed is None else tuple(allowed)
    choices = ", ".join(repr(n) for n in names)
    if not isinstance(metric, str):
        if not (callable(metric) and hasattr(metric, "read_positions")):
            raise ConfigError(f"{method} got metric {metric!r}: give a metric name ({choices}) or a metric object "
                              "from recallscope.metrics.")
        if allowed is not None and getattr(metric, "name", None) not in names:
            raise ConfigError(f"{method} supports the metrics {choices}, not a {type(metric).__name__} "
                              f"(name {getattr(metric, 'name', None)!r}).")
        return metric
    if metric not in names:
        hint = "" if metric not in NAMES else f" ({metric!r} exists but {method} cannot use it)"
        raise ConfigError(f"unknown metric {metric!r} for {method}{hint}; use one of {choices} or pass a metric "
                          "object from recallscope.metrics.")
    answer, wrong = (pairs, None) if isinstance(pairs, Tensor) else (pairs.answer, getattr(pairs, "wrong", None))
    if metric == "logit_diff":
        if wrong is None:
            raise ConfigError("metric 'logit_diff' needs a wrong answer in every pair (PromptPair.wrong); use "
                              "'logprob', 'prob' or 'logit' instead, or give the wrong answers.")
        return LogitDiff(answer, wrong)
    return _BY_ANSWER[metric](answer)
