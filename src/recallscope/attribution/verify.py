"""Attribute, then verify: rank sites with a cheap estimate, re-score the top ones exactly.

1. Estimate every site of ``components`` with AtP, AtP* or node-level EAP-IG (:mod:`.atp`).
2. Rank sites by ``|mean estimate|`` over prompts and take the top ``k``.
3. Re-score them with the exact sweep engine (:mod:`recallscope.patching.engine`), one cell per site,
   all components in one sweep. With ``exhaustive=True`` every site is re-scored, which yields the
   exact top ``k`` too.
4. Report the Spearman rank correlation between estimates and exact effects (over the verified sites,
   or over all sites when exhaustive), precision@k (the share of the estimated top ``k`` that is in the
   exact top ``k``; exhaustive only) and the hit rate (the share of the verified sites whose exact
   ``|effect|`` is at least ``min_effect`` of the clean-corrupt gap).

Kramár et al. (2024) use the same scheme to bound AtP's false negatives; here it doubles as the
benchmark of attribution quality (``experiments/benchmarks/attribution_quality.py``).
"""

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from torch import Tensor

from recallscope.attribution.atp import atp
from recallscope.attribution.common import prepare, target_source
from recallscope.attribution.results import AttributionResult
from recallscope.errors import ConfigError
from recallscope.patching.engine import Cell, sweep
from recallscope.patching.traces import reference_run
from recallscope.results import load_result_dir, register_result, save_result_dir
from recallscope.sites import Site
from recallscope.stats import spearman
from recallscope.tasks.pairs import PromptPair, TokenizedPairs
from recallscope.vocab import Component, Direction

METHODS = ("atp", "atp*", "eap-ig")
"""Estimators attribute-then-verify can rank with (``eap-ig`` = node-level IG on the inputs)."""


def precision_at_k(estimated: Tensor, exact: Tensor, k: int) -> float:
    """Share of the ``k`` largest ``|estimated|`` that are among the ``k`` largest ``|exact|``."""
    k = min(k, len(exact))
    top_e = set(estimated.abs().argsort(descending=True)[:k].tolist())
    top_x = set(exact.abs().argsort(descending=True)[:k].tolist())
    return len(top_e & top_x) / max(1, k)


def exact_effects(model: Any, pairs: Sequence[PromptPair] | TokenizedPairs, metric: Any, sites: Sequence[Site], *,
                  direction: Direction | str = Direction.DENOISING, progress: bool = True) -> Tensor:
    """``[prompt, site]`` exact ``metric(patched) - metric(target)`` for single-site patches, one sweep."""
    prep = prepare(model, pairs, metric)
    tgt_tokens, src_tokens = target_source(prep.tp, direction)
    points = sorted({s.component.value for s in sites})
    read = prep.read.tolist()
    target_logits, target = reference_run(prep.stack, tgt_tokens, points, read)
    _, source = reference_run(prep.stack, src_tokens, points, read)
    values = sweep(prep.stack, [Cell((s,)) for s in sites], target, source, prep.metric, target_logits=target_logits,
                   read_pos=read, progress=progress, desc="verifying")
    return (values - prep.metric(target_logits).float()[None, :]).T


@register_result
@dataclass(frozen=True)
class VerifyResult:
    """Estimates of the verified sites next to their exact effects, and the agreement statistics."""

    sites: list[Site]
    estimated: Tensor
    exact: Tensor
    spearman: float
    precision_at_k: float | None
    hit_rate: float
    k: int
    config: dict[str, Any] = field(default_factory=dict)
    site_labels: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"method": self.config.get("method"), "k": self.k, "spearman": self.spearman,
                "precision_at_k": self.precision_at_k, "hit_rate": self.hit_rate, "n_verified": len(self.sites),
                **{k: v for k, v in self.config.items() if k.endswith("_s")}}

    def plot(self, *, title: str | None = None) -> go.Figure:
        """Estimated against exact effect per verified site, with the diagonal."""
        from recallscope.plotting import apply_style

        est, ex = self.estimated.numpy(), self.exact.numpy()
        labels = self.site_labels or [s.label for s in self.sites]
        top = set(self.estimated.abs().argsort(descending=True)[:self.k].tolist())
        fig = go.Figure()
        for name, idx in (("top-k by estimate", sorted(top)), ("other sites", [i for i in range(len(est)) if i not in top])):
            if idx:
                fig.add_trace(go.Scatter(x=[ex[i] for i in idx], y=[est[i] for i in idx], mode="markers", name=name,
                                         text=[labels[i] for i in idx], hovertemplate="%{text}<br>exact %{x:.4g}"
                                         "<br>estimate %{y:.4g}<extra></extra>"))
        lo, hi = float(min(est.min(), ex.min())), float(max(est.max(), ex.max()))
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="#888888"),
                                 showlegend=False, hoverinfo="skip"))
        p = "" if self.precision_at_k is None else f", precision@{self.k} {self.precision_at_k:.2f}"
        apply_style(fig, title=title or f"{self.config.get('method')} vs exact patching: Spearman "
                                        f"{self.spearman:.3f}{p}")
        fig.update_xaxes(title_text="exact effect")
        fig.update_yaxes(title_text="estimated effect")
        fig.update_layout(height=520, width=620)
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        meta = {"sites": [[s.component.value, s.layer, s.pos, s.head] for s in self.sites],
                "spearman": self.spearman, "precision_at_k": self.precision_at_k, "hit_rate": self.hit_rate,
                "k": self.k, "config": self.config, "site_labels": self.site_labels}
        return save_result_dir(directory, "VerifyResult", {"estimated": self.estimated, "exact": self.exact}, meta,
                               self.config.get("manifest", {}))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "VerifyResult":
        tensors, meta, _ = load_result_dir(directory, "VerifyResult")
        sites = [Site(Component(c), layer, pos, head) for c, layer, pos, head in meta["sites"]]
        return cls(sites, tensors["estimated"], tensors["exact"], meta["spearman"], meta["precision_at_k"],
                   meta["hit_rate"], meta["k"], meta.get("config", {}), meta.get("site_labels", []))


def estimate(model: Any, pairs: Sequence[PromptPair] | TokenizedPairs, metric: Any, method: str, *,
             components: Sequence[str], direction: Direction | str, ig_steps: int, progress: bool) -> AttributionResult:
    """Run the estimator named ``method`` (one of :data:`METHODS`)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; use one of {list(METHODS)}.")
    return atp(model, pairs, metric, components=components, direction=direction, qk_fix=method == "atp*",
               ig_steps=ig_steps if method == "eap-ig" else 0, progress=progress)


def attribute_then_verify(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    metric: Any = "logit_diff",
    *,
    method: str = "atp",
    components: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
    k: int = 20,
    exhaustive: bool = False,
    ig_steps: int = 5,
    direction: Direction | str = Direction.DENOISING,
    min_effect: float = 0.05,
    progress: bool = True,
) -> VerifyResult:
    """Rank every site of ``components`` with ``method``, verify the top ``k`` (or all) exactly."""
    t0 = time.perf_counter()
    est = estimate(model, pairs, metric, method, components=components, direction=direction, ig_steps=ig_steps,
                   progress=progress)
    t1 = time.perf_counter()
    sites, flat = est.flat()
    mean = flat.mean(0)
    order = mean.abs().argsort(descending=True)
    chosen = list(range(len(sites))) if exhaustive else order[:k].tolist()
    exact = exact_effects(model, pairs, metric, [sites[i] for i in chosen], direction=direction,
                          progress=progress).mean(0)
    estimated = mean[chosen]
    gap = float((est.clean - est.corrupt).mean().abs())
    top = estimated.abs().argsort(descending=True)[:k]
    cfg = {"method": method, "components": list(components), "direction": Direction(direction).value,
           "ig_steps": ig_steps if method == "eap-ig" else 0, "exhaustive": exhaustive, "min_effect": min_effect,
           "attribution_s": t1 - t0, "verification_s": time.perf_counter() - t1, "metric": est.config.get("metric"),
           "n_sites": len(sites), "manifest": est.manifest}
    return VerifyResult(
        sites=[sites[i] for i in chosen], estimated=estimated, exact=exact, spearman=spearman(estimated, exact),
        precision_at_k=precision_at_k(estimated, exact, k) if exhaustive else None,
        hit_rate=float((exact[top].abs() >= min_effect * gap).float().mean()), k=k, config=cfg,
        site_labels=[est.site_label(sites[i]) for i in chosen])
