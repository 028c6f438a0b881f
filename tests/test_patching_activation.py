"""Activation patching: equality with TransformerLens's patching, invariants, and a per-cell oracle."""

import pytest
import torch
import transformer_lens.patching as tlp

from recallscope import metrics as M
from recallscope.errors import ConfigError, LengthMismatchError, SiteOutOfRangeError
from recallscope.models.forward import run
from recallscope.models.stack import build_stack
from recallscope.patching.activation import PatchingConfig, activation_patching, patch_tokens
from recallscope.results import PatchingResult
from recallscope.tasks.pairs import PromptPair
from recallscope.vocab import Component, Corruption, Direction

CLEAN = ["The capital of France is", "The Eiffel Tower is in the city of"]
CORRUPT = ["The capital of Spain is", "The Colosseum Tower is in the city of"]


def _batch(model):
    clean = model.to_tokens(["The capital of France is", "The capital of Spain is", "The capital of Italy is"])
    corrupt = model.to_tokens(["The capital of Spain is", "The capital of Italy is", "The capital of France is"])
    ids = [model.tokenizer.encode(w, add_special_tokens=False)[0] for w in (" Paris", " Madrid", " Rome")]
    metric = M.LogitDiff(torch.tensor(ids), torch.tensor(ids[1:] + ids[:1]))
    return clean, corrupt, metric


TL_FUNCS = {
    Component.RESID_PRE: tlp.get_act_patch_resid_pre,
    Component.ATTN_OUT: tlp.get_act_patch_attn_out,
    Component.MLP_OUT: tlp.get_act_patch_mlp_out,
    Component.HEAD_OUT: tlp.get_act_patch_attn_head_out_by_pos,
}
# Not compared: in TransformerBridge, hook_resid_mid is the input of ln2, so TransformerLens's
# get_act_patch_resid_mid changes only what the MLP reads, not the residual stream carried on.
# recallscope patches the residual stream itself; the per-cell oracle below covers resid_mid.


@pytest.mark.parametrize("component", list(TL_FUNCS))
def test_matches_transformer_lens(tiny, component):
    clean, corrupt, metric = _batch(tiny)
    _, cache = tiny.run_with_cache(clean)
    ref = TL_FUNCS[component](tiny, corrupt, cache, M.on_full_logits(metric, clean.shape[1]))
    values, *_ = patch_tokens(tiny, clean, corrupt, metric, PatchingConfig(component=component), progress=False)
    ours = values.mean(0)
    if component == Component.HEAD_OUT:  # TL: [layer, pos, head]; recallscope: [layer, head, pos]
        ref = ref.permute(0, 2, 1)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert ours.abs().max() > 1e-3, "the sweep should show some effect on these prompts"


def _slow_cell(stack, tokens, source_acts, point, layer, pos, head, metric):
    """The obviously-correct oracle: one full forward per cell with one edit."""
    def edit(p, l, t):
        if p == point and l == layer:
            t = t.clone()
            idx = [slice(None)] * t.ndim
            if point == "pattern":
                idx[1], idx[2] = head, pos
            else:
                idx[1] = pos
                if head is not None:
                    idx[2] = head
            t[tuple(idx)] = source_acts[(point, layer)][tuple(idx)]
        return t
    logits, _ = run(stack, tokens, edit=edit)
    return metric(logits[:, metric.read_positions(tokens.shape[1])])


@pytest.mark.parametrize("component", [Component.Q, Component.K, Component.V, Component.PATTERN,
                                       Component.RESID_POST, Component.RESID_MID])
def test_matches_per_cell_oracle(tiny, component):
    clean, corrupt, metric = _batch(tiny)
    stack = build_stack(tiny)
    point = component.value
    with torch.no_grad():
        _, clean_trace = run(stack, clean, record={point})
        values, *_ = patch_tokens(tiny, clean, corrupt, metric, PatchingConfig(component=component), progress=False)
        heads = values.shape[2] if component.per_head else None
        for layer in range(tiny.cfg.n_layers):
            for pos in range(clean.shape[1]):
                for h in (range(heads) if heads else [None]):
                    want = _slow_cell(stack, corrupt, clean_trace.acts, point, layer, pos, h, metric)
                    got = values[:, layer, h, pos] if heads else values[:, layer, pos]
                    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_patch_nothing_gives_corrupt_and_everything_gives_clean(tiny):
    clean, corrupt, metric = _batch(tiny)
    last = tiny.cfg.n_layers - 1
    values, clean_m, corrupt_m, _ = patch_tokens(
        tiny, clean, corrupt, metric,
        PatchingConfig(component=Component.RESID_POST, per_position=False, layers=(last,)), progress=False)
    torch.testing.assert_close(values[:, 0], clean_m, atol=1e-4, rtol=0)
    # patching a position after nothing changed (the BOS at layer 0 is identical in both runs)
    values0, _, corrupt_m2, _ = patch_tokens(tiny, clean, corrupt, metric,
                                             PatchingConfig(layers=(0,), positions=(0,)), progress=False)
    torch.testing.assert_close(values0[:, 0, 0], corrupt_m, atol=1e-5, rtol=0)
    assert not torch.allclose(clean_m, corrupt_m, atol=1e-3)


def test_noising_with_zero_and_mean(tiny):
    clean, corrupt, metric = _batch(tiny)
    cfg = PatchingConfig(component=Component.MLP_OUT, direction=Direction.NOISING, corruption=Corruption.ZERO)
    values, clean_m, _, _ = patch_tokens(tiny, clean, corrupt, metric, cfg, progress=False)
    stack = build_stack(tiny)

    def zero_mlp(p, l, t):
        if p == "mlp_out" and l == 1:
            t = t.clone()
            t[:, 2] = 0
        return t
    with torch.no_grad():
        logits, _ = run(stack, clean, edit=zero_mlp)
    torch.testing.assert_close(values[:, 1, 2], metric(logits[:, -1:]), atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="NOISING"):
        patch_tokens(tiny, clean, corrupt, metric, PatchingConfig(corruption=Corruption.ZERO), progress=False)


def test_window_equals_patching_all_layers_in_it(tiny):
    clean, corrupt, metric = _batch(tiny)
    cfg = PatchingConfig(component=Component.MLP_OUT, window=2)
    values, *_ = patch_tokens(tiny, clean, corrupt, metric, cfg, progress=False)
    stack = build_stack(tiny)
    with torch.no_grad():
        _, tr = run(stack, clean, record={"mlp_out"})

        def both(p, l, t):
            if p == "mlp_out":
                t = t.clone()
                t[:, 3] = tr.acts[("mlp_out", l)][:, 3]
            return t
        logits, _ = run(stack, corrupt, edit=both)
    for layer in range(2):  # a 2-layer window on a 2-layer model covers both layers
        torch.testing.assert_close(values[:, layer, 3], metric(logits[:, -1:]), atol=1e-4, rtol=0)


def test_memory_budget_does_not_change_results(tiny):
    clean, corrupt, metric = _batch(tiny)
    big, *_ = patch_tokens(tiny, clean, corrupt, metric, PatchingConfig(), progress=False)
    small, *_ = patch_tokens(tiny, clean, corrupt, metric, PatchingConfig(memory_budget_mb=0.001), progress=False)
    torch.testing.assert_close(big, small, atol=1e-5, rtol=0)


def test_activation_patching_result(tiny_gpt2, tmp_path):
    pairs = [PromptPair("The capital of France is", "The capital of Spain is", " Paris", " Madrid"),
             PromptPair("The capital of Spain is", "The capital of France is", " Madrid", " Paris")]
    res = activation_patching(tiny_gpt2, pairs, "logit_diff", component="resid_post", progress=False)
    assert res.axes == ("layer", "pos") and res.values.shape == (2, 2, 6)
    assert res.labels["pos"][4].startswith("ĠFrance")
    norm = res.normalized()
    torch.testing.assert_close(norm.values[:, -1, -1], torch.ones(2), atol=1e-4, rtol=0)
    lo, hi = res.ci()
    assert (lo <= res.mean() + 1e-6).all() and (res.mean() <= hi + 1e-6).all()
    back = PatchingResult.load(res.save(tmp_path / "r"))
    torch.testing.assert_close(back.values, res.values)
    assert back.manifest["model"]["weights_sha256"] == res.manifest["model"]["weights_sha256"]


def test_bad_inputs(tiny_gpt2):
    with pytest.raises(LengthMismatchError, match="same token count|equal lengths"):
        activation_patching(tiny_gpt2, [PromptPair("The capital of France is", "The big capital city of Spain is",
                                                   " Paris", " Madrid")], progress=False)
    pairs = [PromptPair("The capital of France is", "The capital of Spain is", " Paris", " Madrid")]
    with pytest.raises(SiteOutOfRangeError, match="layer 5"):
        activation_patching(tiny_gpt2, pairs, layers=[5], progress=False)
    with pytest.raises(SiteOutOfRangeError, match="position 9"):
        activation_patching(tiny_gpt2, pairs, positions=[9], progress=False)
