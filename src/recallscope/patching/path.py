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
"""

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from recallscope.errors import ConfigError
from recallscope.manifest import build_manifest
from recallscope.models.forward import Trace, run
from recallscope.models.stack import build_stack
from recallscope.patching.activation import _metric_for
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
) -> PatchingResult:
    """Metric after patching each sender along its paths to ``receivers`` only (axes: sender)."""
    t0 = time.perf_counter()
    tp = pairs if isinstance(pairs, TokenizedPairs) else tokenize_pairs(model, pairs)
    met = _metric_for(metric, tp)
    _check(model, senders, receivers, tp.n_pos)
    stack = build_stack(model)
    read = met.read_positions(tp.n_pos)
    denoise = Direction(direction) == Direction.DENOISING
    tgt_tokens, src_tokens = (tp.corrupt, tp.clean) if denoise else (tp.clean, tp.corrupt)
    points = {"z", "mlp_out"}
    values = torch.empty(tp.clean.shape[0], len(senders))
    with torch.no_grad():
        tgt_logits, target = run(stack, tgt_tokens, record=points)
        src_logits, source = run(stack, src_tokens, record=points)
        others = [r for r in receivers if r.component != Component.RESID_POST]
        for i, s in enumerate(tqdm(senders, desc="path patching", disable=not progress, leave=False)):
            logits1, recorded = _pass1(stack, tgt_tokens, s, others, target, source)
            logits = _pass2(stack, tgt_tokens, others, recorded) if others else logits1
            values[:, i] = met(logits[:, read])
    clean_logits, corrupt_logits = (src_logits, tgt_logits) if denoise else (tgt_logits, src_logits)
    cfg = {"method": "path_patching", "direction": Direction(direction).value,
           "senders": [s.label for s in senders], "receivers": [r.label for r in receivers],
           "metric": getattr(met, "name", str(metric))}
    manifest = build_manifest(model, [p.clean for p in tp.pairs], cfg, timings={"total": time.perf_counter() - t0})
    return PatchingResult(values=values, axes=("sender",), clean=met(clean_logits[:, read]).float(),
                          corrupt=met(corrupt_logits[:, read]).float(), labels={"sender": [s.label for s in senders]},
                          config=cfg, manifest=manifest)
