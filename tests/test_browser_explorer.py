"""The explorer widget in a real browser: JupyterLab served on the loopback, a notebook opened in headless
Chromium, the widget's layer slider dragged with the mouse, and screenshots checked.

1. Write a notebook that builds an :class:`~recallscope.explorer.Explorer` over synthetic patching results
   (no model: the kernel only imports recallscope) and displays its widget.
2. Start ``jupyter lab`` on a free loopback port (token auth, settings and workspaces in ``tmp_path``) and
   headless Chromium with a DevTools port; drive Chromium over the Chrome DevTools Protocol (a websocket,
   tornado's client: no selenium or chromedriver needed, nothing leaves the machine).
3. Open the notebook, run all cells, wait for the widget's dropdowns and the plotly heatmap to render, and
   screenshot the cell's output: it must not be blank.
4. Drag the layer slider's handle to the right end of its track with mouse events (press, moves, release).
   The kernel answers by redrawing the figures: the slider must read 3, the per-token figure's title must
   name layer 3, and the output screenshot must differ from the first. (Keyboard input on the dropdowns
   is not used: JupyterLab's notebook shortcuts take the arrow keys in command mode.)

Every wait has a deadline; the servers are stopped in ``finally`` (Jupyter through its shutdown API, then
the process groups). Skips with the reason when Chromium or JupyterLab is missing (``make test`` installs
both: the ``chromium`` target and the ``notebook`` extra).
"""

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DEADLINE_S = 150  # the whole browser session; pytest-timeout (300 s) is the outer guard
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

NOTEBOOK_SOURCE = '''import torch
from recallscope.explorer import Explorer
from recallscope.results import PatchingResult

def result(axes, seed):
    sizes = {"layer": 4, "head": 2, "pos": 5}
    values = torch.randn((3, *(sizes[a] for a in axes)), generator=torch.Generator().manual_seed(seed))
    labels = {"layer": [str(i) for i in range(4)], "pos": [f"t{i}" for i in range(5)]}
    return PatchingResult(values=values, axes=axes, clean=torch.full((3,), 2.0), corrupt=torch.full((3,), -1.0),
                          labels=labels)

explorer = Explorer({"resid_pre": result(("layer", "pos"), 0), "z": result(("layer", "head", "pos"), 1)},
                    prompts=["p0", "p1", "p2"], normalized=False)
explorer.widget()'''

STATE_JS = """(() => {
  const app = window.jupyterapp; if (!app) return 'no app';
  let w = null; for (const x of app.shell.widgets('main')) { if (x.sessionContext) { w = x; break; } }
  if (!w) return 'no notebook';
  const k = w.sessionContext.session && w.sessionContext.session.kernel; return k ? k.status : 'no kernel';
})()"""
OUTPUT_JS = """(() => {
  const out = document.querySelector('.jp-Cell .jp-OutputArea');
  if (!out) return {};
  const titles = Array.from(out.querySelectorAll('.js-plotly-plot .gtitle')).map(t => t.textContent);
  const base = out.querySelector('.widget-slider .noUi-base'), handle = out.querySelector('.widget-slider .noUi-handle');
  const readout = out.querySelector('.widget-slider .widget-readout');
  const err = out.querySelector('[data-mime-type="application/vnd.jupyter.stderr"]');
  const box = e => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; };
  return {n_select: out.querySelectorAll('.widget-dropdown select').length, titles: titles,
          layer: readout ? readout.textContent.trim() : null, base: base ? box(base) : null,
          handle: handle ? box(handle) : null, error: err ? err.textContent.slice(0, 2000) : null, rect: box(out)};
})()"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback only)
        return r.read()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class DevTools:
    """A minimal Chrome DevTools Protocol client: one websocket, commands answered by id, events skipped."""

    def __init__(self, conn) -> None:
        self.conn, self.next_id = conn, 0

    @classmethod
    async def connect(cls, url: str) -> "DevTools":
        from tornado.websocket import websocket_connect

        return cls(await asyncio.wait_for(websocket_connect(url, max_message_size=256 << 20), 20))

    async def send(self, method: str, timeout: float = 30, **params):
        self.next_id += 1
        me = self.next_id
        await self.conn.write_message(json.dumps({"id": me, "method": method, "params": params}))
        while True:
            raw = await asyncio.wait_for(self.conn.read_message(), timeout)
            if raw is None:
                raise RuntimeError(f"Chromium closed the DevTools connection during {method}")
            msg = json.loads(raw)
            if msg.get("id") == me:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def js(self, expression: str):
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return res["result"].get("value")

    async def until(self, what: str, check, timeout: float):
        """Poll ``OUTPUT_JS``/``STATE_JS``-style checks every 0.25 s until ``check(value)``; fail with the last value."""
        end, value = time.monotonic() + timeout, None
        while time.monotonic() < end:
            value = await self.js(what)
            if check(value):
                return value
            await asyncio.sleep(0.25)
        raise AssertionError(f"timed out after {timeout} s waiting in the browser; last state: {value}")

    async def key(self, key: str, code: int) -> None:
        for kind in ("rawKeyDown", "keyUp"):
            await self.send("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code,
                            nativeVirtualKeyCode=code)

    async def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 8) -> None:
        """Press the left mouse button at ``start``, move to ``end`` in ``steps`` moves, release."""
        await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=start[0], y=start[1])
        await self.send("Input.dispatchMouseEvent", type="mousePressed", x=start[0], y=start[1], button="left",
                        buttons=1, clickCount=1)
        for i in range(1, steps + 1):
            x = start[0] + (end[0] - start[0]) * i / steps
            y = start[1] + (end[1] - start[1]) * i / steps
            await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, button="left", buttons=1)
        await self.send("Input.dispatchMouseEvent", type="mouseReleased", x=end[0], y=end[1], button="left",
                        buttons=0, clickCount=1)

    async def shot(self, rect) -> bytes:
        x, y, w, h = rect
        clip = {"x": x, "y": y, "width": max(1.0, w), "height": max(1.0, min(h, 2000.0)), "scale": 1}
        res = await self.send("Page.captureScreenshot", format="png", clip=clip)
        return base64.b64decode(res["data"])


def _pixels(png: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def _not_blank(png: bytes) -> float:
    """Fraction of pixels that are not (near) white."""
    img = _pixels(png)
    gray = img.convert("L")
    dark = sum(n for v, n in enumerate(gray.histogram()) if v < 235)
    return dark / (img.width * img.height)


def _changed(a: bytes, b: bytes) -> float:
    """Fraction of pixels that differ (1.0 when the sizes differ)."""
    from PIL import ImageChops

    ia, ib = _pixels(a), _pixels(b)
    if ia.size != ib.size:
        return 1.0
    diff = ImageChops.difference(ia, ib).convert("L")
    return sum(n for v, n in enumerate(diff.histogram()) if v > 16) / (ia.width * ia.height)


def _write_notebook(path: Path) -> None:
    import nbformat

    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell(NOTEBOOK_SOURCE)]
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, path)


def _start_lab(root: Path, port: int, token: str) -> subprocess.Popen:
    notes = root / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notes.parent.mkdir(parents=True)
    notes.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))  # no news toast over the page
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / "cfg"), "JUPYTER_RUNTIME_DIR": str(root / "run"),
           "JUPYTERLAB_SETTINGS_DIR": str(root / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(root / "ws"),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root / 'nb'}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--ServerApp.terminals_enabled=False", "--ServerApp.allow_root=True"]
    log = open(root / "lab.log", "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _start_chromium(root: Path) -> subprocess.Popen:
    profile = root / "chrome"
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-extensions", "--remote-debugging-port=0", "--remote-allow-origins=*",
           f"--user-data-dir={profile}", "--window-size=1400,1100", "about:blank"]
    log = open(root / "chromium.log", "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(what: str, fn, timeout: float, log: Path, proc: subprocess.Popen):
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            value = fn()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    died = f"exited with {proc.returncode}" if proc.poll() is not None else f"did not come up within {timeout} s"
    raise AssertionError(f"{what} {died}; log tail:\n{tail}")


async def _session(devtools_port: int, lab: str, shots: Path) -> dict:
    targets = json.loads(_get(f"http://127.0.0.1:{devtools_port}/json/list"))
    page = next(t for t in targets if t.get("type") == "page")
    cdp = await DevTools.connect(page["webSocketDebuggerUrl"])
    try:
        await cdp.send("Page.enable")
        await cdp.send("Emulation.setDeviceMetricsOverride", width=1400, height=1100, deviceScaleFactor=1, mobile=False)
        await cdp.send("Emulation.setFocusEmulationEnabled", enabled=True)  # keyboard focus as in a shown window
        await cdp.send("Page.navigate", url=lab)
        await cdp.until(STATE_JS, lambda s: s == "idle", 60)
        await cdp.js("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        ready = lambda o: bool(o) and (o.get("error") or (o.get("n_select", 0) >= 3 and len(o.get("titles", [])) >= 2  # noqa: E731
                                                       and o.get("handle")))
        before = await cdp.until(OUTPUT_JS, ready, 90)
        assert not before.get("error"), f"the notebook cell failed:\n{before['error']}"
        await cdp.js("document.querySelector('.jp-Cell .jp-OutputArea').scrollIntoView()")
        await asyncio.sleep(0.5)  # let plotly finish drawing
        before = await cdp.js(OUTPUT_JS)
        first = await cdp.shot(before["rect"])
        # the interaction, as a person does it: drag the layer slider's handle to the right end of its track
        hx, hy, hw, hh = before["handle"]
        bx, by, bw, bh = before["base"]
        await cdp.drag((hx + hw / 2, hy + hh / 2), (bx + bw + 5, hy + hh / 2))
        after = await cdp.until(OUTPUT_JS, lambda o: o.get("layer") == "3" and any(t.startswith("layer 3,")
                                                                                    for t in o.get("titles", [])), 30)
        await cdp.js("document.querySelector('.jp-Cell .jp-OutputArea').scrollIntoView()")
        await asyncio.sleep(0.5)
        after = await cdp.js(OUTPUT_JS)
        second = await cdp.shot(after["rect"])
        (shots / "explorer_before.png").write_bytes(first)
        (shots / "explorer_after.png").write_bytes(second)
        return {"before": before, "after": after, "first": first, "second": second}
    except BaseException:
        try:  # what the page showed when it failed, for the log
            res = await cdp.send("Page.captureScreenshot", format="png", timeout=10)
            (shots / "explorer_failure.png").write_bytes(base64.b64decode(res["data"]))
        except Exception:
            pass
        raise
    finally:
        cdp.conn.close()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (chromium, chromium-browser or google-chrome) on PATH: "
                                              "install it with `make chromium` (as root) or apt-get install chromium")
def test_explorer_widget_in_jupyterlab_in_headless_chromium(tmp_path):
    pytest.importorskip("jupyterlab", reason="JupyterLab is missing: pip install 'recallscope[notebook]'")
    pytest.importorskip("PIL", reason="Pillow is missing: pip install 'recallscope[test]'")
    pytest.importorskip("tornado")
    (tmp_path / "nb").mkdir()
    _write_notebook(tmp_path / "nb" / "explorer.ipynb")
    port, token = _free_port(), "recallscope-browser-test"
    lab = _start_lab(tmp_path, port, token)
    chrome = _start_chromium(tmp_path)
    try:
        status = f"http://127.0.0.1:{port}/api/status?token={token}"
        _wait_for("JupyterLab", lambda: _get(status), 60, tmp_path / "lab.log", lab)
        active = tmp_path / "chrome" / "DevToolsActivePort"
        devtools = _wait_for("Chromium's DevTools port", lambda: active.exists() and active.read_text().split()[0],
                             30, tmp_path / "chromium.log", chrome)
        url = f"http://127.0.0.1:{port}/lab/tree/explorer.ipynb?token={token}&reset"
        shots = Path(os.environ.get("RECALLSCOPE_BROWSER_SHOTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        run = asyncio.run(asyncio.wait_for(_session(int(devtools), url, shots), DEADLINE_S))
    finally:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(req, timeout=5)  # noqa: S310 (stops the kernel too)
        except OSError:
            pass
        _stop(chrome)
        _stop(lab)
    before, after = run["before"], run["after"]
    assert before["layer"] == "0" and before["titles"][0] == "activation patching: resid_pre · mean over prompts"
    assert "layer 0, by token: resid_pre · mean over prompts" in before["titles"]
    assert after["layer"] == "3" and "layer 3, by token: resid_pre · mean over prompts" in after["titles"]
    assert _not_blank(run["first"]) > 0.02 and _not_blank(run["second"]) > 0.02
    assert _changed(run["first"], run["second"]) > 0.01
