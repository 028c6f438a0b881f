"""Attribution patching: AtP, AtP* (QK fix + GradDrop) and node-level integrated gradients.

AtP (Nanda 2023, "Attribution patching"; Syed et al. 2023) estimates the effect of patching every site
of every component at once, from two forward passes and one backward pass:

1. Run the source (the clean prompt when denoising) without gradients, recording every component the
   patching engine can patch: ``resid_pre/mid/post, attn_out, mlp_out, z, q, k, v, pattern``.
2. Run the target (the corrupt prompt when denoising) with gradients and record the same components;
   one ``torch.autograd.grad`` call returns the gradient of the summed metric with respect to all of
   them (activation gradients only: no weight gradient is computed).
3. A site's estimate is ``grad . (source - target)`` summed over the site's features (d_model, d_head,
   or the source positions of a pattern row): the first-order Taylor expansion of the metric around the
   target run. It is exact when the metric is linear in the site's activation along the way.
4. AtP* (Kramár et al. 2024, "AtP*: An efficient and scalable method for localizing LLM behaviour to
   components") adds two corrections:

   a. *QK fix*: for ``q`` and ``k`` sites, recompute the attention softmax exactly with the patched
      query (one row of the pattern) or key (one column; closed form below) and linearise only the step
      from attention probabilities to the metric, ``sum grad_pattern * (pattern_patched - pattern)``.
      Saturated softmaxes no longer hide large effects. Patching key ``s`` changes row ``t`` to
      ``p'_s = sigmoid(score'_ts - logsumexp_{j != s} score_tj)`` and rescales the other entries, so
      ``sum_j g_j (p'_j - p_j) = (p'_s - p_s) (g_s - sum_{j != s} softmax_{j != s}(score_t)_j g_j)``.
   b. *GradDrop*: repeat the backward pass once per layer ``l`` with the gradient that flows back
      through layer ``l``'s attention and MLP outputs set to zero (sites inside layer ``l`` get none; its
      ``attn_out``/``mlp_out`` keep the gradient from above); the score ``(1/(L-1)) sum_l |estimate_l|``
      is large for sites whose direct and indirect effects cancel in the plain estimate. It ranks; it
      does not estimate.
5. Integrated gradients (``ig_steps=m``; the node-level form of EAP-IG on inputs, Hanna et al. 2024,
   "Have Faith in Faithfulness"): the gradients of step 2 are averaged over ``m`` runs whose embeddings
   move in a straight line from the target's to the source's (midpoint rule) before step 3.

Plain AtP also runs on the hook engine (``engine="hooks"``, or ``"auto"`` on a model whose fast adapter
fails its self-check): :mod:`recallscope.attribution.atp_hooks`.

Over a dataset, ``prompts_per_chunk`` runs the pairs in chunks (estimates are per prompt, so chunks only
change float rounding); with ``checkpoint_dir`` each finished chunk is checkpointed
(:mod:`recallscope.store`) and the same call resumes from them.
"""

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from recallscope.attribution.common import (
    Prepared,
    by_prompt_chunks,
    check_corruption,
    open_pairs_store,
    position_labels,
    prepare,
    rotate,
    target_source,
)
from recallscope.attribution.atp_hooks import atp_hooks_chunk
from recallscope.attribution.results import AttributionResult
from recallscope.errors import ConfigError
from recallscope.manifest import build_manifest
from recallscope.models.forward import Trace, run
from recallscope.models.selfcheck import Engine, manifest_entry, require_fast, resolve_engine
from recallscope.models.stack import Stack
from recallscope.patching.traces import constant_trace
from recallscope.tasks.pairs import PromptPair, TokenizedPairs, check_counterfactual
from recallscope.vocab import Component, Corruption, Direction

ALL_COMPONENTS = tuple(c.value for c in Component)
"""Every component of the patching engine, in the vocabulary's order."""


@dataclass(frozen=True)
class AtPConfig:
    """Configuration of attribution patching."""

    components: tuple[str, ...] = ALL_COMPONENTS
    """Components whose sites are estimated (all of them cost one backward pass together)."""
    direction: Direction = Direction.DENOISING
    """Denoising (clean into corrupt; gradients at the corrupt run) or noising (the reverse)."""
    corruption: Corruption = Corruption.RESAMPLE
    """Source of noising patches: the corrupt prompt, zeros or the batch mean."""
    qk_fix: bool = False
    """AtP*: recompute the attention softmax exactly for q and k sites."""
    graddrop: bool = False
    """AtP*: also compute GradDrop magnitudes (one extra backward pass per layer)."""
    ig_steps: int = 0
    """Integrated-gradients steps along the embedding path (0: plain AtP)."""
    memory_budget_mb: float = 1024.0
    """Activation memory per batch of integrated-gradients steps."""
    prompts_per_chunk: int | None = None
    """Pairs per chunk (None: all in one); each chunk is one checkpoint of a resumable run."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["components"] = list(self.components)
        d["direction"], d["corruption"] = self.direction.value, self.corruption.value
        return d


def _reduce(point: str, grad: Tensor, diff: Tensor) -> Tensor:
    """Sum ``grad * diff`` over a site's features: [batch, (head,) pos] in the engine's axis order."""
    prod = (grad.float() * diff.float()).sum(-1)
    if point in ("z", "q", "k", "v"):  # [batch, pos, head] -> [batch, head, pos]
        return prod.transpose(1, 2)
    return prod  # resid-like [batch, pos]; pattern [batch, head, dest_pos]


def _qk_effects(stack: Stack, layer: int, tgt: Trace, src: Trace, g: Tensor, *, block_elems: int = 2**24
                ) -> tuple[Tensor, Tensor]:
    """AtP*'s exact-softmax estimates for the query sites [batch, head, pos] and key sites
    [batch, kv_head, pos] of one layer, given the metric's gradient ``g`` w.r.t. the pattern."""
    n = tgt.acts[("q", layer)].shape[1]
    pos = torch.arange(n)
    rep = stack.n_heads // stack.n_kv_heads

    def rot(trace: Trace, point: str) -> Tensor:
        x = rotate(stack, trace.acts[(point, layer)].transpose(1, 2).float(), pos)
        return x.repeat_interleave(rep, dim=1) if point == "k" and rep > 1 else x

    q_t, q_s, k_t, k_s = rot(tgt, "q"), rot(src, "q"), rot(tgt, "k"), rot(src, "k")
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    scale = stack.attn_scale
    g = g.float()
    scores = (q_t @ k_t.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p_q = torch.softmax((q_s @ k_t.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf")), dim=-1)
    q_eff = (g * (p_q - p)).sum(-1)
    new = q_t @ k_s.transpose(-1, -2) * scale  # [b, h, t, s]: score of key s after patching it
    k_eff = torch.zeros_like(new)
    eye = torch.eye(n, dtype=torch.bool)
    rows = max(1, block_elems // max(1, new.shape[0] * new.shape[1] * n * n))
    for t0 in range(0, n, rows):
        sl = slice(t0, t0 + rows)
        excl = scores[:, :, sl, None, :].masked_fill(eye, float("-inf"))  # [b, h, t, s, j], j != s
        lse = torch.logsumexp(excl, dim=-1)
        gbar = (torch.softmax(excl, dim=-1) * g[:, :, sl, None, :]).sum(-1)
        eff = (torch.sigmoid(new[:, :, sl] - lse) - p[:, :, sl]) * (g[:, :, sl] - gbar)
        valid = causal[sl] & (pos[sl, None] > 0)  # a row with a single key cannot change
        k_eff[:, :, sl] = torch.where(valid, eff, torch.zeros_like(eff))
    k_eff = k_eff.sum(2).view(new.shape[0], stack.n_kv_heads, rep, n).sum(2)
    return q_eff, k_eff


def _estimates(stack: Stack, grads: dict[tuple[str, int], Tensor], tgt: Trace, src: Trace,
               components: Sequence[str], qk_fix: bool) -> dict[str, Tensor]:
    """Per-component estimates [batch, layer, (head,) pos] from per-(point, layer) gradients."""
    out: dict[str, list[Tensor]] = {c: [] for c in components}
    for layer in range(stack.n_layers):
        fixed: dict[str, Tensor] = {}
        if qk_fix:
            fixed["q"], fixed["k"] = _qk_effects(stack, layer, tgt, src, grads[("pattern", layer)])
        for c in components:
            est = fixed.get(c)
            if est is None:
                est = _reduce(c, grads[(c, layer)], src.acts[(c, layer)] - tgt.acts[(c, layer)])
            out[c].append(est)
    return {c: torch.stack(v, dim=1).cpu() for c, v in out.items()}


class _TargetPass:
    """The target run with gradients: ``grads()`` differentiates the summed metric w.r.t. every recorded
    activation; with ``graddrop``, ``grads(drop=l)`` zeroes the gradient through layer ``l``'s outputs."""

    def __init__(self, stack: Stack, tokens: Tensor, metric: Any, read: Tensor, record: set[str], *,
                 embeds: Tensor | None = None, graddrop: bool = False, lead: int = 1) -> None:
        self.drop: int | None = None
        self.graddrop = graddrop

        def edit(point: str, layer: int, t: Tensor) -> Tensor:
            if graddrop and point in ("attn_out", "mlp_out") and t.requires_grad:
                t.register_hook(lambda g, layer=layer: torch.zeros_like(g) if self.drop == layer else None)
            return t

        def embed_edit(x: Tensor) -> Tensor:
            return (x if embeds is None else embeds).detach().requires_grad_(True)

        with torch.enable_grad():
            logits, self.trace = run(stack, tokens, edit=edit, record=record, read_pos=read, embed_edit=embed_edit)
            self.value = metric(logits.view(lead, -1, *logits.shape[1:])).sum()
        self.logits = logits.detach()
        self.keys = sorted(self.trace.acts)

    def grads(self, drop: int | None = None, *, last: bool = True) -> dict[tuple[str, int], Tensor]:
        self.drop = drop
        tensors = [self.trace.acts[k] for k in self.keys]
        gs = torch.autograd.grad(self.value, tensors, retain_graph=not last, allow_unused=True)
        return {k: (g if g is not None else torch.zeros_like(t)) for k, t, g in zip(self.keys, tensors, gs)}

    def detached(self) -> Trace:
        out = Trace()
        out.acts = {k: v.detach() for k, v in self.trace.acts.items()}
        return out


def _ig_grads(stack: Stack, tgt_tokens: Tensor, src_tokens: Tensor, metric: Any, read: Tensor,
              record: set[str], steps: int, memory_budget_mb: float, progress: bool
              ) -> dict[tuple[str, int], Tensor]:
    """Gradients averaged over ``steps`` midpoints of the straight path from the target's embeddings
    to the source's, batched several steps per forward under the memory budget."""
    b, n = tgt_tokens.shape
    positions = torch.arange(n)
    with torch.no_grad():
        e_t, e_s = stack.embed(tgt_tokens, positions), stack.embed(src_tokens, positions)
    per_step = 4 * b * n * stack.n_layers * (24 * stack.d_model + 4 * stack.n_heads * n)
    chunk = max(1, min(steps, int(memory_budget_mb * 2**20) // max(1, per_step)))
    alphas = (torch.arange(steps, dtype=e_t.dtype) + 0.5) / steps
    total: dict[tuple[str, int], Tensor] = {}
    for a in tqdm(alphas.split(chunk), desc="integrated gradients", disable=not progress, leave=False):
        emb = (e_t + a.view(-1, 1, 1, 1) * (e_s - e_t)).reshape(-1, n, e_t.shape[-1])
        grads = _TargetPass(stack, tgt_tokens.repeat(len(a), 1), metric, read, record, embeds=emb,
                            lead=len(a)).grads()
        for k, g in grads.items():
            g = g.view(len(a), b, *g.shape[1:]).sum(0)
            total[k] = total[k] + g if k in total else g
    return {k: v / steps for k, v in total.items()}


def _graddrop(stack: Stack, target: _TargetPass, tgt: Trace, src: Trace, cfg: AtPConfig, progress: bool
              ) -> dict[str, Tensor]:
    """GradDrop magnitudes ``(1/(L-1)) sum_l |estimate with layer l's output gradients zeroed|``."""
    total: dict[str, Tensor] = {}
    for layer in tqdm(range(stack.n_layers), desc="GradDrop", disable=not progress, leave=False):
        grads = target.grads(layer, last=layer == stack.n_layers - 1)
        est = _estimates(stack, grads, tgt, src, cfg.components, cfg.qk_fix)
        total = {c: total.get(c, 0) + est[c].abs() for c in cfg.components}
    return {c: v / max(1, stack.n_layers - 1) for c, v in total.items()}


def _check(cfg: AtPConfig, stack: Stack | None) -> None:
    unknown = [c for c in cfg.components if c not in ALL_COMPONENTS]
    if unknown or not cfg.components:
        raise ConfigError(f"unknown or no components {unknown}; choose from {list(ALL_COMPONENTS)}.")
    if stack is None:  # the hook engine: missing hook points are reported when the chunk runs
        return
    if "resid_mid" in cfg.components and stack.parallel_attn_mlp:
        raise ConfigError("this model runs attention and MLP in parallel: it has no resid_mid to patch.")
    if "mlp_out" in cfg.components and any(lp.mlp is None for lp in stack.layers):
        raise ConfigError("this model has attention-only layers: drop mlp_out from components.")
    if cfg.qk_fix:  # the q/k fix recomputes scores from recorded q and k with plain rotary attention
        stack.require("AtP*'s q/k fix (qk_fix=True)", attention=True)
    if cfg.ig_steps < 0:
        raise ConfigError(f"ig_steps must be >= 0, got {cfg.ig_steps}.")
    if cfg.ig_steps and (cfg.qk_fix or cfg.graddrop):
        raise ConfigError("integrated gradients (ig_steps) and AtP*'s corrections are separate estimators; "
                          "use one of them per call.")
    if cfg.prompts_per_chunk is not None and cfg.corruption == Corruption.MEAN:
        raise ConfigError("mean ablation averages over all pairs, which chunks of pairs would change; use "
                          "prompts_per_chunk=None (one chunk) with corruption='mean'.")
    if cfg.ig_steps and cfg.corruption != Corruption.RESAMPLE:
        raise ConfigError("integrated gradients interpolate between two prompts; use corruption='resample'.")


def _atp_chunk(prep: Prepared, cfg: AtPConfig, progress: bool) -> dict[str, Tensor]:
    """AtP on one group of pairs: ``clean``, ``corrupt``, ``values.<component>`` and ``graddrop.<component>``."""
    stack, met, read = prep.stack, prep.metric, prep.read
    tgt_tokens, src_tokens = target_source(prep.tp, cfg.direction)
    record = set(cfg.components) | ({"q", "k", "pattern"} if cfg.qk_fix else set())
    with torch.no_grad():
        src_logits, src = run(stack, src_tokens, record=record, read_pos=read)
    if cfg.ig_steps:
        with torch.no_grad():
            tgt_logits, tgt = run(stack, tgt_tokens, record=record, read_pos=read)
        grads = _ig_grads(stack, tgt_tokens, src_tokens, met, read, record, cfg.ig_steps, cfg.memory_budget_mb,
                          progress)
    else:
        target = _TargetPass(stack, tgt_tokens, met, read, record, graddrop=cfg.graddrop)
        tgt_logits, tgt = target.logits, target.detached()
        if cfg.corruption != Corruption.RESAMPLE:
            src = constant_trace(tgt, record, cfg.corruption.value)
        grads = target.grads(last=not cfg.graddrop)
    values = _estimates(stack, grads, tgt, src, cfg.components, cfg.qk_fix)
    dropped = _graddrop(stack, target, tgt, src, cfg, progress) if cfg.graddrop else {}
    with torch.no_grad():
        tgt_m, src_m = met(tgt_logits).float().cpu(), met(src_logits).float().cpu()
    clean_m, corrupt_m = (src_m, tgt_m) if cfg.direction == Direction.DENOISING else (tgt_m, src_m)
    return {"clean": clean_m, "corrupt": corrupt_m, **{f"values.{c}": v for c, v in values.items()},
            **{f"graddrop.{c}": v for c, v in dropped.items()}}


def _atp_hooks_part(model: Any, prep: Prepared, cfg: AtPConfig) -> dict[str, Tensor]:
    """:func:`_atp_chunk` on the hook engine (plain AtP only)."""
    tgt_tokens, src_tokens = target_source(prep.tp, cfg.direction)
    tgt_m, src_m, values = atp_hooks_chunk(model, tgt_tokens, src_tokens, prep.metric, prep.read.tolist(),
                                           cfg.components, cfg.corruption.value)
    clean_m, corrupt_m = (src_m, tgt_m) if cfg.direction == Direction.DENOISING else (tgt_m, src_m)
    return {"clean": clean_m, "corrupt": corrupt_m, **{f"values.{c}": v for c, v in values.items()}}


def _atp_engine(model: Any, engine: str, plain: bool) -> str:
    """The engine AtP runs on: AtP*'s corrections and integrated gradients need the fast one."""
    if plain:
        return resolve_engine(model, engine)
    if engine == "hooks":
        raise ConfigError("engine='hooks' runs plain AtP only; AtP*'s q/k fix and GradDrop and integrated "
                          "gradients need engine='fast' (or use activation_patching(..., engine='hooks') for "
                          "exact effects).")
    require_fast(model, "AtP*'s corrections and integrated gradients")
    return "fast"


def atp(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    metric: Any = "logit_diff",
    *,
    components: Sequence[Component | str] | None = None,
    direction: Direction | str = Direction.DENOISING,
    corruption: Corruption | str = Corruption.RESAMPLE,
    qk_fix: bool = False,
    graddrop: bool = False,
    ig_steps: int = 0,
    memory_budget_mb: float = 1024.0,
    prompts_per_chunk: int | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    engine: Engine = "auto",
) -> AttributionResult:
    """Estimate the effect of patching every site of ``components`` (default: all ten) at once.

    See the module docstring for the algorithm. ``metric`` is a name bound to the pairs' answers
    (``"logit_diff"``, ``"logprob"``, ``"prob"``) or a metric object; all pairs share one token length.
    ``qk_fix`` / ``graddrop`` are AtP*'s corrections (see :func:`atp_star`); ``ig_steps=m`` averages the
    gradients over ``m`` points of the embedding path (integrated gradients). ``prompts_per_chunk``: run
    the pairs in chunks of this many (None: all at once); with ``checkpoint_dir`` each finished chunk is
    checkpointed there and the same call resumes from them (:mod:`recallscope.store`). ``engine``:
    ``"auto"`` (fast when the model passes its self-check, else hooks), ``"fast"`` or ``"hooks"`` (plain
    AtP only); the engine that ran is ``result.config["engine"]``.
    """
    t0 = time.perf_counter()
    ran = _atp_engine(model, engine, plain=not (qk_fix or graddrop or ig_steps))
    prep = prepare(model, pairs, metric, fast=ran == "fast")
    names = tuple(c.value if isinstance(c, Component) else str(c) for c in (components or ALL_COMPONENTS))
    cfg = AtPConfig(names, Direction(direction), check_corruption(direction, corruption), qk_fix, graddrop,
                    int(ig_steps), memory_budget_mb, prompts_per_chunk)
    _check(cfg, prep.stack)
    if cfg.corruption == Corruption.RESAMPLE:
        check_counterfactual(prep.tp)
    method = "atp*" if qk_fix or graddrop else ("atp-ig" if ig_steps else "atp")
    cfg_dict = {**cfg.to_dict(), "method": method, "metric": prep.metric_name, "engine": ran}
    manifest = build_manifest(model, [p.clean for p in prep.tp.pairs] + [p.corrupt for p in prep.tp.pairs],
                              cfg_dict)
    store = open_pairs_store(checkpoint_dir, manifest, prep)
    run_part = (lambda part: _atp_chunk(part, cfg, progress)) if ran == "fast" else (
        lambda part: _atp_hooks_part(model, part, cfg))
    parts = by_prompt_chunks(prep, prompts_per_chunk, store, run_part, progress=progress)
    cat = lambda key: torch.cat([part[key] for part in parts])  # noqa: E731
    manifest.update(timings_s={"total": time.perf_counter() - t0}, **store.manifest_entry(), **manifest_entry(model))
    labels = {"layer": [str(i) for i in range(int(model.cfg.n_layers))],
              "pos": position_labels(model, prep.tp.clean[0])}
    return AttributionResult(values={c: cat(f"values.{c}") for c in cfg.components}, clean=cat("clean"),
                             corrupt=cat("corrupt"), direction=cfg.direction.value, labels=labels,
                             graddrop={c: cat(f"graddrop.{c}") for c in cfg.components} if graddrop else {},
                             config=cfg_dict, manifest=manifest)


def atp_star(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    metric: Any = "logit_diff",
    *,
    components: Sequence[Component | str] | None = None,
    direction: Direction | str = Direction.DENOISING,
    graddrop: bool = True,
    prompts_per_chunk: int | None = None,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    engine: Engine = "auto",
) -> AttributionResult:
    """AtP* (Kramár et al. 2024): AtP with the exact-softmax QK fix and, by default, GradDrop.

    ``result.values`` are the QK-fixed estimates; ``result.graddrop`` the GradDrop magnitudes (rank
    with ``result.ranked(score="graddrop")``). GradDrop costs one extra backward pass per layer.
    ``engine``: the fast forward only ("auto" / "fast"; "hooks" is refused).
    """
    return atp(model, pairs, metric, components=components, direction=direction, qk_fix=True,
               graddrop=graddrop, prompts_per_chunk=prompts_per_chunk, progress=progress,
               checkpoint_dir=checkpoint_dir, engine=engine)
