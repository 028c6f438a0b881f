"""An architecture-neutral view of a decoder-only transformer, for recallscope's fast engines.

A :class:`Stack` exposes a model as plain callables (embed, per-layer norms/projections/MLP, rotary,
final norm, unembed) taken from the model's *own* modules, so norms, MLPs and rotary embeddings keep
the model's exact numerics. Only attention is recomputed by :mod:`recallscope.models.forward`, which
needs it split into q/k/v/o to reuse cached keys and values and to patch heads.

Supported families: TransformerLens-native models (``boot_native``), Hugging Face Llama-style models
(Llama, Qwen2, Mistral, SmolLM2: ``model.layers[i].self_attn.{q,k,v,o}_proj``) and GPT-2. Other
architectures raise :class:`UnsupportedArchitectureError`; the hook-based reference path still works.
"""

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from recallscope.errors import RecallscopeError

Fn = Callable[[Tensor], Tensor]
Rope = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


class UnsupportedArchitectureError(RecallscopeError):
    """The fast engine does not know this architecture; use the hook-based reference path."""


@dataclass(frozen=True)
class LayerParts:
    """The callables of one block. ``q``/``k``/``v`` map [.., d_model] to [.., heads * d_head]."""

    ln1: Fn
    q: Fn
    k: Fn
    v: Fn
    o: Fn
    ln2: Fn | None
    mlp: Fn | None


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
    parallel_attn_mlp: bool = False

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        x = self.embed_tokens(tokens)
        if self.embed_pos is not None:
            x = x + self.embed_pos(positions)
        return x


def unwrap(module: Any) -> Any:
    """Strip TransformerBridge wrappers to reach the original torch module."""
    while hasattr(module, "_original_component"):
        module = module._original_component
    return module


def build_stack(model: Any) -> Stack:
    """Build the :class:`Stack` of a TransformerBridge (cached on the bridge object)."""
    cached = getattr(model, "_recallscope_stack", None)
    if cached is not None:
        return cached
    original = unwrap(getattr(model, "original_model", model))
    name = type(original).__name__
    if name == "NativeModel":
        stack = _native_stack(original)
    elif name == "GPT2LMHeadModel":
        stack = _gpt2_stack(original)
    elif hasattr(original, "model") and hasattr(unwrap(original.model), "layers"):
        stack = _llama_like_stack(original)
    else:
        raise UnsupportedArchitectureError(
            f"recallscope's fast engine does not support {name}. Use engine='hooks' (the TransformerLens "
            "hook path, slower but architecture-agnostic), or add an adapter in recallscope.models.stack."
        )
    model._recallscope_stack = stack
    return stack


def _native_stack(m: Any) -> Stack:
    cfg = m.cfg
    layers = []
    for block in m.layers:
        b = unwrap(block)
        attn = unwrap(b.attn)
        mlp = unwrap(b.mlp) if not cfg.attn_only else None
        layers.append(LayerParts(
            ln1=unwrap(b.ln1), q=unwrap(attn.q), k=unwrap(attn.k), v=unwrap(attn.v), o=unwrap(attn.o),
            ln2=unwrap(b.ln2) if mlp is not None else None, mlp=mlp,
        ))
    first_attn = unwrap(unwrap(m.layers[0]).attn)
    rotary = unwrap(m.rotary) if m.rotary is not None else None
    rope = None
    if rotary is not None:
        def rope(q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
            return rotary.apply_rope(q, k, position_ids=positions.unsqueeze(0).expand(q.shape[0], -1))
    pos = unwrap(m.pos) if m.pos is not None else None
    return Stack(
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_key_value_heads or cfg.n_heads,
        d_head=cfg.d_head, d_model=cfg.d_model, d_vocab=unwrap(m.head).out_features, n_ctx=cfg.n_ctx,
        attn_scale=1.0 / first_attn.scale, embed_tokens=unwrap(m.tok_embed), embed_pos=pos, rope=rope,
        layers=tuple(layers), final_norm=unwrap(m.ln_out), unembed=unwrap(m.head),
    )


def _llama_like_stack(m: Any) -> Stack:
    inner = unwrap(m.model)
    cfg = m.config
    n_heads = cfg.num_attention_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    layers = []
    for layer in inner.layers:
        layer = unwrap(layer)
        attn = unwrap(layer.self_attn)
        layers.append(LayerParts(
            ln1=unwrap(layer.input_layernorm), q=unwrap(attn.q_proj), k=unwrap(attn.k_proj),
            v=unwrap(attn.v_proj), o=unwrap(attn.o_proj), ln2=unwrap(layer.post_attention_layernorm),
            mlp=unwrap(layer.mlp),
        ))
    first_attn = unwrap(unwrap(inner.layers[0]).self_attn)
    apply_rope = sys.modules[type(first_attn).__module__].apply_rotary_pos_emb
    rotary = unwrap(inner.rotary_emb)

    def rope(q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = rotary(q, positions.unsqueeze(0))  # on the rotary module's device
        return apply_rope(q, k, cos.to(q.device), sin.to(q.device))

    return Stack(
        n_layers=len(layers), n_heads=n_heads, n_kv_heads=getattr(cfg, "num_key_value_heads", n_heads),
        d_head=d_head, d_model=cfg.hidden_size, d_vocab=cfg.vocab_size,
        n_ctx=getattr(cfg, "max_position_embeddings", 2048), attn_scale=float(first_attn.scaling),
        embed_tokens=unwrap(inner.embed_tokens), embed_pos=None, rope=rope, layers=tuple(layers),
        final_norm=unwrap(inner.norm), unembed=unwrap(m.lm_head),
    )


def _conv1d_split(conv: Any, n: int) -> list[Fn]:
    """Split a GPT-2 Conv1D (y = x W + b, W: [in, n*out]) into ``n`` linear callables."""
    weights = conv.weight.chunk(n, dim=1)
    biases = conv.bias.chunk(n, dim=0)
    return [lambda x, w=w, b=b: torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], -1)
            for w, b in zip(weights, biases)]


def _gpt2_stack(m: Any) -> Stack:
    tr = unwrap(m.transformer)
    cfg = m.config
    d_head = cfg.n_embd // cfg.n_head
    layers = []
    for block in tr.h:
        block = unwrap(block)
        attn = unwrap(block.attn)
        q, k, v = _conv1d_split(unwrap(attn.c_attn), 3)
        (o,) = _conv1d_split(unwrap(attn.c_proj), 1)
        layers.append(LayerParts(ln1=unwrap(block.ln_1), q=q, k=k, v=v, o=o, ln2=unwrap(block.ln_2),
                                 mlp=unwrap(block.mlp)))
    return Stack(
        n_layers=cfg.n_layer, n_heads=cfg.n_head, n_kv_heads=cfg.n_head, d_head=d_head, d_model=cfg.n_embd,
        d_vocab=cfg.vocab_size, n_ctx=cfg.n_positions, attn_scale=1.0 / math.sqrt(d_head),
        embed_tokens=unwrap(tr.wte), embed_pos=unwrap(tr.wpe), rope=None, layers=tuple(layers),
        final_norm=unwrap(tr.ln_f), unembed=unwrap(m.lm_head),
    )
