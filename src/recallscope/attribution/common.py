"""What every attribution method does first: tokenise the pairs, bind the metric, pick the runs."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.models.stack import Stack, build_stack
from recallscope.patching.activation import _metric_for
from recallscope.tasks.pairs import PromptPair, TokenizedPairs, tokenize_pairs
from recallscope.vocab import Corruption, Direction


@dataclass(frozen=True)
class Prepared:
    """Tokenised pairs, the bound metric, the model's stack and the positions the metric reads."""

    tp: TokenizedPairs
    metric: Any
    stack: Stack
    read: Tensor

    @property
    def metric_name(self) -> str:
        return str(getattr(self.metric, "name", type(self.metric).__name__))


def prepare(model: Any, pairs: Sequence[PromptPair] | TokenizedPairs, metric: Any) -> Prepared:
    """Tokenise ``pairs`` (one token length), bind ``metric`` to their answers, build the stack."""
    tp = pairs if isinstance(pairs, TokenizedPairs) else tokenize_pairs(model, pairs)
    met = _metric_for(metric, tp)
    return Prepared(tp=tp, metric=met, stack=build_stack(model), read=torch.tensor(met.read_positions(tp.n_pos)))


def target_source(tp: TokenizedPairs, direction: Direction | str) -> tuple[Tensor, Tensor]:
    """(tokens patched into, tokens patched from): (corrupt, clean) when denoising, else (clean, corrupt)."""
    if Direction(direction) == Direction.DENOISING:
        return tp.corrupt, tp.clean
    return tp.clean, tp.corrupt


def check_corruption(direction: Direction | str, corruption: Corruption | str) -> Corruption:
    """The corruption, checked against the direction (denoising needs a counterfactual prompt)."""
    corruption = Corruption(corruption)
    if corruption == Corruption.GAUSSIAN_NOISE:
        raise ConfigError("Gaussian-noise corruption is ROME's causal trace (recallscope.patching.causal_trace); "
                          "attribution supports resample, zero and mean.")
    if Direction(direction) == Direction.DENOISING and corruption != Corruption.RESAMPLE:
        raise ConfigError("denoising patches clean activations into the corrupted run, which needs "
                          "corruption='resample'; use direction='noising' for zero or mean ablation.")
    return corruption


def position_labels(model: Any, tokens: Tensor) -> list[str]:
    """``token·index`` labels of one prompt's positions (the convention of patching results)."""
    toks = model.tokenizer.convert_ids_to_tokens(tokens.tolist()) if getattr(model, "tokenizer", None) else \
        [str(t) for t in tokens.tolist()]
    return [f"{t}·{i}" for i, t in enumerate(toks)]


def rotate(stack: Stack, x: Tensor, positions: Tensor) -> Tensor:
    """Rotary embedding of ``x`` [batch, heads, pos, d_head] at ``positions`` (identity without rotary)."""
    if stack.rope is None:
        return x
    rotated, _ = stack.rope(x, x, positions)
    return rotated


def fact_pairs(model: Any, facts: Sequence[Any], *, n_pairs: int = 16, seed: int = 0,
               length: int | None = None) -> list[PromptPair]:
    """Counterfactual pairs of ``facts`` (:func:`recallscope.tasks.facts.counterfactual_pairs`) that share
    one token length, as attribution needs: the largest length group (or ``length``), ``n_pairs`` of
    them drawn with ``random.Random(seed)``. Pass the facts a model recalls
    (``tasks.facts.recalled_facts(model, facts).kept``) so that the clean run knows the answer."""
    import random

    from recallscope.errors import EmptyDatasetError
    from recallscope.tasks.facts import counterfactual_pairs
    from recallscope.tasks.pairs import group_by_length

    pairs = list(counterfactual_pairs(model, facts, seed=seed).pairs)
    groups = group_by_length(model, pairs) if pairs else {}
    if not groups or (length is not None and length not in groups):
        raise EmptyDatasetError(f"no counterfactual pairs{'' if length is None else f' of {length} tokens'} "
                                f"among {len(facts)} facts (lengths available: {sorted(groups)}); pass more facts.")
    group = groups[length] if length is not None else max(groups.values(), key=len)
    return random.Random(seed).sample(group, min(n_pairs, len(group)))
