"""Tick labels for figures: tokens made visible and safe for plotly's pseudo-HTML text."""

import re
from typing import Any

SPACE = "␣"
"""Shown in place of a leading space (GPT-2's ``Ġ``, SentencePiece's ``▁``, or a literal space)."""

_VISIBLE = {
    "Ġ": SPACE,   # GPT-2 byte-level BPE: space
    "▁": SPACE,   # SentencePiece: space
    " ": SPACE,
    "Ċ": "↵",     # GPT-2 byte-level BPE: newline
    "\n": "↵",
    "ĉ": "⇥",     # GPT-2 byte-level BPE: tab
    "\t": "⇥",
    "č": "␍",     # GPT-2 byte-level BPE: carriage return
    "\r": "␍",
}
# plotly renders a few HTML tags inside text (<b>, <i>, <s>, <br>...): "<s>" (Llama's BOS token) would
# strike through the label, so markup characters become entities, which plotly decodes for display.
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_INDEX_SUFFIX = re.compile(r"^(.*)(·\d+)$", re.DOTALL)


def display_token(label: str) -> str:
    """A token label as a figure should show it: ``"ĠParis·5"`` -> ``"␣Paris·5"``.

    Whitespace markers of byte-level BPE and SentencePiece (and raw whitespace) become visible symbols
    (``␣`` space, ``↵`` newline, ``⇥`` tab); ``&``, ``<`` and ``>`` become HTML entities so plotly shows
    them literally; an empty token shows as ``∅``. The ``·index`` suffix that keeps repeated tokens
    distinct is kept unchanged.
    """
    match = _INDEX_SUFFIX.match(label)
    token, suffix = (match.group(1), match.group(2)) if match else (label, "")
    if not token:
        return "∅" + suffix
    token = "".join(_HTML.get(ch, ch) for ch in token)
    return "".join(_VISIBLE.get(ch, ch) for ch in token) + suffix


def axis_labels(result: Any, axis: str) -> list[str]:
    """Display labels for one axis of a result: its stored labels (tokens cleaned), else indices."""
    size = int(result.values.shape[1 + result.axes.index(axis)])
    labels = result.labels.get(axis)
    if not labels:
        return [str(i) for i in range(size)]
    return [display_token(str(lab)) for lab in labels]
