"""Attention knockout against a full forward with the blocked scores."""

import pytest
import torch

from recallscope import metrics as M
from recallscope.errors import ConfigError
from recallscope.models.forward import run
from recallscope.models.stack import build_stack
from recallscope.patching.knockout import attention_knockout, key_positions
from recallscope.tasks.pairs import PromptPair

ITEMS = [PromptPair("The city of Paris is in", "The city of Paris is in", " France", spans={"subject": (1, 4)}),
         PromptPair("The city of Rome is in", "The city of Rome is in", " France", spans={"subject": (1, 4)})]


def test_key_positions():
    assert key_positions(ITEMS[0], "relation", 6, has_bos=True) == [4]
    assert key_positions(ITEMS[0], "subject", 6, has_bos=True) == [1, 2, 3]
    assert key_positions(ITEMS[0], "last", 6, has_bos=True) == [5]
    with pytest.raises(ConfigError, match="no span 'object'"):
        key_positions(ITEMS[0], "object", 6, has_bos=True)


def test_knockout_matches_full_forward(tiny):
    res = attention_knockout(tiny, ITEMS, window=1, progress=False)
    stack = build_stack(tiny)
    tokens = torch.cat([tiny.to_tokens(i.clean) for i in ITEMS])
    assert tokens.shape[1] == 7, "both prompts should be 7 tokens for this test"
    answers = torch.tensor([tiny.tokenizer.encode(" France", add_special_tokens=False)[0]] * 2)
    metric = M.Prob(answers)
    with torch.no_grad():
        for layer in range(tiny.cfg.n_layers):
            def block_subject(p, l, t):
                if p == "scores" and l == layer:
                    t = t.clone()
                    t[:, :, 6, 1:4] = float("-inf")
                return t
            logits, _ = run(stack, tokens, edit=block_subject)
            torch.testing.assert_close(res.values[:, layer, 0], metric(logits[:, -1:]), atol=1e-5, rtol=1e-4)
        base, _ = run(stack, tokens)
    torch.testing.assert_close(res.clean, metric(base[:, -1:]), atol=1e-5, rtol=1e-4)
    assert (res.effect().values[:, :, 0].abs() > 1e-6).any()


def test_result_whose_baselines_share_one_tensor_saves_and_loads(tmp_path, tiny_gpt2):
    from dataclasses import replace

    from recallscope.results import PatchingResult

    res = attention_knockout(tiny_gpt2, ITEMS, window=1, progress=False)
    shared = replace(res, corrupt=res.clean)  # one storage under two names: safetensors alone refuses this
    back = PatchingResult.load(shared.save(tmp_path / "ko"))
    assert torch.equal(back.clean, res.clean) and torch.equal(back.corrupt, res.clean)
    assert torch.equal(back.values, res.values)
