"""Feature-level circuits: transcoders, replacement models, attribution graphs over features.

- :mod:`.transcoder`: per-layer and cross-layer transcoders (:class:`~.transcoder.TranscoderSet`), the
  exact transcoder of a ReLU MLP.
- :mod:`.train`: TopK skip-transcoder training on CPU (seeded, checkpointed, resumable).
- :mod:`.replacement`: the replacement model (MLPs spliced out for transcoders) and its fidelity.
- :mod:`.formats`: loading circuit-tracer, SAELens and sparsify transcoders.
- :mod:`.graph`: attribution graphs over features, error nodes, embeddings and logits.
- :mod:`.shipped`: the default transcoder set of every shipped organism (package data, hash-checked).
- :mod:`.concepts` / :mod:`.routes`: features and supernodes as route concepts; does a feature set carry a route.

Importing this package has no side effects; submodules are imported on first use.
"""

_LAZY = {
    "Transcoder": "recallscope.features.transcoder",
    "TranscoderSet": "recallscope.features.transcoder",
    "TranscoderSpec": "recallscope.features.transcoder",
    "exact_mlp_transcoders": "recallscope.features.transcoder",
    "replaced": "recallscope.features.replacement",
    "fidelity": "recallscope.features.replacement",
    "train_set": "recallscope.features.train",
    "train_transcoder": "recallscope.features.train",
    "load_transcoders": "recallscope.features.formats",
    "attribution_graph": "recallscope.features.graph",
    "feature_concept": "recallscope.features.concepts",
    "supernode_concept": "recallscope.features.concepts",
    "feature_controls": "recallscope.features.concepts",
    "feature_family_report": "recallscope.features.routes",
    "load_shipped_transcoders": "recallscope.features.shipped",
    "shipped_transcoder_names": "recallscope.features.shipped",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'recallscope.features' has no attribute {name!r}")


__all__ = list(_LAZY)
