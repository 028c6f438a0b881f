"""A plotly picture of a pruned attribution graph: positions left to right, layers bottom to top.

Embeddings sit below layer 0, logits above the last layer; features and error nodes sit at their
(position, layer) cell, spread horizontally inside the cell. Edge colour is the sign (blue +, red -),
width the absolute weight relative to the largest kept edge.
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
                 title: str = "attribution graph") -> Any:
    """The kept nodes and edges of ``pruned`` as a ``go.Figure`` (hover shows each node's label)."""
    import plotly.graph_objects as go

    keep = [i for i in range(graph.adjacency.shape[0]) if bool(pruned.node_mask[i])]
    xy = _positions(graph, keep)
    labels = graph.node_labels()
    fig = go.Figure()
    edges = pruned.edge_mask.nonzero().tolist()
    top = max((abs(float(graph.adjacency[t, s])) for t, s in edges), default=1.0) or 1.0
    for t, s in edges:
        w = float(graph.adjacency[t, s])
        fig.add_trace(go.Scatter(x=[xy[s][0], xy[t][0]], y=[xy[s][1], xy[t][1]], mode="lines", hoverinfo="skip",
                                 line={"width": 0.5 + 4 * abs(w) / top, "color": "#3366cc" if w > 0 else "#cc3333"},
                                 opacity=0.6, showlegend=False))
    fig.add_trace(go.Scatter(x=[xy[i][0] for i in keep], y=[xy[i][1] for i in keep], mode="markers",
                             text=[f"{labels[i]}<br>influence {float(pruned.influence[i]):.3g}" for i in keep],
                             hoverinfo="text", marker={"size": 9, "color": "#222"}, showlegend=False))
    ticks = token_strs or [str(t) for t in graph.tokens.tolist()]
    fig.update_layout(title=title, xaxis={"tickmode": "array", "tickvals": list(range(graph.n_pos)), "ticktext": ticks},
                      yaxis={"tickmode": "array", "tickvals": list(range(-1, graph.n_layers + 1)),
                             "ticktext": ["emb"] + [f"L{i}" for i in range(graph.n_layers)] + ["logit"]},
                      template="plotly_white", height=200 + 80 * graph.n_layers)
    return fig
