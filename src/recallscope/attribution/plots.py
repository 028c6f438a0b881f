"""Figures for attribution results: ranked bar charts and circuit graphs laid out by layer.

Both return a styled :class:`plotly.graph_objects.Figure` (house style via
:func:`recallscope.plotting.apply_style`) and show nothing.
"""

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from recallscope.plotting import apply_style

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22")
"""Colours of bar groups (component types), in order of first appearance."""
POSITIVE, NEGATIVE = "rgb(214, 39, 40)", "rgb(31, 119, 180)"
"""Edge colours by the sign of their score."""


def ranked_bars(labels: Sequence[str], values: np.ndarray, *, lo: np.ndarray | None = None,
                hi: np.ndarray | None = None, groups: Sequence[str] | None = None, title: str | None = None,
                x_title: str = "estimated effect") -> go.Figure:
    """Horizontal bars, largest ``|value|`` at the top, coloured by ``groups``, with optional CI whiskers.
    ``labels`` are shown as given (make tokens visible first, e.g. with ``plotting.display_token``)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(-np.abs(values), kind="stable")
    groups = list(groups) if groups is not None else ["value"] * len(values)
    fig = go.Figure()
    seen: dict[str, str] = {}
    for g in groups:
        seen.setdefault(g, PALETTE[len(seen) % len(PALETTE)])
    for g, colour in seen.items():
        idx = [i for i in order if groups[i] == g]
        err = None
        if lo is not None and hi is not None:
            err = dict(type="data", symmetric=False, array=[hi[i] - values[i] for i in idx],
                       arrayminus=[values[i] - lo[i] for i in idx], color="#555555", thickness=1)
        fig.add_trace(go.Bar(
            x=[values[i] for i in idx], y=[labels[i] for i in idx], orientation="h", name=g,
            marker_color=colour, error_x=err, hovertemplate="%{y}<br>%{x:.4g}<extra>" + g + "</extra>"))
    apply_style(fig, title=title)
    fig.update_yaxes(type="category", categoryorder="array",
                     categoryarray=[labels[i] for i in order][::-1], showgrid=False)
    fig.update_xaxes(title_text=x_title, zeroline=True, zerolinecolor="#888888")
    fig.update_layout(height=max(300, 22 * len(values) + 150), barmode="overlay", showlegend=len(seen) > 1,
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1))
    return fig


def circuit_figure(nodes: dict[str, tuple[float, float]], edges: Sequence[tuple[str, str, float, str]], *,
                   title: str | None = None, stage_labels: dict[float, str] | None = None,
                   links: Sequence[tuple[str, str]] = ()) -> go.Figure:
    """A circuit graph: ``nodes`` name -> (x, y) position (y = layer stage), ``edges`` (sender node,
    receiver node, weight, hover text); line width grows with ``|weight|``, colour shows its sign.
    ``links`` are drawn as thin dotted lines (a key/value node to the heads it serves)."""
    fig = go.Figure()
    if links:
        xs: list[float | None] = [c for a, b in links for c in (nodes[a][0], nodes[b][0], None)]
        ys: list[float | None] = [c for a, b in links for c in (nodes[a][1], nodes[b][1], None)]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(width=1, color="#999999", dash="dot")))
    top = max((abs(w) for _, _, w, _ in edges), default=1.0) or 1.0
    buckets: dict[tuple[int, bool], list[tuple[str, str, float, str]]] = {}
    for e in edges:
        buckets.setdefault((int(np.ceil(4 * abs(e[2]) / top)), e[2] >= 0), []).append(e)
    for (level, positive), group in sorted(buckets.items()):
        xs: list[float | None] = []
        ys: list[float | None] = []
        for a, b, _, _ in group:
            xs += [nodes[a][0], nodes[b][0], None]
            ys += [nodes[a][1], nodes[b][1], None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(width=0.8 + 1.6 * level, color=POSITIVE if positive else NEGATIVE),
                                 opacity=0.35 + 0.15 * level))
    mids = [((nodes[a][0] + nodes[b][0]) / 2, (nodes[a][1] + nodes[b][1]) / 2, text) for a, b, _, text in edges]
    fig.add_trace(go.Scatter(x=[m[0] for m in mids], y=[m[1] for m in mids], mode="markers", showlegend=False,
                             marker=dict(size=6, color="rgba(0,0,0,0)"), text=[m[2] for m in mids],
                             hovertemplate="%{text}<extra></extra>"))
    names = list(nodes)
    fig.add_trace(go.Scatter(
        x=[nodes[n][0] for n in names], y=[nodes[n][1] for n in names], mode="markers+text", text=names,
        textposition="top center", showlegend=False, hovertemplate="%{text}<extra></extra>",
        marker=dict(size=14, color=["#444444" if n in ("input", "logits") else
                                    ("#2ca02c" if n.startswith("m") else "#ff7f0e") for n in names],
                    line=dict(width=1, color="white"))))
    apply_style(fig, title=title)
    fig.update_xaxes(visible=False)
    ticks = sorted(stage_labels or {})
    fig.update_yaxes(tickvals=ticks, ticktext=[(stage_labels or {})[t] for t in ticks], showgrid=False,
                     zeroline=False, title_text="layer")
    n_stages = len({y for _, y in nodes.values()})
    fig.update_layout(height=max(420, 56 * n_stages + 160), hovermode="closest")
    fig.add_annotation(text="edge width: |score|; red: positive, blue: negative", xref="paper", yref="paper",
                       x=1.0, y=-0.06, showarrow=False, xanchor="right", font=dict(size=11, color="#666666"))
    return fig
