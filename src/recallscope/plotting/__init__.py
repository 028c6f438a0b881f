"""Figures for recallscope results (plotly) and their export to HTML / PNG / SVG / PDF.

Importing this package changes no global state: the house style is applied per figure by
:func:`apply_style`, never through ``plotly.io.templates.default``, and nothing is shown or printed.

- :func:`plot_patching`: the figure for a :class:`~recallscope.results.PatchingResult`
  (also reached as ``result.plot()``).
- :func:`heatmap`: a styled diverging heatmap of any matrix with row and column labels.
- :func:`display_token`: a token label made visible (``"ĠParis·5"`` -> ``"␣Paris·5"``).
- :func:`plot_b64_alignment`: tokens, 6-bit groups and decoded bytes of a base64 string on one ruler.
- :func:`result_html`: the summary table + figure that results show in Jupyter (``_repr_html_``).
- :func:`export` / :func:`export_all`: write a figure or result; :func:`find_chromium` tells whether
  static export can work here.
"""

from recallscope.plotting.exporting import (
    ExportError,
    ExportReport,
    StaticExportUnavailable,
    export,
    export_all,
    find_chromium,
)
from recallscope.plotting.b64 import plot_b64_alignment
from recallscope.plotting.heatmaps import UnsupportedResultError, heatmap, plot_patching
from recallscope.plotting.labels import display_token
from recallscope.plotting.lines import plot_line
from recallscope.plotting.rich import result_html
from recallscope.plotting.style import apply_style

__all__ = [
    "ExportError",
    "ExportReport",
    "StaticExportUnavailable",
    "UnsupportedResultError",
    "apply_style",
    "display_token",
    "export",
    "export_all",
    "find_chromium",
    "heatmap",
    "plot_b64_alignment",
    "plot_line",
    "plot_patching",
    "result_html",
]
