"""Tiny random Hugging Face models of many decoder families, built offline from their configs.

Used by the architecture matrix (``tests/test_arch_matrix.py``) and the GPU scripts' tests: each family
gets a 2-layer model with a small width and the GPT-2 vocabulary, written to a directory with a tokenizer
so that :func:`recallscope.load_model` loads it like any checkpoint (``AutoModelForCausalLM`` from the
directory, then ``TransformerBridge.boot_transformers``). Nothing is downloaded.
"""

from pathlib import Path
from typing import Any

import torch

from recallscope.errors import ConfigError

TINY_VOCAB = 50257
"""GPT-2's vocabulary size: the tiny models use GPT-2's tokenizer."""

_D, _H, _L, _FF = 32, 4, 2, 64
_ROPE = {"rope_theta": 10000.0}

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", dict(hidden_size=_D, num_attention_heads=_H, num_key_value_heads=2,
                                   intermediate_size=_FF, num_hidden_layers=_L, **_ROPE)),
    "qwen2": ("Qwen2Config", dict(hidden_size=_D, num_attention_heads=_H, num_key_value_heads=2,
                                   intermediate_size=_FF, num_hidden_layers=_L, **_ROPE)),
    "qwen3": ("Qwen3Config", dict(hidden_size=_D, num_attention_heads=_H, num_key_value_heads=2, head_dim=8,
                                   intermediate_size=_FF, num_hidden_layers=_L, **_ROPE)),
    "mistral": ("MistralConfig", dict(hidden_size=_D, num_attention_heads=_H, num_key_value_heads=2,
                                       intermediate_size=_FF, num_hidden_layers=_L, sliding_window=4, **_ROPE)),
    "gemma": ("GemmaConfig", dict(hidden_size=_D, num_attention_heads=_H, num_key_value_heads=1, head_dim=8,
                                   intermediate_size=_FF, num_hidden_layers=_L, **_ROPE)),
    "gemma2": ("Gemma2Config", dict(hidden_size=_D, num_attention_heads=_H, num_key_value_heads=2, head_dim=8,
                                     intermediate_size=_FF, num_hidden_layers=_L, query_pre_attn_scalar=16,
                                     sliding_window=4, attn_logit_softcapping=2.0,
                                     final_logit_softcapping=3.0, **_ROPE)),
    "gemma3": ("Gemma3TextConfig", dict(hidden_size=_D, num_attention_heads=_H, num_key_value_heads=2,
                                         head_dim=8, intermediate_size=_FF, num_hidden_layers=_L,
                                         query_pre_attn_scalar=16, sliding_window=4,
                                         layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", dict(hidden_size=_D, num_attention_heads=_H, num_key_value_heads=_H,
                                 intermediate_size=_FF, num_hidden_layers=_L, pad_token_id=0, **_ROPE)),
    "olmo2": ("Olmo2Config", dict(hidden_size=_D, num_attention_heads=_H, num_key_value_heads=_H,
                                   intermediate_size=_FF, num_hidden_layers=_L, pad_token_id=0, **_ROPE)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=_D, num_attention_heads=_H, intermediate_size=_FF,
                                        num_hidden_layers=_L, rotary_pct=0.25, use_parallel_residual=True)),
    "gpt2": ("GPT2Config", dict(n_embd=_D, n_head=_H, n_layer=_L, n_positions=128)),
    "opt": ("OPTConfig", dict(hidden_size=_D, num_attention_heads=_H, ffn_dim=_FF, num_hidden_layers=_L,
                               word_embed_proj_dim=_D, max_position_embeddings=128, pad_token_id=1)),
    "gptj": ("GPTJConfig", dict(n_embd=_D, n_head=_H, n_layer=_L, n_positions=128, rotary_dim=4)),
    "granite": ("GraniteConfig", dict(hidden_size=_D, num_attention_heads=_H, num_key_value_heads=2,
                                       intermediate_size=_FF, num_hidden_layers=_L, embedding_multiplier=3.0,
                                       residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0,
                                       **_ROPE)),
}
"""Family name -> (transformers config class, keyword arguments of a 2-layer model of width 32). Granite
(multipliers on embeddings, residual branches, attention and logits) has no fast adapter: it is the
matrix's example of a family that runs on the hook engine."""


def tiny_hf_config(family: str, **overrides: Any) -> Any:
    """The transformers config of a tiny ``family`` model (see :data:`FAMILIES`), GPT-2 vocabulary."""
    import transformers

    if family not in FAMILIES:
        raise ConfigError(f"unknown tiny family {family!r}; use one of {sorted(FAMILIES)}")
    cls_name, kwargs = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**{"vocab_size": TINY_VOCAB, **kwargs, **overrides})
    if hasattr(cfg, "bos_token_id"):
        cfg.bos_token_id = cfg.eos_token_id = 50256
    return cfg


def save_tiny_hf(family: str, out: str | Path, tokenizer: Any, *, seed: int = 0, **overrides: Any) -> Path:
    """Build a tiny random ``family`` model (``AutoModelForCausalLM.from_config``) with ``seed`` and
    save it with ``tokenizer`` (GPT-2's, 50257 tokens) to ``out``; returns ``out``."""
    from transformers import AutoModelForCausalLM

    from recallscope.models.tokenizers import GPT2_VOCAB_SIZE, check_vocab

    check_vocab(tokenizer, expected=GPT2_VOCAB_SIZE, source="tokenizer for a tiny HF model")
    cfg = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _spread_weights(model, seed)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _spread_weights(model: Any, seed: int) -> None:
    """Give every parameter a visible random part: norms start at exactly 1 (or 0), some families
    zero-initialise biases, and small weights make attention nearly uniform; each would hide a missing
    bias, norm, window or softcap from the tests."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            else:  # HF's std 0.02 gives near-uniform attention that hides q/k norms and windows
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
