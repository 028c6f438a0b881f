"""Transcoder features and supernodes as route concepts, and their size-matched placebo feature sets.

A route concept (:class:`~recallscope.routes.concepts.Concept`) is text or a residual-stream direction. A
feature set becomes a concept through its **decoder rows**, the directions its features write:

1. Members: ``(layer, feature)`` pairs (:class:`FeatureSet`), from ``feature_concept(tset, layer, features)``
   or from a :class:`~recallscope.features.interventions.Supernode` (its positions are dropped: a concept
   direction is the same at every position). Checked: a non-empty set, layers with a transcoder, feature
   indices in range, no duplicates (:func:`check_members`, a :class:`~recallscope.errors.ConfigError`
   naming the problem and the fix).
2. Direction ``d = sum_f w_f * W_dec[f] / ||W_dec[f]||`` (target 0: the residual the feature's own layer
   writes to; a cross-layer transcoder's later targets are ignored). Default weights: 1 per feature, so each
   member counts equally whatever its decoder norm; :func:`supernode_concept` with ``tokens`` uses each
   member's activation at its own position on that prompt (the supernode's actual write there); any
   ``weights`` may be given (e.g. :attr:`FeatureStats.mean_active`, the mean activation when active).
   The direction is ``[d_model]`` and is used at every layer, like any vector concept: the residual stream
   carries what a feature writes to every later layer.
3. Label ``L1/F37``, ``L1/F37+F40``, ``L0/F3+L1/F7``, or the supernode's name; source
   :attr:`~recallscope.routes.concepts.ConceptSource.FEATURE`.
4. Placebos (:func:`feature_controls`, :func:`matched_placebos`): other feature sets of the **same size at
   the same layers**, each member replaced by a feature drawn (seeded) from the ``pool`` features nearest
   to it in activation-frequency rank and decoder norm (:func:`feature_stats` on reference text), never a
   member of the set and never twice in one placebo. Their concepts are built with the same weights, so a
   feature concept is compared with feature sets that look like it but were not chosen. Pass them as
   ``route_report(..., controls={concept.name: feature_controls(...)})``.
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.features.interventions import Supernode
from recallscope.features.transcoder import TranscoderSet, feature_activations
from recallscope.routes.concepts import Concept, ConceptSource

__all__ = ["FeatureSet", "FeatureStats", "check_members", "feature_concept", "feature_controls", "feature_label",
           "feature_stats", "matched_placebos", "supernode_concept"]


@dataclass(frozen=True)
class FeatureSet:
    """A named set of transcoder features ``(layer, feature)`` (the unit a feature route is about)."""

    members: tuple[tuple[int, int], ...]
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or feature_label(self.members)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.members})

    def at(self, layer: int) -> list[int]:
        """The member features of ``layer``, in the set's order."""
        return [f for lyr, f in self.members if lyr == layer]

    @classmethod
    def of(cls, spec: "FeatureSet | Supernode | tuple[int, Sequence[int]]", name: str = "") -> "FeatureSet":
        """From a FeatureSet, a Supernode (positions dropped, order kept) or ``(layer, features)``."""
        if isinstance(spec, FeatureSet):
            return cls(spec.members, name or spec.name)
        if isinstance(spec, Supernode):
            members = tuple(dict.fromkeys((int(layer), int(f)) for layer, _, f in spec.members))
            return cls(members, name or spec.name)
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], int):
            return cls(tuple((int(spec[0]), int(f)) for f in spec[1]), name)
        raise ConfigError(f"a feature set is a FeatureSet, a Supernode or (layer, [features]); got {type(spec).__name__}.")


def check_members(tset: TranscoderSet, members: Sequence[tuple[int, int]]) -> None:
    """Raise a :class:`ConfigError` naming the problem for an empty set, a layer without a transcoder, a
    feature index out of range or a repeated feature."""
    if not members:
        raise ConfigError("the feature set is empty; give at least one (layer, feature).")
    for layer, f in members:
        if layer not in tset:
            raise ConfigError(f"layer {layer} has no transcoder (transcoded layers: {tset.layers}); pick features of "
                              "those layers or load a set that covers this one.")
        d_sae = tset[layer].spec.d_sae
        if not 0 <= f < d_sae:
            raise ConfigError(f"feature {f} is out of range for the layer-{layer} transcoder (features 0..{d_sae - 1}).")
    if len(set(members)) != len(members):
        raise ConfigError(f"the feature set repeats a feature: {list(members)}; list each (layer, feature) once.")


def feature_label(members: Sequence[tuple[int, int]]) -> str:
    """``L1/F37``, ``L1/F37+F40`` (one layer), ``L0/F3+L1/F7`` (several); long sets are abbreviated."""
    layers = list(dict.fromkeys(layer for layer, _ in members))
    parts = []
    for layer in layers:
        feats = [f for lyr, f in members if lyr == layer]
        shown = "+".join(f"F{f}" for f in feats[:6]) + (f"+{len(feats) - 6} more" if len(feats) > 6 else "")
        parts.append(f"L{layer}/{shown}")
    return "+".join(parts)


def _direction(tset: TranscoderSet, members: Sequence[tuple[int, int]], weights: Sequence[float]) -> Tensor:
    rows = [tset[layer].W_dec[0, f].detach().float() for layer, f in members]
    return sum((w * r / r.norm().clamp_min(1e-8) for w, r in zip(weights, rows)), torch.zeros_like(rows[0]))


def _concept(tset: TranscoderSet, fs: FeatureSet, weights: Sequence[float] | None, source: ConceptSource,
             label: str) -> Concept:
    check_members(tset, fs.members)
    w = [1.0] * len(fs.members) if weights is None else [float(x) for x in weights]
    if len(w) != len(fs.members):
        raise ConfigError(f"{len(w)} weights for {len(fs.members)} features; give one weight per feature.")
    d = _direction(tset, fs.members, w)
    if float(d.norm()) == 0.0:
        raise ConfigError(f"the feature set {fs.label} has a zero decoder direction (zero weights or dead decoder "
                          "rows); give non-zero weights or other features.")
    return Concept(text=None, source=source, direction=d, label=label)


def feature_concept(tset: TranscoderSet, layer: int, features: int | Sequence[int], *,
                    weights: Sequence[float] | None = None, label: str | None = None) -> Concept:
    """The concept of ``features`` of the layer-``layer`` transcoder (module doc, steps 1-3)."""
    feats = [features] if isinstance(features, int) else list(features)
    fs = FeatureSet(tuple((layer, int(f)) for f in feats))
    return _concept(tset, fs, weights, ConceptSource.FEATURE, label or fs.label)


def supernode_concept(tset: TranscoderSet, supernode: Supernode, *, model: Any = None,
                      tokens: Int[Tensor, " pos"] | None = None, weights: Sequence[float] | None = None) -> Concept:
    """The concept of a supernode, labelled with its name. With ``model`` and ``tokens`` each member is
    weighted by its activation at its own position on that prompt (an all-zero write is an error)."""
    fs = FeatureSet.of(supernode)
    if tokens is not None:
        if model is None:
            raise ConfigError("supernode_concept(tokens=...) needs model= to read the activations.")
        acts = feature_activations(model, tset, tokens[None], sorted({m[0] for m in supernode.members}))
        by_member: dict[tuple[int, int], float] = {}
        for layer, pos, f in supernode.members:
            by_member[(layer, f)] = by_member.get((layer, f), 0.0) + float(acts[layer][0, pos, f])
        weights = [by_member[m] for m in fs.members]
    return _concept(tset, fs, weights, ConceptSource.FEATURE, supernode.name or fs.label)


# ------------------------------------------------------------------------------------------ placebos
@dataclass(frozen=True)
class FeatureStats:
    """Per-feature statistics of one layer's transcoder on reference text (what placebos are matched on)."""

    layer: int
    frequency: Float[Tensor, " d_sae"]
    """Share of reference positions where the feature is active."""
    mean_active: Float[Tensor, " d_sae"]
    """Mean activation where active (0 for a dead feature)."""
    decoder_norm: Float[Tensor, " d_sae"]


@torch.no_grad()
def feature_stats(model: Any, tset: TranscoderSet, layer: int, texts: Sequence[str]) -> FeatureStats:
    """:class:`FeatureStats` of the layer-``layer`` transcoder over every position of ``texts``."""
    if layer not in tset:
        raise ConfigError(f"layer {layer} has no transcoder (transcoded layers: {tset.layers}).")
    if not texts:
        raise ConfigError("feature_stats needs reference texts (e.g. the family's prompts and concepts).")
    seqs = [model.to_tokens(t)[0] for t in texts]
    acts = torch.cat([feature_activations(model, tset, torch.stack([s for s in seqs if len(s) == n]), [layer])[layer].flatten(0, 1)
                      for n in sorted({len(s) for s in seqs})])  # every position of every text, batched by length
    active = acts > 0
    freq = active.float().mean(0)
    mean = (acts * active).sum(0) / active.sum(0).clamp_min(1)
    return FeatureStats(layer, freq, mean, tset[layer].W_dec[0].detach().float().norm(dim=-1))


def matched_placebos(stats: dict[int, FeatureStats], members: Sequence[tuple[int, int]], n: int, *,
                     seed: int = 0, pool: int = 8) -> list[tuple[tuple[int, int], ...]]:
    """``n`` placebo sets of the same size and layers (module doc, step 4). A placebo member is drawn from the
    ``pool`` non-members nearest to the member in frequency rank (share of the layer) plus ``|log|`` decoder-norm
    ratio; a live member is matched only with live features."""
    if n < 1 or pool < 1:
        raise ConfigError(f"need n >= 1 placebo sets and pool >= 1, got n={n}, pool={pool}.")
    missing = sorted({layer for layer, _ in members} - set(stats))
    if missing:
        raise ConfigError(f"no feature statistics for layers {missing}; compute them with feature_stats.")
    rng = random.Random(seed)
    near: dict[tuple[int, int], list[int]] = {}
    for layer, f in members:
        st = stats[layer]
        rank = st.frequency.argsort().argsort().float() / len(st.frequency)
        dist = (rank - rank[f]).abs() + (st.decoder_norm.clamp_min(1e-8) / st.decoder_norm[f].clamp_min(1e-8)).log().abs()
        taken = {g for lyr, g in members if lyr == layer}
        ok = [int(g) for g in dist.argsort().tolist() if g not in taken
              and (bool(st.frequency[g] > 0) or not bool(st.frequency[f] > 0))]
        if len(ok) < sum(1 for lyr, _ in members if lyr == layer):
            raise ConfigError(f"layer {layer} has too few other live features for a placebo of this size; use a "
                              "smaller set or reference text on which more features fire.")
        near[(layer, f)] = ok[: max(pool, sum(1 for lyr, _ in members if lyr == layer) + 1)]
    out = []
    for _ in range(n):
        used: set[tuple[int, int]] = set()
        placebo = []
        for layer, f in members:
            choices = [g for g in near[(layer, f)] if (layer, g) not in used]
            if not choices:  # the nearest pool is used up: widen to any matched feature of the layer
                choices = [g for g in near[(layer, f)] + sorted({x for k, v in near.items() if k[0] == layer for x in v})
                           if (layer, g) not in used]
            g = rng.choice(choices)
            used.add((layer, g))
            placebo.append((layer, g))
        out.append(tuple(placebo))
    return out


def feature_controls(model: Any, tset: TranscoderSet, features: "FeatureSet | Supernode | tuple[int, Sequence[int]]",
                     texts: Sequence[str], *, n: int = 8, seed: int = 0, pool: int = 8,
                     weights: Sequence[float] | None = None) -> list[Concept]:
    """Placebo concepts for a feature concept: ``n`` matched feature sets (:func:`matched_placebos`, statistics
    on ``texts``) as concepts with the same ``weights``, source ``FEATURE_PLACEBO``."""
    fs = FeatureSet.of(features)
    check_members(tset, fs.members)
    stats = {layer: feature_stats(model, tset, layer, texts) for layer in fs.layers}
    sets = matched_placebos(stats, fs.members, n, seed=seed, pool=pool)
    return [_concept(tset, FeatureSet(p), weights, ConceptSource.FEATURE_PLACEBO,
                     f"placebo {i} of {fs.label} ({feature_label(p)})") for i, p in enumerate(sets)]
