"""Scales the stack must read off the modules, not their weights: the final norm's gain (Gemma's RMSNorm
multiplies by ``1 + weight``) and the embedding's output scale (Gemma multiplies by ``sqrt(d_model)``).

Before these helpers, ``routes.scores.output_directions`` and ``routes.competitors.unembedding`` folded in
``final_norm.weight`` and the causal trace's noise unit was the raw matrix's std: both silently wrong on Gemma.
"""

import logging
import math

import pytest
import torch

from recallscope.models.stack import build_stack, embedding_output_scale, norm_gain
from recallscope.models.tiny_hf import save_tiny_hf

FAMILIES = ("llama", "gemma", "gemma2", "gpt2", "gpt_neox", "olmo2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gpt2_tokenizer):
    from recallscope import load_model

    root = tmp_path_factory.mktemp("norms")
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            logging.getLogger("transformers").setLevel(logging.ERROR)
            cache[family] = load_model(save_tiny_hf(family, root / family, gpt2_tokenizer, seed=0))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_gain_is_the_linear_factor_of_the_final_norm(tiny, family):
    stack = build_stack(tiny(family))
    gain = norm_gain(stack.final_norm, stack.d_model)
    x = torch.randn(4, stack.d_model, generator=torch.Generator().manual_seed(1)) * 5
    x = x - x.mean(-1, keepdim=True)
    with torch.no_grad():
        got = stack.final_norm(x) - stack.final_norm(torch.zeros(1, stack.d_model))
    want = gain * x / x.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(got.float(), want, atol=1e-4, rtol=1e-4)


def test_gemma_gain_is_one_plus_weight_and_embedding_is_scaled(tiny):
    stack = build_stack(tiny("gemma"))
    weight = stack.final_norm.weight.detach().float()
    assert (weight.abs() > 1e-3).any(), "the tiny model's norm weights should be non-trivial"
    torch.testing.assert_close(norm_gain(stack.final_norm, stack.d_model), 1 + weight, atol=1e-5, rtol=1e-5)
    assert embedding_output_scale(stack.embed_tokens) == pytest.approx(math.sqrt(stack.d_model), rel=1e-3)
    llama = build_stack(tiny("llama"))
    assert embedding_output_scale(llama.embed_tokens) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_unembedding_directions_are_the_direct_logit_directions(tiny, family):
    """``unembedding(model) @ x_hat`` equals the logits of a unit-rms, zero-mean final residual (no bias)."""
    from recallscope.routes.competitors import unembedding

    model = tiny(family)
    stack = build_stack(model)
    x = torch.randn(3, stack.d_model, generator=torch.Generator().manual_seed(2))
    x = x - x.mean(-1, keepdim=True)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    with torch.no_grad():
        logits = stack.unembed(stack.final_norm(x)) - stack.unembed(stack.final_norm(torch.zeros(1, stack.d_model)))
    torch.testing.assert_close(x @ unembedding(model).T, logits.float(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_trace_noise_unit_is_the_embedding_the_residual_receives(tiny, family):
    from recallscope.patching.causal_trace import embedding_std

    model = tiny(family)
    stack = build_stack(model)
    ids = torch.arange(2000)
    with torch.no_grad():
        received = stack.embed_tokens(ids).float().std()
    fast, hooks = embedding_std(model, "fast"), embedding_std(model, "hooks")
    assert fast == pytest.approx(hooks, rel=1e-6)
    assert fast == pytest.approx(float(received), rel=0.05)
