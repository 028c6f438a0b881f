"""Write figures to disk: self-contained HTML always, PNG / SVG / PDF through kaleido + Chromium.

1. The format comes from the file suffix (``.html``, ``.png``, ``.svg``, ``.pdf``).
2. HTML embeds plotly.js (``include_plotlyjs=True``), so the file opens offline.
3. Static formats are rendered by kaleido 1.x in a headless Chromium. :func:`find_chromium` looks for
   one (``BROWSER_PATH``, then every Chrome/Chromium/Edge/Brave name and usual path that kaleido's
   browser driver, choreographer, knows, including the copy ``plotly_get_chrome`` downloads) and
   passes its path to kaleido explicitly. Debian's ``/usr/bin/chromium`` is a shell launcher that
   sources ``/etc/chromium.d``; the real binary beside it (``/usr/lib/chromium/chromium``) is used
   instead, which starts the same browser without the launcher's stderr chatter.
4. Every write goes to a temporary file in the target directory, then is renamed over the target,
   so a crash never leaves a half-written figure.
"""

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from recallscope.errors import RecallscopeError
from recallscope.plotting.style import DEFAULT_HEIGHT, DEFAULT_WIDTH

FORMATS = ("html", "png", "svg", "pdf")
"""Every format :func:`export` writes, named by file suffix."""
STATIC_FORMATS = ("png", "svg", "pdf")
"""The formats that need kaleido and a Chromium."""

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
"""Looked up on PATH when choreographer (kaleido's browser driver) cannot be imported."""

HOW_TO_ENABLE = (
    "To enable static export (PNG/SVG/PDF), install a Chromium-based browser: on Debian, as root, "
    "`apt-get install -y chromium`; on Ubuntu, where `chromium` is a snap, install Google Chrome's .deb "
    "or use the next option; on any machine with internet access, run `plotly_get_chrome -y` (or, in "
    "Python, `import kaleido; kaleido.get_chrome_sync()`), which downloads Chrome for kaleido; or set "
    "BROWSER_PATH to an existing Chrome/Chromium executable. HTML export works without any of this."
)


class ExportError(RecallscopeError):
    """A figure cannot be written: unknown format, unwritable location, or not a figure at all."""


class StaticExportUnavailable(ExportError):
    """PNG / SVG / PDF export is impossible here: no Chromium (or no kaleido). The message says how to fix it.

    ``html_path``: where :func:`export` wrote the figure as HTML instead (None when nothing was written).
    """

    def __init__(self, message: str, *, html_path: Path | None = None) -> None:
        super().__init__(message)
        self.html_path = html_path


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_all` wrote.

    Attributes:
        written: format -> path of every file written (always includes ``"html"``).
        failed: static format -> why it was not written (e.g. no Chromium on this machine).
    """

    written: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def _is_executable(path: str | os.PathLike) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _unwrap_launcher(path: str) -> str:
    """Debian's ``/usr/bin/chromium`` is a shell script; prefer the binary it execs, if present."""
    try:
        with open(path, "rb") as fh:
            is_script = fh.read(2) == b"#!"
    except OSError:
        return path
    name = Path(os.path.realpath(path)).name
    real = Path("/usr/lib") / name / name
    return str(real) if is_script and _is_executable(real) else path


def find_chromium() -> str | None:
    """Path of the Chromium-based browser static export will use, or None if there is none.

    ``BROWSER_PATH`` wins when set (if it is not an executable file, :class:`StaticExportUnavailable`
    is raised rather than silently using another browser).
    """
    override = os.environ.get("BROWSER_PATH")
    if override:
        if not _is_executable(override):
            raise StaticExportUnavailable(f"BROWSER_PATH={override!r} is not an executable file; point it at "
                                          f"a Chrome/Chromium binary or unset it. {HOW_TO_ENABLE}")
        return override
    try:
        from choreographer.browsers.chromium import Chromium

        found = Chromium.find_browser(skip_local=False)
    except ImportError:
        found = next((p for p in map(shutil.which, BROWSER_NAMES) if p), None)
    if not found or not _is_executable(found):
        return None
    return _unwrap_launcher(found)


def _as_figure(fig_or_result: Any) -> go.Figure:
    if isinstance(fig_or_result, go.Figure):
        return fig_or_result
    plot = getattr(fig_or_result, "plot", None)
    if callable(plot):
        fig = plot()
        if isinstance(fig, go.Figure):
            return fig
        raise ExportError(f"{type(fig_or_result).__name__}.plot() returned {type(fig).__name__}, not a "
                          "plotly Figure")
    raise ExportError(f"cannot export a {type(fig_or_result).__name__}: pass a plotly Figure or a result "
                      "with a .plot() method")


def _format_of(path: Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ExportError(f"cannot tell the format of {str(path)!r} from its suffix {path.suffix!r}; "
                          f"supported suffixes: {', '.join('.' + f for f in FORMATS)}")
    return fmt


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create the directory {str(path.parent)!r} for {path.name!r} "
                          f"({exc.strerror or exc}); choose a writable location") from exc
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as for open()
    except OSError as exc:
        raise ExportError(f"cannot write to the directory {str(path.parent)!r} ({exc.strerror or exc}); "
                          "choose a writable location") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise ExportError(f"cannot write {str(path)!r} ({exc.strerror or exc})") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def _render_static(fig: go.Figure, fmt: str, width: int, height: int, scale: int | float) -> bytes:
    browser = find_chromium()
    if browser is None:
        raise StaticExportUnavailable(f"cannot export {fmt.upper()}: no Chrome or Chromium found on this "
                                      f"machine. {HOW_TO_ENABLE}")
    try:
        import kaleido
        from kaleido.errors import BrowserClosedError, BrowserFailedError, ChromeNotFoundError
    except ImportError as exc:
        raise StaticExportUnavailable(f"cannot export {fmt.upper()}: kaleido is not installed; run "
                                      "`pip install 'recallscope[export]'` (kaleido>=1.0)") from exc
    try:
        # mathjax=False: kaleido would otherwise fetch MathJax from a CDN, which fails offline.
        return kaleido.calc_fig_sync(fig.to_dict(), opts=dict(format=fmt, width=width, height=height,
                                                              scale=scale),
                                     kopts=dict(path=browser, mathjax=False))
    except (ChromeNotFoundError, BrowserFailedError, BrowserClosedError) as exc:
        raise StaticExportUnavailable(f"cannot export {fmt.upper()}: the browser at {browser!r} failed to "
                                      f"start ({type(exc).__name__}: {exc}). {HOW_TO_ENABLE}") from exc


def export(fig_or_result: Any, path: str | os.PathLike, *, width: int | None = None,
           height: int | None = None, scale: int | float = 2) -> Path:
    """Write a figure (or ``result.plot()``) to ``path``; the suffix picks the format. Returns the path.

    ``width``/``height`` are layout pixels (default: the figure's own size, else 900 x 600). ``scale``
    multiplies the pixel size of PNGs only (a 900 x 600 figure at scale 2 is a 1800 x 1200 PNG); SVG and
    PDF are vector formats and keep the layout size. Raises :class:`ExportError` for an unknown suffix or
    an unwritable location. When PNG/SVG/PDF cannot be rendered here, the figure is written as HTML beside
    the requested path (same name, ``.html``) and :class:`StaticExportUnavailable` is raised, saying how to
    enable static export and where the HTML is (``exc.html_path``).
    """
    path = Path(path)
    fig = _as_figure(fig_or_result)
    try:
        return _export(fig, path, width=width, height=height, scale=scale)
    except StaticExportUnavailable as exc:
        html = _export(fig, path.with_suffix(".html"), width=width, height=height, scale=scale)
        raise StaticExportUnavailable(f"{exc} The figure was written as HTML instead: {html}",
                                      html_path=html) from exc


def _export(fig: go.Figure, path: Path, *, width: int | None, height: int | None, scale: int | float) -> Path:
    """:func:`export` without the HTML fallback."""
    fmt = _format_of(path)
    if fmt == "html":
        if width is not None or height is not None:
            fig = go.Figure(fig).update_layout(width=width, height=height)
        html = fig.to_html(include_plotlyjs=True, full_html=True,
                           config={"displaylogo": False, "responsive": True})
        _atomic_write(path, html.encode("utf-8"))
        return path
    w = int(width or fig.layout.width or DEFAULT_WIDTH)
    h = int(height or fig.layout.height or DEFAULT_HEIGHT)
    data = _render_static(fig, fmt, w, h, scale if fmt == "png" else 1)
    _atomic_write(path, data)
    return path


def export_all(fig: Any, stem: str | os.PathLike, formats: tuple[str, ...] = ("html", "png"), *,
               width: int | None = None, height: int | None = None, scale: int | float = 2) -> ExportReport:
    """Write ``stem.html`` (always) and ``stem.<fmt>`` for each static format in ``formats``.

    A static format that cannot be rendered here (no Chromium, no kaleido) is recorded in
    ``report.failed`` with the reason instead of raising; any other problem (unknown format,
    unwritable directory) raises :class:`ExportError`.
    """
    wanted = [f.lower().lstrip(".") for f in formats]
    unknown = [f for f in wanted if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown export format(s) {unknown}; supported: {', '.join(FORMATS)}")
    figure = _as_figure(fig)
    written: dict[str, Path] = {}
    failed: dict[str, str] = {}
    written["html"] = _export(figure, Path(f"{os.fspath(stem)}.html"), width=width, height=height, scale=scale)
    for fmt in dict.fromkeys(f for f in wanted if f != "html"):
        try:
            written[fmt] = _export(figure, Path(f"{os.fspath(stem)}.{fmt}"), width=width, height=height,
                                   scale=scale)
        except StaticExportUnavailable as exc:
            failed[fmt] = str(exc)
    return ExportReport(written=written, failed=failed)
