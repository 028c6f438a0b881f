"""Manifests: what produced a result (model and weight hash, prompts, config, versions, timings)."""

import hashlib
import json
import os
import platform
import sys
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch


def weights_hash(model: Any) -> str:
    """SHA-256 over the model's parameters (names, shapes, bytes); cached on the model object."""
    cached = getattr(model, "_recallscope_weights_hash", None)
    if cached:
        return cached
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    model._recallscope_weights_hash = digest
    return digest


def prompts_hash(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("recallscope", "torch", "transformer-lens", "transformers", "plotly"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def model_info(model: Any) -> dict[str, Any]:
    cfg = model.cfg
    tok = getattr(model, "tokenizer", None)
    return {
        "spec": getattr(model, "recallscope_spec", getattr(cfg, "model_name", "unknown")),
        "weights_sha256": weights_hash(model),
        "n_layers": int(cfg.n_layers),
        "n_heads": int(cfg.n_heads),
        "d_model": int(cfg.d_model),
        "tokenizer": type(tok).__name__ if tok is not None else None,
        "tokenizer_vocab": len(tok) if tok is not None else None,
    }


def build_manifest(model: Any, prompts: Sequence[str], config: dict[str, Any], *, seed: int | None = None,
                   timings: dict[str, float] | None = None) -> dict[str, Any]:
    return {
        "model": model_info(model),
        "prompts": list(prompts),
        "prompts_sha256": prompts_hash(prompts),
        "config": config,
        "seed": seed,
        "versions": versions(),
        "timings_s": timings or {},
    }


def manifest_key(manifest: dict[str, Any]) -> str:
    """Hash of what determines a result (model weights, prompts, config, seed) — not timings."""
    core = {k: manifest.get(k) for k in ("prompts_sha256", "config", "seed")}
    core["weights"] = manifest.get("model", {}).get("weights_sha256")
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, as for open(); mkstemp gives 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
