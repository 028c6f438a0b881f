"""Rich Jupyter display of results: a summary table and the result's figure, as one HTML fragment.

Any result class gets it by inheriting :class:`recallscope.results.RichReprMixin` (whose
``_repr_html_`` calls :func:`result_html`), or by defining ``_repr_html_ = recallscope.plotting.rich
.result_html``-style methods itself. The algorithm:

1. Summary rows: :func:`summary_rows` reads what every recallscope result carries (its class, tensor
   shapes and axis names, ``config`` and ``manifest``) and, when the result has them, ``n_prompts``,
   ``clean``/``corrupt`` baselines and ``peak()``. A result may add rows through a
   ``summary_extra() -> list[tuple[str, str]]`` method.
2. Figure: ``result.plot()``; a result that cannot be plotted shows the table and the reason.
3. plotly.js is embedded in the first fragment a Python process renders and reused by later ones (as
   plotly's own notebook renderer does), so a notebook works offline without carrying one 3.5 MB copy
   per output. Where every output lives in its own frame (Google Colab), each fragment embeds its own
   copy. ``embed_plotlyjs="always"`` or ``"never"`` overrides the choice per call.
"""

import html
import sys
from collections.abc import Iterable
from typing import Any, Literal

import plotly.graph_objects as go

_STATE = {"plotlyjs_sent": False}

_CSS = ("<style>.rs-summary{border-collapse:collapse;font:12px/1.4 Helvetica,Arial,sans-serif;margin:4px 0}"
        ".rs-summary th{text-align:left;padding:2px 10px 2px 0;color:#555;font-weight:600;vertical-align:top}"
        ".rs-summary td{padding:2px 0;font-family:Menlo,Consolas,monospace}</style>")


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, float) for v in value):
        return "(" + ", ".join(f"{v:.{digits}g}" for v in value) + ")"
    return str(value)


def _tensor_rows(result: Any) -> Iterable[tuple[str, str]]:
    axes = getattr(result, "axes", None)
    values = getattr(result, "values", None)
    if hasattr(values, "shape"):
        names = ("prompt", *axes) if axes else ()
        shape = " × ".join(f"{n} {s}" if names else str(s) for n, s in zip(names or values.shape, values.shape))
        yield "values", shape
    elif isinstance(values, dict):
        for name, t in values.items():
            yield f"values[{name}]", " × ".join(str(s) for s in getattr(t, "shape", ()))


def _baseline_rows(result: Any) -> Iterable[tuple[str, str]]:
    n = getattr(result, "n_prompts", None)
    if n is not None:
        yield "prompts", str(n)
    for name in ("clean", "corrupt"):
        t = getattr(result, name, None)
        if hasattr(t, "float") and t.numel():
            yield f"{name} metric (mean)", _fmt(float(t.float().nanmean()))


def _peak_row(result: Any) -> Iterable[tuple[str, str]]:
    peak = getattr(result, "peak", None)
    if not callable(peak):
        return
    try:
        p = peak()
    except Exception as exc:  # a summary must render even when a statistic cannot be computed
        yield "peak", f"unavailable ({type(exc).__name__})"
        return
    where = ", ".join(f"{k} {p.get(k + '_label', p[k])}" for k in getattr(result, "axes", ()) if k in p)
    yield "peak", f"{_fmt(p.get('mean'))} at {where}; 95% CI {_fmt(list(p.get('ci95', ())))}"


def summary_rows(result: Any) -> list[tuple[str, str]]:
    """(field, value) rows describing ``result``: type, shapes, method, model, baselines, peak, timing."""
    config = getattr(result, "config", None) or {}
    manifest = getattr(result, "manifest", None) or {}
    rows: list[tuple[str, str]] = [("result", type(result).__name__)]
    rows += list(_tensor_rows(result))
    for key in ("method", "component", "metric", "direction", "window", "lens", "normalized", "effect"):
        if key in config and config[key] not in (None, False):
            rows.append((key, _fmt(config[key])))
    model = manifest.get("model") or {}
    if model:
        sha = str(model.get("weights_sha256", ""))[:12]
        rows.append(("model", f"{model.get('spec', '?')} ({model.get('n_layers', '?')} layers"
                              f"{', weights ' + sha if sha else ''})"))
    rows += list(_baseline_rows(result))
    rows += list(_peak_row(result))
    timing = (manifest.get("timings_s") or {}).get("total")
    if timing is not None:
        rows.append(("time", f"{timing:.2f} s"))
    extra = getattr(result, "summary_extra", None)
    if callable(extra):
        rows += [(str(k), _fmt(v)) for k, v in extra()]
    return rows


def summary_table(rows: Iterable[tuple[str, str]]) -> str:
    """An HTML table of (field, value) rows, every cell escaped."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='rs-summary'>{body}</table>"


def _embed(mode: Literal["auto", "always", "never"]) -> bool:
    if mode == "always":
        return True
    if mode == "never":
        return False
    if "google.colab" in sys.modules:
        return True
    return not _STATE["plotlyjs_sent"]


def figure_html(fig: go.Figure, *, embed_plotlyjs: Literal["auto", "always", "never"] = "auto") -> str:
    """A ``<div>`` fragment drawing ``fig``, with plotly.js embedded as :func:`result_html` decides."""
    embed = _embed(embed_plotlyjs)
    out = fig.to_html(full_html=False, include_plotlyjs=embed, config={"displaylogo": False})
    if embed:
        _STATE["plotlyjs_sent"] = True
    return out


def result_html(result: Any, *, figure: go.Figure | None = None,
                embed_plotlyjs: Literal["auto", "always", "never"] = "auto") -> str:
    """The HTML Jupyter shows for ``result``: :func:`summary_rows` as a table, then its figure.

    ``figure`` replaces ``result.plot()``. See the module docstring for how plotly.js is embedded.
    """
    parts = [_CSS, summary_table(summary_rows(result))]
    if figure is None:
        try:
            figure = result.plot()
        except Exception as exc:  # show the table even when the result has no figure
            parts.append(f"<p><i>no figure: {html.escape(f'{type(exc).__name__}: {exc}')}</i></p>")
    if figure is not None:
        parts.append(figure_html(figure, embed_plotlyjs=embed_plotlyjs))
    return "<div class='recallscope-result'>" + "".join(parts) + "</div>"
