"""What every attribution method does first: tokenise the pairs, bind the metric, pick the runs; and how a
dataset is split into checkpointed chunks of prompts (:func:`by_prompt_chunks`)."""

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from recallscope import metrics as M
from recallscope.errors import ConfigError
from recallscope.models.selfcheck import require_fast
from recallscope.models.stack import Stack, build_stack
from recallscope.store import ChunkStore, open_store
from recallscope.tasks.pairs import PromptPair, TokenizedPairs, tokenize_pairs
from recallscope.vocab import Corruption, Direction


@dataclass(frozen=True)
class Prepared:
    """Tokenised pairs, the bound metric, the model's stack and the positions the metric reads."""

    tp: TokenizedPairs
    metric: Any
    stack: Stack | None
    """The fast engine's stack (None when the method runs on the hook engine)."""
    read: Tensor

    @property
    def metric_name(self) -> str:
        return str(getattr(self.metric, "name", type(self.metric).__name__))


def prepare(model: Any, pairs: Sequence[PromptPair] | TokenizedPairs, metric: Any, *, fast: bool = True
            ) -> Prepared:
    """Tokenise ``pairs`` (one token length), bind ``metric`` to their answers, build the stack.

    With ``fast`` (every method but plain AtP on ``engine="hooks"``), the method runs on the fast forward:
    on a model whose fast adapter fails its self-check (:mod:`recallscope.models.selfcheck`) this raises
    :class:`~recallscope.models.selfcheck.EngineSelfCheckError`.
    """
    if fast:
        require_fast(model, "gradient attribution (AtP* / EAP / integrated gradients)")
    tp = pairs if isinstance(pairs, TokenizedPairs) else tokenize_pairs(model, pairs)
    met = M.resolve(metric, tp, method="attribution")
    return Prepared(tp=tp, metric=met, stack=build_stack(model) if fast else None,
                    read=torch.tensor(met.read_positions(tp.n_pos)))


def subset(prep: Prepared, rows: slice) -> Prepared:
    """The pairs ``rows`` of ``prep``, with the metric bound to their answers only.

    The metric must be a dataclass whose per-prompt fields lead with the prompt axis (every metric in
    :mod:`recallscope.metrics` is); those fields are sliced.
    """
    n = prep.tp.clean.shape[0]

    def cut(obj: Any) -> Any:
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"cannot split the metric {type(obj).__name__} by prompts: use a metric from "
                              "recallscope.metrics (or a dataclass whose per-prompt tensors lead with the "
                              "prompt axis), or prompts_per_chunk=None.")
        assert not isinstance(obj, type)
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **{k: v[rows] for k, v in values.items() if _per_prompt(v, n)})

    return dataclasses.replace(prep, tp=cut(prep.tp), metric=cut(prep.metric))


def _per_prompt(value: Any, n: int) -> bool:
    return (isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == n) or \
        (isinstance(value, tuple) and len(value) == n)


def by_prompt_chunks(prep: Prepared, size: int | None, store: ChunkStore,
                     compute: Callable[[Prepared], dict[str, Tensor]], *, progress: bool = True
                     ) -> list[dict[str, Tensor]]:
    """``compute`` over consecutive chunks of ``size`` pairs (all pairs in one chunk when None), each
    checkpointed in ``store`` under its prompt range, so a rerun resumes at the first unfinished chunk."""
    n = prep.tp.clean.shape[0]
    if size is not None and size < 1:
        raise ConfigError(f"prompts_per_chunk must be >= 1 (or None for one chunk), got {size}.")
    step = n if size is None else size
    out = []
    for start in tqdm(range(0, n, step), desc="prompt chunks", disable=not progress or step >= n, leave=False):
        rows = slice(start, min(n, start + step))
        part = prep if rows == slice(0, n) else subset(prep, rows)
        out.append(store.get_or_compute(f"p{rows.start:05d}-{rows.stop:05d}", lambda part=part: compute(part)))
    return out


def open_pairs_store(checkpoint_dir: str | os.PathLike | None, manifest: dict[str, Any], prep: Prepared
                     ) -> ChunkStore:
    """The checkpoint store of an attribution run: keyed by its manifest, answers and metric."""
    return open_store(checkpoint_dir, manifest, inputs={"answer": prep.tp.answer, "wrong": prep.tp.wrong,
                                                        "metric": prep.metric})


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
