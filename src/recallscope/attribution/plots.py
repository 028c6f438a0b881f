"""Figures for attribution results: ranked bar charts.

They return a styled :class:`plotly.graph_objects.Figure` (house style via
:func:`recallscope.plotting.apply_style`) and show nothing. Circuits are drawn by the graph view,
:func:`recallscope.features.view.graph_view` (``Circuit.plot``).
"""

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from recallscope.plotting import apply_style

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
           "#7f7f7f", "#bcbd22")
"""Colours of bar groups (component types), in order of first appearance."""


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
