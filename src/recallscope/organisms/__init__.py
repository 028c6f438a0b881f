"""Model organisms: small transformers trained here, whose mechanisms are known by construction.

Shipped organisms (``recallscope.load_model("organism:<name>")``; weights under ``organisms/weights/``):

- ``b64-decoder``: decodes base64 given as 2-character chunk tokens (:mod:`.b64_decoder`); truth: the
  dependency map of output bytes on input chunks.
- ``route-s0`` .. ``route-s4``: decode base64 chunks through a concept (:mod:`.mnemonic`, interchange
  training); ``rote-s0`` .. ``rote-s4``: the same decode map as a direct lookup. Truth: which concept
  each chunk routes through, and where (layer, position).
- ``fact-store``: subject -> attribute lookups with two-token subjects (:mod:`.fact_store`); truth: the
  residual nodes that carry the subject.

:func:`ground_truth` returns a loaded organism's typed ground truth (:class:`~.b64_decoder.B64Truth`,
:class:`~.mnemonic.RouteTruth` or :class:`~.fact_store.FactTruth`). Importing this package has no side
effects; :func:`register_builtin` (called lazily by the model registry) registers the shipped names.
"""

import functools
from typing import Any

from recallscope.organisms.store import OrganismInfo, load_organism_dir, organism_info

__all__ = ["OrganismInfo", "ground_truth", "load_organism_dir", "organism_info", "register_builtin", "shipped"]


def ground_truth(model: Any) -> Any:
    """The typed ground truth of a loaded organism (raises for models that are not organisms)."""
    from recallscope.organisms.b64_decoder import B64Truth
    from recallscope.organisms.fact_store import FactTruth
    from recallscope.organisms.mnemonic import RouteTruth

    info = organism_info(model)
    types: dict[str, Any] = {"b64": B64Truth, "mnemonic": RouteTruth, "facts": FactTruth}
    return types[info.kind].from_dict(info.truth)


def shipped() -> list[str]:
    """Names of the organisms whose weights are installed with this package."""
    from recallscope.organisms.recipes import WEIGHTS_DIR

    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "config.json").is_file())


def register_builtin() -> None:
    """Register a loader for every shipped organism with :mod:`recallscope.models.organisms_registry`."""
    from recallscope.models.organisms_registry import register_organism
    from recallscope.organisms.recipes import WEIGHTS_DIR

    for name in shipped():
        register_organism(name, functools.partial(load_organism_dir, WEIGHTS_DIR / name))
