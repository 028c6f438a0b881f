"""Scale: devices, precision, memory budgets, out-of-memory back-off and distributed sweeps.

- :mod:`.memory`: :func:`free_memory_mb`, :func:`auto_memory_budget_mb`, :class:`OOMBackoff`.
- :mod:`.devices`: where the parts of a model spread over several devices live.
- :mod:`.executor`: who evaluates a sweep's chunks (:class:`LocalExecutor`, :func:`use_executor`).
- :mod:`.distributed`: :func:`ray_sweeps` / :class:`RaySweepExecutor`, sweeps sharded over Ray
  workers (``pip install 'recallscope[distributed]'``; Ray is imported only when used).

``memory``, ``devices`` and ``executor`` import only torch and the error classes, so the model and
patching layers may use them; ``distributed`` sits on top of the patching engine. Names are loaded
lazily: importing this package imports neither Ray nor the engine.
"""

_LAZY = {
    "free_memory_mb": "memory", "auto_memory_budget_mb": "memory", "resolve_memory_budget": "memory",
    "OOMBackoff": "memory", "is_oom": "memory",
    "module_device": "devices", "layer_device": "devices", "place_trace": "devices",
    "LocalExecutor": "executor", "current_executor": "executor", "use_executor": "executor",
    "ModelRecipe": "distributed", "RayConfig": "distributed", "RaySweepExecutor": "distributed",
    "ray_sweeps": "distributed", "ray_available": "distributed",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"recallscope.scale.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'recallscope.scale' has no attribute {name!r}")


__all__ = sorted(_LAZY)
