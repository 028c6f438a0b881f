"""Causal interventions: activation patching, ROME-style causal tracing, attention knockout, path patching.

All methods share the exact sweep engine (:mod:`recallscope.patching.engine`) or the functional
forward (:mod:`recallscope.models.forward`) and return :class:`~recallscope.results.PatchingResult`.
"""

from recallscope.patching.activation import PatchingConfig, activation_patching, patch_tokens
from recallscope.patching.causal_trace import TraceConfig, causal_trace
from recallscope.patching.knockout import attention_knockout
from recallscope.patching.path import path_patching

__all__ = ["PatchingConfig", "TraceConfig", "activation_patching", "attention_knockout", "causal_trace",
           "patch_tokens", "path_patching"]
