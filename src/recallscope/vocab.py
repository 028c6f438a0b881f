"""Domain vocabulary, defined once: components, corruptions, directions, and axis names.

Axis names used in every result and jaxtyping annotation:

- ``batch``: prompts (or prompt pairs) in a batch.
- ``pos``: token positions of a prompt (BOS included when the model prepends one).
- ``layer``: transformer blocks, 0-based.
- ``head``: attention (query) heads; ``kv_head`` for key/value heads under grouped-query attention.
- ``src_pos`` / ``dest_pos``: key and query positions of an attention pattern.
- ``d_model``, ``d_head``, ``d_mlp``, ``vocab``: hidden sizes.
- ``cell``: one intervention (a site) inside a sweep; ``sample``: noise samples or bootstrap draws.
"""

from enum import Enum

AXES: dict[str, str] = {
    "batch": "prompts (or prompt pairs) in a batch",
    "pos": "token positions, BOS included when the model prepends one",
    "layer": "transformer blocks, 0-based",
    "head": "attention query heads",
    "kv_head": "key/value heads (grouped-query attention)",
    "src_pos": "key positions of an attention pattern",
    "dest_pos": "query positions of an attention pattern",
    "prompt": "prompts of a dataset",
    "cell": "one intervention site in a sweep",
    "sample": "noise samples or bootstrap draws",
}


class Component(str, Enum):
    """What is patched or read at a site."""

    RESID_PRE = "resid_pre"
    """Residual stream entering block ``layer``."""
    RESID_MID = "resid_mid"
    """Residual stream between the attention and MLP sublayers of block ``layer``."""
    RESID_POST = "resid_post"
    """Residual stream leaving block ``layer``."""
    ATTN_OUT = "attn_out"
    """Output of the attention sublayer (all heads, after the output projection and bias)."""
    MLP_OUT = "mlp_out"
    """Output of the MLP sublayer."""
    HEAD_OUT = "z"
    """One head's mixed values ``z`` (before the output projection): patching it patches the head's output."""
    Q = "q"
    """One head's queries (after rotary, when the model has it)."""
    K = "k"
    """One key/value head's keys (after rotary)."""
    V = "v"
    """One key/value head's values."""
    PATTERN = "pattern"
    """One head's attention pattern (``dest_pos x src_pos``)."""

    @property
    def per_head(self) -> bool:
        return self in (Component.HEAD_OUT, Component.Q, Component.K, Component.V, Component.PATTERN)


class Corruption(str, Enum):
    """How the corrupted (reference) run is produced."""

    RESAMPLE = "resample"
    """A counterfactual prompt of equal token length (e.g. another subject)."""
    ZERO = "zero"
    """The activation is set to zero."""
    MEAN = "mean"
    """The activation is set to its mean over the dataset (per position)."""
    GAUSSIAN_NOISE = "gaussian_noise"
    """ROME: Gaussian noise added to the subject token embeddings, scaled by the embedding std."""


class Direction(str, Enum):
    """Which run receives the patched activation."""

    DENOISING = "denoising"
    """Clean activations go into the corrupted run; effect = how much of the clean behaviour returns."""
    NOISING = "noising"
    """Corrupted activations go into the clean run; effect = how much clean behaviour is destroyed."""
