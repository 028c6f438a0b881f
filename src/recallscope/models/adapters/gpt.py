"""Adapters for GPT-2, GPT-NeoX (Pythia), GPT-J and OPT.

- **GPT-2**: fused ``c_attn`` Conv1D split into q/k/v; learned positions.
- **GPT-NeoX**: fused ``query_key_value`` whose output is laid out per head as ``[head, (q|k|v), d_head]``;
  partial rotary (the model's own ``apply_rotary_pos_emb`` rotates the first ``rotary_ndims``); parallel
  attention and MLP with separate norms when ``use_parallel_residual``.
- **GPT-J**: parallel attention and MLP reading one shared norm (``ln_1``); rotary on the first
  ``rotary_dim`` features with interleaved pairs (``rotate_every_two``).
- **OPT**: learned positions offset by 2; ReLU MLP ``fc2(act(fc1(x)))``; pre-norm checkpoints only.
"""

import sys
from typing import Any

import torch
from torch import Tensor

from recallscope.models.stack import (
    Fn, LayerParts, Rope, Stack, UnsupportedArchitectureError, conv1d_split, inv_sqrt, unwrap,
)


def _refuse(name: str, setting: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(f"the fast engine's {name} adapter does not reproduce {setting}; "
                                        "use engine='hooks' (or engine='auto', which falls back to it).")


def gpt2_stack(m: Any) -> Stack:
    tr = unwrap(m.transformer)
    cfg = m.config
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or not getattr(cfg, "scale_attn_weights", True):
        raise _refuse("GPT-2", "scale_attn_by_inverse_layer_idx / scale_attn_weights=False")
    d_head = cfg.n_embd // cfg.n_head
    layers = []
    for block in tr.h:
        block = unwrap(block)
        attn = unwrap(block.attn)
        q, k, v = conv1d_split(unwrap(attn.c_attn), 3)
        (o,) = conv1d_split(unwrap(attn.c_proj), 1)
        layers.append(LayerParts(ln1=unwrap(block.ln_1), q=q, k=k, v=v, o=o, ln2=unwrap(block.ln_2),
                                 mlp=unwrap(block.mlp)))
    return Stack(
        n_layers=cfg.n_layer, n_heads=cfg.n_head, n_kv_heads=cfg.n_head, d_head=d_head, d_model=cfg.n_embd,
        d_vocab=cfg.vocab_size, n_ctx=cfg.n_positions, attn_scale=inv_sqrt(d_head),
        embed_tokens=unwrap(tr.wte), embed_pos=unwrap(tr.wpe), rope=None, layers=tuple(layers),
        final_norm=unwrap(tr.ln_f), unembed=unwrap(m.lm_head), family=type(m).__name__,
    )


def _neox_qkv(fused: Any, n_heads: int, d_head: int) -> tuple[Fn, Fn, Fn, Any]:
    """Split GPT-NeoX's ``query_key_value`` ([.., head * 3 * d_head], per head q|k|v) into q, k, v.
    The forward pass uses the fused ``qkv``; the single projections (read once by attribution) run it
    and keep their part, so no weight is copied."""
    def qkv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = fused(x).unflatten(-1, (n_heads, 3, d_head))
        return out[..., 0, :].flatten(-2), out[..., 1, :].flatten(-2), out[..., 2, :].flatten(-2)

    q, k, v = (lambda x, i=i: qkv(x)[i] for i in range(3))
    return q, k, v, qkv


def _hf_rope(rotary: Any, apply_rope: Any) -> Rope:
    def rope(q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = rotary(q, positions.unsqueeze(0))
        return apply_rope(q, k, cos.to(q.device), sin.to(q.device))
    return rope


def neox_stack(m: Any) -> Stack:
    tr = unwrap(m.gpt_neox)
    cfg = m.config
    n_heads, d = cfg.num_attention_heads, cfg.hidden_size
    d_head = d // n_heads
    layers = []
    for layer in tr.layers:
        layer = unwrap(layer)
        attn = unwrap(layer.attention)
        q, k, v, qkv = _neox_qkv(unwrap(attn.query_key_value), n_heads, d_head)
        layers.append(LayerParts(ln1=unwrap(layer.input_layernorm), q=q, k=k, v=v, o=unwrap(attn.dense),
                                 ln2=unwrap(layer.post_attention_layernorm), mlp=unwrap(layer.mlp), qkv=qkv))
    first = unwrap(unwrap(tr.layers[0]).attention)
    apply_rope = sys.modules[type(first).__module__].apply_rotary_pos_emb
    return Stack(
        n_layers=len(layers), n_heads=n_heads, n_kv_heads=n_heads, d_head=d_head, d_model=d,
        d_vocab=cfg.vocab_size, n_ctx=cfg.max_position_embeddings, attn_scale=float(first.scaling),
        embed_tokens=unwrap(tr.embed_in), embed_pos=None, rope=_hf_rope(unwrap(tr.rotary_emb), apply_rope),
        layers=tuple(layers), final_norm=unwrap(tr.final_layer_norm), unembed=unwrap(getattr(m, "lm_head", None) or m.embed_out),
        parallel_attn_mlp=bool(cfg.use_parallel_residual), family=type(m).__name__,
    )


def _gptj_sincos(tr: Any, first_attn: Any) -> Any:
    """``(x, position_ids) -> (sin, cos)`` of GPT-J: the model's rotary module (transformers >= 5.2x) or,
    in earlier versions, the attention's own ``embed_positions`` table ([pos, rotary_dim] = sin | cos)."""
    rotary = getattr(tr, "rotary_emb", None)
    if rotary is not None:
        return unwrap(rotary)
    table = getattr(first_attn, "embed_positions", None)
    if table is None:
        raise _refuse("GPT-J", "this transformers version's rotary embedding (no rotary_emb or embed_positions)")

    def sincos(x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        rows = table.to(x.device)[position_ids].to(x.dtype)
        return torch.split(rows, rows.shape[-1] // 2, dim=-1)

    return sincos


def _gptj_rope(rotary: Any, apply_rope: Any, rotary_dim: int | None) -> Rope:
    """GPT-J's rotary on q/k [batch, head, pos, d_head]: the model's own function, which works on
    [batch, pos, head, d_head], on the first ``rotary_dim`` features."""
    def rope(q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        sin, cos = rotary(q, positions.unsqueeze(0))
        sin, cos = sin.to(q.device), cos.to(q.device)

        def one(x: Tensor) -> Tensor:
            x = x.transpose(1, 2)
            rd = rotary_dim or x.shape[-1]
            x = torch.cat([apply_rope(x[..., :rd], sin, cos), x[..., rd:]], dim=-1)
            return x.transpose(1, 2)

        return one(q), one(k)
    return rope


def gptj_stack(m: Any) -> Stack:
    tr = unwrap(m.transformer)
    cfg = m.config
    n_heads, d = cfg.n_head, cfg.n_embd
    d_head = d // n_heads
    layers = []
    for block in tr.h:
        block = unwrap(block)
        attn = unwrap(block.attn)
        ln = unwrap(block.ln_1)  # attention and MLP both read ln_1(x)
        layers.append(LayerParts(ln1=ln, q=unwrap(attn.q_proj), k=unwrap(attn.k_proj), v=unwrap(attn.v_proj),
                                 o=unwrap(attn.out_proj), ln2=ln, mlp=unwrap(block.mlp)))
    first = unwrap(unwrap(tr.h[0]).attn)
    apply_rope = sys.modules[type(first).__module__].apply_rotary_pos_emb
    scale = getattr(first, "scaling", None) or inv_sqrt(d_head)  # older transformers: no `scaling`
    return Stack(
        n_layers=len(layers), n_heads=n_heads, n_kv_heads=n_heads, d_head=d_head, d_model=d,
        d_vocab=cfg.vocab_size, n_ctx=cfg.n_positions, attn_scale=float(scale),
        embed_tokens=unwrap(tr.wte), embed_pos=None,
        rope=_gptj_rope(_gptj_sincos(tr, first), apply_rope, first.rotary_dim), layers=tuple(layers),
        final_norm=unwrap(tr.ln_f), unembed=unwrap(m.lm_head), parallel_attn_mlp=True, family=type(m).__name__,
        scores_fp32=True,
    )


def opt_stack(m: Any) -> Stack:
    dec = unwrap(unwrap(m.model).decoder)
    cfg = m.config
    if not cfg.do_layer_norm_before or dec.project_in is not None or dec.project_out is not None \
            or dec.final_layer_norm is None:
        raise _refuse("OPT", "post-norm OPT (do_layer_norm_before=False, OPT-350m) or project_in/project_out")
    n_heads, d = cfg.num_attention_heads, cfg.hidden_size
    d_head = d // n_heads
    layers = []
    for layer in dec.layers:
        layer = unwrap(layer)
        attn = unwrap(layer.self_attn)
        fc1, fc2, act = unwrap(layer.fc1), unwrap(layer.fc2), layer.activation_fn
        layers.append(LayerParts(
            ln1=unwrap(layer.self_attn_layer_norm), q=unwrap(attn.q_proj), k=unwrap(attn.k_proj),
            v=unwrap(attn.v_proj), o=unwrap(attn.out_proj), ln2=unwrap(layer.final_layer_norm),
            mlp=lambda x, fc1=fc1, fc2=fc2, act=act: fc2(act(fc1(x))),
        ))
    positions = unwrap(dec.embed_positions)

    def embed_pos(pos: Tensor) -> Tensor:
        return torch.nn.functional.embedding(pos + positions.offset, positions.weight)

    return Stack(
        n_layers=len(layers), n_heads=n_heads, n_kv_heads=n_heads, d_head=d_head, d_model=d,
        d_vocab=cfg.vocab_size, n_ctx=cfg.max_position_embeddings, attn_scale=inv_sqrt(d_head),
        embed_tokens=unwrap(dec.embed_tokens), embed_pos=embed_pos, rope=None, layers=tuple(layers),
        final_norm=unwrap(dec.final_layer_norm), unembed=unwrap(m.lm_head), family=type(m).__name__,
        scale_queries=True,
    )


GPT_ADAPTERS = {"GPT2LMHeadModel": gpt2_stack, "GPTNeoXForCausalLM": neox_stack, "GPTJForCausalLM": gptj_stack,
                "OPTForCausalLM": opt_stack}
