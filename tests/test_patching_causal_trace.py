"""ROME-style causal trace: the fast engine against a slow per-cell loop, and the categories."""

import pytest
import torch

from recallscope import metrics as M
from recallscope.errors import ConfigError, EmptyDatasetError
from recallscope.models.forward import run
from recallscope.models.stack import build_stack
from recallscope.patching.causal_trace import (
    CATEGORIES, TraceConfig, _noise, categorize, causal_trace, embedding_std, trace_tokens,
)
from recallscope.tasks.pairs import PromptPair
from recallscope.vocab import Component


def _slow_trace(model, tokens, answers, spans, cfg):
    """One full forward per (sample, layer, position): restore the clean state, noise the subject."""
    stack = build_stack(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_samples
    rep = tokens.repeat_interleave(n, 0)
    noise = _noise(spans, tokens.shape[1], stack.d_model, n, cfg.noise_scale * embedding_std(model), gen)
    point = cfg.component.value
    metric = M.Prob(answers.repeat_interleave(n, 0))
    with torch.no_grad():
        _, clean = run(stack, rep, record={point})
        out = torch.zeros(tokens.shape[0], stack.n_layers, tokens.shape[1])
        for layer in range(stack.n_layers):
            lo = max(0, min(layer - cfg.window // 2, stack.n_layers - cfg.window))
            window = range(lo, min(stack.n_layers, lo + cfg.window))
            for pos in range(tokens.shape[1]):
                def restore(p, l, t):
                    if p == point and l in window:
                        t = t.clone()
                        t[:, pos] = clean.acts[(point, l)][:, pos]
                    return t
                logits, _ = run(stack, rep, edit=restore, embed_edit=lambda x: x + noise)
                out[:, layer, pos] = metric(logits[:, -1:]).view(-1, n).mean(-1)
    return out


@pytest.mark.parametrize("component,window", [(Component.RESID_POST, 1), (Component.MLP_OUT, 2),
                                              (Component.ATTN_OUT, 1)])
def test_trace_matches_slow_loop(tiny, component, window):
    tokens = tiny.to_tokens(["The Eiffel Tower is in the city of", "The Space Needle is in the city of"])
    answers = torch.tensor([tiny.tokenizer.encode(" Paris", add_special_tokens=False)[0]] * 2)
    spans = [(1, 4), (1, 4)]
    cfg = TraceConfig(component=component, window=window, n_samples=3, seed=7)
    fast, clean_p, noised_p = trace_tokens(tiny, tokens, answers, spans, cfg,
                                           gen=torch.Generator().manual_seed(7),
                                           noise_std=embedding_std(tiny), progress=False)
    slow = _slow_trace(tiny, tokens, answers, spans, cfg)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)
    # restoring the whole residual at the last layer and position recovers the clean probability
    if component == Component.RESID_POST:
        torch.testing.assert_close(fast[:, -1, -1], clean_p, atol=1e-5, rtol=1e-4)
        # positions before the subject are untouched by the noise: restoring them changes nothing
        torch.testing.assert_close(fast[:, :, 0], noised_p[:, None].expand(-1, 2), atol=1e-5, rtol=1e-4)


def test_categorize():
    grid = torch.arange(16.0).view(2, 8)  # 2 layers x 8 positions, subject at [2, 5)
    cats = categorize(grid, (2, 5))
    assert cats.shape == (2, len(CATEGORIES))
    torch.testing.assert_close(cats[0], torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0, 7.0]))
    single = categorize(grid, (2, 3))
    assert torch.isnan(single[0, 1]) and single[0, 0] == single[0, 2] == 2.0


def test_causal_trace_dataset(tiny_gpt2, tmp_path):
    items = [PromptPair("The Eiffel Tower is in", "The Eiffel Tower is in", " Paris", spans={"subject": (1, 4)}),
             PromptPair("Rome is the capital of", "Rome is the capital of", " Italy", spans={"subject": (1, 2)})]
    res = causal_trace(tiny_gpt2, items, n_samples=2, progress=False)
    assert res.axes == ("layer", "token") and res.values.shape == (2, 2, 6)
    assert torch.isnan(res.values[1, :, 1]).all()  # one-token subject: no middle tokens
    assert torch.isfinite(res.mean()).all()
    again = causal_trace(tiny_gpt2, items, n_samples=2, progress=False)
    assert torch.equal(res.values.nan_to_num(), again.values.nan_to_num()), "same seed, same result"
    other = causal_trace(tiny_gpt2, items, n_samples=2, seed=1, progress=False)
    assert not torch.equal(res.corrupt, other.corrupt)
    with pytest.raises(ConfigError, match="subject"):
        causal_trace(tiny_gpt2, [PromptPair("a b", "a b", " c")], progress=False)
    with pytest.raises(EmptyDatasetError):
        causal_trace(tiny_gpt2, [], progress=False)
