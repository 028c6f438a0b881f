"""An architecture-neutral view of a decoder-only transformer, for recallscope's fast engines.

A :class:`Stack` exposes a model as plain callables (embed, per-layer norms/projections/MLP, rotary,
final norm, unembed) taken from the model's *own* modules, so norms, MLPs and rotary embeddings keep
the model's exact numerics. Only attention is recomputed by :mod:`recallscope.models.forward`, which
needs it split into q/k/v/o to reuse cached keys and values and to patch heads.

Each family has an adapter in :mod:`recallscope.models.adapters` (the table is
:data:`recallscope.models.adapters.ADAPTERS`); a model of any other architecture raises
:class:`UnsupportedArchitectureError` (never a guess), and the hook engine runs it instead. Every edit
point of :mod:`recallscope.models.forward` holds the tensor of the TransformerBridge hook of the same
name (``tests/test_arch_matrix.py`` checks this per family against the bridge's cache).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.errors import RecallscopeError

Fn = Callable[[Tensor], Tensor]
Rope = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


class UnsupportedArchitectureError(RecallscopeError):
    """The fast engine does not know this architecture; use the hook-based reference path."""


@dataclass(frozen=True)
class LayerParts:
    """The callables of one block. ``q``/``k``/``v`` map [.., d_model] to [.., heads * d_head].

    The optional parts are the extras of some families; each defaults to "absent":
    ``q_norm``/``k_norm`` act on q/k [batch, pos, head, d_head] after the ``q``/``k`` edit points and
    before rotary (Qwen3, Gemma-3, OLMo-2); ``post_attn``/``post_mlp`` normalise the attention / MLP
    output before it is added to the residual, and ``attn_out``/``mlp_out`` are after them, like the
    bridge's hooks (Gemma-2/3, OLMo-2); ``window`` is a sliding-window length (a key ``s`` is seen from
    query ``t`` when ``t - window < s <= t``); ``softcap`` caps the attention scores as
    ``softcap * tanh(scores / softcap)`` before the mask; ``rope`` replaces the stack's rotary for this
    layer (Gemma-3's local layers); ``qkv`` computes q, k and v in one fused matmul.
    """

    ln1: Fn
    q: Fn
    k: Fn
    v: Fn
    o: Fn
    ln2: Fn | None
    mlp: Fn | None
    q_norm: Fn | None = None
    k_norm: Fn | None = None
    post_attn: Fn | None = None
    post_mlp: Fn | None = None
    window: int | None = None
    softcap: float | None = None
    rope: Rope | None = None
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]] | None = None
    """A fused projection computing ``(q(x), k(x), v(x))`` at once (used by the forward pass when given)."""


@dataclass(frozen=True)
class Stack:
    """A decoder-only transformer as callables plus shape facts."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    n_ctx: int
    attn_scale: float
    embed_tokens: Callable[[Tensor], Tensor]
    embed_pos: Callable[[Tensor], Tensor] | None
    rope: Rope | None
    """``rope(q, k, positions)`` with q/k of shape [batch, heads, pos, d_head] and positions [pos]."""
    layers: tuple[LayerParts, ...]
    final_norm: Fn
    unembed: Fn
    """Final residual (after ``final_norm``) to logits, including a final logit softcap if any."""
    parallel_attn_mlp: bool = False
    family: str = ""
    """The architecture the adapter was built for (``Qwen3ForCausalLM``, ``native``, ...)."""
    scale_queries: bool = False
    """The scale multiplies q before the product q k^T (OPT) instead of the product (same in exact arithmetic)."""
    scores_fp32: bool = False
    """Attention scores are computed from q and k upcast to float32 (GPT-J), whatever the model dtype."""
    final_softcap: float | None = None
    """Gemma-2's final logit softcap (already applied inside ``unembed``): logits are then not linear
    in the final residual."""

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        x = self.embed_tokens(tokens)
        if self.embed_pos is not None:
            x = x + self.embed_pos(positions)
        return x

    def rope_at(self, layer: int) -> Rope | None:
        """The rotary embedding that ``layer`` uses."""
        own = self.layers[layer].rope
        return own if own is not None else self.rope

    def attention_extras(self) -> list[str]:
        """What this model's attention does beyond ``softmax(q k^T * scale + causal mask) v`` with one
        rotary for every layer (for methods that recompute attention scores from recorded q and k)."""
        found = []
        if any(lp.q_norm is not None or lp.k_norm is not None for lp in self.layers):
            found.append("q/k norms")
        if any(lp.softcap is not None for lp in self.layers):
            found.append("attention-score softcapping")
        if any(lp.window is not None for lp in self.layers):
            found.append("sliding-window attention")
        if any(lp.rope is not None for lp in self.layers):
            found.append("per-layer rotary embeddings")
        return found

    def post_norms(self) -> list[str]:
        """Norms between a sublayer and the residual: the residual is then not a sum of per-head and
        per-MLP outputs computed from z and W_O (for DLA and edge attribution)."""
        found = []
        if any(lp.post_attn is not None for lp in self.layers):
            found.append("a norm after attention (heads do not add up to the attention output)")
        if any(lp.post_mlp is not None for lp in self.layers):
            found.append("a norm after the MLP")
        return found

    def require(self, method: str, *, attention: bool = False, post_norms: bool = False,
                linear_logits: bool = False) -> None:
        """Raise :class:`UnsupportedArchitectureError` if ``method`` needs plain attention (``attention``,
        see :meth:`attention_extras`), no post-norms (``post_norms``) or logits linear in the final
        residual (``linear_logits``) and this model lacks them."""
        found = self.attention_extras() if attention else []
        found += self.post_norms() if post_norms else []
        if linear_logits and self.final_softcap is not None:
            found.append("a final logit softcap")
        if found:
            raise UnsupportedArchitectureError(
                f"{method} does not support {self.family or 'this model'}: it has {', '.join(found)}. "
                "Use exact activation patching (recallscope.patching), which handles this architecture.")


def unwrap(module: Any) -> Any:
    """Strip TransformerBridge wrappers to reach the original torch module."""
    while hasattr(module, "_original_component"):
        module = module._original_component
    return module


def softcapped(fn: Fn, cap: float | None) -> Fn:
    """``fn`` followed by ``cap * tanh(. / cap)`` (``fn`` itself when ``cap`` is None)."""
    if cap is None:
        return fn
    return lambda x: cap * torch.tanh(fn(x) / cap)


def build_stack(model: Any) -> Stack:
    """Build the :class:`Stack` of a TransformerBridge (cached on the bridge object).

    Raises :class:`UnsupportedArchitectureError` for an architecture without an adapter in
    :data:`recallscope.models.adapters.ADAPTERS`, or with a setting its adapter does not handle.
    """
    from recallscope.models.adapters import ADAPTERS

    cached = getattr(model, "_recallscope_stack", None)
    if cached is not None:
        return cached
    original = unwrap(getattr(model, "original_model", model))
    name = type(original).__name__
    builder = _native_stack if name == "NativeModel" else ADAPTERS.get(name)
    if builder is None:
        raise UnsupportedArchitectureError(
            f"recallscope's fast engine has no adapter for {name} (it knows NativeModel, "
            f"{', '.join(sorted(ADAPTERS))}). Use engine='hooks' (the TransformerLens hook path, slower "
            "but architecture-agnostic), or engine='auto', which falls back to it.")
    stack = builder(original)
    model._recallscope_stack = stack
    return stack


def cap_value(value: Any) -> float | None:
    """A softcap setting as a float, or None when disabled (None, 0 or negative, as in TransformerLens)."""
    return float(value) if value is not None and float(value) > 0 else None


def _native_stack(m: Any) -> Stack:
    cfg = m.cfg
    if getattr(cfg, "attention_dir", "causal") != "causal":
        raise UnsupportedArchitectureError(
            f"the fast engine runs causal decoders; this native model has attention_dir={cfg.attention_dir!r}. "
            "Use engine='hooks'.")
    layers = []
    for block in m.layers:
        b = unwrap(block)
        attn = unwrap(b.attn)
        mlp = unwrap(b.mlp) if not cfg.attn_only else None
        layers.append(LayerParts(
            ln1=unwrap(b.ln1), q=unwrap(attn.q), k=unwrap(attn.k), v=unwrap(attn.v), o=unwrap(attn.o),
            ln2=unwrap(b.ln2) if mlp is not None else None, mlp=mlp, softcap=cap_value(attn.attn_scores_soft_cap),
        ))
    first_attn = unwrap(unwrap(m.layers[0]).attn)
    rotary = unwrap(m.rotary) if m.rotary is not None else None
    rope = None
    if rotary is not None:
        def rope(q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
            return rotary.apply_rope(q, k, position_ids=positions.unsqueeze(0).expand(q.shape[0], -1))
    pos = unwrap(m.pos) if m.pos is not None else None
    cap = cap_value(m.output_logits_soft_cap)
    return Stack(
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_key_value_heads or cfg.n_heads,
        d_head=cfg.d_head, d_model=cfg.d_model, d_vocab=unwrap(m.head).out_features, n_ctx=cfg.n_ctx,
        attn_scale=1.0 / first_attn.scale, embed_tokens=unwrap(m.tok_embed), embed_pos=pos, rope=rope,
        layers=tuple(layers), final_norm=unwrap(m.ln_out), unembed=softcapped(unwrap(m.head), cap),
        family="native", final_softcap=cap,
    )


def split_linear(linear: Any, rows: list[Any]) -> list[Fn]:
    """Callables ``x -> x W[r]^T + b[r]`` for each row slice ``r`` of a fused ``nn.Linear`` (Phi-3's
    qkv_proj); the weights are views, not copies."""
    def row_fn(w: Tensor, b: Tensor | None) -> Fn:
        return lambda x: torch.nn.functional.linear(x, w, b)

    return [row_fn(linear.weight[r], linear.bias[r] if linear.bias is not None else None) for r in rows]


def conv1d_split(conv: Any, n: int) -> list[Fn]:
    """Split a GPT-2 Conv1D (y = x W + b, W: [in, n*out]) into ``n`` linear callables."""
    weights = conv.weight.chunk(n, dim=1)
    biases = conv.bias.chunk(n, dim=0)
    return [lambda x, w=w, b=b: torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], -1)
            for w, b in zip(weights, biases)]


def inv_sqrt(d: int | float) -> float:
    """``1 / sqrt(d)``, the usual attention scale."""
    return 1.0 / math.sqrt(d)


def norm_gain(norm: Fn, d_model: int) -> Float[Tensor, " d_model"]:
    """The per-dimension gain ``g`` of a LayerNorm or RMSNorm ``norm`` (``norm(x) = g * x_hat + b``),
    read off the module's output rather than its ``weight``: Gemma's RMSNorm multiplies by ``1 + weight``.

    1. ``s``: a zero-mean pattern of +-1 (three entries ``1, 1, -2`` closing it when ``d_model`` is odd),
       so that centring (LayerNorm) leaves it unchanged and its rms equals its std.
    2. ``g = (norm(c s) - norm(-c s)) / 2 * rms(s) / s`` with ``c`` large (eps negligible); the bias cancels.
    The input is in the module's parameter dtype; the gain is returned in float32.
    """
    s = torch.tensor([1.0, -1.0]).repeat(d_model // 2 + 1)[:d_model].clone()
    if d_model % 2:
        s[-3:] = torch.tensor([1.0, 1.0, -2.0])
    rms = s.pow(2).mean().sqrt()
    params = getattr(norm, "parameters", None)
    dtype = next(iter(params()), torch.ones(())).dtype if callable(params) else torch.float32
    c = 1e3
    with torch.no_grad():
        plus = norm((c * s).to(dtype)[None]).float()[0]
        minus = norm((-c * s).to(dtype)[None]).float()[0]
    return (plus - minus) / 2 * rms / s


def embedding_output_scale(embed_tokens: Fn) -> float:
    """The factor an embedding module applies to its weight rows (Gemma: ``sqrt(d_model)``; others 1)."""
    weight = getattr(embed_tokens, "weight", None)
    if weight is None:
        return 1.0
    ids = torch.arange(min(int(weight.shape[0]), 256))
    with torch.no_grad():
        out = embed_tokens(ids).float()
    raw = weight.detach()[ids].float()
    return float(out.norm() / raw.norm().clamp_min(1e-30))
