"""The house style, applied to one figure at a time.

Nothing here touches plotly's global state (``plotly.io.templates.default`` stays whatever the user
set): every figure gets the style explicitly through :func:`apply_style`, so importing recallscope
never changes how the user's other figures look.
"""

import plotly.graph_objects as go

FONT_FAMILY = "Inter, 'Helvetica Neue', Arial, sans-serif"
"""Sans-serif stack; Arial is the fallback every renderer (including headless Chromium) has."""

FONT_SIZE = 13
TITLE_SIZE = 16
FONT_COLOR = "#222222"
GRID_COLOR = "#e6e6e6"

DIVERGING = "RdBu_r"
"""Diverging colour scale for signed effects: negative = blue, zero = white, positive = red."""

BAND_COLOR = "rgba(214, 39, 40, 0.18)"
LINE_COLOR = "rgb(214, 39, 40)"

DEFAULT_WIDTH = 900
"""Static-export width in layout pixels when neither the caller nor the figure sets one."""
DEFAULT_HEIGHT = 600
"""Static-export height in layout pixels when neither the caller nor the figure sets one."""


def apply_style(fig: go.Figure, *, title: str | None = None) -> go.Figure:
    """Give ``fig`` the house style (font, margins, white background, light grid) and return it.

    Uses the ``plotly_white`` template *on this figure only*; the global default template is left
    alone. ``title``, when given, replaces the figure's title.
    """
    fig.update_layout(
        template="plotly_white",
        font=dict(family=FONT_FAMILY, size=FONT_SIZE, color=FONT_COLOR),
        paper_bgcolor="white",
        plot_bgcolor="white",
        margin=dict(l=70, r=30, t=70 if (title or fig.layout.title.text) else 30, b=70),
        hoverlabel=dict(font=dict(family=FONT_FAMILY, size=FONT_SIZE), bgcolor="white"),
        title=dict(font=dict(size=TITLE_SIZE), x=0.01, xanchor="left"),
    )
    if title is not None:
        fig.update_layout(title_text=title)
    fig.update_xaxes(showline=True, linecolor="#888888", gridcolor=GRID_COLOR, ticks="outside")
    fig.update_yaxes(showline=True, linecolor="#888888", gridcolor=GRID_COLOR, ticks="outside")
    return fig
