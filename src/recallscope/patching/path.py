"""Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): the effect of senders on receivers only.

For each sender (a head's output ``z`` or an MLP's output, optionally at one position):

1. Pass 1: run the target prompt with the sender's activation taken from the source run and every
   other head output and MLP output frozen at its target value, so the sender's change reaches later
   components only through the residual stream and cannot spread through other components. Record
   each receiver's input-side activation: a head's ``q``/``k``/``v``, an MLP's output (recomputed from
   its changed input but not passed on), or the final residual (receiver = the logits).
2. Pass 2: run the target prompt again, replacing only the receivers' activations with those
   recorded in pass 1, and measure the metric. (With the logits as receiver, pass 1 is the answer.)

Denoising (default): source = clean, target = corrupt, so the value says how much of the clean
behaviour the path sender -> receivers restores.

On the hook engine (``engine="hooks"``, or a model whose fast adapter fails its self-check), both
passes run through TransformerLens hooks on ``hook_z`` / ``hook_mlp_out`` and the receivers' hooks,
with many senders per forward: the target rows are repeated once per sender along the batch axis.
"""

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from recallscope import metrics as M
from recallscope.errors import ConfigError
from recallscope.manifest import build_manifest
from recallscope.models.forward import Trace, run
from recallscope.models.selfcheck import Engine, manifest_entry, resolve_engine
from recallscope.models.stack import build_stack
from recallscope.patching import hook_engine as H
from recallscope.patching.engine import _index
from recallscope.results import PatchingResult
from recallscope.sites import Site
from recallscope.tasks.pairs import PromptPair, TokenizedPairs, tokenize_pairs
from recallscope.vocab import Component, Direction

SENDERS = (Component.HEAD_OUT, Component.MLP_OUT)
RECEIVERS = (Component.Q, Component.K, Component.V, Component.MLP_OUT, Component.RESID_POST)


def _assign(t: Tensor, site: Site, src: Tensor) -> Tensor:
    t = t.clone()
    idx = (slice(None), *_index(site, 0))
    t[idx] = src[idx]
    return t


def _pass1(stack: Any, tokens: Tensor, sender: Site, receivers: Sequence[Site], target: Trace, source: Trace
           ) -> tuple[Tensor, dict[tuple[str, int], Tensor]]:
    recorded: dict[tuple[str, int], Tensor] = {}
    recv_points = {(r.component.value, r.layer) for r in receivers}

    def edit(point: str, layer: int, t: Tensor) -> Tensor:
        if (point, layer) in recv_points:
            recorded[(point, layer)] = t
        if point in ("z", "mlp_out") and layer >= sender.layer:
            frozen = target.acts[(point, layer)]
            if (sender.component.value, sender.layer) == (point, layer):
                return _assign(frozen, sender, source.acts[(point, layer)])
            return frozen
        return t

    logits, _ = run(stack, tokens, edit=edit)
    return logits, recorded


def _pass2(stack: Any, tokens: Tensor, receivers: Sequence[Site], recorded: dict) -> Tensor:
    def edit(point: str, layer: int, t: Tensor) -> Tensor:
        for r in receivers:
            if (r.component.value, r.layer) == (point, layer):
                t = _assign(t, r, recorded[(point, layer)])
        return t

    logits, _ = run(stack, tokens, edit=edit)
    return logits


def _pass1_hooks(model: Any, senders: Sequence[Site], receivers: Sequence[Site], target: dict[str, Tensor],
                 source: dict[str, Tensor], batch: int) -> tuple[list, dict[str, Tensor]]:
    """Pass 1 on the hook engine for a chunk of senders (cell ``i`` = rows ``i * batch ..``): every
    z / mlp_out at or after the sender's layer frozen at the target's, the sender's own site from the
    source; the receivers' activations recorded (an mlp_out receiver before it is frozen)."""
    recorded: dict[str, Tensor] = {}
    recv = {r.hook_name for r in receivers}
    freeze = {Site(c, layer).hook_name: (c, layer) for layer in range(int(model.cfg.n_layers)) for c in SENDERS
              if Site(c, layer).hook_name in model.hook_dict}

    def make(name: str) -> Any:
        def hook(t: Tensor, hook: Any) -> Tensor:
            if name in recv:
                recorded[name] = t.clone()
            if name in freeze:
                comp, layer = freeze[name]
                for i, s in enumerate(senders):
                    if layer < s.layer:
                        continue
                    rows = slice(i * batch, (i + 1) * batch)
                    t[rows] = target[name].to(t)
                    if (s.component, s.layer) == (comp, layer):
                        idx = _index(s, 0)
                        t[(rows, *idx)] = source[name][(slice(None), *idx)].to(t)
            return t

        return hook

    return [(name, make(name)) for name in sorted(recv | set(freeze))], recorded


def _pass2_hooks(receivers: Sequence[Site], recorded: dict[str, Tensor]) -> list:
    """Pass 2 on the hook engine: each receiver's site replaced by its pass-1 activation, in every row."""
    def make(sites: list[Site], rec: Tensor) -> Any:
        def hook(t: Tensor, hook: Any) -> Tensor:
            for r in sites:
                idx = (slice(None), *_index(r, 0))
                t[idx] = rec[idx].to(t)
            return t

        return hook

    by_name: dict[str, list[Site]] = {}
    for r in receivers:
        by_name.setdefault(r.hook_name, []).append(r)
    return [(name, make(sites, recorded[name])) for name, sites in by_name.items()]


def _path_hooks(model: Any, tgt_tokens: Tensor, src_tokens: Tensor, senders: Sequence[Site],
                receivers: Sequence[Site], met: Any, read: list[int], *, progress: bool,
                memory_budget_mb: float) -> tuple[Tensor, Tensor, Tensor]:
    """Path patching on the hook engine. Returns (values [batch, sender], target logits, source logits)."""
    names = {Site(c, layer).hook_name for layer in range(int(model.cfg.n_layers)) for c in SENDERS}
    names &= set(model.hook_dict)
    tgt_logits, target = H.record(model, tgt_tokens, names, read)
    src_logits, source = H.record(model, src_tokens, names, read)
    batch, n_pos = tgt_tokens.shape
    values = torch.empty(batch, len(senders))
    plan = H.plan(model, len(senders), batch, n_pos, len(read), memory_budget_mb)
    with torch.no_grad():
        for _, idxs in tqdm(plan, desc="path patching (hooks)", disable=not progress, leave=False):
            part = [senders[i] for i in idxs]
            rows = tgt_tokens.repeat(len(part), 1)
            hooks, recorded = _pass1_hooks(model, part, receivers, target, source, batch)
            logits = H.logits_at(model, rows, read, hooks)
            if receivers:
                logits = H.logits_at(model, rows, read, _pass2_hooks(receivers, recorded))
            values[:, list(idxs)] = met(logits.view(len(part), batch, len(read), -1)).float().cpu().T
    return values, tgt_logits, src_logits


def _check(model: Any, senders: Sequence[Site], receivers: Sequence[Site], n_pos: int) -> None:
    last = int(model.cfg.n_layers) - 1
    for s in senders:
        s.validate(model.cfg, n_pos)
        if s.component not in SENDERS:
            raise ConfigError(f"sender {s.label}: senders must be head outputs (z) or mlp_out.")
    to_logits = [r for r in receivers if r.component == Component.RESID_POST]
    if to_logits and len(to_logits) != len(receivers):
        raise ConfigError("give the logits (resid_post at the last layer) and other receivers in separate calls: "
                          "the direct path to the logits and paths through q/k/v/MLP are different quantities.")
    for r in receivers:
        r.validate(model.cfg, n_pos)
        if r.component not in RECEIVERS or (r.component == Component.RESID_POST and r.layer != last):
            raise ConfigError(f"receiver {r.label}: receivers must be q/k/v of a head, mlp_out, or "
                              f"resid_post at the last layer ({last}) for the logits.")


def path_patching(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    metric: Any = "logit_diff",
    *,
    senders: Sequence[Site],
    receivers: Sequence[Site],
    direction: Direction | str = Direction.DENOISING,
    progress: bool = True,
    engine: Engine = "auto",
    memory_budget_mb: float = 1024.0,
) -> PatchingResult:
    """Metric after patching each sender along its paths to ``receivers`` only (axes: sender).

    ``engine``: ``"auto"`` (fast when the model passes its self-check, else hooks), ``"fast"`` or
    ``"hooks"``. ``memory_budget_mb``: activation memory per forward of the hook engine (senders
    batched along the batch axis).
    """
    t0 = time.perf_counter()
    tp = pairs if isinstance(pairs, TokenizedPairs) else tokenize_pairs(model, pairs)
    met = M.resolve(metric, tp, method="path_patching")
    _check(model, senders, receivers, tp.n_pos)
    ran = resolve_engine(model, engine)
    read = met.read_positions(tp.n_pos)
    denoise = Direction(direction) == Direction.DENOISING
    tgt_tokens, src_tokens = (tp.corrupt, tp.clean) if denoise else (tp.clean, tp.corrupt)
    others = [r for r in receivers if r.component != Component.RESID_POST]
    if ran == "hooks":
        values, tgt_logits, src_logits = _path_hooks(model, tgt_tokens, src_tokens, senders, others, met, read,
                                                     progress=progress, memory_budget_mb=memory_budget_mb)
    else:
        stack = build_stack(model)
        values = torch.empty(tp.clean.shape[0], len(senders))
        with torch.no_grad():
            tgt_logits, target = run(stack, tgt_tokens, record={"z", "mlp_out"}, read_pos=torch.tensor(read))
            src_logits, source = run(stack, src_tokens, record={"z", "mlp_out"}, read_pos=torch.tensor(read))
            for i, s in enumerate(tqdm(senders, desc="path patching", disable=not progress, leave=False)):
                logits1, recorded = _pass1(stack, tgt_tokens, s, others, target, source)
                logits = _pass2(stack, tgt_tokens, others, recorded) if others else logits1
                values[:, i] = met(logits[:, read])
    clean_logits, corrupt_logits = (src_logits, tgt_logits) if denoise else (tgt_logits, src_logits)
    cfg = {"method": "path_patching", "direction": Direction(direction).value,
           "senders": [s.label for s in senders], "receivers": [r.label for r in receivers],
           "metric": getattr(met, "name", str(metric)), "engine": ran}
    manifest = build_manifest(model, [p.clean for p in tp.pairs], cfg, timings={"total": time.perf_counter() - t0})
    manifest.update(manifest_entry(model))
    return PatchingResult(values=values, axes=("sender",), clean=met(clean_logits).float(),
                          corrupt=met(corrupt_logits).float(), labels={"sender": [s.label for s in senders]},
                          config=cfg, manifest=manifest)
