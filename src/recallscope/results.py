"""Typed result containers: tensors with named axes, token labels, config and manifest.

:class:`PatchingResult` keeps one value per prompt and cell (``values[prompt, *axes]``) plus the
unpatched clean and corrupt metric per prompt, so every statistic (means, normalised recovery,
bootstrap confidence intervals) is derived, never stored twice. ``.save(dir)`` writes
``values.safetensors`` + ``result.json`` + ``manifest.json`` atomically; ``.load(dir)`` validates them.

Every result type implements the :class:`Result` protocol (``plot``, ``save``, ``load``, ``_repr_html_``) and
is registered where it is defined with :func:`register_result`, so :func:`recallscope.outputs.load_result`
opens any saved result by the type named in its ``result.json``. A saved result records the SHA-256 of its
``values.safetensors`` and ``manifest.json`` in ``result.json``; loading recomputes them and refuses a file
that changed since it was written.
"""

import hashlib
import importlib
import json
import os
import pkgutil
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.errors import ResultFileError
from recallscope.stats import bootstrap_ci  # noqa: F401  (re-exported: results.bootstrap_ci was its home)

RESULT_FILES = ("values.safetensors", "result.json", "manifest.json")
CHECKED_FILES = (RESULT_FILES[0], RESULT_FILES[2])
"""Files whose SHA-256 ``result.json`` records (``"sha256"``) and :func:`load_result_dir` verifies."""

RESULT_TYPES: dict[str, str] = {}
"""Registered result type name (``result.json`` ``"type"``) -> ``module:Class``; filled by :func:`register_result`
where each class is defined."""

_PACKAGES_WITH_RESULTS = ("attribution", "bench", "features", "lens", "organisms", "patching", "routes", "tasks")


@runtime_checkable
class Result(Protocol):
    """What every result type offers: a figure, a saved directory and back, and a rich notebook display."""

    def plot(self, *args: Any, **kwargs: Any) -> Any:
        """A plotly figure of the result."""
        ...

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the result to ``directory`` (safetensors + JSON, with checksums); return the directory."""
        ...

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Any:
        """Read a result written by :meth:`save`, verifying its checksums."""
        ...

    def _repr_html_(self) -> str:
        """A summary table and the figure, for Jupyter."""
        ...


T = TypeVar("T", bound=type)


def register_result(cls: T) -> T:
    """Class decorator: make ``cls`` a registered :class:`Result` (loadable by type name).

    Checks that it has ``plot``, ``save`` and ``load``, and gives it the standard ``_repr_html_`` (summary table
    and figure, :mod:`recallscope.plotting.rich`) unless it defines its own.
    """
    missing = [m for m in ("plot", "save", "load") if not callable(getattr(cls, m, None))]
    if missing:
        raise TypeError(f"{cls.__name__} cannot be registered as a result: it lacks {missing}.")
    if not callable(getattr(cls, "_repr_html_", None)):
        setattr(cls, "_repr_html_", RichReprMixin._repr_html_)
    RESULT_TYPES[cls.__name__] = f"{cls.__module__}:{cls.__qualname__}"
    return cls


def discover_results() -> dict[str, str]:
    """Import every recallscope module that can define result types, so all of them are registered."""
    import recallscope

    for pkg in _PACKAGES_WITH_RESULTS:
        try:
            package = importlib.import_module(f"recallscope.{pkg}")
        except ImportError:
            continue
        for info in pkgutil.walk_packages(package.__path__, prefix=f"recallscope.{pkg}."):
            try:
                importlib.import_module(info.name)
            except ImportError:  # an optional dependency (ray, ipywidgets, ...) is missing
                continue
    del recallscope
    return RESULT_TYPES


def result_class(kind: str, module: str | None = None) -> type | None:
    """The registered class for a saved ``type``: from the registry, the module recorded at save time, or a
    search of the packages that define results; None if no class of that name is registered."""
    if kind not in RESULT_TYPES and module and module.startswith("recallscope."):
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    if kind not in RESULT_TYPES:
        discover_results()
    if kind not in RESULT_TYPES:
        return None
    mod, name = RESULT_TYPES[kind].split(":")
    obj: Any = importlib.import_module(mod)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sums(directory: Path, recorded: Any) -> None:
    """Raise :class:`ResultFileError` if a file's SHA-256 differs from the one ``result.json`` recorded."""
    if not isinstance(recorded, dict):
        raise ResultFileError(f"{directory / RESULT_FILES[1]} has a malformed \"sha256\" entry; re-run the method "
                              "that produced it.")
    for name, expected in recorded.items():
        if name not in CHECKED_FILES:
            continue
        actual = _sha256(directory / name)
        if actual != expected:
            raise ResultFileError(f"{directory / name} does not match the checksum recorded when it was saved "
                                  f"(sha256 {actual[:12]}... != {str(expected)[:12]}...): the file was changed or "
                                  "corrupted after saving. Restore it from a copy or re-run the method that "
                                  "produced it.")


def save_result_dir(directory: str | os.PathLike, kind: str, tensors: dict[str, Tensor], meta: dict[str, Any],
                    manifest: dict[str, Any]) -> Path:
    """Write any result as ``values.safetensors`` + ``result.json`` + ``manifest.json``, atomically.

    The files are written to a temporary sibling directory that is renamed into place, so a reader
    sees the whole result or nothing. ``kind`` (the result class name) is stored in ``result.json``
    and checked by :func:`load_result_dir`.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    except OSError as exc:
        raise ResultFileError(f"cannot write a result to {directory}: {exc.strerror or exc}. Choose a writable "
                              "output directory (--out) or fix its permissions.") from exc
    try:
        # clone: safetensors refuses two names for one storage (e.g. clean and corrupt the same tensor)
        owned = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
        save_file(owned, str(tmp / RESULT_FILES[0]))
        (tmp / RESULT_FILES[2]).write_text(json.dumps(manifest, indent=1, default=str))
        module = RESULT_TYPES.get(kind, "").split(":")[0] or None
        sums = {name: _sha256(tmp / name) for name in CHECKED_FILES}
        (tmp / RESULT_FILES[1]).write_text(json.dumps({"type": kind, "module": module, **meta, "sha256": sums},
                                                      indent=1, default=str))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_result_dir(directory: str | os.PathLike, kind: str
                    ) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """Read (tensors, result.json, manifest.json) written by :func:`save_result_dir`, validating them.

    The checksums recorded in ``result.json`` are verified before the tensors are parsed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    missing = [f for f in RESULT_FILES if not (directory / f).is_file()]
    if missing:
        raise ResultFileError(f"{directory} is not a complete result: missing {missing}. Re-run the "
                              "method that produced it.")
    try:
        meta = json.loads((directory / RESULT_FILES[1]).read_text())
        if not isinstance(meta, dict):
            raise json.JSONDecodeError("not a JSON object", "", 0)
        if "sha256" in meta:  # results saved before checksums existed have none
            _check_sums(directory, meta.pop("sha256"))
        tensors = load_file(str(directory / RESULT_FILES[0]))
        manifest = json.loads((directory / RESULT_FILES[2]).read_text())
    except (SafetensorError, json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"{directory} is corrupted ({type(exc).__name__}: {exc}); delete it and "
                              "re-run the method that produced it.") from exc
    if meta.get("type", kind) != kind:
        raise ResultFileError(f"{directory} holds a {meta.get('type')}, not a {kind}; load it with "
                              f"{meta.get('type')}.load (or recallscope.outputs.load_result).")
    meta.pop("module", None)
    return tensors, meta, manifest


class RichReprMixin:
    """Jupyter display for any result class: a summary table and ``self.plot()`` as HTML.

    Inherit it (``class MyResult(RichReprMixin)``) to get ``_repr_html_``; add rows with an optional
    ``summary_extra() -> list[tuple[str, str]]``. See :mod:`recallscope.plotting.rich`.
    """

    def _repr_html_(self) -> str:
        from recallscope.plotting.rich import result_html

        return result_html(self)


@register_result
@dataclass(frozen=True)
class PatchingResult(RichReprMixin):
    """Per-prompt metric after patching each cell.

    Attributes:
        values: ``[prompt, *axes]`` metric values after patching.
        axes: names of the cell axes (``("layer", "pos")``, ``("layer", "head")``...).
        clean: ``[prompt]`` metric on the clean run; corrupt: ``[prompt]`` on the corrupted run.
        labels: tick labels per axis (token strings for ``pos``).
        config: the method's configuration (JSON-serialisable).
        manifest: model, weights hash, prompts, versions, timings.
    """

    values: Float[Tensor, "prompt ..."]
    axes: tuple[str, ...]
    clean: Float[Tensor, " prompt"]
    corrupt: Float[Tensor, " prompt"]
    labels: dict[str, list[str]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.ndim != len(self.axes) + 1:
            raise ResultFileError(f"values has {self.values.ndim} axes but axes names {self.axes} (+prompt)")
        n = self.values.shape[0]
        if self.clean.shape != (n,) or self.corrupt.shape != (n,):
            raise ResultFileError(f"clean/corrupt must be [{n}], got {tuple(self.clean.shape)}, "
                                  f"{tuple(self.corrupt.shape)}")
        for ax, lab in self.labels.items():
            if ax in self.axes and len(lab) != self.values.shape[1 + self.axes.index(ax)]:
                raise ResultFileError(f"{len(lab)} labels for axis {ax!r} of size "
                                      f"{self.values.shape[1 + self.axes.index(ax)]}")

    @property
    def n_prompts(self) -> int:
        return int(self.values.shape[0])

    def mean(self) -> Tensor:
        """Mean over prompts (ignoring NaN: cells a prompt does not have), shaped like the cell axes."""
        return self.values.nanmean(0)

    def normalized(self) -> "PatchingResult":
        """(patched - corrupt) / (clean - corrupt) per prompt: 0 = no effect, 1 = full recovery."""
        shape = (-1,) + (1,) * len(self.axes)
        gap = (self.clean - self.corrupt).reshape(shape)
        vals = (self.values - self.corrupt.reshape(shape)) / gap
        return replace(self, values=vals, clean=torch.ones_like(self.clean),
                       corrupt=torch.zeros_like(self.corrupt),
                       config={**self.config, "normalized": True})

    def effect(self) -> "PatchingResult":
        """patched - corrupt per prompt (ROME's indirect effect when the metric is a probability)."""
        shape = (-1,) + (1,) * len(self.axes)
        return replace(self, values=self.values - self.corrupt.reshape(shape),
                       clean=self.clean - self.corrupt, corrupt=torch.zeros_like(self.corrupt),
                       config={**self.config, "effect": True})

    def ci(self, level: float = 0.95, *, n_boot: int = 2000, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Bootstrap confidence interval of the mean over prompts, per cell."""
        return bootstrap_ci(self.values, level=level, n_boot=n_boot, seed=seed)

    def peak(self) -> dict[str, Any]:
        """The cell with the largest mean, with its labels and 95% bootstrap CI."""
        mean = self.mean()
        flat = int(mean.nan_to_num(nan=float("-inf")).argmax())
        index = torch.unravel_index(torch.tensor(flat), mean.shape)
        lo, hi = self.ci()
        out: dict[str, Any] = {"mean": float(mean.flatten()[flat]), "ci95": (float(lo.flatten()[flat]),
                                                                           float(hi.flatten()[flat]))}
        for ax, i in zip(self.axes, index):
            out[ax] = int(i)
            if ax in self.labels:
                out[ax + "_label"] = self.labels[ax][int(i)]
        return out

    def plot(self, **kwargs: Any):
        """A plotly Figure: layer x position heatmap with token labels, or a head grid."""
        from recallscope.plotting import plot_patching

        return plot_patching(self, **kwargs)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the result to ``directory`` atomically (all files appear together or none)."""
        meta = {"axes": list(self.axes), "labels": self.labels, "config": self.config,
                "shape": list(self.values.shape)}
        return save_result_dir(directory, "PatchingResult", {"values": self.values, "clean": self.clean,
                                                            "corrupt": self.corrupt}, meta, self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PatchingResult":
        """Read a result written by :meth:`save`; raise :class:`ResultFileError` if it is damaged."""
        tensors, meta, manifest = load_result_dir(directory, "PatchingResult")
        if list(tensors["values"].shape) != meta.get("shape"):
            raise ResultFileError(f"{directory}: values shape {list(tensors['values'].shape)} does not match "
                                  f"result.json shape {meta.get('shape')}; the files are from different runs.")
        return cls(values=tensors["values"], axes=tuple(meta["axes"]), clean=tensors["clean"],
                   corrupt=tensors["corrupt"], labels=meta.get("labels", {}), config=meta.get("config", {}),
                   manifest=manifest)
