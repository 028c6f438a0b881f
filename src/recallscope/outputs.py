"""What a run writes beside its results: a run manifest, CSV tables, and loading any saved result.

1. :class:`RunRecord` collects, during one command-line (or scripted) run, the command and its
   options, the config dataclass, the model (spec, weight hash, tokenizer), the prompts (hash and
   count), the seed, library versions, named timings and every output written, and saves them as
   ``manifest.json`` in the run's output directory (atomically). Each result directory also carries
   its own ``manifest.json`` from the method that made it.
2. :func:`cells_table` turns a :class:`~recallscope.results.PatchingResult` into long-format rows (one
   per cell: axis labels, mean over prompts, 95% bootstrap CI, prompt count); :func:`write_csv` writes
   any list of row dicts as CSV.
3. :func:`load_result` opens any saved result directory by the ``type`` recorded in its ``result.json``
   (the classes register themselves with :func:`recallscope.results.register_result` where they are defined).
"""

import csv
import io
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recallscope.errors import ResultFileError
from recallscope.manifest import atomic_write_text, model_info, prompts_hash, versions
from recallscope.results import RESULT_TYPES  # noqa: F401  (re-exported: the registry lives in results)
from recallscope.results import RESULT_FILES, PatchingResult, discover_results, result_class

MANIFEST = "manifest.json"


class RunRecord:
    """The manifest of one run, filled in as the run goes and written with :meth:`write`."""

    def __init__(self, out_dir: str | os.PathLike, command: str, *, options: Mapping[str, Any] | None = None,
                 config: Any = None, seed: int | None = None, argv: Sequence[str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.data: dict[str, Any] = {
            "command": command,
            "argv": list(sys.argv[1:] if argv is None else argv),
            "options": {k: v for k, v in (options or {}).items() if not callable(v)},
            "config": None,
            "config_type": None,
            "seed": seed,
            "model": None,
            "prompts_sha256": None,
            "n_prompts": None,
            "versions": versions(),
            "timings_s": {},
            "outputs": [],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.config_object = config
        if config is not None:
            self.config(config)
        self._t0 = time.perf_counter()

    def model(self, model: Any, spec: str | None = None) -> None:
        """Record the model: spec, weight SHA-256, shape, tokenizer."""
        info = model_info(model)
        if spec is not None:
            info["spec"] = spec
        self.data["model"] = info

    def config(self, config: Any) -> None:
        """Record the config dataclass the method ran with (and its type)."""
        self.config_object = config
        self.data["config"], self.data["config_type"] = _config_data(config), type(config).__name__
        if hasattr(config, "seed"):
            self.data["seed"] = config.seed

    def prompts(self, prompts: Sequence[str]) -> None:
        """Record the prompts the run used (their hash and count; the result manifests list them)."""
        self.data["prompts_sha256"] = prompts_hash(prompts)
        self.data["n_prompts"] = len(prompts)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time the enclosed block as ``timings_s[name]`` (accumulating over repeated blocks)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            timings = self.data["timings_s"]
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0

    def output(self, path: str | os.PathLike) -> Path:
        """Record a file or directory the run wrote (stored relative to the output directory)."""
        path = Path(path)
        try:
            rel = path.resolve().relative_to(self.out_dir.resolve())
        except ValueError:
            rel = path
        if str(rel) not in self.data["outputs"]:
            self.data["outputs"].append(str(rel))
        return path

    def write(self, **extra: Any) -> Path:
        """Write ``manifest.json`` (with total time and ``extra`` fields) into the output directory."""
        self.data["timings_s"]["total"] = time.perf_counter() - self._t0
        self.data.update(extra)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / MANIFEST
        atomic_write_text(path, json.dumps(self.data, indent=1, default=str) + "\n")
        return path


def _config_data(config: Any) -> Any:
    if config is None:
        return None
    from recallscope.config import config_to_dict

    return config_to_dict(config)


def cells_table(result: PatchingResult) -> list[dict[str, Any]]:
    """One row per cell of ``result``: its axis indices and labels, mean, 95% CI and prompt count."""
    import torch

    mean = result.mean()
    lo, hi = result.ci()
    counts = (~result.values.isnan()).sum(0)
    rows = []
    for index in torch.cartesian_prod(*(torch.arange(s) for s in mean.shape)).reshape(-1, mean.ndim).tolist():
        row: dict[str, Any] = {}
        for ax, i in zip(result.axes, index):
            row[ax] = i
            if result.labels.get(ax):
                row[f"{ax}_label"] = result.labels[ax][i]
        cell = tuple(index)
        row.update(mean=float(mean[cell]), ci95_low=float(lo[cell]), ci95_high=float(hi[cell]),
                   n_prompts=int(counts[cell]))
        rows.append(row)
    return rows


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write row dicts as CSV (columns: the union of keys, in first-seen order), atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())
    return path


def load_result(directory: str | os.PathLike) -> Any:
    """Load any saved result directory, choosing the class from the ``type`` in its ``result.json``."""
    directory = Path(directory)
    meta_file = directory / RESULT_FILES[1]
    if not meta_file.is_file():
        raise ResultFileError(f"{directory} is not a saved result (no {RESULT_FILES[1]}); pass a directory "
                              "written by a result's .save() (e.g. a subdirectory of a run's --out).")
    try:
        meta = json.loads(meta_file.read_text())
        kind, module = meta.get("type"), meta.get("module")
    except (json.JSONDecodeError, OSError, AttributeError) as exc:
        raise ResultFileError(f"{meta_file} is unreadable ({exc}); re-run the method that produced it.") from exc
    cls = result_class(str(kind), module if isinstance(module, str) else None)
    if cls is None:
        raise ResultFileError(f"{directory} holds a {kind!r}, which recallscope cannot load; known result types: "
                              f"{', '.join(sorted(discover_results()))}.")
    loader: Any = cls
    return loader.load(directory)
