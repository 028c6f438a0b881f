"""The replacement model: the real model with its MLPs replaced by transcoders, via hooks.

1. At each transcoded layer's input hook, record the transcoder input and compute its activations.
2. At each MLP output hook, return the transcoders' reconstruction (summing cross-layer writers) instead
   of the MLP's output; layers without a transcoder keep their MLP, and so do positions before the
   set's ``first_pos`` (BOS, for sets trained without it).
3. :func:`fidelity` compares the replacement model's next-token distribution with the real model's:
   KL(real || replacement) per position and top-1 agreement (Ameisen et al. 2025 report the same two).

Interventions restore the model on exit (hooks are removed by ``model.hooks``).
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from recallscope.features.transcoder import TranscoderSet


@contextlib.contextmanager
def replaced(model: Any, tset: TranscoderSet, *, layers: list[int] | None = None,
             record: dict[str, dict[int, Tensor]] | None = None) -> Iterator[Any]:
    """Within the block, ``model``'s MLP outputs at ``layers`` (default: every transcoded layer) are the
    transcoders' reconstructions. ``record`` (optional) receives ``{"inputs": ..., "acts": ...}`` by layer."""
    tset.check_model(model)
    chosen = set(tset.layers if layers is None else layers)
    needed = {src for layer in chosen for src, _ in tset.writers(layer)} | chosen
    missing = sorted(layer for layer in chosen if layer not in tset)
    if missing:
        from recallscope.errors import ConfigError

        raise ConfigError(f"no transcoder for layers {missing}; transcoded layers are {tset.layers}.")
    inputs: dict[int, Tensor] = {}
    acts: dict[int, Tensor] = {}

    def read(layer: int):
        def hook(x: Tensor, hook: Any) -> None:
            inputs[layer] = x
            acts[layer] = tset.activations(layer, x)
        return hook

    def write(layer: int):
        def hook(y: Tensor, hook: Any) -> Tensor:
            out = tset.output(layer, inputs, acts).to(y.dtype)
            if tset.info.first_pos > 0:  # positions the set was not trained on keep the real MLP output
                out = torch.cat([y[..., : tset.info.first_pos, :], out[..., tset.info.first_pos:, :]], dim=-2)
            return out
        return hook

    fwd = [(tset.input_hook(layer), read(layer)) for layer in sorted(needed)]
    fwd += [(tset.output_hook(layer), write(layer)) for layer in sorted(chosen)]
    with model.hooks(fwd_hooks=fwd):
        yield model
    if record is not None:
        record["inputs"], record["acts"] = inputs, acts


@dataclass(frozen=True)
class Fidelity:
    """How closely the replacement model's next-token predictions follow the real model's."""

    kl: float
    """Mean KL(real || replacement) in nats over all positions."""
    top1_agreement: float
    """Fraction of positions where both models' argmax tokens agree."""
    n_positions: int
    """Positions averaged over."""


@torch.no_grad()
def fidelity(model: Any, tset: TranscoderSet, tokens: Int[Tensor, "batch pos"] | list[Tensor], *,
             layers: list[int] | None = None, batch_size: int = 16) -> Fidelity:
    """KL and top-1 agreement of the replacement model against ``model`` on ``tokens`` (a batch, or a list
    of batches of different lengths)."""
    kl_sum, agree, n = 0.0, 0, 0
    chunks = [b[s:s + batch_size] for b in (tokens if isinstance(tokens, list) else [tokens])
              for s in range(0, b.shape[0], batch_size)]
    for chunk in chunks:
        real = model(chunk, return_type="logits").float().log_softmax(-1)
        with replaced(model, tset, layers=layers):
            repl = model(chunk, return_type="logits").float().log_softmax(-1)
        kl_sum += float((real.exp() * (real - repl)).sum(-1).sum())
        agree += int((real.argmax(-1) == repl.argmax(-1)).sum())
        n += real.shape[0] * real.shape[1]
    return Fidelity(kl=kl_sum / n, top1_agreement=agree / n, n_positions=n)


def error_share(graph: Any) -> dict[str, float]:
    """How much of an attribution graph runs through error nodes (what the transcoders miss):

    - ``direct``: share of the absolute direct edges into the logit node(s) that come from error nodes;
    - ``influence``: share of the total influence on the logits (:func:`~.graph.influence`, all paths) held by
      error nodes, among feature, error and embedding nodes.
    """
    from recallscope.features.graph import influence

    rows = graph.adjacency[graph.logit_slice].abs()
    direct = float(rows[:, graph.error_slice].sum() / rows.sum().clamp_min(1e-12))
    infl = influence(graph)
    sources = infl[: graph.embed_slice.stop]
    return {"direct": direct, "influence": float(infl[graph.error_slice].sum() / sources.sum().clamp_min(1e-12))}
