"""The HTML report: self-contained, escaped, and rendered by a headless Chromium (figures actually drawn).

The browser tests skip cleanly when no Chromium is installed (``apt-get install -y chromium``).
"""

import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from plotly.offline import get_plotlyjs

from recallscope.report import Section, write_report
from recallscope.results import PatchingResult

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--virtual-time-budget=10000"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install -y chromium (as root)")


def _result(axes, seed):
    sizes = {"layer": 4, "head": 4, "pos": 6}
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn((3, *(sizes[a] for a in axes)), generator=gen)
    return PatchingResult(values=values, axes=axes, clean=torch.ones(3), corrupt=torch.zeros(3),
                          labels={"pos": [f"Ġtok{i}·{i}" for i in range(6)]}, config={"method": "activation_patching"})


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    sections = [
        Section("Layer by position", "Patching <b>heatmap</b> & friends.", _result(("layer", "pos"), 0).plot(),
                [{"layer": 2, "note": "<i>peak</i>"}]),
        Section("Heads", "One panel per head.", _result(("layer", "head", "pos"), 1).plot(),
                figures=(_result(("layer", "pos"), 2).plot(),)),
        Section("Only a table", "No figure here.", None, [{"a": 1}]),
    ]
    return write_report(tmp_path_factory.mktemp("report") / "report.html", "Report <test>", sections, footer="made by a test")


def _browser(report: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, report.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp_path)


def png_rgb(data: bytes) -> np.ndarray:
    """Decode an 8-bit, non-interlaced RGB/RGBA PNG (what Chromium writes) to ``[height, width, 3]`` uint8."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, f"unsupported PNG {header}"
    bpp = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), dtype=np.uint8)
    prev = np.zeros(width * bpp, dtype=np.int64)
    for r in range(height):
        kind, line = raw[r, 0], raw[r, 1:].astype(np.int64)
        if kind == 0:
            cur = line
        elif kind == 2:
            cur = (line + prev) % 256
        elif kind == 1:  # Sub: a running sum per channel
            cur = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) % 256
        else:  # Average (3) and Paeth (4) depend on the reconstructed left neighbour: byte by byte
            cur = line.copy()
            for i in range(len(cur)):
                a = int(cur[i - bpp]) if i >= bpp else 0
                b, c = int(prev[i]), (int(prev[i - bpp]) if i >= bpp else 0)
                if kind == 3:
                    pred = (a + b) // 2
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (cur[i] + pred) % 256
        out[r] = cur
        prev = cur
    return out.reshape(height, width, bpp)[..., :3]


def test_png_decoder_against_a_known_image():
    """Oracle for the decoder: a 3x2 image written with every filter type by hand."""
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[10, 20, 30], [40, 50, 60], [70, 80, 90]]],
                      dtype=np.uint8)
    rows, prev = [], np.zeros(9, dtype=np.int64)
    for kind, row in zip((1, 4), pixels.reshape(2, 9).astype(np.int64)):
        left = np.concatenate([[0, 0, 0], row[:-3]])
        up_left = np.concatenate([[0, 0, 0], prev[:-3]])
        if kind == 1:
            pred = left
        else:
            p = left + prev - up_left
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - up_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, up_left))
        rows.append(bytes([kind]) + bytes(((row - pred) % 256).astype(np.uint8)))
        prev = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    np.testing.assert_array_equal(png_rgb(png), pixels)


def test_report_is_self_contained_and_escaped(report):
    page = report.read_text(encoding="utf-8")
    assert page.count(get_plotlyjs()[:3000]) == 1, "plotly.js must be embedded exactly once"
    assert 'src="https://' not in page and "src='http" not in page
    assert page.count("Plotly.newPlot") == 3
    assert page.count("<div class='figs'>") == 2, "one figure row per section with figures"
    assert "<title>Report &lt;test&gt;</title>" in page and "Patching &lt;b&gt;heatmap&lt;/b&gt; &amp; friends." in page
    assert "<td>&lt;i&gt;peak&lt;/i&gt;</td>" in page
    assert page.count("<li><a href='#s") == 3 and "id='s3'" in page
    assert '"displaylogo": false' in page or '"displaylogo":false' in page
    if os.name == "posix":
        assert report.stat().st_mode & 0o044, "the report must be readable by others (not 0600)"


@needs_chromium
def test_report_renders_in_headless_chromium(report, tmp_path):
    proc = _browser(report, tmp_path, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert dom.count('class="main-svg"') >= 6, "plotly did not draw the three figures (no .main-svg elements)"
    assert dom.count('class="hm"') + dom.count("heatmaplayer") >= 3, "no heatmap layers were drawn"
    assert "␣tok3·3" in dom  # token labels are rendered as text


@needs_chromium
def test_report_screenshot_shows_coloured_figures(report, tmp_path):
    shot = tmp_path / "shot.png"
    proc = _browser(report, tmp_path, f"--screenshot={shot}", "--window-size=900,1300")
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    rgb = png_rgb(shot.read_bytes()).astype(int)
    assert rgb.shape == (1300, 900, 3)
    non_white = (rgb.min(-1) < 235).mean()
    saturated = (rgb.max(-1) - rgb.min(-1) > 60).mean()  # the diverging heatmap colours, not just text
    assert non_white > 0.10, f"only {non_white:.1%} of the page is drawn on: figures did not render"
    assert saturated > 0.05, f"only {saturated:.1%} of the pixels are coloured: heatmaps missing"
    red = ((rgb[..., 0] - rgb[..., 2]) > 60).mean()
    blue = ((rgb[..., 2] - rgb[..., 0]) > 60).mean()
    assert red > 0.01 and blue > 0.01, "a diverging heatmap shows both signs"


# ------------------------------------------------------------------------------------------ the demo
@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory, tiny_gpt2):
    """The whole demo on a random 2-layer model (it recalls no fact) with the shipped organisms, sized down."""
    from recallscope.demo import DemoConfig, run_demo

    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(model="tiny-gpt2", n_cards=3, card_controls=2, b64_per_byte=2, organisms=("route-s0",),
                        organism_chunks=("VA", "TA"), organism_controls=3, png=False)
    return out, run_demo(out, config, model=tiny_gpt2)


def test_demo_writes_every_section_with_its_numbers(tiny_demo):
    from recallscope.bench.organism_figures import B64DependencyMap
    from recallscope.routes.human import HumanComparison

    out, summary = tiny_demo
    page = (out / "report.html").read_text(encoding="utf-8")
    for title in ("Facts the model recalls", "Fact recall: skipped", "Routes: acronyms", "Routes: human mnemonic cards",
                  "Base64 organism: tokens, bits and bytes", "Base64 organism: exact patching vs the ground truth",
                  "Mnemonic organisms: route vs rote"):
        assert f">{title}</h2>" in page, title
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary, default=str))
    b64 = summary["b64_organism"]
    assert b64 == B64DependencyMap.load(out / "b64_dependency").summary() and b64["roc_auc"] == 1.0
    assert f"ROC AUC {b64['roc_auc']:.3f}" in page  # the explanation quotes the measured number
    human = HumanComparison.load(out / "human_cards")
    assert summary["human_cards"]["n_cards"] == len(human.rows) == 3
    assert summary["human_cards"]["source"] == "shipped sample cards"
    rows = summary["organism_routes"]
    assert [r["chunk"] for r in rows] == ["VA", "TA"]
    assert all(r["organism"] == "route-s0" and r["is_route"] for r in rows)
    assert set(summary["timings_s"]) >= {"fact recall", "human mnemonic cards", "base64 organism",
                                         "route vs rote organisms"}
    assert not list(out.glob("*.png")), "png=False writes no PNGs"


def test_demo_fact_sections_on_a_tiny_model(tiny_gpt2, tmp_path):
    """Patching, AtP (and its agreement with patching), DLA, the EAP-IG circuit and the noise traces, on
    counterfactual capital pairs a random model does not know (the code paths, cheaply)."""
    from recallscope import demo
    from recallscope.attribution import atp, fact_pairs
    from recallscope.tasks.facts import load_builtin_facts

    facts = load_builtin_facts(["capital"])
    pairs = fact_pairs(tiny_gpt2, facts, n_pairs=3, seed=0)
    rep = demo._Report(tmp_path, png=False)
    exact = demo._patching(tiny_gpt2, pairs, rep)
    demo._attribution(tiny_gpt2, pairs, exact, rep)
    cfg = demo.DemoConfig(n_trace=2, samples=1, ig_steps=2, top_edges=20)
    demo._circuit(tiny_gpt2, pairs, cfg, rep)
    demo._noise(tiny_gpt2, facts[:2], cfg, rep)
    titles = [s.title for s in rep.sections]
    assert titles[:4] == ["Activation patching: where the answer is decided", "Attribution patching (AtP): every site "
                          "at once", "Direct logit attribution: who writes the answer", "The circuit (EAP-IG)"]
    assert [t for t in titles if t.startswith("Noise trace")] == ["Noise trace: residual stream",
                                                                  "Noise trace: MLP outputs",
                                                                  "Noise trace: attention outputs"]
    assert all(s.all_figures() for s in rep.sections)
    estimate = atp(tiny_gpt2, pairs, "logit_diff", components=["resid_pre"], progress=False).mean("resid_pre")
    r = float(torch.corrcoef(torch.stack([exact.effect().mean().flatten(), estimate.flatten()]))[0, 1])
    assert rep.summary["atp"]["pearson_r_vs_exact_resid_pre"] == pytest.approx(r, abs=1e-4)
    circuit = rep.summary["circuit"]
    assert circuit["requested"] == 20 and 0 < circuit["edges"] <= 20
    assert f"{circuit['edges']} edges over {circuit['nodes']} nodes" in rep.sections[3].explanation
    for name in ("patching_resid_pre", "atp", "dla", "trace_resid_post", "trace_mlp_out", "trace_attn_out", "knockout"):
        assert (tmp_path / name / "manifest.json").is_file(), name


def test_demo_config_file_and_cli_options(tmp_path):
    import argparse

    from recallscope.cli.demo import DEMO_OPTIONS
    from recallscope.cli.common import _config
    from recallscope.demo import DemoConfig

    path = tmp_path / "demo.json"
    path.write_text(json.dumps({"n_pairs": 4, "acronyms": ["VAT"], "png": False, "model": "organism:b64-decoder"}))
    args = argparse.Namespace(config=str(path), **{dest: None for dest in DEMO_OPTIONS})
    args.n_pairs = 6  # the command line wins over the file
    config = _config(args, DemoConfig, DEMO_OPTIONS)
    assert (config.n_pairs, config.acronyms, config.png, config.model) == (6, ("VAT",), False, "organism:b64-decoder")
    assert config.n_trace == DemoConfig().n_trace


@needs_chromium
def test_demo_report_png_and_rendering(tiny_demo, tmp_path):
    """A figure's PNG is a real image; the demo page draws every figure in headless Chromium."""
    from recallscope import demo

    out, _ = tiny_demo
    rep = demo._Report(tmp_path, png=True)
    rep.add("t", "e", {"fig": _result(("layer", "pos"), 3).plot()})
    rgb = png_rgb((tmp_path / "fig.png").read_bytes()).astype(int)
    assert rgb.shape[0] >= 300 and rgb.shape[1] >= 400 and (rgb.max(-1) - rgb.min(-1) > 60).mean() > 0.05
    page = (out / "report.html").read_text(encoding="utf-8")
    proc = _browser(out / "report.html", tmp_path, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_figures = page.count("Plotly.newPlot")
    assert n_figures >= 6 and proc.stdout.count('class="main-svg"') >= 2 * n_figures
