"""Readable pictures of circuits: supernodes, a pruning slider and labels that say what a node does.

One view serves both feature graphs (:class:`~recallscope.features.graph.AttributionGraph`) and component
circuits (:class:`~recallscope.attribution.edges.EdgeScores` / :class:`~recallscope.attribution.edges.Circuit`):

1. **Node graph** (:class:`NodeGraph`): every node's label, hover text, kind and place (x = position or head,
   y = layer), a weighted adjacency ``[target, source]`` and the pinned nodes (inputs and outputs, always
   drawn). Built by :func:`feature_node_graph` and :func:`component_node_graph`.
2. **Supernodes** (:func:`group_nodes`): user-given groups (name -> node indices) and/or an automatic
   grouping, ``"cell"`` (features at one layer and position), ``"label"`` (nodes with the same label, e.g.
   features whose decoder says the same token) or ``"layer"``. A supernode's edges are the sums of its
   members' edges (edges inside it are dropped); its place is its members' mean.
3. **Influence and pruning**: each node's influence on the outputs is the sum over all paths of the
   absolute, row-normalised edge weights (as :func:`recallscope.features.graph.influence`). For each
   threshold ``tau`` of the slider the nodes with the largest influence whose cumulative share stays below
   ``tau`` are kept (circuit-tracer's node pruning), with the pinned nodes, and the ``max_edges``
   strongest edges among them are drawn. The frames are precomputed: one set of traces per threshold,
   the slider toggles their visibility (works in static HTML, offline).
4. **Labels** (:func:`feature_labels`): a feature's lens tokens (the top tokens of its decoder direction
   through the final norm's gain and the unembedding, bias removed) and its top-activating context from
   texts the caller gives (the token where it fires most, with the tokens before it).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import plotly.graph_objects as go
import torch
from torch import Tensor

from recallscope.errors import ConfigError

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
"""Default cumulative-influence thresholds of the pruning slider."""
_KIND_COLOURS = {"feature": "#1f77b4", "error": "#bbbbbb", "embedding": "#2ca02c", "logit": "#d62728",
                 "head": "#1f77b4", "mlp": "#ff7f0e", "input": "#2ca02c", "logits": "#d62728",
                 "supernode": "#9467bd"}


@dataclass(frozen=True)
class NodeGraph:
    """Nodes and weighted edges to draw (see the module docstring)."""

    labels: list[str]
    hover: list[str]
    kinds: list[str]
    x: Tensor
    y: Tensor
    adjacency: Tensor
    """``[target, source]`` edge weights."""
    pinned: Tensor
    """Nodes always drawn (inputs and outputs)."""
    outputs: Tensor
    """Nodes whose influence is measured (logits)."""
    x_ticks: tuple[list[float], list[str]]
    y_ticks: tuple[list[float], list[str]]
    members: list[list[int]] | None = None
    """For a grouped graph: the original nodes in each node."""
    ids: list[str] | None = None
    """Names that ``groups`` may use instead of indices (component node ids such as ``a23.h4``)."""

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.adjacency.shape != (n, n) or not (len(self.hover) == len(self.kinds) == n):
            raise ConfigError(f"a node graph needs one label, hover text and kind per node and an [{n}, {n}] "
                              f"adjacency; got adjacency {tuple(self.adjacency.shape)}.")


# --- building node graphs ------------------------------------------------------------------------------
def _spread(cells: list[tuple[float, float]]) -> Tensor:
    """x offsets inside each (x, y) cell so that nodes sharing a cell sit side by side."""
    out, seen = torch.zeros(len(cells)), dict[tuple[float, float], list[int]]()
    for i, c in enumerate(cells):
        seen.setdefault(c, []).append(i)
    for members in seen.values():
        for j, i in enumerate(members):
            out[i] = (j + 1) / (len(members) + 1) - 0.5
    return out


def feature_node_graph(graph: Any, *, labels: Sequence[str] | None = None,
                       token_strs: Sequence[str] | None = None) -> NodeGraph:
    """A :class:`NodeGraph` of an attribution graph: x = position, y = layer (embeddings at -1, logits at
    ``n_layers``); ``labels`` (one per node, e.g. from :func:`feature_labels`) replace the default ones."""
    n = graph.adjacency.shape[0]
    names = list(labels) if labels is not None else graph.node_labels()
    if len(names) != n:
        raise ConfigError(f"labels has {len(names)} entries; the graph has {n} nodes (features, errors, "
                          "embeddings, logits).")
    toks = list(token_strs) if token_strs is not None else [str(t) for t in graph.tokens.tolist()]
    cells, kinds = [], []
    for i in range(n):
        if i < graph.n_feat:
            layer, pos, _ = graph.features[i].tolist()
            cells.append((float(pos), float(layer)))
            kinds.append("feature")
        elif i < graph.error_slice.stop:
            layer, pos = divmod(i - graph.n_feat, graph.n_pos)
            cells.append((float(pos), float(layer)))
            kinds.append("error")
        elif i < graph.embed_slice.stop:
            cells.append((float(i - graph.embed_slice.start), -1.0))
            kinds.append("embedding")
        else:
            cells.append((float(graph.n_pos - 1), float(graph.n_layers)))
            kinds.append("logit")
    x = torch.tensor([c[0] for c in cells]) + _spread(cells)
    y = torch.tensor([c[1] for c in cells])
    act = [f"<br>activation {float(graph.activations[i]):.3g}" if i < graph.n_feat else "" for i in range(n)]
    hover = [f"{names[i]}<br>{kinds[i]} at position {int(cells[i][0])} ({toks[int(cells[i][0])]}){act[i]}"
             for i in range(n)]
    pinned = torch.zeros(n, dtype=torch.bool)
    pinned[graph.embed_slice.start:] = True
    outputs = torch.zeros(n, dtype=torch.bool)
    outputs[graph.logit_slice] = True
    y_ticks = ([-1.0, *map(float, range(graph.n_layers)), float(graph.n_layers)],
               ["emb", *[f"L{i}" for i in range(graph.n_layers)], "logit"])
    return NodeGraph(names, hover, kinds, x, y, graph.adjacency.float(), pinned, outputs,
                     ([float(p) for p in range(graph.n_pos)], toks), y_ticks)


def component_node_graph(scores: Any) -> NodeGraph:
    """A :class:`NodeGraph` of component edge scores or a circuit (its edges' weights only): one node per
    head, MLP, the input and the logits; edges into a head's q, k and v inputs are summed (under grouped-query
    attention a key/value input's weight is split equally over the query heads of its group).
    Nodes are labelled with :meth:`~recallscope.attribution.graph.Graph.node_label` (the site labels)."""
    from recallscope.attribution.edges import Circuit, _node_xy

    g = scores.graph
    if isinstance(scores, Circuit):
        w = scores.weights if scores.weights is not None else scores.edges.float()
        w = (w * scores.edges).float()
    else:
        w = scores.scores.float() * (g.valid[..., None] if scores.scores.ndim == 3 else g.valid)
    w = w.sum(-1) if w.ndim == 3 else w
    nodes = [*g.senders, "logits"]
    index = {name: i for i, name in enumerate(nodes)}
    adjacency = torch.zeros(len(nodes), len(nodes))
    rep = g.n_heads // g.n_kv_heads
    for v in range(g.n_receivers):
        node = g.receiver_node(v)
        if ".kv" in node:  # a grouped key/value input feeds every query head of its group: split it over them
            layer, group = node[1:].split(".kv")
            targets = [index[f"a{layer}.h{int(group) * rep + i}"] for i in range(rep)]
        else:
            targets = [index[node]]
        for u in w[:, v].nonzero().squeeze(-1).tolist():
            for target in targets:
                adjacency[target, index[g.senders[u]]] += w[u, v] / len(targets)
    xy = [_node_xy(g, name) for name in nodes]
    kinds = ["input" if n == "input" else "logits" if n == "logits" else "mlp" if n.startswith("m") else "head"
             for n in nodes]
    pinned = [k in ("input", "logits") for k in kinds]
    used = [i for i in range(len(nodes)) if pinned[i] or bool(adjacency[i].any() or adjacency[:, i].any())]
    rows = sorted({xy[i][1] for i in used})  # only rows with a node get drawn, one unit apart
    sub = torch.tensor(used)
    labels = [g.node_label(nodes[i]) for i in used]
    return NodeGraph(labels, [f"{lab}<br>id {nodes[i]}" for lab, i in zip(labels, used)], [kinds[i] for i in used],
                     torch.tensor([xy[i][0] for i in used]), torch.tensor([float(rows.index(xy[i][1])) for i in used]),
                     adjacency[sub][:, sub], torch.tensor([pinned[i] for i in used]),
                     torch.tensor([kinds[i] == "logits" for i in used]), ([], []),
                     ([float(r) for r in range(len(rows))], [_row_label(g, r) for r in rows]),
                     ids=[nodes[i] for i in used])


def _row_label(g: Any, y: float) -> str:
    from recallscope.attribution.edges import _stage_label

    return _stage_label(g, y)


# --- supernodes ----------------------------------------------------------------------------------------
def _auto_groups(ng: NodeGraph, by: str) -> list[tuple[str, list[int]]]:
    """(name, members) of the automatic groups over the nodes that are not pinned (error nodes stay apart)."""
    if by not in ("cell", "layer", "label"):
        raise ConfigError(f"group_by is 'cell', 'layer' or 'label', got {by!r}.")
    groups: dict[Any, tuple[str, list[int]]] = {}
    key: Any
    for i, kind in enumerate(ng.kinds):
        if bool(ng.pinned[i]) or kind == "error":
            continue
        x, y = round(float(ng.x[i])), float(ng.y[i])
        if by == "cell":
            key, name = (x, y, kind), f"{kind}s {_layer_name(ng, y)} @{x}"
        elif by == "layer":
            key, name = (y, kind), f"{kind}s {_layer_name(ng, y)}"
        else:
            key = name = _concept(ng.labels[i])
        groups.setdefault(key, (name, []))[1].append(i)
    return list(groups.values())


def _concept(label: str) -> str:
    """What a label says a node does: the lens tokens of a :func:`feature_labels` label (``→ ...``, before any
    ``|`` context), else the whole label."""
    if "→" not in label:
        return label
    return "→" + label.split("→", 1)[1].split(" | ", 1)[0]


def _layer_name(ng: NodeGraph, y: float) -> str:
    vals, texts = ng.y_ticks
    return texts[vals.index(y)] if y in vals else f"y={y:g}"


def group_nodes(ng: NodeGraph, groups: Mapping[str, Sequence[int | str]] | None = None, *,
                by: str | None = None) -> NodeGraph:
    """Merge nodes into supernodes: ``groups`` (name -> node indices, ids or labels of ``ng``) first, then
    ``by`` over the nodes no group took: ``"cell"`` (feature graphs: one layer and position), ``"layer"`` or
    ``"label"``; automatic groups of one node stay as they were."""
    n = len(ng.labels)
    named = _given_groups(ng, groups or {})
    if by is not None:
        taken = {i for _, idx in named for i in idx}
        free = replace(ng, pinned=ng.pinned | torch.tensor([i in taken for i in range(n)]))
        named += [(nm, m) for nm, m in _auto_groups(free, by) if len(m) > 1]
    return _merge(ng, named)


def _given_groups(ng: NodeGraph, groups: Mapping[str, Sequence[int | str]]) -> list[tuple[str, list[int]]]:
    """User supernodes as (name, node indices), members given by index, id or label; no node in two groups."""
    n = len(ng.labels)
    named: list[tuple[str, list[int]]] = []
    taken: set[int] = set()
    names_at = {name: i for i, name in enumerate(ng.ids or [])} | {lab: i for i, lab in enumerate(ng.labels)}
    for name, given in groups.items():
        unknown = [m for m in given if isinstance(m, str) and m not in names_at]
        if unknown:
            raise ConfigError(f"supernode {name!r}: no node named {unknown}; use node indices, ids or labels.")
        idx = [names_at[m] if isinstance(m, str) else int(m) for m in given]
        bad = [i for i in idx if not 0 <= i < n or i in taken]
        if bad or not idx:
            raise ConfigError(f"supernode {name!r}: node indices {bad or idx} are out of range (0..{n - 1}), "
                              "empty or already in another supernode.")
        taken |= set(idx)
        named.append((name, idx))
    return named


def _merge(ng: NodeGraph, named: list[tuple[str, list[int]]]) -> NodeGraph:
    """``ng`` with each named group merged into one node (edges summed, internal edges dropped)."""
    n = len(ng.labels)
    new_of = {}
    out_members: list[list[int]] = []
    names: list[str | None] = []
    for name, idx in named:
        for i in idx:
            new_of[i] = len(out_members)
        out_members.append(idx)
        names.append(name)
    for i in range(n):
        if i not in new_of:
            new_of[i] = len(out_members)
            out_members.append([i])
            names.append(None)
    m = len(out_members)
    assign = torch.zeros(m, n)
    for i, j in new_of.items():
        assign[j, i] = 1.0
    adjacency = assign @ ng.adjacency @ assign.T
    adjacency.fill_diagonal_(0.0)  # edges inside a supernode are not drawn
    labels, hover, kinds = [], [], []
    for j, (idx, group) in enumerate(zip(out_members, names)):
        if group is None:
            labels.append(ng.labels[idx[0]])
            hover.append(ng.hover[idx[0]])
            kinds.append(ng.kinds[idx[0]])
        else:
            labels.append(f"{group} ({len(idx)})")
            shown = "<br>".join(ng.labels[i] for i in idx[:12]) + ("<br>..." if len(idx) > 12 else "")
            hover.append(f"supernode {group}: {len(idx)} nodes<br>{shown}")
            kinds.append("supernode")
    mean = lambda t: torch.stack([t[idx].float().mean() for idx in out_members])  # noqa: E731
    any_of = lambda t: torch.tensor([bool(t[idx].any()) for idx in out_members])  # noqa: E731
    base = ng.members or [[i] for i in range(n)]
    ids = [ng.ids[idx[0]] if ng.ids and name is None else (name or labels[j])
           for j, (idx, name) in enumerate(zip(out_members, names))]
    return NodeGraph(labels, hover, kinds, mean(ng.x), mean(ng.y), adjacency, any_of(ng.pinned), any_of(ng.outputs),
                     ng.x_ticks, ng.y_ticks, [[b for i in idx for b in base[i]] for idx in out_members], ids)


# --- influence and pruning -----------------------------------------------------------------------------
def node_influence(ng: NodeGraph) -> Tensor:
    """Each node's influence on the output nodes: sum over paths of absolute, row-normalised edge weights."""
    from recallscope.features.graph import path_influence

    w = ng.outputs.double() / max(1, int(ng.outputs.sum()))
    return path_influence(ng.adjacency.double(), w).float()


def kept_nodes(ng: NodeGraph, threshold: float, influence: Tensor | None = None) -> Tensor:
    """The pinned nodes and the most influential others whose cumulative share of influence (before each
    is added) stays below ``threshold``."""
    if not 0 < threshold <= 1:
        raise ConfigError(f"a pruning threshold lies in (0, 1], got {threshold}.")
    infl = node_influence(ng) if influence is None else influence
    free = (~ng.pinned).nonzero().squeeze(-1)
    scores = infl[free]
    order = scores.argsort(descending=True)
    share = scores[order].cumsum(0) / scores.sum().clamp_min(1e-12)
    before = torch.cat([torch.zeros(1), share[:-1]])
    keep = ng.pinned.clone()
    chosen = order[before < threshold]
    keep[free[chosen[scores[chosen] > 0]]] = True
    return keep


def _frame_traces(ng: NodeGraph, keep: Tensor, infl: Tensor, max_edges: int, n_text: int = 15) -> list[go.Scatter]:
    """Edge traces (sign x three width classes) and one node trace; only the ``n_text`` most influential
    nodes (and pinned nodes and supernodes) carry a text label, the rest show it on hover."""
    idx = keep.nonzero().squeeze(-1)
    sub = ng.adjacency[idx][:, idx]
    strength = sub.abs().flatten()
    best = strength.topk(min(max_edges, int((strength > 0).sum()))).indices  # the strongest edges, largest first
    t_s = [divmod(int(i), sub.shape[1]) for i in best]
    top = max((abs(float(sub[t, s])) for t, s in t_s), default=1.0) or 1.0
    traces = []
    for sign, colour in ((1, "rgba(51,102,204,0.55)"), (-1, "rgba(204,51,51,0.55)")):
        for lo, hi, width in ((0.0, 0.15, 0.7), (0.15, 0.5, 2.0), (0.5, 1.01, 4.0)):
            xs: list[float | None] = []
            ys: list[float | None] = []
            for t, s in t_s:
                w = float(sub[t, s])
                if (w > 0) == (sign > 0) and lo <= abs(w) / top < hi:
                    a, b = int(idx[s]), int(idx[t])
                    xs += [float(ng.x[a]), float(ng.x[b]), None]
                    ys += [float(ng.y[a]), float(ng.y[b]), None]
            traces.append(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                     line={"width": width, "color": colour}))
    ids = idx.tolist()
    big = [ng.kinds[i] == "supernode" for i in ids]
    named = set(sorted(ids, key=lambda i: -float(infl[i]))[:n_text]) | {i for i in ids if bool(ng.pinned[i]) or
                                                                       ng.kinds[i] == "supernode"}
    traces.append(go.Scatter(
        x=[float(ng.x[i]) for i in ids], y=[float(ng.y[i]) for i in ids], mode="markers+text",
        text=[_short(ng.labels[i]) if i in named else "" for i in ids], textfont={"size": 9},
        textposition=["top center" if k % 2 == 0 else "bottom center" for k in range(len(ids))],
        hovertext=[f"{ng.hover[i]}<br>influence {float(infl[i]):.3g}" for i in ids], hoverinfo="text",
        marker={"size": [16 if b else 9 for b in big], "symbol": ["square" if b else "circle" for b in big],
                "color": [_KIND_COLOURS.get(ng.kinds[i], "#444") for i in ids], "line": {"width": 1, "color": "#222"}},
        showlegend=False))
    return traces


def _short(label: str, n: int = 22) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def draw(ng: NodeGraph, *, thresholds: Sequence[float] = THRESHOLDS, start: float | None = None,
         max_edges: int = 300, title: str = "circuit") -> go.Figure:
    """The node graph with a pruning slider over ``thresholds`` (cumulative influence), starting at
    ``start`` (default: the threshold nearest 0.8)."""
    thresholds = sorted(float(t) for t in thresholds)
    if not thresholds:
        raise ConfigError("give at least one pruning threshold.")
    infl = node_influence(ng)
    start = min(thresholds, key=lambda t: abs(t - (0.8 if start is None else start)))
    fig = go.Figure()
    per_frame, counts = 0, []
    for tau in thresholds:
        keep = kept_nodes(ng, tau, infl)
        counts.append(int(keep.sum()))
        traces = _frame_traces(ng, keep, infl, max_edges)
        per_frame = len(traces)
        for tr in traces:
            tr.visible = tau == start
            fig.add_trace(tr)
    steps = []
    for k, tau in enumerate(thresholds):
        visible = [j // per_frame == k for j in range(per_frame * len(thresholds))]
        steps.append({"method": "update", "label": f"{tau:g}",
                      "args": [{"visible": visible}, {"title.text": f"{title}: {counts[k]} nodes at {tau:g}"}]})
    active = thresholds.index(start)
    fig.update_layout(
        title={"text": f"{title}: {counts[active]} nodes at {start:g}"}, template="plotly_white",
        height=260 + 70 * len(set(ng.y.tolist())), margin={"l": 60, "r": 20, "t": 80, "b": 90},
        sliders=[{"active": active, "steps": steps, "currentvalue": {"prefix": "cumulative influence kept: "},
                  "pad": {"t": 40}}],
        xaxis={"tickmode": "array", "tickvals": ng.x_ticks[0], "ticktext": ng.x_ticks[1], "showgrid": False,
               "zeroline": False, **({} if ng.x_ticks[0] else {"showticklabels": False})},
        yaxis={"tickmode": "array", "tickvals": ng.y_ticks[0], "ticktext": ng.y_ticks[1], "zeroline": False})
    fig.add_annotation(text="edges: <span style='color:#3366cc'>positive</span> / <span style='color:#cc3333'>"
                            "negative</span> weight, width ∝ |weight|; squares: supernodes; hover for details",
                       xref="paper", yref="paper", x=0, y=1.0, showarrow=False, xanchor="left", yanchor="bottom",
                       font={"size": 10, "color": "#555"})
    return fig


def graph_view(obj: Any, *, groups: Mapping[str, Sequence[int | str]] | None = None, group_by: str | None = None,
               labels: Sequence[str] | None = None, token_strs: Sequence[str] | None = None,
               thresholds: Sequence[float] = THRESHOLDS, start: float | None = None, max_edges: int = 300,
               title: str | None = None) -> go.Figure:
    """The interactive view of an attribution graph, edge scores or a circuit (see the module docstring).

    ``groups``: supernodes, name -> nodes (indices, ids such as ``"a23.h4"``, or labels); ``group_by``: automatic grouping of
    the other nodes (``"cell"``, ``"layer"``, ``"label"``); ``labels`` / ``token_strs``: node labels and
    position tick labels for attribution graphs.
    """
    if hasattr(obj, "features") and hasattr(obj, "adjacency"):
        ng = feature_node_graph(obj, labels=labels, token_strs=token_strs)
        default = f"attribution graph ({obj.n_feat} features)"
    elif hasattr(obj, "graph") and hasattr(obj.graph, "receivers"):
        ng = component_node_graph(obj)
        default = "component circuit"
    else:
        raise ConfigError(f"graph_view draws an AttributionGraph, EdgeScores or a Circuit, not {type(obj).__name__}.")
    if groups or group_by:
        ng = group_nodes(ng, groups, by=group_by)
    return draw(ng, thresholds=thresholds, start=start, max_edges=max_edges, title=title or default)


# --- labels --------------------------------------------------------------------------------------------
def lens_tokens(model: Any, tset: Any, features: Tensor, k: int = 3) -> list[list[int]]:
    """Top ``k`` token ids of each feature's decoder direction (``(layer, pos, index)`` rows) read through the
    final norm's gain and the unembedding (unembedding bias removed)."""
    from recallscope.models.selfcheck import checked_stack
    from recallscope.models.stack import norm_gain

    stack = checked_stack(model, "feature lens labels")
    gain = norm_gain(stack.final_norm, stack.d_model)
    with torch.no_grad():
        zero = stack.unembed(torch.zeros(1, stack.d_model)).float()[0]
        out = []
        for layer, _, idx in features.tolist():
            direction = tset[layer].W_dec[-1][idx].float()  # the last layer it writes to (a PLT: its own)
            logits = stack.unembed((direction * gain)[None]).float()[0] - zero
            out.append(logits.topk(k).indices.tolist())
    return out


def top_contexts(model: Any, tset: Any, features: Tensor, contexts: Tensor,
                 window: int = 4) -> list[tuple[float, list[int], int]]:
    """For each feature (``(layer, pos, index)`` rows): its largest activation over ``contexts``
    (``[batch, pos]`` token ids), the tokens of that context up to the firing token (at most ``window``)
    and the firing token's index in that list. A set trained without BOS has no features before its
    ``first_pos`` (:meth:`~recallscope.features.transcoder.TranscoderSet.activations`), so no context fires there."""
    if contexts.ndim != 2:
        raise ConfigError(f"contexts are [batch, pos] token ids, got shape {tuple(contexts.shape)}.")
    from recallscope.features.transcoder import feature_activations

    with torch.no_grad():
        acts = feature_activations(model, tset, contexts, sorted({int(f[0]) for f in features}))
    out = []
    for layer, _, idx in features.tolist():
        a = acts[layer][..., idx]  # [batch, pos]
        flat = int(a.argmax())
        b, p = divmod(flat, a.shape[1])
        lo = max(0, p - window + 1)
        out.append((float(a[b, p]), contexts[b, lo:p + 1].tolist(), p - lo))
    return out


def feature_labels(model: Any, tset: Any, graph: Any, *, contexts: Tensor | None = None, k: int = 3,
                   window: int = 4, decode: Any = None) -> list[str]:
    """One label per node of ``graph``: features get ``L{layer} #{index} → tok1 tok2 tok3`` (lens tokens)
    and, with ``contexts``, ``| …ctx[firing token]`` (top-activating context); other nodes name their token.
    ``decode``: token ids -> text (default: the model's tokenizer)."""
    if decode is None:
        if getattr(model, "tokenizer", None) is None:
            raise ConfigError("the model has no tokenizer; pass decode=(token ids -> text) to feature_labels.")
        decode = model.tokenizer.decode
    show = lambda ids: [decode([int(t)]) for t in ids]  # noqa: E731
    lens = lens_tokens(model, tset, graph.features, k)
    ctx = top_contexts(model, tset, graph.features, contexts, window) if contexts is not None else None
    prompt = show(graph.tokens.tolist())
    labels = []
    for n, (layer, pos, idx) in enumerate(graph.features.tolist()):
        text = f"L{layer} #{idx} → " + " ".join(repr(s)[1:-1] for s in show(lens[n]))
        if ctx is not None:
            _, ids, at = ctx[n]
            words = show(ids)
            words[at] = f"[{words[at]}]"
            text += " | …" + "".join(words)
        labels.append(text)
    labels += [f"err L{layer} @{pos} {prompt[pos]!r}" for layer in range(graph.n_layers) for pos in range(graph.n_pos)]
    labels += [f"emb {s!r}" for s in prompt]
    for label in graph.logit_labels:
        labels.append(f"logit {show([int(label)])[0]!r}" if label.isdigit() else f"logit {label}")
    return labels
