"""Heatmaps of patching results: layer x position, layer x head, and one panel per head.

:func:`plot_patching` picks the figure from the result's axes:

1. ``("layer", "pos")``, ``("layer", "head")`` (or any two axes): one heatmap, first axis on y (layer 0
   at the top, as in TransformerLens's ``imshow``), second on x with display tokens.
2. ``("layer", "head", "pos")``: small multiples, one layer x position heatmap per head, on a grid
   chosen to fill its rows (9 heads -> 3 x 3, 12 -> 4 x 3), all sharing one colour axis.
3. A single axis (``("layer",)``): a line with its 95% bootstrap band (see :mod:`.lines`).

Every cell's hover shows its labels, the mean over prompts, the 95% bootstrap CI from
``result.ci()`` and the number of prompts. Colours are diverging and centred on ``zmid`` (0 by default).
"""

import math
from typing import Any
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

from recallscope.errors import RecallscopeError
from recallscope.plotting.labels import axis_labels
from recallscope.plotting.lines import plot_line
from recallscope.plotting.style import DIVERGING, apply_style
from recallscope.results import PatchingResult

AXIS_TITLES = {"layer": "layer", "pos": "token", "head": "head"}
"""How each axis name of a result is titled on a figure."""

PANEL_HEIGHT_PER_ROW = 26
"""Pixels per heatmap row (layer); panels never get shorter than ``MIN_PANEL_HEIGHT``."""
MIN_PANEL_HEIGHT = 170


class UnsupportedResultError(RecallscopeError):
    """A result whose axes no recallscope figure can show (more than three, or three without ``head``)."""


def _as_array(matrix: Tensor | np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    if isinstance(matrix, Tensor):
        return matrix.detach().float().cpu().numpy()
    return np.asarray(matrix, dtype=float)


def heatmap(matrix: Tensor | np.ndarray | Sequence[Sequence[float]], x_labels: Sequence[str],
            y_labels: Sequence[str], *, title: str | None = None, zmid: int | float = 0.0,
            colorbar_title: str | None = None, customdata: np.ndarray | None = None,
            hovertemplate: str | None = None) -> go.Figure:
    """A styled heatmap of ``matrix[row, col]`` with a diverging colour scale centred on ``zmid``.

    Rows are labelled by ``y_labels`` (first row at the top), columns by ``x_labels``; both axes are
    categorical, so labels are shown verbatim. ``customdata``/``hovertemplate`` customise the hover.
    """
    z = _as_array(matrix)
    if z.ndim != 2 or z.shape != (len(y_labels), len(x_labels)):
        raise RecallscopeError(f"heatmap needs a 2-D matrix of shape (len(y_labels), len(x_labels)) = "
                               f"({len(y_labels)}, {len(x_labels)}); got shape {z.shape}")
    fig = go.Figure(_heatmap_trace(z, list(x_labels), list(y_labels), zmid=zmid,
                                   colorbar_title=colorbar_title, customdata=customdata,
                                   hovertemplate=hovertemplate))
    apply_style(fig, title=title)
    fig.update_xaxes(type="category", showgrid=False)
    fig.update_yaxes(type="category", autorange="reversed", showgrid=False)
    fig.update_layout(height=max(MIN_PANEL_HEIGHT, PANEL_HEIGHT_PER_ROW * len(y_labels)) + 160)
    return fig


def _heatmap_trace(z: np.ndarray, x: list[str], y: list[str], *, zmid: int | float | None = None,
                   colorbar_title: str | None = None, customdata: np.ndarray | None = None,
                   hovertemplate: str | None = None, coloraxis: str | None = None) -> go.Heatmap:
    """One heatmap trace; with ``coloraxis`` the colour scale lives in the layout instead."""
    trace = go.Heatmap(z=z, x=x, y=y, customdata=customdata, hovertemplate=hovertemplate, xgap=1, ygap=1)
    if coloraxis is not None:
        trace.update(coloraxis=coloraxis)
    else:
        trace.update(colorscale=DIVERGING, zmid=zmid, colorbar=dict(title=dict(text=colorbar_title)))
    return trace


def _hovertemplate(axes: Sequence[str], n_prompts: int, fixed: str = "") -> str:
    """Hover text for a cell: its labels, mean, 95% CI (customdata[0], [1]) and the prompt count."""
    y_name, x_name = AXIS_TITLES.get(axes[0], axes[0]), AXIS_TITLES.get(axes[1], axes[1])
    return (f"{fixed}{y_name} %{{y}}<br>{x_name} %{{x}}<br>mean %{{z:.4g}}"
            "<br>95% CI [%{customdata[0]:.4g}, %{customdata[1]:.4g}]"
            f"<br>n = {n_prompts} prompt{'s' if n_prompts != 1 else ''}<extra></extra>")


def _colorbar_title(result: PatchingResult) -> str:
    if result.config.get("normalized"):
        return "normalized<br>recovery"
    if result.config.get("effect"):
        return f"effect<br>({result.config.get('metric', 'metric')})"
    return str(result.config.get("metric", "metric"))


def _default_title(result: PatchingResult) -> str | None:
    method = result.config.get("method")
    if not method:
        return None
    parts = [str(method).replace("_", " ").capitalize()]
    if result.config.get("component"):
        parts.append(str(result.config["component"]))
    return " · ".join(parts)


def _grid(n: int) -> tuple[int, int]:
    """(rows, cols) for ``n`` panels: a divisor of ``n`` near sqrt(n) if one exists, so rows are full."""
    base = max(1, math.ceil(math.sqrt(n)))
    cols = next((c for c in range(base, base + 3) if n % c == 0), base)
    return math.ceil(n / cols), cols


def _plot_2d(result: PatchingResult, mean: np.ndarray, lo: np.ndarray, hi: np.ndarray, *,
             title: str | None, zmid: int | float) -> go.Figure:
    y_labels, x_labels = axis_labels(result, result.axes[0]), axis_labels(result, result.axes[1])
    fig = heatmap(mean, x_labels, y_labels, title=title, zmid=zmid, colorbar_title=_colorbar_title(result),
                  customdata=np.stack([lo, hi], axis=-1),
                  hovertemplate=_hovertemplate(result.axes, result.n_prompts))
    fig.update_xaxes(title_text=AXIS_TITLES.get(result.axes[1], result.axes[1]))
    fig.update_yaxes(title_text=AXIS_TITLES.get(result.axes[0], result.axes[0]))
    return fig


def _plot_per_head(result: PatchingResult, mean: np.ndarray, lo: np.ndarray, hi: np.ndarray, *,
                   title: str | None, zmid: int | float) -> go.Figure:
    """Small multiples: one ``other axes`` heatmap per head, sharing a colour axis centred on zmid."""
    head_ax = result.axes.index("head")
    rest = tuple(ax for ax in result.axes if ax != "head")
    mean, lo, hi = (np.moveaxis(a, head_ax, 0) for a in (mean, lo, hi))  # [head, rest0, rest1]
    heads = axis_labels(result, "head")
    y_labels, x_labels = axis_labels(result, rest[0]), axis_labels(result, rest[1])
    rows, cols = _grid(len(heads))
    specs: list[list[dict[str, Any] | None]] = [[{} if r * cols + c < len(heads) else None for c in range(cols)] for r in range(rows)]
    fig = make_subplots(rows=rows, cols=cols, specs=specs, shared_xaxes=True, shared_yaxes=True,
                        subplot_titles=[f"head {h}" for h in heads], horizontal_spacing=0.02,
                        vertical_spacing=min(0.1, 0.25 / rows))
    for h, head in enumerate(heads):
        fig.add_trace(_heatmap_trace(mean[h], x_labels, y_labels, coloraxis="coloraxis",
                                     customdata=np.stack([lo[h], hi[h]], axis=-1),
                                     hovertemplate=_hovertemplate(rest, result.n_prompts, f"head {head}<br>")),
                      row=h // cols + 1, col=h % cols + 1)
    apply_style(fig, title=title)
    fig.update_layout(coloraxis=dict(colorscale=DIVERGING, cmid=zmid,
                                     colorbar=dict(title=dict(text=_colorbar_title(result)))),
                      height=rows * max(MIN_PANEL_HEIGHT, PANEL_HEIGHT_PER_ROW * len(y_labels)) + 180)
    fig.update_xaxes(type="category", showgrid=False, tickangle=-60, tickfont=dict(size=10))
    fig.update_yaxes(type="category", autorange="reversed", showgrid=False, tickfont=dict(size=10))
    for c in range(1, cols + 1):
        fig.update_xaxes(title_text=AXIS_TITLES.get(rest[1], rest[1]), row=rows, col=c)
    for r in range(1, rows + 1):
        fig.update_yaxes(title_text=AXIS_TITLES.get(rest[0], rest[0]), row=r, col=1)
    fig.update_annotations(font_size=12)
    return fig


def plot_patching(result: PatchingResult, *, normalized: bool = False, title: str | None = None,
                  zmid: int | float = 0.0) -> go.Figure:
    """The figure for a patching result, chosen by its axes (see the module docstring).

    ``normalized=True`` plots ``result.normalized()`` (0 = corrupt, 1 = clean) instead of raw metric
    values. ``title`` defaults to the method and component named in ``result.config``.
    """
    if normalized:
        result = result.normalized()
    if title is None:
        title = _default_title(result)
    mean = result.mean().detach().float().cpu().numpy()
    lo, hi = (t.detach().float().cpu().numpy() for t in result.ci())
    if len(result.axes) == 1:
        return plot_line(mean, lo, hi, axis_labels(result, result.axes[0]),
                         x_title=AXIS_TITLES.get(result.axes[0], result.axes[0]),
                         y_title=_colorbar_title(result).replace("<br>", " "), n_prompts=result.n_prompts,
                         title=title, zero=zmid, normalized=bool(result.config.get("normalized")))
    if len(result.axes) == 2:
        return _plot_2d(result, mean, lo, hi, title=title, zmid=zmid)
    if len(result.axes) == 3 and "head" in result.axes:
        return _plot_per_head(result, mean, lo, hi, title=title, zmid=zmid)
    raise UnsupportedResultError(f"no figure for a result with axes {result.axes}: plot_patching draws one "
                                 "axis (line), two axes (heatmap) or three including 'head' (one heatmap "
                                 "per head). Reduce the result first, e.g. average over an axis.")
