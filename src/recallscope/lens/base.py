"""Lenses: read what a hidden state "says" by mapping it to a next-token distribution.

Layer convention (the tuned-lens one): hidden state ``layer`` ``l`` is the residual stream after
``l`` blocks, so ``l = 0`` is the embedding output (``resid_pre`` of block 0), ``l < n_layers`` is
``resid_pre`` of block ``l`` and ``l = n_layers`` is the final residual (``resid_post`` of the last
block). A model therefore has ``n_layers + 1`` hidden-state layers, and any lens at ``l = n_layers``
with an identity transform reproduces the model's own logits.

A :class:`Lens` only has to say how to move a hidden state of layer ``l`` to something the model's
final norm and unembedding can read (:meth:`Lens.transform_hidden`); :meth:`Lens.logits` does the rest.

1. :func:`hidden_states` runs the functional forward once and stacks the ``n_layers + 1`` states.
2. ``lens.transform_hidden(h, l)`` maps each state to a final-layer-like residual.
3. ``lens.logits(h, l) = unembed(final_norm(transform_hidden(h, l)))``.
"""

from abc import ABC, abstractmethod
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import SiteOutOfRangeError
from recallscope.models.forward import Edit, Trace, forward
from recallscope.models.selfcheck import checked_stack
from recallscope.models.stack import Stack


def run_hidden(
    stack: Stack, tokens: Int[Tensor, "batch pos"], *, edit: Edit | None = None
) -> tuple[Float[Tensor, "layer batch pos d_model"], Trace]:
    """The ``n_layers + 1`` hidden states of a run and its :class:`Trace` (keys/values per layer)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    final, trace = forward(stack, stack.embed(tokens, positions), edit=edit, record={"resid_pre"},
                           unembed=False)
    # .to(final.device): a model spread over devices (device_map) keeps each layer's state on its device
    states = torch.stack([trace.acts.pop(("resid_pre", layer)).to(final.device) for layer in range(stack.n_layers)]
                         + [final])
    return states, trace


def hidden_states(
    stack: Stack, tokens: Int[Tensor, "batch pos"], *, edit: Edit | None = None
) -> Float[Tensor, "layer batch pos d_model"]:
    """The ``n_layers + 1`` hidden states of a run (see the module doc for the layer convention)."""
    return run_hidden(stack, tokens, edit=edit)[0]


def check_layer(stack: Stack, layer: int, *, what: str = "layer") -> int:
    """``layer`` as a non-negative hidden-state index in ``0..n_layers``; negative counts from the end."""
    n = stack.n_layers + 1
    if not -n <= layer < n:
        raise SiteOutOfRangeError(f"{what} {layer} is outside the model's hidden-state layers 0..{n - 1} "
                                  f"(0 = embeddings, {n - 1} = final residual); pick one in range.")
    return layer % n


class Lens(ABC):
    """Base class: subclasses implement :meth:`transform_hidden`.

    Attributes:
        model: the TransformerBridge the lens reads.
        stack: its :class:`~recallscope.models.stack.Stack` (final norm and unembedding).
    """

    name = "lens"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.stack = checked_stack(model, "the lens")

    @property
    def n_layers(self) -> int:
        """Hidden-state layers the lens reads: ``model.n_layers + 1``."""
        return self.stack.n_layers + 1

    @abstractmethod
    def transform_hidden(self, h: Float[Tensor, "*batch d_model"], layer: int) -> Float[Tensor, "*batch d_model"]:
        """Map hidden states of ``layer`` to residuals the final norm and unembedding can read."""

    def logits(self, h: Float[Tensor, "*batch d_model"], layer: int) -> Float[Tensor, "*batch vocab"]:
        """Next-token logits the lens reads from hidden states of ``layer``."""
        layer = check_layer(self.stack, layer)
        return self.stack.unembed(self.stack.final_norm(self.transform_hidden(h, layer)))

    def logprobs(self, h: Float[Tensor, "*batch d_model"], layer: int) -> Float[Tensor, "*batch vocab"]:
        """Log-softmax of :meth:`logits`, in float32."""
        return torch.log_softmax(self.logits(h, layer).float(), dim=-1)

    def _check_states(self, states: Tensor) -> None:
        if states.shape[0] != self.n_layers:
            raise SiteOutOfRangeError(f"expected {self.n_layers} hidden-state layers, got {states.shape[0]}; "
                                      "pass the output of lens.hidden_states(...).")

    def all_layers(self, states: Float[Tensor, "layer *batch d_model"]) -> Float[Tensor, "layer *batch vocab"]:
        """Log-probs at every layer of a stack of hidden states from :func:`hidden_states`."""
        self._check_states(states)
        return torch.stack([self.logprobs(states[layer], layer) for layer in range(self.n_layers)])


class LogitLens(Lens):
    """The logit lens (nostalgebraist 2020): decode every layer with the model's own final norm and
    unembedding, i.e. :meth:`transform_hidden` is the identity."""

    name = "logit_lens"

    def transform_hidden(self, h: Float[Tensor, "*batch d_model"], layer: int) -> Float[Tensor, "*batch d_model"]:
        return h

    def all_layers(self, states: Float[Tensor, "layer *batch d_model"]) -> Float[Tensor, "layer *batch vocab"]:
        """Log-probs at every layer in one batched unembedding (the transform is the identity)."""
        self._check_states(states)
        return torch.log_softmax(self.stack.unembed(self.stack.final_norm(states)).float(), dim=-1)


def first_token_id(model: Any, text: str) -> int:
    """The id of the first token of ``text`` (no BOS), e.g. ``" Value"`` of ``" Value Added Tax"``."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise SiteOutOfRangeError(f"{text!r} has no tokens; give a non-empty target text.")
    return int(ids[0])


def rank_of(logprobs: Float[Tensor, "*batch vocab"], ids: Int[Tensor, "*batch"]) -> Float[Tensor, "*batch"]:
    """0-based rank of ``ids`` under ``logprobs`` (0 = top-1; ties count in the token's favour)."""
    own = logprobs.gather(-1, ids.unsqueeze(-1))
    return (logprobs > own).sum(-1).to(logprobs.dtype)
