"""Direct logit attribution by layer, head and source position (Chughtai et al. 2024, "Summing up the facts").

1. Run the clean prompts, recording each layer's head mixes ``z``, values ``v``, attention patterns and
   MLP outputs, and the final residual at the read position ``t`` (the last token).
2. The read-out is linear in the logits: the answer's logit, or the logit difference answer - wrong. Its
   gradient with respect to the unembedding's input is a direction ``d`` per prompt (``W_U[:, answer] -
   W_U[:, wrong]``), and the unembedding bias gives a constant.
3. Freeze the final norm at the actual final residual ``x``: it becomes linear, ``c -> gamma * P(c) /
   sigma(x) + beta`` (:mod:`.weights`), so a part ``c`` of the residual contributes ``c . u / sigma(x)``
   with ``u = P(gamma * d)``.
4. The residual at ``t`` is the sum of the embeddings, every head's output ``z_h W_O[h]``, every layer's
   attention-output bias and every MLP output; their contributions plus the constants (``d . beta`` and
   the unembedding bias) add up to the read-out exactly.
5. By source position: ``z_t = sum_s pattern[t, s] v_s``, so a head's contribution splits over source
   positions as ``pattern[t, s] (v_s W_O[h]) . u / sigma``; summing sources within spans separates
   subject tokens from relation tokens (Chughtai et al.'s subject, relation and mixed heads).
"""

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from recallscope import metrics as M
from recallscope.attribution.common import position_labels
from recallscope.attribution.weights import attn_weights, frozen_norm
from recallscope.errors import ConfigError, MultiTokenAnswerError, ResultFileError
from recallscope.manifest import build_manifest
from recallscope.models.forward import forward
from recallscope.models.selfcheck import checked_stack
from recallscope.results import load_result_dir, register_result, save_result_dir
from recallscope.sites import site_label
from recallscope.tasks.pairs import PromptPair, TokenizedPairs, tokenize_pairs
from recallscope.vocab import Component

PARTS = ("embed", "heads", "attn_bias", "mlp", "constant", "by_source", "total")


@register_result
@dataclass(frozen=True)
class DLAResult:
    """Direct contributions to the read-out (answer logit or logit difference) at the last position.

    Attributes:
        embed: ``[prompt]``; heads: ``[prompt, layer, head]``; attn_bias, mlp: ``[prompt, layer]``;
            constant: ``[prompt]`` (final-norm bias and unembedding bias). They sum to ``total``.
        by_source: ``[prompt, layer, head, src_pos]``: each head's contribution split by the position
            it read from; sums over ``src_pos`` to ``heads``.
        total: ``[prompt]`` the model's actual read-out.
        spans: per prompt, named token spans (``subject``, ``bos``...) when the task suite gave them.
    """

    embed: Float[Tensor, " prompt"]
    heads: Float[Tensor, "prompt layer head"]
    attn_bias: Float[Tensor, "prompt layer"]
    mlp: Float[Tensor, "prompt layer"]
    constant: Float[Tensor, " prompt"]
    by_source: Float[Tensor, "prompt layer head src_pos"]
    total: Float[Tensor, " prompt"]
    labels: dict[str, list[str]] = field(default_factory=dict)
    spans: list[dict[str, list[int]]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, layers, heads = self.heads.shape
        if self.by_source.shape[:3] != (n, layers, heads) or self.mlp.shape != (n, layers):
            raise ResultFileError("DLA parts disagree on the number of prompts, layers or heads.")

    def sum(self) -> Float[Tensor, " prompt"]:
        """All direct contributions added up (equals ``total`` up to float rounding)."""
        return (self.embed + self.heads.sum((1, 2)) + self.attn_bias.sum(1) + self.mlp.sum(1) + self.constant)

    def by_layer(self) -> Float[Tensor, "prompt layer 2"]:
        """Per layer: attention (heads + bias) and MLP."""
        return torch.stack([self.heads.sum(2) + self.attn_bias, self.mlp], dim=-1)

    def by_span(self, names: Sequence[str] = ("bos", "subject"), *, rest: str = "relation"
                ) -> tuple[Float[Tensor, "prompt layer head group"], list[str]]:
        """Head contributions summed over the source positions of each named span, plus ``rest`` (every
        other position: the relation's tokens when ``names`` covers BOS and the subject)."""
        if len(self.spans) != self.heads.shape[0] or not all(self.spans):
            raise ConfigError("these prompts carry no token spans; build them with the fact suite "
                              "(tasks.facts.counterfactual_pairs / trace_items), which records spans.")
        names = [n for n in names if all(n in s for s in self.spans)]
        n_pos = self.by_source.shape[-1]
        masks = torch.zeros(len(self.spans), len(names) + 1, n_pos)
        for i, spans in enumerate(self.spans):
            for j, name in enumerate(names):
                masks[i, j, spans[name][0]:spans[name][1]] = 1.0
        masks[:, -1] = (1.0 - masks[:, :-1].sum(1)).clamp(min=0.0)
        return torch.einsum("plhs,pgs->plhg", self.by_source, masks), [*names, rest]

    def components(self) -> tuple[list[str], Float[Tensor, "prompt component"]]:
        """Every contribution as a flat ``[prompt, component]`` matrix with labels."""
        n, layers, heads = self.heads.shape
        labels = ["embed"]
        cols = [self.embed[:, None]]
        for layer in range(layers):
            labels += [site_label(Component.HEAD_OUT, layer, head=h) for h in range(heads)]
            labels += [site_label(Component.ATTN_OUT, layer) + " bias", site_label(Component.MLP_OUT, layer)]
            cols += [self.heads[:, layer], self.attn_bias[:, layer, None], self.mlp[:, layer, None]]
        return labels + ["constant"], torch.cat(cols + [self.constant[:, None]], dim=1)

    def plot(self, *, top: int = 20, title: str | None = None) -> go.Figure:
        """Ranked bar chart of the ``top`` contributions (mean over prompts, 95% bootstrap CI)."""
        from recallscope.attribution.plots import ranked_bars
        from recallscope.results import bootstrap_ci

        labels, flat = self.components()
        mean = flat.mean(0)
        order = mean.abs().argsort(descending=True)[:top].tolist()
        lo, hi = bootstrap_ci(flat[:, order])
        kinds = {"z": "head", "attn_out": "attn bias", "mlp_out": "MLP"}
        groups = [kinds.get(labels[i].split(" ", 1)[0], labels[i]) for i in order]
        return ranked_bars([labels[i] for i in order], mean[order].numpy(), lo=lo.numpy(), hi=hi.numpy(),
                           groups=groups, title=title or f"Direct logit attribution ({self.config.get('target')})",
                           x_title=f"direct contribution to {self.config.get('target')}")

    def plot_sources(self, *, top: int = 12, title: str | None = None) -> go.Figure:
        """The ``top`` heads by ``|mean DLA|``, each split into subject / relation / BOS sources."""
        from recallscope.attribution.plots import PALETTE
        from recallscope.plotting import apply_style

        split, groups = self.by_span()
        mean = split.mean(0)  # [layer, head, group]
        total = mean.sum(-1).flatten()
        order = total.abs().argsort(descending=True)[:top].tolist()
        n_heads = mean.shape[1]
        names = [site_label(Component.HEAD_OUT, i // n_heads, head=i % n_heads) for i in order][::-1]
        fig = go.Figure()
        for j, g in enumerate(groups):
            fig.add_trace(go.Bar(y=names, x=[float(mean.reshape(-1, len(groups))[i, j]) for i in order][::-1],
                                 orientation="h", name=g, marker_color=PALETTE[j % len(PALETTE)]))
        apply_style(fig, title=title or "Direct logit attribution of the top heads, by source tokens")
        fig.update_layout(barmode="relative", height=max(320, 26 * len(order) + 160))
        fig.update_xaxes(title_text=f"direct contribution to {self.config.get('target')}")
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        tensors = {k: getattr(self, k) for k in PARTS}
        meta = {"labels": self.labels, "spans": self.spans, "config": self.config}
        return save_result_dir(directory, "DLAResult", tensors, meta, self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "DLAResult":
        tensors, meta, manifest = load_result_dir(directory, "DLAResult")
        return cls(**{k: tensors[k] for k in PARTS}, labels=meta.get("labels", {}), spans=meta.get("spans", []),
                   config=meta.get("config", {}), manifest=manifest)


def _read_direction(stack: Any, answer: Tensor, wrong: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient of the read-out w.r.t. the unembedding input [prompt, d_model], and its constant [prompt]."""
    h = torch.zeros(len(answer), stack.d_model, dtype=like.dtype, device=like.device, requires_grad=True)
    with torch.enable_grad():
        logits = stack.unembed(h)
        value = logits.gather(1, answer[:, None])[:, 0]
        if wrong is not None:
            value = value - logits.gather(1, wrong[:, None])[:, 0]
        (grad,) = torch.autograd.grad(value.sum(), [h])
    return grad.detach(), value.detach()


def direct_logit_attribution(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    metric: Any = "logit_diff",
    *,
    target: Any = None,
) -> DLAResult:
    """Direct contributions of every head (and source position), MLP and the embeddings to ``metric``, a
    linear function of the logits: ``"logit_diff"`` (answer - wrong; needs wrong answers), ``"logit"`` (the
    answer's logit), or a :class:`recallscope.metrics.LogitDiff` / :class:`~recallscope.metrics.Logit`
    (resolved by :func:`recallscope.metrics.resolve`). ``target`` is the old name of ``metric``. Only the clean
    prompts are run."""
    t0 = time.perf_counter()
    metric = metric if target is None else target
    if isinstance(pairs, TokenizedPairs):
        tp = pairs
    else:
        try:
            tp = tokenize_pairs(model, pairs, need_wrong=metric == "logit_diff")
        except MultiTokenAnswerError as exc:
            raise ConfigError(f"{exc} (direct logit attribution metric {metric!r})") from exc
    met = M.resolve(metric, tp, allowed=("logit_diff", "logit"),
                    method="direct logit attribution (it reads a linear function of the logits)")
    answer, wrong, name = met.answer, getattr(met, "wrong", None), met.name
    stack = checked_stack(model, "direct logit attribution")
    stack.require("direct logit attribution", post_norms=True, linear_logits=True)
    tokens = tp.clean
    n = tokens.shape[1]
    t = n - 1
    with torch.no_grad():
        x0 = stack.embed(tokens, torch.arange(n))
        final, trace = forward(stack, x0, record={"z", "v", "pattern", "mlp_out"}, read_pos=torch.tensor([t]),
                               unembed=False)
        final = final[:, 0]
        logits = stack.unembed(stack.final_norm(final))
    actual = logits.gather(1, answer[:, None])[:, 0] - (logits.gather(1, wrong[:, None])[:, 0] if wrong is not None else 0)
    weights = attn_weights(stack, like=x0)
    d, unembed_const = _read_direction(stack, answer, wrong, x0)
    with torch.no_grad():
        norm = frozen_norm(stack.final_norm, final)
        u = norm.read_direction(d) / norm.sigma(final)  # [prompt, d_model]
        rep = stack.n_heads // stack.n_kv_heads
        heads, bias, mlp, source = [], [], [], []
        for layer, w in enumerate(weights):
            wu = torch.einsum("hed,pd->phe", w.W_O, u)  # each head's output direction read back through W_O
            v = trace.acts[("v", layer)].repeat_interleave(rep, dim=2)  # [prompt, src, head, d_head]
            per_source = torch.einsum("pshe,phe->phs", v, wu) * trace.acts[("pattern", layer)][:, :, t]
            source.append(per_source)
            heads.append(torch.einsum("phe,phe->ph", trace.acts[("z", layer)][:, t], wu))
            bias.append((w.b_O * u).sum(-1))
            mlp.append((trace.acts[("mlp_out", layer)][:, t] * u).sum(-1))
        constant = unembed_const + norm.constant(d)
    cfg = {"method": "direct_logit_attribution", "metric": name, "target": name, "read_pos": t}
    manifest = build_manifest(model, [p.clean for p in tp.pairs], cfg, timings={"total": time.perf_counter() - t0})
    spans = [{k: list(v) for k, v in p.spans.items()} for p in tp.pairs]
    return DLAResult(embed=(x0[:, t] * u).sum(-1).float(), heads=torch.stack(heads, 1).float(),
                     attn_bias=torch.stack(bias, 1).float(), mlp=torch.stack(mlp, 1).float(),
                     constant=constant.float(), by_source=torch.stack(source, 1).float(), total=actual.float(),
                     labels={"pos": position_labels(model, tokens[0])}, spans=spans, config=cfg, manifest=manifest)
