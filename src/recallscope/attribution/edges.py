"""Results of edge attribution and circuit discovery: :class:`EdgeScores` and :class:`Circuit`.

``EdgeScores`` holds one score per edge of a :class:`~recallscope.attribution.graph.Graph` (optionally per
position), averaged over prompts; ``top(n)`` / ``threshold(tau)`` select a :class:`Circuit`. A circuit
is a set of edges (with the scores that chose them, for drawing), plus whatever was measured about it
(faithfulness, completeness) in ``info``. Both save and load through
:func:`recallscope.results.save_result_dir`.
"""

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from recallscope.attribution.graph import Graph
from recallscope.errors import ConfigError, ResultFileError
from recallscope.results import load_result_dir, register_result, save_result_dir


def _check_shape(graph: Graph, t: Tensor, what: str) -> None:
    if t.shape[:2] != (graph.n_senders, graph.n_receivers) or t.ndim not in (2, 3):
        raise ResultFileError(f"{what} has shape {tuple(t.shape)}; expected [{graph.n_senders} senders, "
                              f"{graph.n_receivers} receivers(, pos)] for this graph.")


@register_result
@dataclass(frozen=True)
class Circuit:
    """A set of edges of ``graph``: ``edges[sender, receiver(, pos)]``; ``weights`` (same shape) are the
    scores that chose them (for drawing), ``info`` what was measured (faithfulness, how it was chosen)."""

    graph: Graph
    edges: Bool[Tensor, "sender receiver *pos"]
    weights: Float[Tensor, "sender receiver *pos"] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_shape(self.graph, self.edges, "edges")
        if self.weights is not None and self.weights.shape != self.edges.shape:
            raise ResultFileError(f"weights {tuple(self.weights.shape)} and edges {tuple(self.edges.shape)} differ.")
        if (self.edges & ~self._valid()).any():
            raise ConfigError("the circuit has edges the graph does not (a receiver reading a later sender).")

    def _valid(self) -> Tensor:
        return self.graph.valid[..., None] if self.edges.ndim == 3 else self.graph.valid

    @classmethod
    def from_edges(cls, graph: Graph, labels: Iterable[str], *, info: dict[str, Any] | None = None) -> "Circuit":
        """A circuit from edge names such as ``"a0.h1 -> m1"`` (see :meth:`Graph.edge`)."""
        edges = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
        for label in labels:
            edges[graph.edge(label)] = True
        return cls(graph, edges, info=dict(info or {}))

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    def edge_matrix(self) -> Bool[Tensor, "sender receiver"]:
        """Edges with positions collapsed (an edge is in if it is in at any position)."""
        return self.edges.any(-1) if self.edges.ndim == 3 else self.edges

    def keep_mask(self) -> Float[Tensor, "sender receiver *pos"]:
        """1 for kept edges, 0 for ablated ones (for :class:`~recallscope.attribution.graph.Ablation`)."""
        return self.edges.float()

    def edge_labels(self) -> list[str]:
        idx = self.edges.nonzero().tolist()
        return [self.graph.edge_label(*i) for i in idx]

    def nodes(self) -> list[str]:
        """Nodes touched by an edge (senders and receiver nodes), in graph order."""
        em = self.edge_matrix()
        used = {self.graph.senders[u] for u in em.any(1).nonzero().squeeze(-1).tolist()}
        used |= {self.graph.receiver_node(v) for v in em.any(0).nonzero().squeeze(-1).tolist()}
        return [n for n in self.graph.nodes if n in used]

    def pruned(self) -> "Circuit":
        """Drop edges that lie on no path from the input to the logits. The circuit computes the same
        function: a node none of whose inputs is kept reads the corrupt run and outputs its corrupt
        value, and a node with no kept path to the logits cannot reach them."""
        keep = _on_paths(self.graph, self.edge_matrix())
        edges = self.edges & (keep[..., None] if self.edges.ndim == 3 else keep)
        return replace(self, edges=edges, info={**self.info, "pruned": True})

    def plot(self, *, title: str | None = None) -> go.Figure:
        """The circuit as a graph laid out by layer (only layers with nodes get a row): heads spread
        across their attention row, MLPs to the right, key/value nodes of grouped-query attention just
        below their heads. Line width grows with ``|weight|``; red edges have positive weights."""
        from recallscope.attribution.plots import circuit_figure

        g = self.graph
        w = self.weights if self.weights is not None else self.edges.float()
        w = w.sum(-1) if w.ndim == 3 else w
        merged: dict[tuple[str, str], list[tuple[str, float]]] = {}
        for u, v in self.edge_matrix().nonzero().tolist():
            merged.setdefault((g.senders[u], g.receiver_node(v)), []).append((g.receivers[v], float(w[u, v])))
        edges = [(a, b, sum(x for _, x in parts), f"{a} → " + ", ".join(f"{r}: {x:.3g}" for r, x in parts))
                 for (a, b), parts in merged.items()]
        names = list(dict.fromkeys(["input", *[n for e in edges for n in e[:2]], "logits"]))
        raw = {n: _node_xy(g, n) for n in names}
        rows = sorted({y for _, y in raw.values()})
        layout = {n: (x, float(rows.index(y))) for n, (x, y) in raw.items()}
        labels = {float(i): _stage_label(g, y) for i, y in enumerate(rows)}
        faith = f", faithfulness {self.info['faithfulness']:.2f}" if "faithfulness" in self.info else ""
        links = [(n, h) for n in names if ".kv" in n for h in _group_heads(g, n) if h in layout]
        return circuit_figure(layout, edges, stage_labels=labels, links=links,
                              title=title or f"Circuit: {len(names)} nodes, {self.n_edges} edges{faith}")

    def save(self, directory: str | os.PathLike) -> Path:
        tensors = {"edges": self.edges.to(torch.uint8)}
        if self.weights is not None:
            tensors["weights"] = self.weights
        return save_result_dir(directory, "Circuit", tensors, {"graph": self.graph.to_dict(), "info": self.info},
                               self.info.get("manifest", {}))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Circuit":
        tensors, meta, _ = load_result_dir(directory, "Circuit")
        return cls(Graph(**meta["graph"]), tensors["edges"].bool(), tensors.get("weights"), meta.get("info", {}))


def _node_xy(graph: Graph, name: str) -> tuple[float, float]:
    """Position of a node before rows are compacted: y = 2l+1 for layer l's heads, 2l+2 for its MLP,
    2l+0.6 for its key/value nodes; x spreads heads around 0 and puts MLPs (zig-zagging) to the right."""
    if name in ("input", "logits"):
        return 0.0, 0.0 if name == "input" else float(2 * graph.n_layers + 1)
    layer = int(name[1:].split(".")[0])
    if name.startswith("m"):
        return graph.n_heads / 2 + 1.0 + 0.7 * (layer % 2), float(2 * layer + 2)
    part = name.split(".")[1]
    if part.startswith("kv"):
        rep = graph.n_heads // graph.n_kv_heads
        return int(part[2:]) * rep + (rep - 1) / 2 - (graph.n_heads - 1) / 2, 2 * layer + 0.6
    return int(part[1:]) - (graph.n_heads - 1) / 2, float(2 * layer + 1)


def _group_heads(graph: Graph, kv_node: str) -> list[str]:
    """The query heads a key/value node (``a{l}.kv{g}``) serves."""
    layer, g = kv_node[1:].split(".kv")
    rep = graph.n_heads // graph.n_kv_heads
    return [f"a{layer}.h{int(g) * rep + i}" for i in range(rep)]


def _stage_label(graph: Graph, y: float) -> str:
    if y == 0:
        return "input"
    if y == 2 * graph.n_layers + 1:
        return "logits"
    layer, rest = divmod(y, 2)  # MLP of layer l sits at 2l+2, its heads at 2l+1, its k/v nodes at 2l+0.6
    if rest < 0.3:
        return f"L{int(layer) - 1} MLP"
    return f"L{int(layer)} k/v" if rest < 0.9 else f"L{int(layer)} attn"


def _dependents(graph: Graph, v: int) -> list[int]:
    """Senders whose output depends on receiver ``v`` (empty for the logits)."""
    if v == graph.logits:
        return []
    layer, r = divmod(v, graph.per_layer)
    h, kv = graph.n_heads, graph.n_kv_heads
    if r < h:
        return [graph.head(layer, r)]
    if r < h + 2 * kv:
        g = (r - h) % kv
        rep = h // kv
        return [graph.head(layer, g * rep + i) for i in range(rep)]
    return [graph.mlp(layer)]


def _on_paths(graph: Graph, edges: Tensor) -> Tensor:
    """Edges (non-positional) on some input -> logits path of the edge set."""
    deps = [_dependents(graph, v) for v in range(graph.n_receivers)]
    useful = torch.zeros(graph.n_senders, dtype=torch.bool)  # has a kept path to the logits
    for u in reversed(range(graph.n_senders)):
        for v in edges[u].nonzero().squeeze(-1).tolist():
            if v == graph.logits or any(useful[d] for d in deps[v]):
                useful[u] = True
                break
    live = torch.zeros(graph.n_senders, dtype=torch.bool)  # reached from the input through kept edges
    live[0] = True
    for u in range(graph.n_senders):
        if live[u]:
            for v in edges[u].nonzero().squeeze(-1).tolist():
                live[deps[v]] = True
    reaches = torch.tensor([v == graph.logits or bool(useful[deps[v]].any()) for v in range(graph.n_receivers)])
    return edges & live[:, None] & reaches[None, :]


@register_result
@dataclass(frozen=True)
class EdgeScores:
    """Edge attribution scores, averaged over prompts.

    Attributes:
        graph: the model's graph.
        scores: ``[sender, receiver]`` (or ``[sender, receiver, pos]``) estimated change of the metric
            when that edge alone is patched from the source run (0 for pairs that are not edges).
        clean / corrupt: ``[prompt]`` metric of the clean and corrupt runs.
        direction: ``"noising"`` (default: clean is patched) or ``"denoising"``.
        labels: ``"pos"`` token labels of the first clean prompt.
    """

    graph: Graph
    scores: Float[Tensor, "sender receiver *pos"]
    clean: Float[Tensor, " prompt"]
    corrupt: Float[Tensor, " prompt"]
    direction: str = "noising"
    labels: dict[str, list[str]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_shape(self.graph, self.scores, "scores")

    @property
    def per_position(self) -> bool:
        return self.scores.ndim == 3

    def edge_matrix(self) -> Float[Tensor, "sender receiver"]:
        """Scores summed over positions."""
        return self.scores.sum(-1) if self.per_position else self.scores

    def node_scores(self) -> dict[str, float]:
        """Each sender's outgoing edges summed: the attribution of patching that node's output."""
        return dict(zip(self.graph.senders, self.edge_matrix().sum(1).tolist()))

    def _valid(self) -> Tensor:
        return self.graph.valid[..., None].expand_as(self.scores) if self.per_position else self.graph.valid

    def ranked(self, k: int = 20) -> list[tuple[str, float]]:
        """The ``k`` edges (with position, if per position) with the largest ``|score|``."""
        flat = self.scores.masked_fill(~self._valid(), 0.0).flatten()
        top = flat.abs().argsort(descending=True)[:k]
        out = []
        for i in top.tolist():
            idx = torch.unravel_index(torch.tensor(i), self.scores.shape)
            out.append((self.graph.edge_label(*(int(j) for j in idx)), float(flat[i])))
        return out

    def top(self, n: int) -> Circuit:
        """The circuit of the ``n`` edges with the largest ``|score|``."""
        if n < 0:
            raise ConfigError(f"n must be >= 0, got {n}.")
        flat = self.scores.abs().masked_fill(~self._valid(), -1.0).flatten()
        edges = torch.zeros_like(flat, dtype=torch.bool)
        edges[flat.argsort(descending=True)[:n]] = True
        edges = edges.view(self.scores.shape) & self._valid()
        return Circuit(self.graph, edges, self.scores.clone(), {"selection": f"top {n}", "n_requested": n})

    def threshold(self, tau: float) -> Circuit:
        """The circuit of the edges with ``|score| >= tau``."""
        edges = (self.scores.abs() >= tau) & self._valid()
        return Circuit(self.graph, edges, self.scores.clone(), {"selection": f"|score| >= {tau:g}"})

    def plot(self, *, top: int = 30, title: str | None = None) -> go.Figure:
        """Ranked bar chart of the ``top`` edges."""
        from recallscope.attribution.plots import ranked_bars

        ranked = self.ranked(top)
        receivers = [label.split(" -> ")[1].split(" @")[0] for label, _ in ranked]
        groups = [r.rsplit(".", 1)[-1] + " input" if r.endswith((".q", ".k", ".v")) else
                  ("logits" if r == "logits" else "mlp input") for r in receivers]
        return ranked_bars([lab for lab, _ in ranked], torch.tensor([s for _, s in ranked]).numpy(),
                           groups=groups, title=title or f"{self.config.get('method', 'EAP')}: top {len(ranked)} edges "
                           f"({self.direction})", x_title=f"edge score ({self.config.get('metric', 'metric')})")

    def save(self, directory: str | os.PathLike) -> Path:
        meta = {"graph": self.graph.to_dict(), "direction": self.direction, "labels": self.labels,
                "config": self.config}
        return save_result_dir(directory, "EdgeScores", {"scores": self.scores, "clean": self.clean,
                                                         "corrupt": self.corrupt}, meta, self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "EdgeScores":
        tensors, meta, manifest = load_result_dir(directory, "EdgeScores")
        return cls(Graph(**meta["graph"]), tensors["scores"], tensors["clean"], tensors["corrupt"],
                   meta["direction"], meta.get("labels", {}), meta.get("config", {}), manifest)
