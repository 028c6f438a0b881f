"""Feature interventions in the real model: ablate, steer or swap transcoder features and supernodes.

1. Each transcoded layer's features are read from the *current* input (so upstream edits propagate):
   ``a = encode(x)``.
2. An edit sets the activation of feature ``f`` at ``(layer, pos)`` to ``value`` (ablation: 0; a swap:
   the activation from another prompt) or multiplies it by ``scale`` (steering).
3. The MLP output at every layer the feature writes to gets ``(a_new - a) @ W_dec``: the real MLP output
   is kept, so the transcoder's error stays in place (as in circuit-tracer's feature interventions).
4. Attention patterns and norm denominators can be frozen to the clean run's values (``freeze``), which
   makes the effect of an edit on the logits the graph's prediction exactly for direct paths.

:func:`run_intervention` returns the logits and every layer's feature activations with and without the
edits, so a claim read off an attribution graph ("feature X drives logit Y through feature Z") can be
checked: ablate X, read Z and Y.
"""

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.features.transcoder import TranscoderSet


@dataclass(frozen=True)
class FeatureEdit:
    """Set (``value``) or scale (``scale``) feature ``feature`` of the layer-``layer`` transcoder at
    position ``pos`` (``None``: every position). Exactly one of ``value`` and ``scale``."""

    layer: int
    feature: int
    pos: int | None = None
    value: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.scale is None):
            raise ConfigError(f"a FeatureEdit needs exactly one of value= (set) or scale= (multiply), got {self}.")


@dataclass(frozen=True)
class Supernode:
    """A named group of features ``(layer, pos, feature)`` edited together."""

    name: str
    members: tuple[tuple[int, int, int], ...]

    def ablate(self) -> list[FeatureEdit]:
        return [FeatureEdit(layer, f, pos, value=0.0) for layer, pos, f in self.members]

    def steer(self, scale: float) -> list[FeatureEdit]:
        return [FeatureEdit(layer, f, pos, scale=scale) for layer, pos, f in self.members]


def _apply(acts: Tensor, edits: Sequence[FeatureEdit]) -> Tensor:
    new = acts.clone()
    for e in edits:
        sl = (slice(None), slice(None) if e.pos is None else e.pos, e.feature)
        new[sl] = e.value if e.value is not None else new[sl] * float(e.scale)  # type: ignore[arg-type]
    return new


@contextlib.contextmanager
def intervened(model: Any, tset: TranscoderSet, edits: Sequence[FeatureEdit], *,
               frozen: dict[str, Tensor] | None = None, record: dict[str, dict[int, Tensor]] | None = None
               ) -> Iterator[Any]:
    """Within the block, ``model`` runs with ``edits`` applied (and ``frozen`` hook values, if given).
    ``record`` receives the feature activations after the edits, by layer."""
    tset.check_model(model)
    bad = sorted({e.layer for e in edits} - set(tset.layers))
    if bad:
        raise ConfigError(f"edits name layers {bad} that have no transcoder (transcoded: {tset.layers}).")
    by_layer = {layer: [e for e in edits if e.layer == layer] for layer in tset.layers}
    delta_acts: dict[int, Tensor] = {}
    seen: dict[int, Tensor] = {} if record is None else record.setdefault("acts", {})

    def read(layer: int):
        def hook(x: Tensor, hook: Any) -> None:
            acts = tset.activations(layer, x.float())
            new = _apply(acts, by_layer[layer]) if by_layer[layer] else acts
            delta_acts[layer] = new - acts
            seen[layer] = new.detach()
        return hook

    def write(layer: int):
        def hook(y: Tensor, hook: Any) -> Tensor:
            out = y
            for src, j in tset.writers(layer):
                if by_layer[src]:
                    out = out + tset[src].decode(delta_acts[src], j).to(y.dtype)
            return out
        return hook

    fwd = [(tset.input_hook(layer), read(layer)) for layer in tset.layers]
    fwd += [(tset.output_hook(layer), write(layer)) for layer in range(tset.n_layers) if tset.writers(layer)]
    fwd += [(name, (lambda t, hook, v=v: v.expand_as(t).to(t.dtype))) for name, v in (frozen or {}).items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # edited norm scales make the bridge leave its native path
        with model.hooks(fwd_hooks=fwd):
            yield model


@dataclass(frozen=True)
class InterventionResult:
    """Logits and feature activations of one prompt, clean and with the edits."""

    clean_logits: Float[Tensor, "n_pos d_vocab"]
    logits: Float[Tensor, "n_pos d_vocab"]
    clean_acts: dict[int, Tensor]
    acts: dict[int, Tensor]
    edits: tuple[FeatureEdit, ...]
    freeze: tuple[str, ...]

    def logit_change(self, token: int, pos: int = -1) -> float:
        return float(self.logits[pos, token] - self.clean_logits[pos, token])

    def feature_change(self, layer: int, pos: int, feature: int) -> float:
        return float(self.acts[layer][pos, feature] - self.clean_acts[layer][pos, feature])


@torch.no_grad()
def run_intervention(model: Any, tset: TranscoderSet, tokens: Int[Tensor, " n_pos"],
                     edits: Sequence[FeatureEdit], *, freeze: Sequence[str] = ()) -> InterventionResult:
    """Run ``tokens`` clean and with ``edits``; ``freeze`` (``"attention"``, ``"norms"``) holds attention
    patterns and/or norm denominators at their clean values during the edited run."""
    unknown = set(freeze) - {"attention", "norms"}
    if unknown:
        raise ConfigError(f"unknown freeze options {sorted(unknown)}; use 'attention' and/or 'norms'.")
    suffixes = tuple(s for s, k in (("hook_pattern", "attention"), ("hook_scale", "norms")) if k in freeze)
    clean_rec: dict[str, dict[int, Tensor]] = {}
    with intervened(model, tset, [], record=clean_rec):
        clean_logits, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n.endswith(suffixes)
                                                   if suffixes else False)
    frozen = {n: v for n, v in cache.items()} if suffixes else None
    rec: dict[str, dict[int, Tensor]] = {}
    with intervened(model, tset, edits, frozen=frozen, record=rec):
        logits = model(tokens[None], return_type="logits")
    return InterventionResult(clean_logits[0].float(), logits[0].float(),
                              {k: v[0] for k, v in clean_rec["acts"].items()},
                              {k: v[0] for k, v in rec["acts"].items()}, tuple(edits), tuple(freeze))


def swap_edits(model: Any, tset: TranscoderSet, source_tokens: Int[Tensor, " n_pos"],
               features: Sequence[tuple[int, int, int]]) -> list[FeatureEdit]:
    """Edits that set ``features`` ``(layer, pos, feature)`` to their activations on ``source_tokens``."""
    rec: dict[str, dict[int, Tensor]] = {}
    with torch.no_grad(), intervened(model, tset, [], record=rec):
        model(source_tokens[None], return_type="logits")
    return [FeatureEdit(layer, f, pos, value=float(rec["acts"][layer][0, pos, f])) for layer, pos, f in features]
