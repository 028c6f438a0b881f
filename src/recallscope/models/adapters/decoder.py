"""Adapters for Hugging Face decoders laid out as ``model.layers[i].{input_layernorm, self_attn, mlp}``.

Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma-2, Gemma-3 (text), Phi-3 and OLMo-2 share that layout and
differ in a few parts, written down per family in :data:`SPECS`: which norm feeds the MLP, post-norms
after attention and MLP (Gemma-2/3, OLMo-2: ``post_attention_layernorm`` is then a post-norm), q/k
norms per head (Qwen3, Gemma-3) or over the whole projection (OLMo-2), sliding windows, attention-score
and final-logit softcapping (Gemma-2), rotary per layer type (Gemma-3) and a fused qkv projection
(Phi-3). Every part is the model's own module, so the numerics stay the model's.
"""

import sys
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from recallscope.models.stack import (
    Fn, LayerParts, Rope, Stack, UnsupportedArchitectureError, cap_value, softcapped, split_linear, unwrap,
)


@dataclass(frozen=True)
class Spec:
    """How one family differs from Llama (see the module docstring)."""

    pre_mlp: str | None = "post_attention_layernorm"
    """The norm before the MLP (None: the MLP reads the residual directly)."""
    input_norm: bool = True
    """Whether a norm (``input_layernorm``) precedes attention."""
    post_attn: str | None = None
    post_mlp: str | None = None
    qk_norm: Literal["head", "flat"] | None = None
    """``head``: RMSNorm over each head's d_head; ``flat``: over the whole projection (OLMo-2)."""
    window: Literal["attn", "config"] | None = None
    """Where the sliding window is read: the attention module's ``sliding_window`` (per layer) or the
    config's (every layer)."""
    softcap: bool = False
    """The attention module's ``attn_logit_softcapping`` is applied (Gemma-2; Gemma-3 ignores it)."""
    fused_qkv: bool = False
    rope_by_layer_type: bool = False
    final_softcap: bool = False


_POST = dict(post_attn="post_attention_layernorm", post_mlp="post_feedforward_layernorm")
SPECS: dict[str, Spec] = {
    "LlamaForCausalLM": Spec(),
    "Qwen2ForCausalLM": Spec(window="attn"),
    "Qwen3ForCausalLM": Spec(qk_norm="head", window="attn"),
    "MistralForCausalLM": Spec(window="config"),
    "GemmaForCausalLM": Spec(),
    "Gemma2ForCausalLM": Spec(pre_mlp="pre_feedforward_layernorm", window="attn", softcap=True,
                              final_softcap=True, **_POST),
    "Gemma3ForCausalLM": Spec(pre_mlp="pre_feedforward_layernorm", qk_norm="head", window="attn",
                              rope_by_layer_type=True, final_softcap=True, **_POST),
    "Phi3ForCausalLM": Spec(window="config", fused_qkv=True),
    "Olmo2ForCausalLM": Spec(pre_mlp=None, input_norm=False, qk_norm="flat", **_POST),
}


def _identity(x: Tensor) -> Tensor:
    return x


def _flat_norm(norm: Any) -> Fn:
    """A norm over the whole projection, applied to q/k of shape [.., head, d_head]."""
    return lambda x: norm(x.flatten(-2)).view(x.shape)


def _qkv(attn: Any, spec: Spec, n_heads: int, n_kv: int, d_head: int) -> tuple[Fn, Fn, Fn, Any]:
    if not spec.fused_qkv:
        return unwrap(attn.q_proj), unwrap(attn.k_proj), unwrap(attn.v_proj), None
    fused = unwrap(attn.qkv_proj)
    nq, nk = n_heads * d_head, n_kv * d_head
    q, k, v = split_linear(fused, [slice(0, nq), slice(nq, nq + nk), slice(nq + nk, nq + 2 * nk)])

    def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(fused(x).split([nq, nk, nk], dim=-1))

    return q, k, v, qkv


def _window(attn: Any, cfg: Any, spec: Spec) -> int | None:
    if spec.window == "attn":
        value = getattr(attn, "sliding_window", None)
    elif spec.window == "config":
        value = getattr(cfg, "sliding_window", None)
    else:
        value = None
    return int(value) if value else None


def _ropes(m: Any, inner: Any, spec: Spec) -> tuple[Rope, dict[str, Rope]]:
    """The rotary of the stack and, for Gemma-3, one per layer type."""
    first_attn = unwrap(unwrap(inner.layers[0]).self_attn)
    apply_rope = sys.modules[type(first_attn).__module__].apply_rotary_pos_emb
    rotary = unwrap(inner.rotary_emb)

    def make(*extra: Any) -> Rope:
        def rope(q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
            cos, sin = rotary(q, positions.unsqueeze(0), *extra)  # on the rotary module's device
            return apply_rope(q, k, cos.to(q.device), sin.to(q.device))
        return rope

    if not spec.rope_by_layer_type:
        return make(), {}
    return make("full_attention"), {t: make(t) for t in set(m.config.layer_types)}


def _layer(layer: Any, cfg: Any, spec: Spec, dims: tuple[int, int, int], ropes: dict[str, Rope]) -> LayerParts:
    attn = unwrap(layer.self_attn)
    if getattr(attn, "is_causal", True) is False:
        raise UnsupportedArchitectureError(f"{type(attn).__name__} is bidirectional here; the fast engine "
                                           "runs causal decoders. Use engine='hooks'.")
    q, k, v, qkv = _qkv(attn, spec, *dims)
    q_norm = k_norm = None
    if spec.qk_norm == "head":
        q_norm, k_norm = unwrap(attn.q_norm), unwrap(attn.k_norm)
    elif spec.qk_norm == "flat":
        q_norm, k_norm = _flat_norm(unwrap(attn.q_norm)), _flat_norm(unwrap(attn.k_norm))
    part = lambda name: unwrap(getattr(layer, name)) if name else None  # noqa: E731
    return LayerParts(
        ln1=unwrap(layer.input_layernorm) if spec.input_norm else _identity,
        q=q, k=k, v=v, o=unwrap(attn.o_proj), ln2=part(spec.pre_mlp) or _identity, mlp=unwrap(layer.mlp),
        q_norm=q_norm, k_norm=k_norm, post_attn=part(spec.post_attn), post_mlp=part(spec.post_mlp),
        window=_window(attn, cfg, spec), softcap=cap_value(attn.attn_logit_softcapping) if spec.softcap else None,
        rope=ropes.get(getattr(attn, "layer_type", None)) if ropes else None, qkv=qkv,
    )


def decoder_stack(m: Any) -> Stack:
    """The :class:`Stack` of a ``model.layers`` decoder whose class is in :data:`SPECS`."""
    name = type(m).__name__
    spec = SPECS[name]
    inner = unwrap(m.model)
    cfg = m.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    rope, ropes = _ropes(m, inner, spec)
    layers = tuple(_layer(unwrap(layer), cfg, spec, (n_heads, n_kv, d_head), ropes) for layer in inner.layers)
    scales = {float(unwrap(unwrap(layer).self_attn).scaling) for layer in inner.layers}
    if len(scales) != 1:
        raise UnsupportedArchitectureError(f"{name} scales attention differently per layer ({sorted(scales)}); "
                                           "the fast engine has one scale. Use engine='hooks'.")
    cap = cap_value(getattr(cfg, "final_logit_softcapping", None)) if spec.final_softcap else None
    return Stack(
        n_layers=len(layers), n_heads=n_heads, n_kv_heads=n_kv, d_head=d_head, d_model=cfg.hidden_size,
        d_vocab=cfg.vocab_size, n_ctx=getattr(cfg, "max_position_embeddings", 2048), attn_scale=scales.pop(),
        embed_tokens=unwrap(inner.embed_tokens), embed_pos=None, rope=rope, layers=layers,
        final_norm=unwrap(inner.norm), unembed=softcapped(unwrap(m.lm_head), cap), family=name,
        final_softcap=cap,
    )


DECODER_ADAPTERS = {name: decoder_stack for name in SPECS}
