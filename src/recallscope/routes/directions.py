"""The model's own representation of a concept, and the concept direction used by route scores.

1. Put the concept's text after each neutral prefix ("", "The word", "I thought about", "They talked
   about") and run the model; keep the hidden state of the concept's last token at every layer.
   The model is causal, so nothing after the concept matters.
2. Average over prefixes: the concept's representation ``r_c[l]``.
3. Do the same for a baseline set of ordinary words and average: ``b[l]``.
4. The concept direction is ``d_c[l] = r_c[l] - b[l]`` (what is special about this concept at layer ``l``);
   interventions use its unit vector ``u_c[l]`` and the baseline's projection ``b[l] . u_c[l]`` as the
   "absent" value. A concept given as a vector uses that vector at every layer instead.
"""

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.lens.base import hidden_states
from recallscope.models.selfcheck import checked_stack
from recallscope.routes.concepts import Concept

NEUTRAL_PREFIXES: tuple[str, ...] = ("", "The word", "I thought about", "They talked about")
"""Contexts in which the model represents a concept "on its own"."""

BASELINE_WORDS: tuple[str, ...] = tuple(" " + w for w in """time house water music paper river table garden
    window doctor money friend number letter market animal school family summer winter morning city road
    story picture kitchen bottle mountain language machine village""".split())
"""Ordinary words whose mean representation is subtracted from every concept's."""


def pad_batch(seqs: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    n = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), n), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(list(s))
    return tokens, torch.tensor([len(s) - 1 for s in seqs])


def last_token_states(model: Any, seqs: Sequence[Sequence[int]], *, batch_size: int = 64
                      ) -> Float[Tensor, "seq layer d_model"]:
    """Hidden states of every layer at each sequence's last token (right-padded batches; causal, so
    padding after a sequence does not change it)."""
    stack = checked_stack(model, "concept directions")
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            tokens, last = pad_batch(seqs[i:i + batch_size], pad)
            states = hidden_states(stack, tokens)  # [layer, batch, pos, d]
            out.append(states[:, torch.arange(len(last)), last].transpose(0, 1))
    return torch.cat(out)


def context_tokens(model: Any, prefix: str, text: str) -> list[int]:
    """Tokens of ``prefix + text`` as the model tokenises them (BOS included when it prepends one)."""
    joined = (prefix + text) if prefix else text
    return [int(t) for t in model.to_tokens(joined, truncate=False)[0]]


def representations(model: Any, texts: Sequence[str], *, prefixes: Sequence[str] = NEUTRAL_PREFIXES,
                    batch_size: int = 64) -> Float[Tensor, "text layer d_model"]:
    """Mean over ``prefixes`` of the hidden states at each text's last token (see the module doc)."""
    if not prefixes:
        raise ConfigError("representations need at least one neutral prefix ('' is allowed).")
    seqs = [context_tokens(model, p, t) for t in texts for p in prefixes]
    states = last_token_states(model, seqs, batch_size=batch_size)
    return states.view(len(texts), len(prefixes), *states.shape[1:]).mean(1)


@dataclass(frozen=True)
class ConceptDirections:
    """Concept directions per hidden-state layer.

    Attributes:
        names: one per concept.
        vectors: ``[concept, layer, d_model]`` the directions ``d_c[l]`` (not normalised).
        baseline: ``[layer, d_model]`` the baseline representation ``b[l]``.
    """

    names: tuple[str, ...]
    vectors: Float[Tensor, "concept layer d_model"]
    baseline: Float[Tensor, "layer d_model"]

    def unit(self) -> Float[Tensor, "concept layer d_model"]:
        return self.vectors / self.vectors.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def absent(self) -> Float[Tensor, "concept layer"]:
        """The baseline's projection on each unit direction: the value an ablation sets."""
        return torch.einsum("cld,ld->cl", self.unit(), self.baseline)


def concept_directions(model: Any, concepts: Sequence[Concept], *, prefixes: Sequence[str] = NEUTRAL_PREFIXES,
                       baseline_words: Sequence[str] | None = BASELINE_WORDS, batch_size: int = 64
                       ) -> ConceptDirections:
    """:class:`ConceptDirections` of ``concepts`` (text -> the model's representation; vector -> itself).

    ``baseline_words=None`` centres on the mean representation of the text concepts themselves (for a
    large pool: each direction is then what is specific to its concept within the pool).
    """
    stack = checked_stack(model, "concept directions")
    n_layers = stack.n_layers + 1
    texts = [c.text for c in concepts if c.direction is None]
    all_reps = representations(model, texts, prefixes=prefixes, batch_size=batch_size) if texts else None
    if baseline_words is None:
        if all_reps is None:
            raise ConfigError("baseline_words=None centres on the text concepts, but no concept has text.")
        baseline = all_reps.mean(0)
    else:
        baseline = representations(model, baseline_words, prefixes=prefixes, batch_size=batch_size).mean(0)
    reps = iter(all_reps if all_reps is not None else [])
    vectors = []
    for c in concepts:
        if c.direction is None:
            vectors.append(next(reps) - baseline)
            continue
        d = c.direction.to(baseline)
        if d.shape[-1] != stack.d_model or (d.ndim == 2 and d.shape[0] != n_layers):
            raise ConfigError(f"concept {c.name!r}: direction shape {tuple(d.shape)} does not fit this model; "
                              f"use [{stack.d_model}] or [{n_layers}, {stack.d_model}].")
        vectors.append(d.expand(n_layers, -1) if d.ndim == 1 else d)
    return ConceptDirections(names=tuple(c.name for c in concepts), vectors=torch.stack(vectors),
                             baseline=baseline)
