"""Model loading: every TransformerBridge construction in recallscope goes through this package."""

from recallscope.models.loading import load_model, smollm2_available, smollm2_gguf_path
from recallscope.models.tiny import tiny_model

__all__ = ["load_model", "smollm2_available", "smollm2_gguf_path", "tiny_model"]
