"""Results of edge attribution and circuit discovery: :class:`EdgeScores` and :class:`Circuit`.

``EdgeScores`` holds one score per edge of a :class:`~recallscope.attribution.graph.Graph` (optionally per
position), averaged over prompts; ``top(n)`` / ``threshold(tau)`` select a :class:`Circuit`. A circuit
is a set of edges (with the scores that chose them, for drawing), plus whatever was measured about it
(faithfulness, completeness) in ``info``. Both save and load through
:func:`recallscope.results.save_result_dir`.

Nodes and edges are *identified* by the names of EAP-IG / MIB circuit files (``a3.h4``, ``m3``,
``"a0.h1 -> a1.h0.q"``; :meth:`Graph.edge`), and *shown* in the one site vocabulary
(:func:`recallscope.sites.site_label`): :meth:`Graph.node_label` (``z L3.H4``, ``mlp_out L3``),
:func:`receiver_label` and :func:`edge_display_label` (``z L0.H1 -> q L1.H0``).
"""

import os
from collections.abc import Iterable, Mapping, Sequence
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
from recallscope.sites import site_label
from recallscope.vocab import Component


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

    def summary_extra(self) -> list[tuple[str, str]]:
        """Rows of the HTML summary: size, how it was chosen, what was measured; nodes by their site labels."""
        nodes = [self.graph.node_label(n) for n in self.nodes()]
        rows = [("edges", str(self.n_edges)),
                ("nodes", f"{len(nodes)}: " + ", ".join(nodes[:12]) + (", …" if len(nodes) > 12 else ""))]
        rows += [(k, f"{self.info[k]:.3f}" if isinstance(self.info[k], float) else str(self.info[k]))
                 for k in ("selection", "faithfulness", "completeness") if k in self.info]
        return rows

    def plot(self, *, title: str | None = None, groups: Mapping[str, Sequence[int | str]] | None = None,
             group_by: str | None = None, thresholds: Sequence[float] | None = None, start: float | None = None,
             max_edges: int = 300) -> go.Figure:
        """The circuit in the graph view (:func:`recallscope.features.view.graph_view`): nodes labelled in the
        site vocabulary (``z L3.H4``, ``mlp_out L3``, ``embed``; the node id such as ``a3.h4`` is in the hover
        text), rows by layer, edge width by ``|weight|`` (q/k/v inputs of a head summed), and a slider that
        prunes to the nodes carrying a cumulative share of the influence on the logits (``thresholds``,
        starting at ``start``, default 0.8). ``groups`` / ``group_by``: supernodes (see ``graph_view``)."""
        from recallscope.features.view import THRESHOLDS, graph_view

        faith = f", faithfulness {self.info['faithfulness']:.2f}" if "faithfulness" in self.info else ""
        return graph_view(self, groups=groups, group_by=group_by, start=start, max_edges=max_edges,
                          thresholds=THRESHOLDS if thresholds is None else thresholds,
                          title=title or f"Circuit: {self.n_edges} edges{faith}")

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


def _stage_label(graph: Graph, y: float) -> str:
    """The label of a row of :func:`_node_xy` in the site vocabulary: ``embed``, ``k/v L3``, ``z L3`` (the
    heads' outputs), ``mlp_out L3``, ``logits``."""
    if y == 0:
        return "embed"
    if y == 2 * graph.n_layers + 1:
        return "logits"
    layer, rest = divmod(y, 2)  # MLP of layer l sits at 2l+2, its heads at 2l+1, its k/v nodes at 2l+0.6
    if rest < 0.3:
        return site_label(Component.MLP_OUT, int(layer) - 1)
    return f"k/v L{int(layer)}" if rest < 0.9 else site_label(Component.HEAD_OUT, int(layer))


def receiver_label(graph: Graph, name: str) -> str:
    """The display label of receiver ``name`` in the site vocabulary: a head's query/key/value input
    ``a3.h4.q`` -> ``q L3.H4`` (``a3.kv1.k`` -> ``k L3.H1``, key/value head 1), any other receiver is
    its node's label (:meth:`Graph.node_label`: ``m3`` -> ``mlp_out L3``, ``logits``)."""
    if name.endswith((".q", ".k", ".v")):
        node, part = name.rsplit(".", 1)
        layer, _, head = node[1:].partition(".")
        return site_label(Component(part), int(layer), head=int(head.lstrip("kvh")))
    return graph.node_label(name)


def edge_display_label(graph: Graph, name: str) -> str:
    """The display label of edge ``name`` (an id such as ``"a0.h1 -> a1.h0.q @3"``, see
    :meth:`Graph.edge_label`): ``"z L0.H1 -> q L1.H0 @3"``. Ids stay the interchange names (MIB / EAP-IG,
    :meth:`Graph.edge`); this is what figures and printouts show (an ASCII arrow: JSON summaries and CLI
    printouts stay readable)."""
    edge, _, pos = name.partition(" @")
    u, v = graph.edge(edge)
    text = f"{graph.node_label(graph.senders[u])} -> {receiver_label(graph, graph.receivers[v])}"
    return text + (f" @{pos}" if pos else "")


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
        """Ranked bar chart of the ``top`` edges, labelled in the site vocabulary (:func:`edge_display_label`)."""
        from recallscope.attribution.plots import ranked_bars

        ranked = self.ranked(top)
        receivers = [label.split(" -> ")[1].split(" @")[0] for label, _ in ranked]
        groups = [r.rsplit(".", 1)[-1] + " input" if r.endswith((".q", ".k", ".v")) else
                  ("logits" if r == "logits" else "mlp input") for r in receivers]
        shown = [edge_display_label(self.graph, lab) for lab, _ in ranked]
        return ranked_bars(shown, torch.tensor([s for _, s in ranked]).numpy(),
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
