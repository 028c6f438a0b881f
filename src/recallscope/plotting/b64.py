"""The base64 alignment view: tokens, characters, 6-bit groups and decoded bytes on one ruler.

Base64 writes 3 bytes as 4 characters of 6 bits; a tokenizer cuts the string without regard to either
(SCIENCE.md, "Base64 facts"). The figure puts every level on one horizontal axis measured in base64
characters, so a reader sees which token carries which bits of which byte:

1. **tokens**: one box per token over its character span (``AlignedToken.char_span``), optionally
   coloured by a per-token value (e.g. a patching or attribution effect at that position), on the
   diverging house scale centred on zero;
2. **characters**: one cell per base64 character, with dashed lines at the 4-character block edges;
3. **6-bit groups**: each character's value as 6 bits, drawn bit by bit at ``x = char + (k + 0.5) / 6``;
   bits are shaded by the byte they belong to, and the unused low bits of the last data character
   before padding are greyed out;
4. **bytes**: decoded byte ``j`` of block ``b`` spans bits ``8j .. 8j + 7`` of the block, i.e. characters
   ``4b + 8j/6 .. 4b + 8(j+1)/6`` (fractional), which is the codec's dependency map
   (:func:`recallscope.tasks.b64_codec.chars_for_byte`) drawn to scale.

Hovering a token lists its blocks and the bytes it determines fully or in part; hovering a byte lists the
characters and tokens that determine it.
"""

from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.plotting.labels import display_token
from recallscope.plotting.style import DIVERGING, FONT_FAMILY, apply_style
from recallscope.tasks.b64_alignment import Base64Alignment
from recallscope.tasks.b64_codec import ALPHABET, PAD, bytes_for_char, chars_for_byte, decode

ROWS = {"tokens": 3.5, "characters": 2.5, "6-bit groups": 1.5, "bytes": 0.5}
"""The y centre of each row of the figure (rows are 1 unit tall, tokens on top)."""
PX_PER_CHAR = 44
"""Horizontal pixels per base64 character: room for six bits in a small monospace font."""

Values: TypeAlias = Sequence[int | float] | np.ndarray | Tensor
"""One number per aligned token."""

_MONO = "'DejaVu Sans Mono', Menlo, Consolas, monospace"
_TOKEN_FILLS = ("#dbe8f5", "#f6e3c8")  # alternating token boxes when no values are given
_BYTE_FILLS = ("#e3f1e0", "#efe3f3")   # alternating byte bands
_UNUSED = "#d9d9d9"
_EDGE = "#555555"


def _byte_label(value: int) -> str:
    """Printable ASCII as itself (space as ␣), any other byte as a dot; always with its hex value."""
    shown = "␣" if value == 0x20 else (display_token(chr(value)) if 0x20 < value < 0x7F else "·")
    return f"{shown}<br>0x{value:02X}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _token_colors(values: Values | None, n: int, zmid: int | float) -> tuple[list[str], list[str], float]:
    """Fill and text colour per token, and the symmetric colour range used (0 when there are no values)."""
    if values is None:
        return [_TOKEN_FILLS[i % 2] for i in range(n)], ["#222222"] * n, 0.0
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    span = float(np.abs(finite - zmid).max()) if finite.size else 0.0
    span = span or 1.0
    frac = np.clip((v - zmid) / (2 * span) + 0.5, 0, 1)
    frac = np.nan_to_num(frac, nan=0.5)
    sampled = sample_colorscale(DIVERGING, frac.tolist())
    fills = [c if np.isfinite(x) else "#ffffff" for c, x in zip(sampled, v)]
    text = ["#ffffff" if abs(f - 0.5) > 0.3 else "#222222" for f in frac]  # dark fills get white text
    return fills, text, span


def _box(x0: int | float, x1: int | float, row: str, fill: str, *, line: str = _EDGE, width: int | float = 1) -> dict:
    y = ROWS[row]
    return dict(type="rect", x0=x0, x1=x1, y0=y - 0.45, y1=y + 0.45, fillcolor=fill, layer="below",
                line=dict(color=line, width=width))


def _token_trace(alignment: Base64Alignment, values: Values | None, value_title: str,
                 text_colors: list[str]) -> go.Scatter:
    text, hover = [], []
    for i, t in enumerate(alignment.tokens):
        text.append(display_token(t.text))
        extra = f"<br>{value_title}: {values[i]:.4g}" if values is not None else ""
        hover.append(f"token {t.index} (id {t.token_id}): {display_token(t.text)}<br>characters "
                     f"{t.char_span[0]}..{t.char_span[1] - 1}<br>blocks {list(t.blocks)}<br>"
                     f"determines bytes {list(t.complete_bytes)} fully, {list(t.byte_indices)} in part{extra}")
    x = [(t.char_span[0] + t.char_span[1]) / 2 for t in alignment.tokens]
    return go.Scatter(x=x, y=[ROWS["tokens"]] * len(x), text=text, hovertext=hover, mode="text",
                      textfont=dict(family=_MONO, size=13, color=text_colors), hoverinfo="text", name="tokens", showlegend=False)


def _bits(b64: str, n_bytes: int) -> tuple[list[float], list[str], list[str], list[str]]:
    """Per bit of every data character: x position, the bit, its colour, and its hover text."""
    xs, bits, colors, hover = [], [], [], []
    for i, ch in enumerate(b64):
        if ch == PAD:
            continue
        value = ALPHABET.index(ch)
        for k in range(6):
            bit_in_block = 6 * (i % 4) + k
            byte = 3 * (i // 4) + bit_in_block // 8
            used = byte < n_bytes
            xs.append(i + (k + 0.5) / 6)
            bits.append(str((value >> (5 - k)) & 1))
            colors.append("#222222" if used else "#9a9a9a")
            hover.append(f"character {i} {ch!r} bit {k}" + (f" → byte {byte} bit {bit_in_block % 8}" if used
                                                             else " (unused: encodes no byte)"))
    return xs, bits, colors, hover


def _byte_geometry(n_bytes: int) -> list[tuple[float, float]]:
    """The (x0, x1) extent of every decoded byte in character units."""
    out = []
    for j in range(n_bytes):
        block, local = divmod(j, 3)
        out.append((4 * block + 8 * local / 6, 4 * block + 8 * (local + 1) / 6))
    return out


def plot_b64_alignment(alignment: Base64Alignment, *, token_values: Values | None = None,
                       value_title: str = "value", zmid: int | float = 0.0, title: str | None = None) -> go.Figure:
    """The alignment view of ``alignment`` (from :func:`recallscope.tasks.b64_alignment.align_tokens`).

    ``token_values`` (one number per aligned token, NaN allowed) colours the token boxes on the diverging
    scale centred on ``zmid`` and adds a colour bar titled ``value_title``: use it to lay a per-position
    effect (patching, attribution) over the tokens. See the module docstring for the rows.
    """
    b64, n_tok = alignment.b64, len(alignment.tokens)
    if token_values is not None:
        token_values = np.asarray(token_values.detach().cpu() if isinstance(token_values, Tensor) else token_values,
                                  dtype=float)
    if token_values is not None and len(token_values) != n_tok:
        raise ConfigError(f"token_values has {len(token_values)} entries but the alignment has {n_tok} tokens; "
                          "pass one value per aligned token (alignment.tokens), in order.")
    data = decode(b64, canonical=False)
    fills, text_colors, span = _token_colors(token_values, n_tok, zmid)
    shapes = [_box(*t.char_span, "tokens", fills[i], width=1.5) for i, t in enumerate(alignment.tokens)]
    shapes += [_box(i, i + 1, "characters", "#ffffff" if c != PAD else _UNUSED) for i, c in enumerate(b64)]
    geometry = _byte_geometry(len(data))
    for j, (x0, x1) in enumerate(geometry):
        shapes.append(_box(x0, x1, "6-bit groups", _BYTE_FILLS[j % 2], line="rgba(0,0,0,0)"))
        shapes.append(_box(x0, x1, "bytes", _BYTE_FILLS[j % 2]))
    used_to = geometry[-1][1] if geometry else 0.0
    n_data = len(b64.rstrip(PAD))
    if n_data > used_to:
        shapes.append(_box(used_to, n_data, "6-bit groups", _UNUSED, line="rgba(0,0,0,0)"))
    y_bits = ROWS["6-bit groups"]
    shapes += [dict(type="line", x0=i, x1=i, y0=y_bits - 0.45, y1=y_bits + 0.45, layer="above",
                    line=dict(color="#aaaaaa", width=1)) for i in range(1, n_data) if i % 4]
    for edge in range(0, len(b64) + 1, 4):
        shapes.append(dict(type="line", x0=edge, x1=edge, y0=0, y1=ROWS["tokens"] - 0.5, layer="above",
                           line=dict(color="#666666", width=1.5, dash="dash")))
    fig = go.Figure()
    fig.add_trace(_token_trace(alignment, token_values, value_title, text_colors))
    fig.add_trace(go.Scatter(
        x=[i + 0.5 for i in range(len(b64))], y=[ROWS["characters"]] * len(b64), text=list(b64), mode="text",
        textfont=dict(family=_MONO, size=15), name="characters", showlegend=False, hoverinfo="text",
        hovertext=[f"character {i} {c!r}" + (f" = {ALPHABET.index(c)} = {ALPHABET.index(c):06b}<br>block "
                   f"{i // 4}; helps determine bytes {sorted(bytes_for_char(i, n_bytes=len(data)))}" if c != PAD
                   else ": padding") for i, c in enumerate(b64)]))
    xs, bits, colors, bit_hover = _bits(b64, len(data))
    fig.add_trace(go.Scatter(x=xs, y=[ROWS["6-bit groups"]] * len(xs), text=bits, mode="text",
                             textfont=dict(family=_MONO, size=10, color=colors), hovertext=bit_hover,
                             hoverinfo="text", name="bits", showlegend=False))
    fig.add_trace(go.Scatter(
        x=[(a + b) / 2 for a, b in geometry], y=[ROWS["bytes"]] * len(geometry), mode="text",
        text=[_byte_label(v) for v in data], textfont=dict(family=_MONO, size=12), name="bytes",
        showlegend=False, hoverinfo="text",
        hovertext=[f"byte {j} = {v} ({_byte_label(v).replace('<br>', ' ')})<br>from characters "
                   f"{sorted(chars_for_byte(j))}; tokens {list(alignment.tokens_for_byte(j))}"
                   for j, v in enumerate(data)]))
    if token_values is not None:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
                                 marker=dict(colorscale=DIVERGING, cmin=zmid - span, cmax=zmid + span,
                                             color=[zmid], showscale=True,
                                             colorbar=dict(title=dict(text=value_title), len=0.8))))
    apply_style(fig, title=title if title is not None else
                f"{b64!r}: {_plural(n_tok, 'token')}, {_plural(len(b64) // 4, 'block')}, "
                f"{_plural(len(data), 'byte')}")
    fig.update_layout(shapes=shapes, width=int(max(520, PX_PER_CHAR * len(b64) + 190)), height=330,
                      hoverlabel=dict(font=dict(family=FONT_FAMILY)))
    fig.update_xaxes(range=[-0.2, len(b64) + 0.2], showgrid=False, zeroline=False, showline=False,
                     tickvals=[4 * b + 2 for b in range(len(b64) // 4)],
                     ticktext=[f"block {b}" for b in range(len(b64) // 4)], ticks="")
    fig.update_yaxes(range=[-0.1, 4.1], showgrid=False, zeroline=False, showline=False, ticks="",
                     tickvals=list(ROWS.values()), ticktext=list(ROWS), fixedrange=True)
    return fig
