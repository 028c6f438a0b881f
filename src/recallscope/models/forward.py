"""A functional forward pass over a :class:`~recallscope.models.stack.Stack`, built for patching.

What it adds over ``model(tokens)``:

1. **Start anywhere.** ``forward(stack, x, start_layer=L, pos0=p, past=...)`` runs blocks ``L..`` on
   positions ``p..`` only, taking keys/values of positions ``< p`` from ``past`` (a reference run).
   In a causal model that is exact when nothing before position ``p`` / below layer ``L`` changed.
2. **Edits at every activation.** ``edit(point, layer, tensor) -> tensor`` sees each activation in
   TransformerLens layout and may replace it: points are ``resid_pre, q, k, v, scores, pattern, z,
   attn_out, resid_mid, mlp_out, resid_post``. Attention knockout edits ``scores``.
3. **Recording.** ``record`` names the points to keep; keys/values are always kept per layer so a
   later partial run can reuse them.
4. **Partial unembedding.** ``read_pos`` picks the positions whose logits are computed.

Each point holds what the TransformerBridge hook of the same name holds for that architecture: ``q``/``k``
are the projections before q/k norms and rotary; ``attn_out``/``mlp_out`` are what is added to the
residual (after Gemma-2's and OLMo-2's post-norms); parallel blocks (GPT-NeoX, GPT-J) have no
``resid_mid``.

Layouts (TransformerLens): resid-like ``[batch, pos, d_model]``; q/z ``[batch, pos, head, d_head]``;
k/v ``[batch, pos, kv_head, d_head]``; scores/pattern ``[batch, head, dest_pos, src_pos]``.
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.models.stack import Stack
from recallscope.scale.devices import layer_device

Edit = Callable[[str, int, Tensor], Tensor]
POINTS = ("resid_pre", "q", "k", "v", "scores", "pattern", "z", "attn_out", "resid_mid", "mlp_out",
          "resid_post")


@dataclass
class Trace:
    """Activations of one run. ``acts[(point, layer)]`` in TransformerLens layout; ``kv[layer]`` =
    post-rotary keys and values ``[batch, kv_head, pos, d_head]`` covering all positions run so far."""

    acts: dict[tuple[str, int], Tensor] = field(default_factory=dict)
    kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def __getitem__(self, key: tuple[str, int]) -> Tensor:
        return self.acts[key]


def _identity(point: str, layer: int, t: Tensor) -> Tensor:
    return t


def attention(
    stack: Stack, layer: int, h: Tensor, positions: Tensor, past: tuple[Tensor, Tensor] | None,
    edit: Edit, keep: Callable[[str, Tensor], None],
) -> tuple[Tensor, Tensor, Tensor]:
    """One attention sublayer on normalised input ``h``. Returns (attn_out, keys, values)."""
    lp = stack.layers[layer]
    b, s, _ = h.shape
    q, k, v = lp.qkv(h) if lp.qkv is not None else (lp.q(h), lp.k(h), lp.v(h))
    q = q.reshape(b, s, stack.n_heads, stack.d_head)
    k = k.reshape(b, s, stack.n_kv_heads, stack.d_head)
    v = v.reshape(b, s, stack.n_kv_heads, stack.d_head)
    z, k, v = attend(stack, layer, q, k, v, positions, past, edit, keep)
    out = lp.o(z.reshape(b, s, stack.n_heads * stack.d_head))
    if lp.post_attn is not None:
        out = lp.post_attn(out)
    return out, k, v


def attend(
    stack: Stack, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor,
    past: tuple[Tensor, Tensor] | None, edit: Edit, keep: Callable[[str, Tensor], None],
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention from projected ``q`` [batch, pos, head, d_head] and ``k``/``v`` [batch, pos, kv_head,
    d_head] (before q/k norms and rotary). Returns (z [batch, pos, head, d_head], keys after norm and
    rotary, values). Scores are scaled, softcapped (if the layer has a softcap), then masked (causal,
    and the layer's sliding window) before the ``scores`` edit point."""
    b = q.shape[0]
    # q and k are edited and recorded before rotary, like TransformerLens's hook_q / hook_k.
    q = edit("q", layer, q)
    k = edit("k", layer, k)
    v = edit("v", layer, v)
    keep("q", q)
    keep("k", k)
    keep("v", v)
    lp = stack.layers[layer]
    if lp.q_norm is not None:  # after hook_q, like the bridge (its hook_q is the projection's output)
        q = lp.q_norm(q)
    if lp.k_norm is not None:
        k = lp.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    rope = stack.rope_at(layer)
    if rope is not None:
        q, k = rope(q, k, positions)
    if past is not None:
        k = torch.cat([past[0].expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([past[1].expand(b, -1, -1, -1), v], dim=2)
    rep = stack.n_heads // stack.n_kv_heads
    kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
    vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
    if stack.scores_fp32:
        scores = torch.matmul(q.float(), kk.float().transpose(-1, -2)) * stack.attn_scale
    elif stack.scale_queries:
        scores = torch.matmul(q * stack.attn_scale, kk.transpose(-1, -2))
    else:
        scores = torch.matmul(q, kk.transpose(-1, -2)) * stack.attn_scale
    if lp.softcap is not None:
        scores = lp.softcap * torch.tanh(scores / lp.softcap)
    key_pos = torch.arange(kk.shape[2], device=q.device)
    masked = key_pos[None, :] > positions[:, None]
    if lp.window is not None:
        masked = masked | (key_pos[None, :] <= positions[:, None] - lp.window)
    scores = edit("scores", layer, scores.masked_fill(masked, float("-inf")))
    keep("scores", scores)
    pattern = edit("pattern", layer, torch.softmax(scores.float(), dim=-1).to(v.dtype))
    keep("pattern", pattern)
    z = edit("z", layer, torch.matmul(pattern, vv).transpose(1, 2))
    keep("z", z)
    return z, k, v


def block(
    stack: Stack, layer: int, x: Tensor, positions: Tensor, past: tuple[Tensor, Tensor] | None,
    edit: Edit, keep: Callable[[str, Tensor], None],
) -> tuple[Tensor, Tensor, Tensor]:
    """One transformer block on residual ``x`` at ``positions``. Returns (resid_post, keys, values)."""
    lp = stack.layers[layer]
    dev = layer_device(stack, layer)  # a model spread over devices: move the residual to this block
    if dev is not None:
        x, positions = x.to(dev), positions.to(dev)
    x = edit("resid_pre", layer, x)
    keep("resid_pre", x)
    attn_out, k, v = attention(stack, layer, lp.ln1(x), positions, past, edit, keep)
    attn_out = edit("attn_out", layer, attn_out)
    keep("attn_out", attn_out)
    if stack.parallel_attn_mlp:
        mlp_in, resid_mid = x, x + attn_out
    else:
        resid_mid = edit("resid_mid", layer, x + attn_out)
        keep("resid_mid", resid_mid)
        mlp_in = resid_mid
    if lp.mlp is not None:
        mlp_out = lp.mlp(lp.ln2(mlp_in))
        if lp.post_mlp is not None:
            mlp_out = lp.post_mlp(mlp_out)
        mlp_out = edit("mlp_out", layer, mlp_out)
        keep("mlp_out", mlp_out)
        # parallel blocks add (attn + mlp) + x, in the order of GPT-NeoX and GPT-J (it matters in bf16)
        x = (attn_out + mlp_out) + x if stack.parallel_attn_mlp else resid_mid + mlp_out
    else:
        x = resid_mid
    x = edit("resid_post", layer, x)
    keep("resid_post", x)
    return x, k, v


def forward(
    stack: Stack,
    x: Float[Tensor, "batch pos d_model"],
    *,
    start_layer: int = 0,
    pos0: int = 0,
    past: dict[int, tuple[Tensor, Tensor]] | None = None,
    edit: Edit | None = None,
    record: frozenset[str] | set[str] = frozenset(),
    read_pos: Int[Tensor, " read"] | None = None,
    unembed: bool = True,
) -> tuple[Tensor, Trace]:
    """Run blocks ``start_layer..`` on residual ``x`` at positions ``pos0..``; see the module doc.

    Returns the logits at ``read_pos`` (absolute positions, default: every run position) — or the
    final residual when ``unembed`` is False — and the :class:`Trace`.
    """
    edit = edit or _identity
    trace = Trace()
    positions = torch.arange(pos0, pos0 + x.shape[1], device=x.device)
    for layer in range(start_layer, stack.n_layers):

        def keep(point: str, t: Tensor, layer: int = layer) -> None:
            if point in record:
                trace.acts[(point, layer)] = t

        x, k, v = block(stack, layer, x, positions, past.get(layer) if past else None, edit, keep)
        trace.kv[layer] = (k, v)
    if read_pos is not None:
        x = x[:, read_pos - pos0]
    if not unembed:
        return x, trace
    return stack.unembed(stack.final_norm(x)), trace


def run(
    stack: Stack, tokens: Int[Tensor, "batch pos"], *, edit: Edit | None = None,
    record: frozenset[str] | set[str] = frozenset(), read_pos: Int[Tensor, " read"] | None = None,
    embed_edit: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Trace]:
    """Full forward from tokens. ``embed_edit`` may change the embeddings (ROME's noise)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    x = stack.embed(tokens, positions)
    if embed_edit is not None:
        x = embed_edit(x)
    return forward(stack, x, edit=edit, record=record, read_pos=read_pos)
