"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG on inputs or activations (Hanna et al. 2024).

Edges are those of :class:`~recallscope.attribution.graph.Graph`: sender (embeddings, head, MLP) to
receiver (a head's q, k or v input, an MLP's input, the logits). An edge's score estimates the change of
the metric when only that edge is patched: the receiver reads the sender's source-run output instead of
its target-run output (noising, the default: clean is the target, corrupt the source, as when a
circuit is evaluated with everything outside it corrupted).

1. Run the target and the source over the graph, recording every sender's output ``a_u``; let
   ``delta_u = a_u^source - a_u^target``.
2. Run the target again with gradients and read, for every receiver ``v``, the gradient ``g_v`` of the
   summed metric with respect to ``v``'s own copy of its residual input (a tensor hook per receiver
   block folds it into the scores as soon as it is computed, so no gradient is kept).
3. ``score(u -> v) = sum_{batch, pos} delta_u . g_v`` (or per position), averaged over prompts.
4. EAP-IG on inputs: step 2's gradient is the mean over ``steps`` runs whose embeddings lie on the
   straight line from the target's to the source's (midpoints; batched several per forward).
5. EAP-IG on activations: for each sender group (the embeddings; one layer's heads; one MLP) the
   gradients for edges leaving that group come from ``steps`` runs in which only that group's outputs
   are moved along the line from target to source (the rest of the model computes normally). By the
   fundamental theorem of calculus the scores of all edges leaving a group then sum, as ``steps`` grows,
   to the exact effect of patching the whole group's output.

A node's score, the sum of its outgoing edges, equals attribution patching of that node (gradient times
activation difference; with IG on inputs, :func:`~recallscope.attribution.atp.atp` with ``ig_steps``).

Over a dataset, ``prompts_per_chunk`` runs the pairs in chunks whose score sums add up to step 3's mean;
with ``checkpoint_dir`` each finished chunk is checkpointed (:mod:`recallscope.store`) and a rerun resumes.
"""

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from recallscope.attribution.common import (
    Prepared,
    by_prompt_chunks,
    open_pairs_store,
    position_labels,
    prepare,
    target_source,
)
from recallscope.attribution.edges import EdgeScores
from recallscope.attribution.graph import Graph, GraphRun, run_graph
from recallscope.attribution.weights import AttnWeights, attn_weights
from recallscope.errors import ConfigError
from recallscope.manifest import build_manifest
from recallscope.models.selfcheck import Engine, fast_only
from recallscope.tasks.pairs import PromptPair, TokenizedPairs
from recallscope.vocab import Direction


class EdgeMethod(str, Enum):
    """How edge gradients are taken."""

    EAP = "eap"
    """One gradient at the target run (Syed et al. 2023)."""
    EAP_IG_INPUTS = "eap-ig-inputs"
    """Gradients averaged along the embedding path from target to source (Hanna et al. 2024)."""
    EAP_IG_ACTIVATIONS = "eap-ig-activations"
    """Per sender group, gradients averaged along that group's output path from target to source."""


@dataclass(frozen=True)
class EAPConfig:
    """Configuration of edge attribution."""

    method: EdgeMethod = EdgeMethod.EAP_IG_INPUTS
    """EAP, EAP-IG on inputs, or EAP-IG on activations."""
    steps: int = 5
    """Integrated-gradients steps (ignored by plain EAP)."""
    per_position: bool = False
    """One score per (edge, position) instead of per edge."""
    direction: Direction = Direction.NOISING
    """Noising (clean is the target; the circuit convention) or denoising."""
    memory_budget_mb: float = 1024.0
    """Activation memory per batch of integrated-gradients steps."""
    prompts_per_chunk: int | None = None
    """Pairs per chunk (None: all in one); each chunk is one checkpoint of a resumable run."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method.value, "steps": self.steps, "per_position": self.per_position,
                "direction": self.direction.value, "memory_budget_mb": self.memory_budget_mb,
                "prompts_per_chunk": self.prompts_per_chunk}


class _Accumulator:
    """Receiver hooks that fold ``delta . grad`` into the score matrix during the backward pass."""

    def __init__(self, graph: Graph, delta: Tensor, per_position: bool) -> None:
        self.graph, self.delta, self.per_position = graph, delta, per_position
        shape = (graph.n_senders, graph.n_receivers) + ((delta.shape[1],) if per_position else ())
        self.scores = torch.zeros(shape, dtype=torch.float64)
        self.readable = graph.valid.sum(0).tolist()  # senders each receiver can read (a prefix)
        self.senders = slice(0, graph.n_senders)
        self.steps = 1

    def hook(self, first: int, xs: Tensor) -> None:
        if xs.requires_grad:
            xs.register_hook(lambda grad, first=first: self._fold(first, grad))

    def _fold(self, first: int, grad: Tensor) -> None:
        lo, hi = self.senders.start, min(self.senders.stop, self.readable[first])
        if hi <= lo:
            return
        b = self.delta.shape[0]
        g = grad.reshape(self.steps, b, *grad.shape[1:]).sum(0).float()
        d = self.delta[:, :, lo:hi].float()
        spec = "bpud,bprd->urp" if self.per_position else "bpud,bprd->ur"
        self.scores[lo:hi, first:first + grad.shape[2]] += torch.einsum(spec, d, g).double()


def _backward(stack: Any, graph: Graph, weights: tuple[AttnWeights, ...], x0: Tensor, prep: Prepared,
              acc: _Accumulator, steps: int, sender_hook: Any = None) -> None:
    x0 = x0.detach().requires_grad_(True)
    acc.steps = steps
    with torch.enable_grad():
        out = run_graph(stack, graph, weights, x0, read=prep.read, receiver_hook=acc.hook, sender_hook=sender_hook)
        value = prep.metric(out.logits.view(steps, -1, *out.logits.shape[1:])).sum()
        torch.autograd.grad(value, [x0])


def _chunks(steps: int, stack: Any, graph: Graph, batch: int, n_pos: int, budget_mb: float) -> list[Tensor]:
    """Midpoints ``(k + 0.5) / steps`` split into batches that fit ``budget_mb`` of activations."""
    per_token_layer = (3 * graph.per_layer + 2 * graph.n_heads + 12) * stack.d_model + 4 * stack.n_heads * n_pos
    per_step = 4 * batch * n_pos * stack.n_layers * per_token_layer
    size = max(1, min(steps, int(budget_mb * 2**20) // max(1, per_step)))
    return list(((torch.arange(steps) + 0.5) / steps).split(size))


def _groups(graph: Graph) -> list[slice]:
    """Sender groups of EAP-IG on activations: the input, then per layer its heads and its MLP."""
    out = [slice(0, 1)]
    for layer in range(graph.n_layers):
        out += [slice(graph.head(layer, 0), graph.mlp(layer)), slice(graph.mlp(layer), graph.mlp(layer) + 1)]
    return out


def _interpolating(group: slice, tgt: GraphRun, delta: Tensor, alphas: Tensor):
    """A sender hook moving ``group``'s outputs to ``target + alpha * delta`` (values only; gradients
    still flow through the group's own computation)."""
    def hook(first: int, out: Tensor) -> Tensor:
        if not group.start <= first < group.stop:
            return out
        sl = slice(first, first + out.shape[2])
        moved = tgt.outputs[:, :, sl] + alphas.view(-1, 1, 1, 1, 1) * delta[:, :, sl]  # [steps, b, p, n, d]
        return out + (moved.reshape(out.shape) - out).detach()

    return hook


def _eap_chunk(prep: Prepared, graph: Graph, cfg: EAPConfig, progress: bool) -> dict[str, Tensor]:
    """Edge scores of one group of pairs, summed over its pairs and steps (``scores``, float64), with the
    metric of its clean and corrupt runs."""
    stack = prep.stack
    tgt_tokens, src_tokens = target_source(prep.tp, cfg.direction)
    positions = torch.arange(prep.tp.n_pos)
    with torch.no_grad():
        e_t, e_s = stack.embed(tgt_tokens, positions), stack.embed(src_tokens, positions)
    weights = attn_weights(stack, like=e_t)
    with torch.no_grad():
        tgt = run_graph(stack, graph, weights, e_t, read=prep.read, record=True)
        src = run_graph(stack, graph, weights, e_s, read=prep.read, record=True)
    delta = src.outputs - tgt.outputs
    acc = _Accumulator(graph, delta, cfg.per_position)
    b, n = tgt_tokens.shape
    if cfg.method == EdgeMethod.EAP:
        _backward(stack, graph, weights, e_t, prep, acc, 1)
    elif cfg.method == EdgeMethod.EAP_IG_INPUTS:
        for a in tqdm(_chunks(cfg.steps, stack, graph, b, n, cfg.memory_budget_mb), desc="EAP-IG",
                      disable=not progress, leave=False):
            x0 = (e_t + a.view(-1, 1, 1, 1).to(e_t) * (e_s - e_t)).reshape(-1, n, e_t.shape[-1])
            _backward(stack, graph, weights, x0, prep, acc, len(a))
    else:
        work = [(g, a) for g in _groups(graph) for a in _chunks(cfg.steps, stack, graph, b, n, cfg.memory_budget_mb)]
        for group, a in tqdm(work, desc="EAP-IG (activations)", disable=not progress, leave=False):
            acc.senders = group
            x0 = e_t.repeat(len(a), 1, 1)
            _backward(stack, graph, weights, x0, prep, acc, len(a),
                      sender_hook=_interpolating(group, tgt, delta, a.to(e_t)))
    with torch.no_grad():
        tgt_m, src_m = prep.metric(tgt.logits).float(), prep.metric(src.logits).float()
    clean_m, corrupt_m = (src_m, tgt_m) if cfg.direction == Direction.DENOISING else (tgt_m, src_m)
    return {"scores": acc.scores, "clean": clean_m, "corrupt": corrupt_m}


def eap(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    metric: Any = "logit_diff",
    *,
    method: EdgeMethod | str = EdgeMethod.EAP_IG_INPUTS,
    steps: int = 5,
    per_position: bool = False,
    direction: Direction | str = Direction.NOISING,
    memory_budget_mb: float = 1024.0,
    prompts_per_chunk: int | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    engine: Engine = "auto",
) -> EdgeScores:
    """Score every edge of the model's graph (see the module docstring); all pairs share one length.

    ``prompts_per_chunk``: run the pairs in chunks of this many (None: all at once); with
    ``checkpoint_dir`` each finished chunk is checkpointed there and the same call resumes from them.
    ``engine``: EAP runs on the fast forward only (``"auto"``/``"fast"``); on a model that fails the fast
    engine's self-check it raises instead of being silently wrong, and ``"hooks"`` is refused.
    """
    t0 = time.perf_counter()
    cfg = EAPConfig(EdgeMethod(method), int(steps), per_position, Direction(direction), memory_budget_mb,
                    prompts_per_chunk)
    if cfg.steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}.")
    ran = fast_only(model, engine, "EAP")
    prep = prepare(model, pairs, metric)
    graph = Graph.of(prep.stack)
    cfg_dict = {**cfg.to_dict(), "metric": prep.metric_name, "engine": ran}
    manifest = build_manifest(model, [p.clean for p in prep.tp.pairs] + [p.corrupt for p in prep.tp.pairs],
                              cfg_dict)
    store = open_pairs_store(checkpoint_dir, manifest, prep)
    parts = by_prompt_chunks(prep, prompts_per_chunk, store, lambda part: _eap_chunk(part, graph, cfg, progress),
                             progress=progress)
    total = parts[0]["scores"]
    for part in parts[1:]:
        total = total + part["scores"]
    n_steps = 1 if cfg.method == EdgeMethod.EAP else cfg.steps
    scores = (total / (n_steps * prep.tp.clean.shape[0])).float()
    scores = scores * (graph.valid[..., None] if per_position else graph.valid)
    manifest.update(timings_s={"total": time.perf_counter() - t0}, **store.manifest_entry())
    return EdgeScores(graph=graph, scores=scores, clean=torch.cat([part["clean"] for part in parts]),
                      corrupt=torch.cat([part["corrupt"] for part in parts]), direction=cfg.direction.value,
                      labels={"pos": position_labels(model, prep.tp.clean[0])}, config=cfg_dict, manifest=manifest)


def eap_ig(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    metric: Any = "logit_diff",
    *,
    steps: int = 5,
    on: str = "inputs",
    per_position: bool = False,
    direction: Direction | str = Direction.NOISING,
    prompts_per_chunk: int | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    engine: Engine = "auto",
) -> EdgeScores:
    """EAP-IG (Hanna et al. 2024) with integrated gradients ``on`` the ``"inputs"`` or ``"activations"``;
    ``prompts_per_chunk`` / ``checkpoint_dir`` / ``engine`` as in :func:`eap`."""
    if on not in ("inputs", "activations"):
        raise ConfigError(f"on must be 'inputs' or 'activations', got {on!r}.")
    return eap(model, pairs, metric, method=f"eap-ig-{on}", steps=steps, per_position=per_position,
               direction=direction, prompts_per_chunk=prompts_per_chunk, progress=progress,
               checkpoint_dir=checkpoint_dir, engine=engine)
