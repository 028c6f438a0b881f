"""Lookup of ``organism:<name>`` specs: small trained models shipped with recallscope.

Organisms register a loader here under their name; ``load_model("organism:<name>")`` dispatches to it.
The organisms shipped with recallscope are registered on first use (importing recallscope does not).
"""

from typing import Any, Callable

import torch

from recallscope.errors import UnknownModelError

PREFIX = "organism:"
_LOADERS: dict[str, Callable[..., Any]] = {}
_BUILTIN = {"registered": False}


def _register_builtin() -> None:
    if not _BUILTIN["registered"]:
        _BUILTIN["registered"] = True
        from recallscope.organisms import register_builtin

        register_builtin()


def is_organism_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def register_organism(name: str, loader: Callable[..., Any]) -> None:
    """Make ``organism:<name>`` loadable; ``loader(device=..., dtype=...)`` returns the model."""
    _LOADERS[name] = loader


def available_organisms() -> list[str]:
    _register_builtin()
    return sorted(_LOADERS)


def load_organism(spec: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    name = spec[len(PREFIX):]
    _register_builtin()
    if name not in _LOADERS:
        have = ", ".join(available_organisms()) or "none are installed in this version"
        raise UnknownModelError(f"unknown organism {name!r}; available organisms: {have}.")
    return _LOADERS[name](device=device, dtype=dtype)
