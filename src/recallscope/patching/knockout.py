"""Attention knockout (Geva et al. 2023, "Dissecting Recall of Factual Associations").

1. For each prompt, pick query positions (default: the last token) and key positions given by a
   span name ("subject", "relation", "last") or explicit positions.
2. For each window of ``window`` consecutive layers, block attention from the query positions to the
   key positions in every head of those layers: set the scores to -inf before the softmax, so the
   other keys share the attention.
3. Run from the first layer of the window (lower layers and earlier positions are unchanged; their
   keys and values come from the clean run) and measure the metric.

The result has axes (layer, edge): ``values[prompt, window_center, edge]``; both baselines are the
unblocked run, so ``result.effect()`` is the change caused by the knockout. With ``checkpoint_dir``,
each finished (length group, edge) is checkpointed (:mod:`recallscope.store`) and a rerun resumes.

On the hook engine (``engine="hooks"``, or a model whose fast adapter fails its self-check) step 2
zeroes the blocked entries of ``hook_pattern`` and renormalises each query's attention over the keys
left: the same softmax over the unblocked keys (TransformerBridge's ``hook_attn_scores`` is read-only
on models whose attention runs inside the wrapped module, so scores cannot be edited everywhere).
"""

import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from recallscope import metrics as M
from recallscope.errors import ConfigError, EmptyDatasetError
from recallscope.manifest import build_manifest
from recallscope.models.selfcheck import Engine, manifest_entry, resolve_engine
from recallscope.models.stack import build_stack
from recallscope.patching import hook_engine as H
from recallscope.patching.engine import Cell, check_finite, plan_chunks, run_chunk
from recallscope.patching.traces import reference_run
from recallscope.results import PatchingResult
from recallscope.sites import layer_window
from recallscope.store import open_store
from recallscope.tasks.pairs import PromptPair, group_by_length, single_token_id, to_tokens
from recallscope.vocab import Component


def key_positions(item: PromptPair, name: str, n_pos: int, *, has_bos: bool) -> list[int]:
    """Key positions named by ``name`` for one prompt: "subject", "relation" (non-subject tokens other
    than BOS and the last), "last", or any span name present in ``item.spans``."""
    if name == "last":
        return [n_pos - 1]
    if name == "relation":
        start, stop = item.spans["subject"]
        first = 1 if has_bos else 0
        return [p for p in range(first, n_pos - 1) if not start <= p < stop]
    if name not in item.spans:
        raise ConfigError(f"prompt {item.clean!r} has no span {name!r} (spans: {sorted(item.spans)}); "
                          "use 'subject', 'relation', 'last' or a span the task suite provides.")
    start, stop = item.spans[name]
    return list(range(start, stop))


def _masking(masks: Tensor, batch: int) -> Callable[[Sequence[Cell]], Callable[[str, int, Tensor], Tensor]]:
    """For the engine's staggered chunk runner: each active cell's rows get ``masks`` on their scores
    at the layers of the cell's window (``masks[batch, 1, dest >= pos0, src]``)."""
    def edit_for(active: Sequence[Cell]) -> Callable[[str, int, Tensor], Tensor]:
        def edit(point: str, layer: int, t: Tensor) -> Tensor:
            if point == "scores":
                for i, cell in enumerate(active):
                    if any(s.layer == layer for s in cell.sites):
                        rows = slice(i * batch, (i + 1) * batch)
                        t[rows] = t[rows].masked_fill(masks.to(t.device), float("-inf"))
            return t

        return edit

    return edit_for


def _masks(group: Sequence[PromptPair], query: str, edge: str, n_pos: int, has_bos: bool) -> Tensor:
    """[prompt, query, key] booleans: True where attention ``query -> edge`` is blocked."""
    masks = torch.zeros(len(group), n_pos, n_pos, dtype=torch.bool)
    for i, g in enumerate(group):
        for q in key_positions(g, query, n_pos, has_bos=has_bos):
            masks[i, q, key_positions(g, edge, n_pos, has_bos=has_bos)] = True
    return masks


def _knockout_edge_hooks(model: Any, tokens: Tensor, group: Sequence[PromptPair], query: str, edge: str,
                         window: int, met: Any, n_pos: int, read: Tensor, has_bos: bool,
                         memory_budget_mb: float) -> Tensor:
    """:func:`_knockout_edge` on the hook engine: one full forward per chunk of layer windows."""
    n_layers = int(model.cfg.n_layers)
    cells = [Cell(tuple(layer_window(Component.ATTN_OUT, c, window, n_layers))) for c in range(n_layers)]
    masks = _masks(group, query, edge, n_pos, has_bos)
    return H.hook_knockout(model, cells, tokens, masks, met, read_pos=read.tolist(),
                           memory_budget_mb=memory_budget_mb).T


def _knockout_edge(stack: Any, trace: Any, group: Sequence[PromptPair], query: str, edge: str, window: int,
                   met: Any, n_pos: int, read: Tensor, has_bos: bool, memory_budget_mb: float) -> Tensor:
    """Metric ``[prompt, window_center]`` with ``query -> edge`` attention blocked in each window.

    A cell is one layer window; cells run batched, staggered by first layer, in chunks that fit
    ``memory_budget_mb`` (the patching engine's planner and runner). Rows before the first blocked query
    position are the clean run's, so each chunk starts there.
    """
    masks = _masks(group, query, edge, n_pos, has_bos)
    rows = masks.any(-1).any(0).nonzero()
    pos0 = min(int(rows.min()) if len(rows) else n_pos - 1, int(read.min()))
    cells = [Cell(tuple(layer_window(Component.ATTN_OUT, c, window, stack.n_layers, pos=pos0)))
             for c in range(stack.n_layers)]
    out = torch.empty(stack.n_layers, len(group))
    edit_for = _masking(masks[:, pos0:, :][:, None], len(group))
    for _, idxs in plan_chunks(stack, cells, len(group), n_pos, memory_budget_mb):
        logits = run_chunk(stack, [cells[i] for i in idxs], trace, trace, batch=len(group), n_pos=n_pos,
                           pos0=pos0, read_pos=read, edit_for=edit_for)
        out[idxs] = met(logits.view(len(idxs), len(group), *logits.shape[1:])).float().cpu()
    check_finite(out, lambda c: f"the layer window centred at {c}, knockout {query}→{edge}",
                 hint="Softmax over no keys is NaN: the knockout may block every key a query can attend to; "
                      "block fewer keys. If the model runs in float16, load it with dtype='bf16' or 'fp32'.")
    return out.T


KNOCKOUT_METRICS = ("prob", "logprob")
"""The metric names :func:`attention_knockout` takes (answers are bound per prompt length)."""


def attention_knockout(
    model: Any,
    items: Sequence[PromptPair],
    *,
    edges: Sequence[str] = ("subject", "relation", "last"),
    query: str = "last",
    window: int = 9,
    metric: str = "prob",
    memory_budget_mb: float = 1024.0,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    engine: Engine = "auto",
) -> PatchingResult:
    """Block attention ``query -> edge`` over layer windows; see the module docstring.

    ``memory_budget_mb``: activation memory per batch of layer windows (windows run together, down to
    one per batch). ``checkpoint_dir``: checkpoint each finished edge there; the same call resumes from them.
    ``engine``: ``"auto"`` (fast when the model passes its self-check, else hooks), ``"fast"`` or ``"hooks"``.
    """
    if not items:
        raise EmptyDatasetError("attention_knockout got no prompts.")
    if not isinstance(metric, str):
        raise ConfigError(f"attention_knockout takes a metric name ({', '.join(map(repr, KNOCKOUT_METRICS))}), not "
                          f"{type(metric).__name__}: it binds each prompt length's answers itself.")
    M.resolve(metric, torch.zeros(0, dtype=torch.long), allowed=KNOCKOUT_METRICS, method="attention_knockout")
    t0 = time.perf_counter()
    ran = resolve_engine(model, engine)
    stack = build_stack(model) if ran == "fast" else None
    n_layers = int(model.cfg.n_layers)
    has_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
    cfg = {"method": "attention_knockout", "edges": list(edges), "query": query, "window": window, "metric": metric,
           "memory_budget_mb": memory_budget_mb, "engine": ran}
    manifest = build_manifest(model, [it.clean for it in items], cfg)
    store = open_store(checkpoint_dir, manifest, inputs={"answers": [it.answer for it in items],
                                                         "spans": [it.spans for it in items], "bos": has_bos})
    rows, base, order = [], [], []
    for n_pos, group in group_by_length(model, items).items():
        tokens = torch.stack(to_tokens(model, [g.clean for g in group]))
        answers = torch.tensor([single_token_id(model, g.answer) for g in group])
        met = M.resolve(metric, answers, allowed=KNOCKOUT_METRICS, method="attention_knockout")
        read = torch.tensor(met.read_positions(n_pos))
        sub = store.child(f"len{n_pos}")
        with torch.no_grad():
            if stack is None:
                clean_logits = H.logits_at(model, tokens, read.tolist())
                run_edge = partial(_knockout_edge_hooks, model, tokens)
            else:
                clean_logits, trace = reference_run(stack, tokens, [], read.tolist())
                run_edge = partial(_knockout_edge, stack, trace)
            cols = [sub.get_or_compute(f"e{e}", lambda edge=edge: {"values": run_edge(
                        group, query, edge, window, met, n_pos, read, has_bos, memory_budget_mb)})["values"]
                    for e, edge in enumerate(tqdm(edges, desc="knockout", disable=not progress, leave=False))]
        rows.append(torch.stack(cols, dim=-1))
        base.append(met(clean_logits))
        order += [items.index(g) for g in group]
    inv = torch.tensor(order).argsort()
    baseline = torch.cat(base)[inv].float()
    manifest.update(timings_s={"total": time.perf_counter() - t0}, **store.manifest_entry(), **manifest_entry(model))
    return PatchingResult(values=torch.cat(rows)[inv], axes=("layer", "edge"), clean=baseline,
                          corrupt=baseline,
                          labels={"layer": [str(c) for c in range(n_layers)],
                                  "edge": [f"{query}→{e}" for e in edges]},
                          config=cfg, manifest=manifest)
