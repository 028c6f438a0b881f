"""Figures and export: data shapes, colour scales, labels, hover CIs, file formats, error paths.

Results are built directly from small tensors (no model). Static export (PNG/SVG/PDF) needs a
Chromium; those tests skip, saying so, on machines without one.
"""

import importlib
import json
import os
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

from recallscope.errors import RecallscopeError
from recallscope.plotting import (
    ExportError,
    StaticExportUnavailable,
    UnsupportedResultError,
    display_token,
    export,
    export_all,
    find_chromium,
    heatmap,
    plot_patching,
)
from recallscope.results import PatchingResult

# the package re-exports the function `export`, which shadows the submodule of the same name
export_mod = importlib.import_module("recallscope.plotting.exporting")

TOKENS = ["<s>", "ĠThe", "ĠEiffel", "ĠTower", "Ġis", "Ġin", "Ġthe"]
POS_LABELS = [f"{t}·{i}" for i, t in enumerate(TOKENS)]
CLEANED = ["&lt;s&gt;·0", "␣The·1", "␣Eiffel·2", "␣Tower·3", "␣is·4", "␣in·5", "␣the·6"]
N_PROMPTS, N_LAYERS, N_HEADS = 5, 3, 4


def _chromium_or_none():
    try:
        return find_chromium()
    except StaticExportUnavailable:
        return None


CHROMIUM = _chromium_or_none()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="static export needs Chromium: apt-get install -y chromium (as root), "
                             "or plotly_get_chrome on a machine with internet")


def make_result(axes, *, n_heads=N_HEADS, seed=0):
    sizes = {"layer": N_LAYERS, "head": n_heads, "pos": len(POS_LABELS)}
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn((N_PROMPTS, *(sizes[a] for a in axes)), generator=gen)
    labels = {"layer": [str(i) for i in range(N_LAYERS)], "head": [str(h) for h in range(n_heads)],
              "pos": POS_LABELS}
    return PatchingResult(values=values, axes=tuple(axes), clean=torch.full((N_PROMPTS,), 2.0),
                          corrupt=torch.full((N_PROMPTS,), -1.0),
                          labels={a: labels[a] for a in axes},
                          config={"method": "activation_patching", "component": "resid_pre",
                                  "metric": "logit_diff"})


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which must come first."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------- global state


def test_import_leaves_plotly_template_alone():
    code = ("import plotly.io as pio; pio.templates.default = 'ggplot2'\n"
            "import torch, recallscope.plotting\n"
            "from recallscope.results import PatchingResult\n"
            "r = PatchingResult(values=torch.zeros(2, 3), axes=('layer',), clean=torch.ones(2), "
            "corrupt=torch.zeros(2))\n"
            "r.plot()\n"
            "assert pio.templates.default == 'ggplot2', pio.templates.default\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "", "the library printed something"


def test_plotting_in_process_keeps_default_template():
    before = pio.templates.default
    fig = plot_patching(make_result(("layer", "pos")))
    assert pio.templates.default == before
    assert fig.layout.template.layout.paper_bgcolor is not None  # the style lives on the figure itself
    assert fig.layout.paper_bgcolor == "white"


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize("raw, shown", [
    ("ĠParis·5", "␣Paris·5"),
    ("▁Paris·5", "␣Paris·5"),
    (" Paris·5", "␣Paris·5"),
    ("Ċ·2", "↵·2"),
    ("<s>·0", "&lt;s&gt;·0"),
    ("a&b·3", "a&amp;b·3"),
    ("·1", "∅·1"),
    ("VA==·4", "VA==·4"),
    ("x·y", "x·y"),  # no numeric suffix: the middle dot is part of the token
    ("Ġ", "␣"),
])
def test_display_token(raw, shown):
    assert display_token(raw) == shown


def test_duplicate_tokens_stay_distinct():
    labels = [display_token(t) for t in ["Ġthe·2", "Ġthe·6"]]
    assert labels[0] != labels[1]


# ---------------------------------------------------------------- figures


def test_layer_pos_heatmap_data_labels_and_colours():
    result = make_result(("layer", "pos"))
    fig = plot_patching(result)
    (trace,) = fig.data
    assert isinstance(fig, go.Figure) and trace.type == "heatmap"
    z = np.asarray(trace.z)
    assert z.shape == tuple(result.mean().shape)
    np.testing.assert_allclose(z, result.mean().numpy(), rtol=1e-6)
    assert list(trace.x) == CLEANED
    assert list(trace.y) == ["0", "1", "2"]
    assert trace.zmid == 0
    scale = trace.colorscale
    assert "rgb(5,48,97)" == scale[0][1] and "rgb(103,0,31)" == scale[-1][1]  # RdBu reversed: blue -> red
    assert fig.layout.xaxis.type == "category"


def test_hover_shows_mean_ci_and_prompt_count():
    result = make_result(("layer", "pos"))
    (trace,) = plot_patching(result).data
    lo, hi = result.ci()
    custom = np.asarray(trace.customdata)
    assert custom.shape == (*result.mean().shape, 2)
    np.testing.assert_allclose(custom[..., 0], lo.numpy(), rtol=1e-6)
    np.testing.assert_allclose(custom[..., 1], hi.numpy(), rtol=1e-6)
    assert (custom[..., 0] <= custom[..., 1]).all() and not np.allclose(custom[..., 0], custom[..., 1])
    for part in ("layer %{y}", "token %{x}", "mean %{z", "95% CI [%{customdata[0]", "%{customdata[1]",
                 f"n = {N_PROMPTS} prompts"):
        assert part in trace.hovertemplate


def test_normalized_plots_recovery_and_zmid_is_configurable():
    result = make_result(("layer", "pos"))
    (raw,) = plot_patching(result).data
    (norm,) = plot_patching(result, normalized=True, zmid=0.5, title="mine").data
    expected = ((result.values - (-1.0)) / 3.0).mean(0).numpy()
    np.testing.assert_allclose(np.asarray(norm.z), expected, rtol=1e-5)
    assert not np.allclose(np.asarray(norm.z), np.asarray(raw.z))
    assert norm.zmid == 0.5
    assert "recovery" in norm.colorbar.title.text
    assert plot_patching(result, title="mine").layout.title.text == "mine"


def test_layer_head_grid():
    result = make_result(("layer", "head"))
    (trace,) = result.plot().data
    assert np.asarray(trace.z).shape == (N_LAYERS, N_HEADS)
    np.testing.assert_allclose(np.asarray(trace.z), result.mean().numpy(), rtol=1e-6)
    assert list(trace.x) == ["0", "1", "2", "3"]
    assert "head %{x}" in trace.hovertemplate


@pytest.mark.parametrize("n_heads, n_cols", [(9, 3), (12, 4), (4, 2)])
def test_layer_head_pos_small_multiples(n_heads, n_cols):
    result = make_result(("layer", "head", "pos"), n_heads=n_heads)
    fig = plot_patching(result)
    assert len(fig.data) == n_heads
    stacked = np.stack([np.asarray(t.z) for t in fig.data], axis=1)  # [layer, head, pos]
    assert stacked.shape == tuple(result.mean().shape)
    np.testing.assert_allclose(stacked, result.mean().numpy(), rtol=1e-6)
    assert all(t.coloraxis == "coloraxis" for t in fig.data)
    assert fig.layout.coloraxis.cmid == 0
    assert fig.layout.coloraxis.colorscale[0][1] == "rgb(5,48,97)"
    assert all(list(t.x) == CLEANED for t in fig.data)
    last = fig.data[-1].hovertemplate
    assert f"head {n_heads - 1}<br>" in last and "95% CI" in last
    lo, _ = result.ci()
    np.testing.assert_allclose(np.asarray(fig.data[2].customdata)[..., 0], lo[:, 2].numpy(), rtol=1e-6)
    domains = {tuple(fig.layout[t.xaxis.replace("x", "xaxis")].domain) for t in fig.data}
    assert len(domains) == n_cols
    titles = [a.text for a in fig.layout.annotations]
    assert titles[: n_heads] == [f"head {h}" for h in range(n_heads)]


def test_one_axis_result_is_a_line_with_ci_band():
    result = make_result(("layer",))
    fig = plot_patching(result)
    lower, upper, line = fig.data
    lo, hi = result.ci()
    np.testing.assert_allclose(np.asarray(line.y), result.mean().numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lower.y), lo.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(upper.y), hi.numpy(), rtol=1e-6)
    assert upper.fill == "tonexty"
    assert "95% CI" in line.hovertemplate


def test_unsupported_axes_raise():
    values = torch.zeros(2, 2, 2, 2)
    result = PatchingResult(values=values, axes=("layer", "pos", "pos2"), clean=torch.ones(2),
                            corrupt=torch.zeros(2))
    with pytest.raises(UnsupportedResultError, match="axes"):
        plot_patching(result)
    assert issubclass(UnsupportedResultError, RecallscopeError)


def test_missing_labels_fall_back_to_indices():
    result = PatchingResult(values=torch.randn(3, 2, 4), axes=("layer", "pos"), clean=torch.ones(3),
                            corrupt=torch.zeros(3))
    (trace,) = plot_patching(result).data
    assert list(trace.x) == ["0", "1", "2", "3"] and list(trace.y) == ["0", "1"]


def test_nan_cells_are_blank_not_an_error(tmp_path):
    """Cells a prompt does not have are NaN; a cell no prompt has stays blank in the figure."""
    from dataclasses import replace

    result = make_result(("layer", "pos"))
    values = result.values.clone()
    values[:, :, -1] = float("nan")
    fig = plot_patching(replace(result, values=values))
    z = np.asarray(fig.data[0].z)
    assert np.isnan(z[:, -1]).all() and np.isfinite(z[:, :-1]).all()

    def reject(constant):
        raise AssertionError(f"figure JSON contains {constant}, which browsers cannot parse")

    json.loads(fig.to_json(), parse_constant=reject)
    assert export(fig, tmp_path / "nan.html").stat().st_size > 0


def test_generic_heatmap_checks_shape():
    fig = heatmap(np.array([[1.0, -2.0, 3.0]]), ["a", "b", "c"], ["r"], title="t", colorbar_title="cb")
    assert fig.data[0].zmid == 0 and fig.data[0].colorbar.title.text == "cb"
    assert fig.layout.title.text == "t"
    with pytest.raises(RecallscopeError, match="shape"):
        heatmap(np.zeros((2, 3)), ["a", "b"], ["r", "s"])


# ---------------------------------------------------------------- export: HTML and errors


def test_html_is_self_contained(tmp_path):
    from plotly.offline import get_plotlyjs

    out = export(make_result(("layer", "pos")), tmp_path / "fig.html")
    html = out.read_text(encoding="utf-8")
    assert out == tmp_path / "fig.html"
    assert get_plotlyjs()[:5000] in html, "plotly.js bundle not embedded"
    assert 'src="https://cdn.plot.ly' not in html
    assert "␣Eiffel·2" in html or "\\u2423Eiffel" in html
    assert [p.name for p in tmp_path.iterdir()] == ["fig.html"], "temporary files left behind"


def test_unknown_suffix_names_supported_ones(tmp_path):
    with pytest.raises(ExportError, match=r"\.html, \.png, \.svg, \.pdf"):
        export(go.Figure(), tmp_path / "fig.jpeg")
    with pytest.raises(ExportError, match="unknown export format"):
        export_all(go.Figure(), tmp_path / "fig", formats=("html", "gif"))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="cannot create the directory"):
        export(go.Figure(), blocker / "fig.html")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ExportError, match="cannot write to the directory"):
            export(go.Figure(), ro / "fig.html")
    finally:
        ro.chmod(0o700)


def test_not_a_figure_is_rejected(tmp_path):
    with pytest.raises(ExportError, match="plotly Figure"):
        export(42, tmp_path / "fig.html")


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "fig.html"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod.os, "replace", broken_replace)
    with pytest.raises(ExportError, match="No space left"):
        export(go.Figure(), target)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.html"]


def test_without_chromium_static_export_explains_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "find_chromium", lambda: None)
    with pytest.raises(StaticExportUnavailable) as info:
        export(go.Figure(), tmp_path / "fig.png")
    message = str(info.value)
    assert "apt-get install -y chromium" in message and "plotly_get_chrome" in message
    assert isinstance(info.value, RecallscopeError)
    assert not (tmp_path / "fig.png").exists()
    # the figure is still written, as HTML beside the requested file, and the message says where
    assert info.value.html_path == tmp_path / "fig.html" and f"written as HTML instead: {tmp_path / 'fig.html'}" in message
    assert "Plotly.newPlot" in (tmp_path / "fig.html").read_text()
    (tmp_path / "fig.html").unlink()

    report = export_all(make_result(("layer", "pos")), tmp_path / "fig", formats=("html", "png", "svg"))
    assert set(report.written) == {"html"} and report.written["html"].is_file()
    assert set(report.failed) == {"png", "svg"}
    assert "apt-get install -y chromium" in report.failed["svg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.html"]


def test_browser_path_override(tmp_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "missing-chrome"))
    with pytest.raises(StaticExportUnavailable, match="BROWSER_PATH"):
        find_chromium()
    fake = tmp_path / "my-chrome"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("BROWSER_PATH", str(fake))
    assert find_chromium() == str(fake)


# ---------------------------------------------------------------- export: static formats


@needs_chromium
def test_debian_launcher_is_bypassed():
    if not Path("/usr/lib/chromium/chromium").is_file():
        pytest.skip("not Debian's chromium package")
    assert CHROMIUM == "/usr/lib/chromium/chromium"


@needs_chromium
def test_png_has_requested_pixel_size(tmp_path):
    fig = plot_patching(make_result(("layer", "pos")))
    out = export(fig, tmp_path / "fig.png", width=320, height=240, scale=2)
    assert png_size(out.read_bytes()) == (640, 480)
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


@needs_chromium
def test_png_defaults_to_figure_height(tmp_path):
    fig = plot_patching(make_result(("layer", "pos")))
    out = export(fig, tmp_path / "fig.png", scale=1)
    assert png_size(out.read_bytes()) == (900, fig.layout.height)


@needs_chromium
def test_export_all_writes_every_static_format(tmp_path):
    report = export_all(make_result(("layer", "head", "pos")), tmp_path / "heads",
                        formats=("html", "svg", "pdf"), width=500, height=400)
    assert report.failed == {}
    assert set(report.written) == {"html", "svg", "pdf"}
    root = ET.parse(report.written["svg"]).getroot()
    assert root.tag in ("svg", "{http://www.w3.org/2000/svg}svg")
    assert float(root.get("width")) == 500 and float(root.get("height")) == 400
    texts = set(root.itertext())
    assert {"<s>·0", "␣Eiffel·2", "head 3"} <= texts  # '<s>' is shown as text, not as strike-through
    assert report.written["pdf"].read_bytes()[:5] == b"%PDF-"
