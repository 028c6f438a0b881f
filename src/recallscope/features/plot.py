"""A plotly picture of a pruned attribution graph: positions left to right, layers bottom to top.

Embeddings sit below layer 0, logits above the last layer; features and error nodes sit at their
(position, layer) cell, spread horizontally inside the cell. Edge colour is the sign (blue +, red -),
width one of three classes of the absolute weight relative to the largest drawn edge.
"""

from typing import Any

from recallscope.features.graph import AttributionGraph, PrunedGraph


def _positions(graph: AttributionGraph, keep: list[int]) -> dict[int, tuple[float, float]]:
    cells: dict[tuple[int, float], list[int]] = {}
    err, emb = graph.error_slice, graph.embed_slice
    for i in keep:
        if i < graph.n_feat:
            layer, pos, _ = graph.features[i].tolist()
            key = (pos, float(layer))
        elif err.start <= i < err.stop:
            layer, pos = divmod(i - err.start, graph.n_pos)
            key = (pos, float(layer))
        elif emb.start <= i < emb.stop:
            key = (i - emb.start, -1.0)
        else:
            key = (graph.n_pos - 1, float(graph.n_layers))
        cells.setdefault(key, []).append(i)
    out = {}
    for (pos, y), members in cells.items():
        for j, i in enumerate(members):
            out[i] = (pos + (j + 1) / (len(members) + 1) - 0.5, y)
    return out


def graph_figure(graph: AttributionGraph, pruned: PrunedGraph, *, token_strs: list[str] | None = None,
                 title: str = "attribution graph", max_edges: int = 3000) -> Any:
    """The kept nodes and the ``max_edges`` strongest kept edges of ``pruned`` as a ``go.Figure`` (hover
    shows each node's label and influence)."""
    import plotly.graph_objects as go

    keep = [i for i in range(graph.adjacency.shape[0]) if bool(pruned.node_mask[i])]
    xy = _positions(graph, keep)
    labels = graph.node_labels()
    fig = go.Figure()
    edges = pruned.edge_mask.nonzero().tolist()
    weights = [float(graph.adjacency[t, s]) for t, s in edges]
    order = sorted(range(len(edges)), key=lambda e: -abs(weights[e]))[:max_edges]
    top = max((abs(weights[e]) for e in order), default=1.0) or 1.0
    for sign, colour in ((1, "#3366cc"), (-1, "#cc3333")):  # one trace per sign and width class
        for lo, hi, width in ((0.0, 0.1, 0.5), (0.1, 0.4, 1.5), (0.4, 1.01, 3.5)):
            xs: list[float | None] = []
            ys: list[float | None] = []
            for e in order:
                t, s_ = edges[e]
                w = weights[e]
                if (w > 0) == (sign > 0) and lo <= abs(w) / top < hi:
                    xs += [xy[s_][0], xy[t][0], None]
                    ys += [xy[s_][1], xy[t][1], None]
            if xs:
                fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", opacity=0.6, showlegend=False,
                                         line={"width": width, "color": colour}))
    fig.add_trace(go.Scatter(x=[xy[i][0] for i in keep], y=[xy[i][1] for i in keep], mode="markers",
                             text=[f"{labels[i]}<br>influence {float(pruned.influence[i]):.3g}" for i in keep],
                             hoverinfo="text", marker={"size": 9, "color": "#222"}, showlegend=False))
    ticks = token_strs or [str(t) for t in graph.tokens.tolist()]
    fig.update_layout(title=title, xaxis={"tickmode": "array", "tickvals": list(range(graph.n_pos)), "ticktext": ticks},
                      yaxis={"tickmode": "array", "tickvals": list(range(-1, graph.n_layers + 1)),
                             "ticktext": ["emb"] + [f"L{i}" for i in range(graph.n_layers)] + ["logit"]},
                      template="plotly_white", height=200 + 80 * graph.n_layers)
    return fig
