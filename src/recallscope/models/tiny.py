"""Tiny random models for tests and examples, built natively by TransformerBridge (no download)."""

from typing import Any, Literal

import torch

Family = Literal["gpt2", "llama"]


def tiny_model(
    family: Family = "gpt2",
    *,
    tokenizer: Any = None,
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 32,
    n_heads: int = 4,
    d_vocab: int | None = None,
    n_ctx: int = 128,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A small randomly initialised ``TransformerBridge``.

    ``"gpt2"``: LayerNorm, learned positions, GELU MLP. ``"llama"``: RMSNorm, rotary positions, gated
    SiLU MLP and grouped-query attention (half as many key/value heads as query heads). The vocabulary
    is the tokenizer's when one is given, else ``d_vocab`` (default 64).
    """
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    from recallscope.models.loading import check_device

    check_device(device)
    if family not in ("gpt2", "llama"):
        raise ValueError(f"unknown tiny model family {family!r}; use 'gpt2' or 'llama'")
    vocab = len(tokenizer) if tokenizer is not None else (d_vocab or 64)
    common: dict[str, Any] = dict(
        d_model=d_model,
        d_head=d_model // n_heads,
        n_layers=n_layers,
        n_ctx=n_ctx,
        n_heads=n_heads,
        d_vocab=vocab,
        d_mlp=4 * d_model,
        seed=seed,
        model_name=f"tiny-{family}-L{n_layers}-d{d_model}-s{seed}",
    )
    if family == "gpt2":
        cfg = TransformerBridgeConfig(**common, act_fn="gelu", normalization_type="LN")
    else:
        cfg = TransformerBridgeConfig(
            **common,
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=d_model // n_heads,
            gated_mlp=True,
            n_key_value_heads=max(1, n_heads // 2),
            final_rms=True,
        )
    model = TransformerBridge.boot_native(cfg, tokenizer=tokenizer, device=device, dtype=dtype)
    model.eval()
    return model
