"""MIB interop and scoring (Mueller et al. 2025, "MIB: A Mechanistic Interpretability Benchmark", circuit
localisation track).

1. **Edge scores as MIB JSON** (the format of EAP-IG's ``Graph.to_json`` / ``Graph.from_json``, which MIB's
   ``run_evaluation.py`` reads): ``{"cfg": {"n_layers", "n_heads", "parallel_attn_mlp", "d_model"},
   "nodes": {name: {"in_graph"}}, "edges": {name: {"score", "in_graph"}}}``. Nodes are ``input``,
   ``a{layer}.h{head}``, ``m{layer}``, ``logits`` (recallscope's own node names); edges are
   ``"{sender}->{receiver}"``, with ``<q>``, ``<k>`` or ``<v>`` after an attention receiver
   (``"input->a0.h1<q>"``, ``"a0.h1->m0"``, ``"m1->logits"``). MIB's graph has one k and one v input per
   query head; under grouped-query attention recallscope has one per key/value head, so export gives each
   query head of a group ``score / heads_per_group`` (import sums them back). Per-position scores are summed
   over positions (MIB edges have no position).
2. **Faithfulness at fixed edge budgets**: for each fraction ``k`` of the graph's edges (MIB's
   ``0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100%``) keep the ``int(k * n_edges)`` edges with the
   largest ``|score|``, drop edges on no input-to-logits path (MIB prunes the same way), and measure the
   faithfulness ``(m(circuit) - m(corrupt)) / (m(clean) - m(corrupt))``.
3. **CPR and CMD** (MIB's ``run_evaluation.py``): trapezoid areas over the fractions ``k`` (linear axis):
   CPR = area under the faithfulness curve (higher is better), CMD = area between the curve and 1, i.e.
   of ``|1 - f(k)|`` (lower is better).
4. **Feature graphs**: the same curve for an attribution graph over transcoder features, evaluated in the
   graph's own linear model (the local replacement model with attention, norms and each feature's on/off
   state frozen; a feature's activation is its pre-activation): every node's value is its bias plus its kept
   input edges, each scaled by how much of its source survived; error and embedding sources are constants.
   All edges give the real logit, none gives the logit's bias. This measures how much of the graph's own
   attribution the kept edges carry, not a causal test in the real model; :func:`feature_node_curve` is
   that test at the level of nodes: the most influential features kept, every other active feature
   ablated in the real model.
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from torch import Tensor
from tqdm.auto import tqdm

from recallscope.attribution.edges import Circuit, EdgeScores
from recallscope.attribution.graph import Graph
from recallscope.errors import ConfigError, ResultFileError
from recallscope.results import load_result_dir, register_result, save_result_dir

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The edge budgets (fractions of all edges) at which MIB evaluates a circuit."""


# --- edge names ----------------------------------------------------------------------------------------
def _mib_receivers(graph: Graph, v: int) -> list[tuple[str, float]]:
    """MIB receiver names of recallscope receiver ``v`` and the share of its score each gets."""
    name = graph.receivers[v]
    if not name.endswith((".q", ".k", ".v")):
        return [(name, 1.0)]
    node, kind = name.rsplit(".", 1)
    layer, part = node.split(".")
    if part.startswith("kv"):  # grouped-query: one k/v receiver per group -> every query head of the group
        rep = graph.n_heads // graph.n_kv_heads
        g = int(part[2:])
        return [(f"{layer}.h{g * rep + i}<{kind}>", 1.0 / rep) for i in range(rep)]
    return [(f"{node}<{kind}>", 1.0)]


def mib_edge_names(graph: Graph) -> dict[str, tuple[int, int, float]]:
    """MIB edge name -> (sender, receiver, share) for every edge of ``graph`` (see the module docstring)."""
    out = {}
    for u, v in graph.valid.nonzero().tolist():
        for name, share in _mib_receivers(graph, v):
            out[f"{graph.senders[u]}->{name}"] = (u, v, share)
    return out


def to_mib_json(scores: EdgeScores, *, d_model: int, circuit: Circuit | None = None) -> dict[str, Any]:
    """The MIB / EAP-IG JSON of ``scores`` (``in_graph`` from ``circuit``; without one, no edge is in the
    graph and the file holds importance scores only, MIB's first submission format)."""
    g = scores.graph
    values = scores.edge_matrix().double()
    inside = circuit.edge_matrix() if circuit is not None else torch.zeros_like(g.valid)
    if circuit is not None and circuit.graph != g:
        raise ConfigError("the circuit belongs to a different model graph than the scores.")
    edges = {name: {"score": float(values[u, v]) * share, "in_graph": bool(inside[u, v])}
             for name, (u, v, share) in mib_edge_names(g).items()}
    used = {g.senders[u] for u in inside.any(1).nonzero().squeeze(-1).tolist()}
    used |= {g.receiver_node(v) for v in inside.any(0).nonzero().squeeze(-1).tolist()}
    nodes = {name: {"in_graph": name in used or name == "logits"}
             for name in ["input", *g.senders[1:], "logits"]}
    cfg = {"n_layers": g.n_layers, "n_heads": g.n_heads, "parallel_attn_mlp": g.parallel, "d_model": int(d_model)}
    if g.n_kv_heads != g.n_heads:
        cfg["n_key_value_heads"] = g.n_kv_heads  # extra key: MIB ungroups k/v heads, recallscope re-groups them
    return {"cfg": cfg, "nodes": nodes, "edges": edges}


def write_mib_json(scores: EdgeScores, path: str | os.PathLike, *, d_model: int,
                   circuit: Circuit | None = None) -> Path:
    """Write :func:`to_mib_json` to ``path`` (e.g. ``<dir>/ioi_gpt2/importances.json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_mib_json(scores, d_model=d_model, circuit=circuit)))
    return path


def from_mib_json(data: dict[str, Any] | str | os.PathLike) -> tuple[EdgeScores, Circuit]:
    """Edge scores and the ``in_graph`` circuit from MIB / EAP-IG JSON (a dict or a file path)."""
    if not isinstance(data, dict):
        try:
            data = json.loads(Path(data).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ResultFileError(f"cannot read MIB JSON from {data}: {exc}") from exc
    if not isinstance(data, dict):
        raise ResultFileError(f"not an MIB circuit file: the JSON is a {type(data).__name__}, not an object with "
                              "cfg, nodes and edges.")
    missing = [k for k in ("cfg", "nodes", "edges") if k not in data]
    if missing:
        raise ResultFileError(f"not an MIB circuit file: it lacks {missing} (expected cfg, nodes, edges).")
    cfg = data["cfg"]
    n_heads = int(cfg["n_heads"])
    g = Graph(int(cfg["n_layers"]), n_heads, int(cfg.get("n_key_value_heads", n_heads)),
              bool(cfg.get("parallel_attn_mlp", False)))
    names = mib_edge_names(g)
    unknown = sorted(set(data["edges"]) - set(names))
    if unknown:
        raise ResultFileError(f"{len(unknown)} edges of the file are not edges of a {g.n_layers}-layer, "
                              f"{n_heads}-head graph, e.g. {unknown[:3]}; check cfg or the edge names.")
    values = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
    inside = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
    for name, info in data["edges"].items():
        u, v, _ = names[name]
        values[u, v] += float(info.get("score", 0.0) or 0.0)
        inside[u, v] |= bool(info.get("in_graph", False))
    empty = torch.zeros(0)
    scores = EdgeScores(g, values.float(), empty, empty, config={"method": "mib-import"})
    return scores, Circuit(g, inside, values.float(), {"selection": "mib in_graph"})


# --- CPR / CMD -----------------------------------------------------------------------------------------
def cpr_cmd(fractions: Sequence[float], faithfulness: Sequence[float]) -> tuple[float, float]:
    """(CPR, CMD): trapezoid areas over ``fractions`` of ``f`` and of ``|1 - f|`` (MIB's definitions)."""
    if len(fractions) != len(faithfulness) or len(fractions) < 2:
        raise ConfigError(f"need at least two (fraction, faithfulness) points of equal count, got "
                          f"{len(fractions)} fractions and {len(faithfulness)} values.")
    if any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ConfigError(f"fractions must increase strictly, got {list(fractions)}.")
    cpr = cmd = 0.0
    for i in range(len(fractions) - 1):
        dx = fractions[i + 1] - fractions[i]
        f1, f2 = faithfulness[i], faithfulness[i + 1]
        cpr += dx * (f1 + f2) / 2
        cmd += dx * (abs(1 - f1) + abs(1 - f2)) / 2
    return cpr, cmd


@register_result
@dataclass(frozen=True)
class MIBCurve:
    """Faithfulness at MIB's edge budgets, with CPR and CMD.

    ``fractions``: budgets (fractions of ``n_edges_total``); ``n_edges``: edges kept at each budget after
    pruning (features kept, for ``"feature-nodes"``); ``faithfulness``: fraction of the clean-corrupt gap
    recovered (component circuits), of the logit's non-bias part (feature graphs) or of the logit change of
    ablating every feature (feature nodes); ``kind``: ``"component"``, ``"feature"``, ``"feature-nodes"`` or
    ``"feature-edges"`` (evaluated in the real model: :mod:`recallscope.attribution.feature_curve`; the ``.pt``
    file format is :mod:`recallscope.attribution.mib_pt`).
    """

    fractions: list[float]
    n_edges: list[int]
    faithfulness: list[float]
    n_edges_total: int
    kind: str = "component"
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.fractions) == len(self.n_edges) == len(self.faithfulness):
            raise ResultFileError("fractions, n_edges and faithfulness must have one entry per budget.")

    @property
    def cpr(self) -> float:
        """Area under the faithfulness curve (MIB's CPR; higher is better)."""
        return cpr_cmd(self.fractions, self.faithfulness)[0]

    @property
    def cmd(self) -> float:
        """Area between the faithfulness curve and 1 (MIB's CMD; lower is better)."""
        return cpr_cmd(self.fractions, self.faithfulness)[1]

    def summary_extra(self) -> list[tuple[str, str]]:
        return [("CPR", f"{self.cpr:.4f}"), ("CMD", f"{self.cmd:.4f}")]

    def plot(self, *, title: str | None = None) -> go.Figure:
        from recallscope.plotting import apply_style

        pct = [100 * f for f in self.fractions]
        fig = go.Figure(go.Scatter(x=pct, y=self.faithfulness, mode="lines+markers", name="faithfulness",
                                   text=[f"{n} edges" for n in self.n_edges],
                                   hovertemplate="%{x:.1f}% budget, %{text}: %{y:.3f}<extra></extra>"))
        apply_style(fig, title=title or f"{self.kind} circuit: CPR {self.cpr:.3f}, CMD {self.cmd:.3f}")
        fig.add_hline(y=1.0, line=dict(color="#888888", width=1, dash="dot"))
        fig.update_xaxes(type="log", title_text=f"edge budget, % of {self.n_edges_total} edges")
        fig.update_yaxes(title_text="faithfulness")
        fig.update_layout(height=420)
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        tensors = {"fractions": torch.tensor(self.fractions, dtype=torch.float64),
                   "n_edges": torch.tensor(self.n_edges, dtype=torch.long),
                   "faithfulness": torch.tensor(self.faithfulness, dtype=torch.float64)}
        meta = {"n_edges_total": self.n_edges_total, "kind": self.kind, "config": self.config,
                "cpr": self.cpr, "cmd": self.cmd}
        return save_result_dir(directory, "MIBCurve", tensors, meta, {})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "MIBCurve":
        t, meta, _ = load_result_dir(directory, "MIBCurve")
        return cls(t["fractions"].tolist(), t["n_edges"].tolist(), t["faithfulness"].tolist(),
                   int(meta["n_edges_total"]), meta.get("kind", "component"), meta.get("config", {}))


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    out = [float(f) for f in fractions]
    if not out or any(not 0 < f <= 1 for f in out):
        raise ConfigError(f"edge budgets are fractions in (0, 1], got {out}.")
    return out


def mib_curve(model: Any, pairs: Any, metric: Any, scores: EdgeScores, *,
              fractions: Sequence[float] = MIB_FRACTIONS, progress: bool = True) -> MIBCurve:
    """Faithfulness of the top ``int(k * n_edges)`` edges of ``scores`` (pruned to input-to-logits paths)
    at each budget ``k``, on ``pairs`` (clean prompts, corrupt runs as the ablation); see the module docstring.
    Per-position scores are summed over positions first (MIB edges have no position)."""
    from recallscope.attribution.circuits import CircuitRunner

    fractions = _check_fractions(fractions)
    flat = scores if not scores.per_position else EdgeScores(scores.graph, scores.edge_matrix(), scores.clean,
                                                             scores.corrupt, scores.direction, config=scores.config)
    runner = CircuitRunner(model, pairs, metric)
    total = int(scores.graph.valid.sum())
    kept, faith = [], []
    for k in tqdm(fractions, desc="MIB budgets", disable=not progress, leave=False):
        circuit = flat.top(int(k * total)).pruned()
        kept.append(circuit.n_edges)
        faith.append(runner.recovered(runner.metric(circuit.keep_mask())))  # evaluate_circuit less the complement
    return MIBCurve(fractions, kept, faith, total, "component", {"method": scores.config.get("method", "")})


# --- feature graphs ------------------------------------------------------------------------------------
def linear_circuit_logits(graph: Any, keep: Tensor) -> Tensor:
    """Each logit node's value in the graph's linear model with only the ``keep`` edges (see the module
    docstring, item 4). ``keep``: ``[n_node, n_node]`` bool, indexed ``[target, source]`` like the adjacency."""
    a = graph.adjacency.double() * keep.double()
    bias = graph.bias.double()
    n_feat = graph.n_feat
    rows = graph.rows_computed if graph.rows_computed is not None else torch.ones(a.shape[0], dtype=torch.bool)
    act = graph.activations.double()
    ratio = torch.ones(a.shape[0], dtype=torch.float64)  # how much of each source survives
    for _ in range(graph.n_layers + 1):  # features only read earlier layers: depth <= n_layers
        value = bias + a @ ratio
        new = ratio.clone()
        feat_rows = rows[:n_feat]
        new[:n_feat][feat_rows] = value[:n_feat][feat_rows] / act[feat_rows].clamp_min(1e-12)
        if torch.equal(new, ratio):
            break
        ratio = new
    return (bias + a @ ratio)[graph.logit_slice]


def feature_mib_curve(graph: Any, *, fractions: Sequence[float] = MIB_FRACTIONS, logit: int = 0) -> MIBCurve:
    """MIB-style faithfulness of a feature attribution graph at fixed edge budgets: keep the
    ``int(k * n_edges)`` edges with the largest ``|weight|`` (among its non-zero edges), evaluate logit node
    ``logit`` in the graph's linear model, and report ``(L(kept) - L(none)) / (L(all) - L(none))``."""
    fractions = _check_fractions(fractions)
    weights = graph.adjacency.abs()
    nonzero = weights > 0
    total = int(nonzero.sum())
    if total == 0:
        raise ConfigError("the attribution graph has no non-zero edges to keep.")
    order = weights.flatten().argsort(descending=True)
    none = float(linear_circuit_logits(graph, torch.zeros_like(nonzero))[logit])
    full = float(linear_circuit_logits(graph, nonzero)[logit])
    if abs(full - none) < 1e-9:
        raise ConfigError("the logit equals its bias in this graph (no edge moves it); faithfulness is undefined.")
    kept, faith = [], []
    for k in fractions:
        n = int(k * total)
        keep = torch.zeros(weights.numel(), dtype=torch.bool)
        keep[order[:n]] = True
        keep = keep.view_as(nonzero) & nonzero
        kept.append(n)
        faith.append((float(linear_circuit_logits(graph, keep)[logit]) - none) / (full - none))
    return MIBCurve(fractions, kept, faith, total, "feature", {"logit": graph.logit_labels[logit]})


def feature_node_curve(model: Any, tset: Any, graph: Any, *, fractions: Sequence[float] = MIB_FRACTIONS,
                       logit: int = 0) -> MIBCurve:
    """MIB's node-level variant for a feature graph, checked in the *real* model: keep the
    ``int(k * n_features)`` active features with the largest influence on the logits (the graph's
    :func:`~recallscope.features.graph.influence`), ablate every other active feature of the graph (set to 0 at
    its layer and position, errors kept: :func:`~recallscope.features.interventions.run_intervention`, nothing
    frozen), and report ``(L(kept) - L(none)) / (L(all) - L(none))`` for logit node ``logit``. Features that an
    ablation newly switches on are left alone. ``n_edges`` of the result counts kept features."""
    from recallscope.features.graph import influence
    from recallscope.features.interventions import FeatureEdit, run_intervention

    fractions = _check_fractions(fractions)
    n_feat = graph.n_feat
    if n_feat == 0:
        raise ConfigError("the attribution graph has no active features to keep or ablate.")
    order = influence(graph)[:n_feat].argsort(descending=True).tolist()
    vec = graph.logit_vectors[logit].float()
    feats = graph.features.tolist()

    def value(kept: set[int]) -> float:
        edits = [FeatureEdit(layer, f, pos, value=0.0) for n, (layer, pos, f) in enumerate(feats) if n not in kept]
        res = run_intervention(model, tset, graph.tokens, edits)
        return float(res.logits[-1] @ vec)

    full, none = value(set(range(n_feat))), value(set())
    if abs(full - none) < 1e-9:
        raise ConfigError("ablating every feature of the graph leaves the logit unchanged; faithfulness is undefined.")
    kept_counts, faith = [], []
    for k in fractions:
        n = int(k * n_feat)
        kept_counts.append(n)
        faith.append((value(set(order[:n])) - none) / (full - none))
    return MIBCurve(fractions, kept_counts, faith, n_feat, "feature-nodes", {"logit": graph.logit_labels[logit]})
