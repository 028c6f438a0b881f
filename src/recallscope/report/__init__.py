"""A self-contained HTML report: sections of figures with short explanations (plotly.js inlined once)."""

from recallscope.report.html import Section, write_report

__all__ = ["Section", "write_report"]
