"""Train only a Llama-family model's upper layers, running its frozen lower layers once (the cached trunk).

When the training inputs are fixed and layers ``0 .. from_layer-1`` are frozen, their output never
changes. So:

1. :func:`cache_trunk` embeds the (left-padded) batch, builds the causal + padding mask and the rotary
   position embeddings once, runs the lower layers without gradients, and keeps the residual stream.
2. :func:`top_logits` runs only layers ``from_layer ..`` on the cached stream (with gradients where the
   upper layers have trainable parameters), applies the final norm to the last position and the
   unembedding, and returns the last-position logits. With ``from_layer = 0`` it is the full forward.

The per-step cost drops to the upper layers' forward and backward. The exactness oracle is the model's own
forward (``model(input_ids, attention_mask, position_ids).logits[:, -1]``; tested). Needs the Hugging Face
Llama layout (``model.model.{embed_tokens, layers, norm, rotary_emb}``, ``model.lm_head``): Llama,
SmolLM2, Mistral, Qwen2 and most recent decoders.
"""

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.finetune.knowledge import position_ids as positions_from_mask


@dataclass
class Trunk:
    """The frozen lower layers' output for a fixed batch, and what the upper layers need besides it."""

    hidden: Float[Tensor, "batch pos d_model"]
    attention_mask: Any
    position_embeddings: tuple[Tensor, Tensor]
    position_ids: Int[Tensor, "batch pos"]
    from_layer: int


def decoder(model: Any) -> Any:
    """The inner decoder (``model.model``) after checking the Llama layout; ConfigError naming what is missing."""
    inner = getattr(model, "model", None)
    missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(inner, n)]
    if inner is None or missing or not hasattr(model, "lm_head"):
        raise ConfigError(f"{type(model).__name__} lacks the Llama layout (missing {missing or ['model']}); the cached "
                          "trunk needs a Hugging Face *ForCausalLM with model.layers, model.rotary_emb and lm_head.")
    return inner


def _causal_mask(inner: Any, embeds: Tensor, mask: Tensor, pos: Tensor) -> Any:
    from transformers.masking_utils import create_causal_mask

    try:
        return create_causal_mask(config=inner.config, inputs_embeds=embeds, attention_mask=mask, cache=None,
                                  position_ids=pos)
    except TypeError:  # transformers 4.x names the argument past_key_values
        return create_causal_mask(config=inner.config, input_embeds=embeds, attention_mask=mask,
                                  past_key_values=None, cache_position=torch.arange(embeds.shape[1]),
                                  position_ids=pos)


def _run_layers(inner: Any, hidden: Tensor, layers: Any, mask: Any, pos_emb: tuple[Tensor, Tensor],
                pos: Tensor) -> Tensor:
    for layer in layers:
        out = layer(hidden, attention_mask=mask, position_embeddings=pos_emb, position_ids=pos)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@torch.no_grad()
def cache_trunk(model: Any, ids: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"], from_layer: int) -> Trunk:
    """Run layers ``0 .. from_layer-1`` once on a left-padded batch (module docstring, step 1)."""
    inner = decoder(model)
    n_layers = len(inner.layers)
    if not 0 <= from_layer < n_layers:
        raise ConfigError(f"from_layer must be in 0..{n_layers - 1} for this {n_layers}-layer model, got {from_layer}.")
    pos = positions_from_mask(mask)
    embeds = inner.embed_tokens(ids)
    causal = _causal_mask(inner, embeds, mask, pos)
    pos_emb = inner.rotary_emb(embeds, position_ids=pos)
    hidden = _run_layers(inner, embeds, inner.layers[:from_layer], causal, pos_emb, pos)
    return Trunk(hidden.detach(), causal, tuple(t.detach() for t in pos_emb), pos, from_layer)


def top_logits(model: Any, trunk: Trunk) -> Float[Tensor, "batch vocab"]:
    """Last-position logits from the cached trunk through the upper layers (module docstring, step 2)."""
    inner = decoder(model)
    hidden = _run_layers(inner, trunk.hidden, inner.layers[trunk.from_layer:], trunk.attention_mask,
                         trunk.position_embeddings, trunk.position_ids)
    return model.lm_head(inner.norm(hidden[:, -1])).float()
