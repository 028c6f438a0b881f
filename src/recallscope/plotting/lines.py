"""Line plots of one-axis results (e.g. per-layer patching) with a bootstrap confidence band."""

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from recallscope.plotting.style import BAND_COLOR, LINE_COLOR, apply_style


def plot_line(mean: np.ndarray, lo: np.ndarray, hi: np.ndarray, x_labels: Sequence[str], *, x_title: str,
              y_title: str, n_prompts: int, title: str | None = None, zero: int | float = 0.0,
              normalized: bool = False) -> go.Figure:
    """``mean`` against ``x_labels`` with the band ``[lo, hi]`` shaded behind it.

    Traces, in order: the band's lower edge, its upper edge (filled down to the lower one), the mean
    line whose hover shows the value, the 95% CI and the prompt count. A dotted line marks ``zero``
    and, for normalized results, a dashed one marks full recovery (1).
    """
    x = list(x_labels)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=lo, mode="lines", line=dict(width=0), hoverinfo="skip",
                             showlegend=False, name="95% CI low"))
    fig.add_trace(go.Scatter(x=x, y=hi, mode="lines", line=dict(width=0), fill="tonexty",
                             fillcolor=BAND_COLOR, hoverinfo="skip", name="95% CI"))
    fig.add_trace(go.Scatter(
        x=x, y=mean, mode="lines+markers", line=dict(color=LINE_COLOR, width=2), marker=dict(size=6),
        name="mean", customdata=np.stack([lo, hi], axis=-1),
        hovertemplate=(f"{x_title} %{{x}}<br>mean %{{y:.4g}}<br>95% CI [%{{customdata[0]:.4g}}, "
                       f"%{{customdata[1]:.4g}}]<br>n = {n_prompts} prompt{'s' if n_prompts != 1 else ''}"
                       "<extra></extra>")))
    apply_style(fig, title=title)
    fig.add_hline(y=zero, line=dict(color="#888888", width=1, dash="dot"))
    if normalized:
        fig.add_hline(y=1.0, line=dict(color="#888888", width=1, dash="dash"),
                      annotation_text="clean", annotation_position="top left")
    fig.update_xaxes(type="category", title_text=x_title)
    fig.update_yaxes(title_text=y_title, zeroline=False)
    fig.update_layout(height=420, legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1))
    return fig
