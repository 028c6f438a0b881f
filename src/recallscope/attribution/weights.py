"""Linear pieces of a model stack, read from its callables: projection weights and frozen norms.

Attribution needs a few parts of the model as explicit tensors, while a
:class:`~recallscope.models.stack.Stack` exposes only callables (so that norms and MLPs keep the
model's own numerics). This module recovers them:

1. **Affine maps** (the q/k/v/o projections): ``W = fn(I) - fn(0)``, ``b = fn(0)``, then checked on a
   random probe, so a callable that is not affine raises instead of giving silently wrong weights.
2. **Frozen norms** (direct logit attribution): a LayerNorm or RMSNorm with its scale ``sigma(x)`` read
   from the actual residual ``x`` is linear, ``c -> gamma * P(c) / sigma(x)`` with ``P`` centring for
   LayerNorm and the identity for RMSNorm, so the residual's parts can be pushed through it one by
   one. The reconstruction is checked against the norm on the actual input.
"""

from dataclasses import dataclass
from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from recallscope.models.stack import Stack, UnsupportedArchitectureError


def affine(fn: Callable[[Tensor], Tensor], d_in: int, *, like: Tensor, name: str = "projection"
           ) -> tuple[Float[Tensor, "d_in d_out"], Float[Tensor, " d_out"]]:
    """``(W, b)`` with ``fn(x) == x @ W + b`` for an affine ``fn``; raises if ``fn`` is not affine."""
    with torch.no_grad():
        eye = torch.eye(d_in, dtype=like.dtype, device=like.device)
        bias = fn(torch.zeros(1, d_in, dtype=like.dtype, device=like.device))[0]
        weight = fn(eye) - bias
        probe = torch.randn(3, d_in, generator=torch.Generator().manual_seed(0)).to(like)
        expected, got = fn(probe), probe @ weight + bias
    scale = expected.abs().max().clamp_min(1.0)
    if not torch.allclose(got, expected, atol=1e-4 * float(scale), rtol=1e-4):
        raise UnsupportedArchitectureError(
            f"the model's {name} is not an affine map of its input, which attribution needs (it reads the "
            "projection weights). Use the exact patching engine (recallscope.patching) for this model.")
    return weight, bias


@dataclass(frozen=True)
class AttnWeights:
    """One layer's attention projections, per head: ``q = h @ W_Q[:, head] + b_Q[head]`` and so on."""

    W_Q: Float[Tensor, "d_model head d_head"]
    b_Q: Float[Tensor, "head d_head"]
    W_K: Float[Tensor, "d_model kv_head d_head"]
    b_K: Float[Tensor, "kv_head d_head"]
    W_V: Float[Tensor, "d_model kv_head d_head"]
    b_V: Float[Tensor, "kv_head d_head"]
    W_O: Float[Tensor, "head d_head d_model"]
    b_O: Float[Tensor, " d_model"]


def attn_weights(stack: Stack, *, like: Tensor) -> tuple[AttnWeights, ...]:
    """The attention projection weights of every layer, split by head."""
    d, h, g, dh = stack.d_model, stack.n_heads, stack.n_kv_heads, stack.d_head
    out = []
    for i, lp in enumerate(stack.layers):
        wq, bq = affine(lp.q, d, like=like, name=f"layer {i} query projection")
        wk, bk = affine(lp.k, d, like=like, name=f"layer {i} key projection")
        wv, bv = affine(lp.v, d, like=like, name=f"layer {i} value projection")
        wo, bo = affine(lp.o, h * dh, like=like, name=f"layer {i} output projection")
        out.append(AttnWeights(wq.view(d, h, dh), bq.view(h, dh), wk.view(d, g, dh), bk.view(g, dh),
                               wv.view(d, g, dh), bv.view(g, dh), wo.view(h, dh, d), bo))
    return tuple(out)


@dataclass(frozen=True)
class FrozenNorm:
    """A LayerNorm / RMSNorm with its scale frozen at a given input: linear in what is added up."""

    center: bool
    """LayerNorm subtracts the mean over d_model; RMSNorm does not."""
    eps: float
    weight: Tensor | None
    bias: Tensor | None
    identity: bool = False

    def sigma(self, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead 1"]:
        """The scale the norm divides ``x`` by."""
        if self.identity:
            return torch.ones_like(x[..., :1])
        xf = x.float()
        if self.center:
            xf = xf - xf.mean(-1, keepdim=True)
        return (xf.pow(2).mean(-1, keepdim=True) + self.eps).sqrt().to(x.dtype)

    def read_direction(self, direction: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
        """``u`` with ``direction . (gamma * P(c))== u . c`` for every part ``c`` of the residual."""
        u = direction * self.weight if self.weight is not None else direction
        return u - u.mean(-1, keepdim=True) if self.center else u

    def constant(self, direction: Float[Tensor, "*lead d_model"]) -> Float[Tensor, " *lead"]:
        """``direction . beta``: the part of the read-out that no residual part causes."""
        if self.bias is None:
            return torch.zeros_like(direction[..., 0])
        return (direction * self.bias).sum(-1)


def frozen_norm(norm: Any, x: Float[Tensor, "*lead d_model"]) -> FrozenNorm:
    """Recognise ``norm`` (LayerNorm, RMSNorm, their parameter-free variants, Identity) and check that
    ``gamma * P(x) / sigma(x) + beta`` reproduces ``norm(x)`` on the actual input ``x``."""
    name = type(norm).__name__.lower()
    if isinstance(norm, nn.Identity):
        fn = FrozenNorm(center=False, eps=0.0, weight=None, bias=None, identity=True)
    elif "rms" in name or hasattr(norm, "variance_epsilon"):
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        fn = FrozenNorm(center=False, eps=float(eps), weight=getattr(norm, "weight", None), bias=None)
    elif "layernorm" in name:
        fn = FrozenNorm(center=True, eps=float(getattr(norm, "eps", 1e-5)), weight=getattr(norm, "weight", None),
                        bias=getattr(norm, "bias", None))
    else:
        raise UnsupportedArchitectureError(
            f"direct logit attribution does not know the final norm {type(norm).__name__}; it supports "
            "LayerNorm, RMSNorm and their parameter-free variants.")
    with torch.no_grad():
        ref = norm(x)
        p = x - x.mean(-1, keepdim=True) if fn.center else x
        rebuilt = p / fn.sigma(x)
        if fn.weight is not None:
            rebuilt = rebuilt * fn.weight
        if fn.bias is not None:
            rebuilt = rebuilt + fn.bias
    if not torch.allclose(rebuilt, ref, atol=1e-4 * float(ref.abs().max().clamp_min(1.0)), rtol=1e-4):
        raise UnsupportedArchitectureError(
            f"the final norm {type(norm).__name__} is not a plain LayerNorm/RMSNorm (its output differs from "
            "gamma * P(x) / sigma(x) + beta), so its frozen-scale linearisation would be wrong.")
    return fn
