"""What the base64 and mnemonic organisms show: measured maps beside their ground truth, as figures.

1. :func:`b64_dependency_map` (base64 organism): for each output byte ``j`` of ``n_bytes``-letter
   plaintexts, the pairs of :func:`~recallscope.organisms.b64_decoder.dependency_pairs` (clean: the prompt
   that predicts byte ``j``; corrupt: another plaintext's chunks); each input chunk ``i``'s residual entering
   layer 0 (model position ``1 + i``) is patched from the corrupt run into the clean run, exactly
   (:func:`~recallscope.bench.scoring.exact_patching_effects`); ``drop[j, i]`` is the mean fall in
   ``log p(byte j)``. The truth ``depends[j, i]`` is the codec's dependency map
   (:meth:`~recallscope.organisms.b64_decoder.B64Truth.dependency`). :class:`B64DependencyMap` plots both,
   and scores the map with ROC AUC of ``|drop|`` against the truth.
2. :func:`chunk_alignment`: the organism's own view of a base64 string (fixed 2-character chunk tokens)
   as a :class:`~recallscope.tasks.b64_alignment.Base64Alignment`, for
   :func:`~recallscope.plotting.plot_b64_alignment`.
3. :func:`mnemonic_route_rows` (mnemonic organisms): for each hook chunk (``VA``), the route module
   (:func:`~recallscope.routes.route_report`) scores the concept the chunk is linked to (``VAT``) against
   control concepts of the same organism; :func:`plot_route_scores` shows route organisms beside rote ones.
4. :func:`mnemonic_checks_figure`: the held-out decode accuracy and the two interchange checks stored
   with every shipped route / rote organism.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from recallscope.errors import ResultFileError
from recallscope.plotting import apply_style, heatmap
from recallscope.results import load_result_dir, register_result, save_result_dir


@register_result
@dataclass(frozen=True)
class B64DependencyMap:
    """Exact patching of the base64 organism's input chunks, per output byte, beside the ground truth.

    Attributes:
        drop: ``[byte, chunk]`` mean fall in ``log p(byte)`` (nats) when the chunk's layer-0 input comes
            from another plaintext.
        depends: ``[byte, chunk]`` ground truth: byte ``j`` is built from bits of chunk ``i``.
        n_per_byte: prompts averaged per byte.
        manifest: provenance (model, prompts, seed).
    """

    drop: Float[Tensor, "byte chunk"]
    depends: Bool[Tensor, "byte chunk"]
    n_per_byte: int
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.drop.shape != self.depends.shape:
            raise ResultFileError(f"B64DependencyMap: drop {tuple(self.drop.shape)} and depends "
                                  f"{tuple(self.depends.shape)} must have the same [byte, chunk] shape.")

    def _labels(self) -> tuple[list[str], list[str]]:
        n_bytes, n_chunks = self.drop.shape
        return ([f"chunk {i} (chars {2 * i}-{2 * i + 1})" for i in range(n_chunks)],
                [f"byte {j}" for j in range(n_bytes)])

    def summary(self) -> dict[str, float]:
        """Mean drop where the byte depends on the chunk and elsewhere (largest |drop| there), and ROC AUC."""
        from recallscope.attribution.scoring import roc_auc

        return {"mean_drop_dependent": float(self.drop[self.depends].mean()),
                "max_abs_drop_independent": float(self.drop[~self.depends].abs().max()),
                "roc_auc": roc_auc(self.drop.abs().flatten(), self.depends.flatten())}

    def plot(self, *, title: str | None = None) -> go.Figure:
        """Heatmap of the measured drop (bytes x chunks)."""
        cols, rows = self._labels()
        return heatmap(self.drop, cols, rows, colorbar_title="nats", title=title or
                       "b64-decoder: exact patching, drop in log p(byte) when the chunk is swapped")

    def plot_truth(self, *, title: str | None = None) -> go.Figure:
        """Heatmap of the ground-truth dependency map (1 = the byte depends on the chunk)."""
        cols, rows = self._labels()
        return heatmap(self.depends.float(), cols, rows, colorbar_title="depends",
                       title=title or "b64-decoder ground truth: byte j depends on chunk i")

    def save(self, directory: str | os.PathLike) -> Path:
        return save_result_dir(directory, "B64DependencyMap", {"drop": self.drop, "depends": self.depends},
                               {"n_per_byte": self.n_per_byte}, self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "B64DependencyMap":
        t, meta, manifest = load_result_dir(directory, "B64DependencyMap")
        return cls(t["drop"], t["depends"].bool(), int(meta["n_per_byte"]), manifest)


def b64_dependency_map(model: Any, n_bytes: int = 9, n: int = 32, *, seed: int = 1) -> B64DependencyMap:
    """The measured byte x chunk map of the base64 organism ``model`` and its truth (see the module doc)."""
    from recallscope.manifest import build_manifest
    from recallscope.organisms import ground_truth
    from recallscope.organisms.b64_decoder import dependency_pairs
    from recallscope.bench.scoring import exact_patching_effects

    truth = ground_truth(model)
    depends = truth.dependency(n_bytes)  # checks n_bytes against the organism's lengths
    pairs = dependency_pairs(n_bytes, n, seed=seed)
    chunk_pos = [1 + i for i in range(truth.n_chunks)]
    drop = torch.stack([exact_patching_effects(model, pairs[j * n:(j + 1) * n], layers=[0], positions=chunk_pos)
                        [:, 0].mean(0) for j in range(n_bytes)])
    manifest = build_manifest(model, [p.clean for p in pairs], {"n_bytes": n_bytes, "n_per_byte": n,
                                                                "layer": 0, "positions": chunk_pos}, seed=seed)
    return B64DependencyMap(drop, depends, n, manifest)


class _ChunkTokenizer:
    """The base64 organism's view of a string: fixed-width chunks with the organism's token ids, in the
    fast-tokenizer call convention :func:`~recallscope.tasks.b64_alignment.align_tokens` reads offsets from."""

    is_fast = True

    def __init__(self, tokenizer: Any, width: int) -> None:
        self.tokenizer, self.width = tokenizer, width

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = True
                 ) -> dict[str, list]:
        spans = [(i, min(i + self.width, len(text))) for i in range(0, len(text), self.width)]
        return {"input_ids": self.tokenizer.convert_tokens_to_ids([text[a:b] for a, b in spans]),
                "offset_mapping": spans}


def chunk_alignment(model: Any, text: str) -> Any:
    """The alignment of the organism's chunk tokens with the base64 of the plaintext ``text``."""
    from recallscope.organisms import ground_truth
    from recallscope.tasks.b64_alignment import align_tokens
    from recallscope.tasks.b64_codec import encode

    return align_tokens(_ChunkTokenizer(model.tokenizer, ground_truth(model).chunk_chars), encode(text))


def mnemonic_route_rows(model: Any, chunks: Sequence[str] | None = None, *, n_controls: int = 9, n_boot: int = 200,
                        seed: int = 0) -> list[dict[str, Any]]:
    """Route verdicts of a mnemonic organism: one row per hook chunk (default: the chunks of
    :data:`~recallscope.tasks.b64_stimuli.MNEMONIC_HOOKS`).

    For chunk ``c`` the route module (:func:`recallscope.routes.route_report`) scores the concept ``c`` is
    linked to (``VA`` -> ``VAT``) against ``n_controls`` other concepts of the organism drawn with
    ``random.Random(seed)``, each represented in the organism's own neutral context (``<s> VAT``) against
    a baseline over its whole vocabulary; the query is ``c ==`` -> ``letter(c)`` with 8 alternative inputs
    (the other hook chunks, then other chunks), and the detector's statistics run over (prompt,
    alternative) units (:func:`recallscope.bench.route_bench.detect`, the one call site). Rows:
    ``chunk``, ``concept``, ``is_route`` (the truth), ``score``, ``verdict``, ``p`` (and the detector's
    ``p_holm``, ``mediation``, ``strongest_competitor``, ``peak_layer``).
    """
    from recallscope.bench.route_bench import default_spec, detect
    from recallscope.tasks.b64_stimuli import MNEMONIC_HOOKS

    spec = default_spec(n_controls=n_controls, n_boot=n_boot)
    chunks = sorted(MNEMONIC_HOOKS) if chunks is None else list(chunks)
    return [detect(model, chunk, spec, seed=seed) for chunk in chunks]


def plot_route_scores(rows: Sequence[dict[str, Any]], *, title: str | None = None) -> go.Figure:
    """Bars of the route score of each hook chunk's concept, one bar group per organism; the hover gives
    the verdict and p-value. ``rows``: :func:`mnemonic_route_rows` rows with an ``organism`` key."""
    fig = go.Figure()
    for org in dict.fromkeys(r["organism"] for r in rows):
        mine = [r for r in rows if r["organism"] == org]
        fig.add_trace(go.Bar(
            x=[f"{r['chunk']} → {r['concept']}" for r in mine],
            y=[r["score"] for r in mine], name=f"{org} ({'route' if mine[0]['is_route'] else 'rote'} by construction)",
            hovertext=[f"{org}: {r['chunk']} via {r['concept']}<br>score {r['score']:.3f}, p = {r['p']:.3f}<br>"
                       f"verdict: {r['verdict']}" for r in mine], hoverinfo="text"))
    apply_style(fig, title=title or "Route score of each hook chunk's concept: route vs rote organisms")
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="route score (share of the total effect)")
    return fig


def mnemonic_checks_figure(names: Sequence[str] | None = None) -> go.Figure:
    """Per shipped route / rote organism: held-out decode accuracy and the interchange checks (config.json)."""
    from recallscope.organisms.recipes import WEIGHTS_DIR, recipes
    from recallscope.organisms.store import read_config

    names = list(names) if names is not None else [n for n in recipes() if n.rsplit("-s", 1)[0] in ("route", "rote")]
    metrics = {n: read_config(WEIGHTS_DIR / n)["metrics"] for n in names}
    fig = go.Figure()
    for key, label in (("decode_test", "decode of the 16 test chunks (never trained directly in route models)"),
                       ("swap_follow", "concept swap followed"),
                       ("kind_transplant", "chunk carries its concept's kind")):
        fig.add_trace(go.Bar(x=names, y=[metrics[n][key] for n in names], name=label))
    apply_style(fig, title="Mnemonic organisms: route models decode through the concept, rote models do not")
    fig.update_yaxes(title="share of prompts", range=[0, 1.05])
    fig.update_layout(barmode="group")
    return fig
