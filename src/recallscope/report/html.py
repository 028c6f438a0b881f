"""Write one self-contained HTML page (works offline) from titled, explained figures.

1. Each :class:`Section` becomes a heading (with an anchor), its explanation, its figures (one under the
   other) and its table; a contents list links the sections when there are more than two.
2. plotly.js is embedded once, with the first figure; later figures reuse it, so the page opens offline
   and carries one copy of the library. Text (titles, explanations, table cells) is HTML-escaped.
3. The page is written atomically (temporary file + rename).
"""

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recallscope.manifest import atomic_write_text

_CSS = """
body{font-family:Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
p.expl{line-height:1.45} table{border-collapse:collapse} td,th{padding:.2em .6em;border-bottom:1px solid #eee}
.meta{color:#666;font-size:.85em} nav ol{line-height:1.5}
.figs>div{margin-bottom:1em;overflow-x:auto}
"""
_FIGURE_CONFIG = {"displaylogo": False, "responsive": True}


@dataclass(frozen=True)
class Section:
    """One report section: a title, a short explanation, optional figures and an optional table."""

    title: str
    """Heading (also the contents entry)."""
    explanation: str
    """Plain-language paragraph under the heading (escaped; no HTML)."""
    figure: Any = None
    """The main plotly figure, or None."""
    table: list[dict[str, Any]] = field(default_factory=list)
    """Rows (dicts with the same keys) shown as a table under the figures."""
    figures: tuple[Any, ...] = ()
    """Further figures shown after ``figure``, one under the other."""

    def all_figures(self) -> list[Any]:
        """``figure`` (if any) followed by ``figures``."""
        return ([self.figure] if self.figure is not None else []) + list(self.figures)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(path: str | os.PathLike, title: str, sections: list[Section], *, footer: str = "") -> Path:
    """Write ``sections`` as one HTML page; plotly.js is embedded once so the page works offline."""
    parts, first = [], True
    for i, s in enumerate(sections):
        block = [f"<h2 id='s{i + 1}'>{html.escape(s.title)}</h2>", f"<p class='expl'>{html.escape(s.explanation)}</p>"]
        figs = []
        for fig in s.all_figures():
            figs.append(f"<div>{fig.to_html(full_html=False, include_plotlyjs=first, config=_FIGURE_CONFIG)}</div>")
            first = False
        if figs:
            block.append(f"<div class='figs'>{''.join(figs)}</div>")
        block.append(_table(s.table))
        parts.append("<section>" + "".join(block) + "</section>")
    toc = ""
    if len(sections) > 2:
        items = "".join(f"<li><a href='#s{i + 1}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(sections))
        toc = f"<nav><ol>{items}</ol></nav>"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{toc}{''.join(parts)}"
            f"<p class='meta'>{html.escape(footer)}</p></body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    return path
