"""The base64 alignment view: every row is checked against Python's own base64 module and the token spans."""

import base64
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import recallscope
from recallscope.errors import ConfigError
from recallscope.plotting import find_chromium
from recallscope.plotting.b64 import ROWS, plot_b64_alignment
from recallscope.plotting.exporting import StaticExportUnavailable
from recallscope.tasks.b64_alignment import align_tokens
from recallscope.tasks.b64_codec import chars_for_byte, encode

TEXTS = ["T", "Hi", "Value added tax!", "ünï"]


def _shapes(fig, row):
    y = ROWS[row]
    return [s for s in fig.layout.shapes if s.type == "rect" and math.isclose((s.y0 + s.y1) / 2, y)]


def _trace(fig, name):
    return next(t for t in fig.data if t.name == name)


@pytest.mark.parametrize("text", TEXTS)
def test_rows_match_tokens_characters_bits_and_bytes(gpt2_tokenizer, text):
    b64 = encode(text)
    raw = base64.b64decode(b64)
    alignment = align_tokens(gpt2_tokenizer, b64, prompt=f"decode {b64} please")
    fig = plot_b64_alignment(alignment)

    boxes = _shapes(fig, "tokens")
    assert [(b.x0, b.x1) for b in boxes] == [t.char_span for t in alignment.tokens]
    assert list(_trace(fig, "characters").text) == list(b64)

    bits = _trace(fig, "bits")
    data_bits = "".join(bits.text)
    expected = "".join(f"{b:08b}" for b in raw)
    assert data_bits[: len(expected)] == expected  # the bit row reads out the decoded bytes, in order
    assert set(data_bits[len(expected):]) <= {"0"}  # the rest: unused (zero) trailing bits
    assert len(data_bits) == 6 * len(b64.rstrip("="))
    greyed = [c for c in bits.textfont.color if c != "#222222"]
    assert len(greyed) == len(data_bits) - len(expected)

    byte_boxes = _shapes(fig, "bytes")
    assert len(byte_boxes) == len(raw)
    for j, box in enumerate(byte_boxes):  # drawn to scale: a byte's box overlaps exactly its two characters
        overlapped = {i for i in range(len(b64)) if box.x0 < i + 1 and box.x1 > i}
        assert overlapped == set(chars_for_byte(j))
        assert math.isclose(box.x1 - box.x0, 8 / 6)
    labels = list(_trace(fig, "bytes").text)
    assert [int(lab.split("0x")[1], 16) for lab in labels] == list(raw)
    hover = _trace(fig, "bytes").hovertext
    assert all(f"tokens {list(alignment.tokens_for_byte(j))}" in hover[j] for j in range(len(raw)))


def test_block_edges_and_padding(gpt2_tokenizer):
    fig = plot_b64_alignment(align_tokens(gpt2_tokenizer, "VA=="))
    dashed = [s for s in fig.layout.shapes if s.type == "line" and s.line.dash == "dash"]
    assert sorted(s.x0 for s in dashed) == [0, 4]
    chars = _shapes(fig, "characters")
    assert [c.fillcolor for c in chars][2:] == ["#d9d9d9", "#d9d9d9"]  # padding is greyed
    assert "T" in _trace(fig, "bytes").text[0]
    assert fig.layout.title.text == "'VA==': 2 tokens, 1 block, 1 byte"


def test_token_values_colour_tokens_on_a_centred_scale(gpt2_tokenizer):
    alignment = align_tokens(gpt2_tokenizer, encode("Value added tax!"))
    n = len(alignment.tokens)
    values = np.linspace(-2.0, 1.0, n)
    values[1] = np.nan
    fig = plot_b64_alignment(alignment, token_values=values, value_title="effect")
    fills = [s.fillcolor for s in _shapes(fig, "tokens")]
    assert fills[1] == "#ffffff"  # NaN: no colour
    rgb = [tuple(int(v) for v in f[4:-1].split(",")) for f in fills if f.startswith("rgb")]
    assert rgb[0][2] > rgb[0][0] and rgb[-1][0] > rgb[-1][2]  # negative blue, positive red
    bar = next(t for t in fig.data if t.marker.showscale)
    assert (bar.marker.cmin, bar.marker.cmax) == (-2.0, 2.0)  # symmetric about zero
    assert bar.marker.colorbar.title.text == "effect"
    assert "effect: " in _trace(fig, "tokens").hovertext[0]
    with pytest.raises(ConfigError, match="one value per aligned token"):
        plot_b64_alignment(alignment, token_values=[1.0])


def test_exported_svg_of_the_alignment_view_parses(gpt2_tokenizer, tmp_path):
    try:
        if find_chromium() is None:
            pytest.skip("static export needs Chromium (apt-get install -y chromium)")
    except StaticExportUnavailable as exc:
        pytest.skip(str(exc))
    fig = plot_b64_alignment(align_tokens(gpt2_tokenizer, encode("Hi!")))
    out = recallscope.export(fig, tmp_path / "b64.svg")
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    texts = set(root.itertext())
    assert {"S", "G", "k", "h", "0x48", "0x69", "0x21", "tokens", "bytes"} <= texts
