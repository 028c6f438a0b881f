"""recallscope: trace where and how a language model recalls a fact.

Importing the package is cheap and has no side effects; submodules load torch and models lazily.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("recallscope.models", "load_model"),
    "tiny_model": ("recallscope.models", "tiny_model"),
    "export": ("recallscope.plotting", "export"),
    "explore": ("recallscope.explorer", "explore"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'recallscope' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
