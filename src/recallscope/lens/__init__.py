"""Lenses: read what a hidden state "says".

- :class:`Lens` (base: ``transform_hidden(h, layer)``), :class:`LogitLens`, :class:`TunedLens`
  (+ :func:`train_tuned_lens`), :class:`Patchscope`.
- :func:`entrec` (EntRec score), :func:`lens_trajectory` -> :class:`LensTrajectory`.
- :func:`backpatch` -> :class:`BackpatchResult` (Biran et al. 2024).
- :func:`hidden_states`: the ``n_layers + 1`` hidden states of a run (0 = embeddings, n_layers = final).
"""

from recallscope.lens.backpatch import BackpatchResult, backpatch
from recallscope.lens.base import Lens, LogitLens, first_token_id, hidden_states, rank_of, run_hidden
from recallscope.lens.patchscope import IDENTITY_PROMPT, Patchscope
from recallscope.lens.trajectory import LensTrajectory, entrec, lens_trajectory
from recallscope.lens.tuned import TunedLens, TunedLensConfig, train_tuned_lens

__all__ = [
    "IDENTITY_PROMPT",
    "BackpatchResult",
    "Lens",
    "LensTrajectory",
    "LogitLens",
    "Patchscope",
    "TunedLens",
    "TunedLensConfig",
    "backpatch",
    "entrec",
    "first_token_id",
    "hidden_states",
    "lens_trajectory",
    "rank_of",
    "run_hidden",
    "train_tuned_lens",
]
