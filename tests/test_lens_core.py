"""Lenses: logit lens = model logits at the last layer, zero tuned lens = logit lens, Patchscopes and
back-patching fast paths = full re-runs, EntRec = log-softmax of the model at the last layer."""

import pytest
import torch

from recallscope.errors import ConfigError, SiteOutOfRangeError
from recallscope.lens import (
    BackpatchResult,
    LensTrajectory,
    LogitLens,
    Patchscope,
    TunedLens,
    TunedLensConfig,
    backpatch,
    entrec,
    hidden_states,
    lens_trajectory,
    train_tuned_lens,
)
from recallscope.models.forward import run
from recallscope.models.stack import build_stack

PROMPT = "The acronym VAT stands for value added tax"


def _model_logits(model, prompt):
    with torch.no_grad():
        return model(model.to_tokens(prompt), return_type="logits")[0]


def test_logit_lens_last_layer_equals_model_logits(tiny):
    lens = LogitLens(tiny)
    with torch.no_grad():
        states = hidden_states(lens.stack, tiny.to_tokens(PROMPT))
        got = lens.logits(states[-1, 0], lens.n_layers - 1)
    torch.testing.assert_close(got, _model_logits(tiny, PROMPT), atol=1e-4, rtol=1e-4)
    assert states.shape[0] == tiny.cfg.n_layers + 1


def test_zero_tuned_lens_equals_logit_lens(tiny):
    logit, tuned = LogitLens(tiny), TunedLens(tiny)
    with torch.no_grad():
        states = hidden_states(logit.stack, tiny.to_tokens(PROMPT))[:, 0]
        torch.testing.assert_close(tuned.all_layers(states), logit.all_layers(states))
    # a non-zero translator changes every layer but the last
    bumped = TunedLens(tiny, bias=torch.ones_like(tuned.bias))
    with torch.no_grad():
        assert not torch.allclose(bumped.logits(states[0], 0), logit.logits(states[0], 0))
        torch.testing.assert_close(bumped.logits(states[-1], -1), logit.logits(states[-1], -1))


def test_tuned_lens_training_lowers_kl_and_round_trips(tiny_llama, tmp_path):
    texts = ["The capital of France is Paris.", "Water boils at one hundred degrees.",
             "The acronym NASA stands for National Aeronautics and Space Administration."]
    lens = train_tuned_lens(tiny_llama, texts, TunedLensConfig(steps=30, lr=1e-2, batch_positions=32),
                            progress=False)
    losses = lens.manifest["losses"]
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is None for p in tiny_llama.parameters())  # the model stayed frozen
    loaded = TunedLens.load(tiny_llama, lens.save(tmp_path / "lens"))
    torch.testing.assert_close(loaded.weight, lens.weight)
    torch.testing.assert_close(loaded.bias, lens.bias)
    with pytest.raises(ConfigError):
        TunedLens(tiny_llama, weight=torch.zeros(1, 2, 2))


def test_patchscope_fast_path_matches_full_rerun(tiny):
    stack = build_stack(tiny)
    ps = Patchscope(tiny)
    src = hidden_states(stack, tiny.to_tokens(PROMPT))[:, 0]  # [layer, pos, d]
    for layer in (0, 1, stack.n_layers):
        h = src[layer, 3]
        got = ps.logits(h, layer)
        point, where = ("resid_pre", layer) if layer < stack.n_layers else ("resid_post", stack.n_layers - 1)

        def edit(name, lyr, t):
            if (name, lyr) == (point, where):
                t = t.clone()
                t[:, ps.patch_pos] = h
            return t

        with torch.no_grad():
            want, _ = run(stack, ps.tokens, edit=edit)
        torch.testing.assert_close(got, want[0, -1], atol=1e-4, rtol=1e-4)
        assert tiny.tokenizer.decode([int(got.argmax())]) == ps.generate(h, layer, max_new_tokens=1)


def test_patchscope_identity_same_prompt_same_layer_is_the_model(tiny):
    """Identity mapping, same layer, inspection prompt = the source prompt: the source's own output."""
    stack = build_stack(tiny)
    prompt = "one two three ?"
    ps = Patchscope(tiny, prompt)
    states = hidden_states(stack, ps.tokens)[:, 0]
    model_logits = _model_logits(tiny, prompt)[-1]
    for layer in range(stack.n_layers + 1):
        torch.testing.assert_close(ps.logits(states[layer, ps.patch_pos], layer), model_logits,
                                   atol=1e-4, rtol=1e-4)


def test_patchscope_rejects_bad_prompts(tiny_gpt2):
    with pytest.raises(ConfigError):
        Patchscope(tiny_gpt2, "no placeholder here")
    with pytest.raises(ConfigError):
        Patchscope(tiny_gpt2, "two ? and ?")
    with pytest.raises(SiteOutOfRangeError):
        LogitLens(tiny_gpt2).logits(torch.zeros(tiny_gpt2.cfg.d_model), 99)


def test_backpatch_matches_oracle_and_round_trips(tiny, tmp_path):
    stack = build_stack(tiny)
    res = backpatch(tiny, PROMPT, " tax", position=-2)
    tokens = tiny.to_tokens(PROMPT)
    states = hidden_states(stack, tokens)[:, 0]
    answer = tiny.tokenizer.encode(" tax", add_special_tokens=False)[0]
    p = tokens.shape[1] - 2
    full = torch.log_softmax(_model_logits(tiny, PROMPT)[-1], -1)
    assert res.baseline == pytest.approx(float(full[answer]), abs=1e-4)
    assert torch.isnan(res.values[0, 0]) and torch.isnan(res.values[0, 1])
    for src, dst in [(1, 0), (2, 0), (2, 1)]:
        def edit(name, lyr, t, src=src, dst=dst):
            if name == "resid_pre" and lyr == dst:
                t = t.clone()
                t[:, p] = states[src, p]
            return t

        with torch.no_grad():
            want = torch.log_softmax(run(stack, tokens, edit=edit)[0][0, -1], -1)[answer]
        assert float(res.values[src, dst]) == pytest.approx(float(want), abs=1e-4)
    back = BackpatchResult.load(res.save(tmp_path / "bp"))
    torch.testing.assert_close(back.values, res.values, equal_nan=True)
    assert back.best() == res.best()
    assert res.plot().data


def test_entrec_and_trajectory(tiny, tmp_path):
    scores = entrec(tiny, PROMPT, " tax")
    full = torch.log_softmax(_model_logits(tiny, PROMPT), -1)[:, tiny.tokenizer.encode(" tax", add_special_tokens=False)[0]]
    torch.testing.assert_close(scores[-1], full, atol=1e-4, rtol=1e-4)
    traj = lens_trajectory(tiny, PROMPT, [" tax", " value"], position=-1)
    torch.testing.assert_close(traj.logprob[0], scores[:, -1])
    logits = _model_logits(tiny, PROMPT)[-1]
    assert float(traj.rank[0, -1]) == float((logits > logits[tiny.tokenizer.encode(" tax", add_special_tokens=False)[0]]).sum())
    back = LensTrajectory.load(traj.save(tmp_path / "traj"))
    torch.testing.assert_close(back.rank, traj.rank)
    assert back.top == traj.top and back.targets == traj.targets
    assert len(traj.plot().data) == 4


@pytest.mark.smollm2
def test_patchscope_identity_prompt_returns_source_token(smollm2):
    """On SmolLM2 the identity inspection prompt decodes early-layer states of content words as the
    words themselves (Ghandeharioun et al.: Patchscopes beat the logit lens in early layers)."""
    words = [" Paris", " music", " water", " table", " garden", " doctor"]
    ps, lens = Patchscope(smollm2), LogitLens(smollm2)
    hits_ps, hits_lens = 0, 0
    for w in words:
        tokens = smollm2.to_tokens("I like the" + w)
        states = hidden_states(ps.stack, tokens)[:, 0, -1]
        target = int(tokens[0, -1])
        hits_ps += int(ps.logits(states[1], 1).argmax()) == target
        hits_lens += int(lens.logits(states[1], 1).argmax()) == target
    assert hits_ps >= 4 and hits_ps > hits_lens
