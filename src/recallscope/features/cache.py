"""Where trained transcoder sets and their activation stores are cached, and how they are found again.

Layout under the recallscope cache root (``$RECALLSCOPE_CACHE``, else the user cache directory, e.g.
``~/.cache/recallscope``):

- ``transcoders/<model>-<hash>/``: one set per (model, text, training settings); ``<hash>`` is the first
  12 hex digits of the SHA-256 of the canonical JSON of those settings (:func:`config_hash`). Holds the
  set (``transcoders.safetensors`` + ``.json``), ``checkpoints/``, ``report.json``, ``fidelity.json``
  and ``config.json``.
- ``activations/<model>-<hash>/``: the activation store the set was trained from (keyed by the text
  settings only, so other training settings reuse it); deleted after training unless kept.
"""

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from recallscope.errors import ResultFileError


def model_slug(spec: str) -> str:
    """A directory-safe name for a model spec (``smollm2`` aliases collapse to ``smollm2``)."""
    from recallscope.models.loading import SMOLLM2_ALIASES

    text = str(spec).strip().lower()
    if text in SMOLLM2_ALIASES:
        return "smollm2"
    return re.sub(r"[^a-z0-9._-]+", "-", text).strip("-") or "model"


def config_hash(config: dict[str, Any]) -> str:
    """12 hex digits identifying ``config`` (canonical JSON: sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def transcoder_dir(spec: str, config: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory of the transcoder set trained for ``spec`` with ``config``."""
    from recallscope.models.cache import cache_root

    return cache_root(cache_dir) / "transcoders" / f"{model_slug(spec)}-{config_hash(config)}"


def activation_dir(spec: str, data_config: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory of the activation store for ``spec`` and the text settings ``data_config``."""
    from recallscope.models.cache import cache_root

    return cache_root(cache_dir) / "activations" / f"{model_slug(spec)}-{config_hash(data_config)}"


def cached_sets(spec: str, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Complete cached transcoder sets of ``spec`` (a saved set in the directory), newest first."""
    from recallscope.models.cache import cache_root

    root = cache_root(cache_dir) / "transcoders"
    prefix = model_slug(spec) + "-"
    found = [d for d in root.glob(prefix + "*") if (d / "transcoders.json").is_file()
             and re.fullmatch(r"[0-9a-f]{12}", d.name[len(prefix):])] if root.is_dir() else []
    return sorted(found, key=lambda d: (d / "transcoders.json").stat().st_mtime, reverse=True)


def find_cached_set(spec: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The newest complete cached set of ``spec``; a clear error naming the training command if none."""
    from recallscope.models.cache import cache_root

    found = cached_sets(spec, cache_dir)
    if not found:
        raise ResultFileError(f"no cached transcoders for {spec!r} under {cache_root(cache_dir) / 'transcoders'}; "
                              f"train them with `recallscope transcoders --model {spec}` or pass --transcoders DIR.")
    return found[0]
