"""Plain AtP on the hook engine: gradients through TransformerLens hooks, for any model TransformerLens loads.

The same estimator as :mod:`recallscope.attribution.atp` (steps 1-3 there), on the model's own forward:

1. Run the source with hooks that record every component's activation (``Site.hook_name``).
2. Run the target with gradients; each hook returns a copy of its activation and keeps that copy, so the
   copy is exactly what flows downstream. One ``torch.autograd.grad`` call gives the gradient of the
   summed metric with respect to every copy.
3. ``hook_resid_mid`` is the input of the second norm in a TransformerBridge, not the residual stream
   carried on, so its gradient covers only the MLP path; the residual path's gradient is the gradient at
   ``resid_post`` of the same layer (the block output is resid_mid plus a function of it), and the
   two are added.
4. A site's estimate is ``grad . (source - target)`` summed over the site's features, as in AtP.

AtP*'s corrections (q/k fix, GradDrop) and integrated gradients need the fast engine.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from recallscope.patching import hook_engine as H
from recallscope.patching.hook_engine import ReadOnlyHookError
from recallscope.sites import Site
from recallscope.vocab import Component


def _names(components: Sequence[str], n_layers: int) -> dict[str, tuple[str, int]]:
    """{hook name: (component, layer)} of every site the estimates need (resid_mid also needs resid_post)."""
    comps = set(components) | ({"resid_post"} if "resid_mid" in components else set())
    return {Site(Component(c), layer).hook_name: (c, layer) for c in comps for layer in range(n_layers)}


def _target_grads(model: Any, tokens: Tensor, metric: Any, read: list[int], names: dict[str, tuple[str, int]]
                  ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Target logits at ``read``, activations and gradients of the summed metric, by hook name."""
    kept: dict[str, Tensor] = {}

    def keep(t: Tensor, hook: Any, name: str = "") -> Tensor:
        kept[name] = t.clone()
        return kept[name]

    with torch.enable_grad():
        logits = H.logits_at(model, tokens, read, [(n, lambda t, hook, n=n: keep(t, hook, n)) for n in names])
        value = metric(logits).sum()
        order = sorted(kept)
        gs = torch.autograd.grad(value, [kept[n] for n in order], allow_unused=True)
    unused = [n for n, g in zip(order, gs) if g is None]
    if unused:  # the hook fired after the fact: its tensor does not flow on, so its gradient is not the effect
        raise ReadOnlyHookError(
            f"{unused[0]} does not flow on in this model's TransformerBridge (the attention runs inside the "
            f"wrapped Hugging Face module), so AtP cannot take its gradient through hooks; drop component "
            f"{names[unused[0]][0]!r} or use engine='fast'.")
    grads = dict(zip(order, gs))
    return logits.detach(), {n: t.detach() for n, t in kept.items()}, grads


def _reduce(component: str, grad: Tensor, diff: Tensor) -> Tensor:
    """Sum ``grad * diff`` over a site's features: [batch, (head,) pos] (pattern: [batch, head, dest])."""
    prod = (grad.float() * diff.float()).sum(-1)
    return prod.transpose(1, 2) if component in ("z", "q", "k", "v") else prod


def atp_hooks_chunk(model: Any, tgt_tokens: Tensor, src_tokens: Tensor, metric: Any, read: list[int],
                    components: Sequence[str], corruption: str) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Target metric, source metric and per-component estimates [batch, layer, (head,) pos]."""
    n_layers = int(model.cfg.n_layers)
    names = _names(components, n_layers)
    H.check_hook_names(model, names)
    tgt_logits, tgt, grads = _target_grads(model, tgt_tokens, metric, read, names)
    with torch.no_grad():
        src_logits, src = H.record(model, src_tokens, names, read)
    if corruption != "resample":
        src = H.constant_acts(tgt, corruption)
    values = {}
    for c in components:
        per_layer = []
        for layer in range(n_layers):
            name = Site(Component(c), layer).hook_name
            g = grads[name]
            if c == "resid_mid":
                g = g + grads[Site(Component.RESID_POST, layer).hook_name]
            per_layer.append(_reduce(c, g, src[name].to(g) - tgt[name]))
        values[c] = torch.stack(per_layer, dim=1).cpu()
    with torch.no_grad():
        return metric(tgt_logits).float().cpu(), metric(src_logits).float().cpu(), values
