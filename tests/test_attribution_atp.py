"""AtP and AtP*: exact on a linear model, the QK fix exact through one softmax, oracles for the closed
form and GradDrop, result plumbing."""

import pytest
import torch

from recallscope.attribution import AttributionResult, atp, atp_star
from recallscope.attribution.atp import _qk_effects, _reduce
from recallscope.attribution.common import prepare, rotate
from recallscope.errors import ConfigError
from recallscope.models.forward import run
from recallscope.models.stack import build_stack
from recallscope.patching.activation import PatchingConfig, patch_tokens
from recallscope.results import PatchingResult
from recallscope.vocab import Component, Direction
from test_attribution_toys import linear_model, native_model, random_pairs


def exact_effect(model, tp, metric, component: Component, direction=Direction.DENOISING) -> torch.Tensor:
    """Exact patching from the sweep engine, as metric(patched) - metric(target), [prompt, *axes]."""
    values, clean, corrupt, _ = patch_tokens(model, tp.clean, tp.corrupt, metric,
                                             PatchingConfig(component=component, direction=direction), progress=False)
    target = corrupt if direction == Direction.DENOISING else clean
    return values - target.reshape(-1, *[1] * (values.ndim - 1))


@pytest.mark.parametrize("direction", [Direction.DENOISING, Direction.NOISING])
def test_atp_equals_exact_patching_on_a_linear_model(direction):
    model = linear_model(frozen={0, 1})
    tp, metric = random_pairs(change=(1, 3))
    result = atp(model, tp, metric, direction=direction, progress=False)
    assert set(result.values) == {c.value for c in Component}
    for comp in Component:
        exact = exact_effect(model, tp, metric, comp, direction)
        torch.testing.assert_close(result.values[comp.value], exact, atol=2e-6, rtol=1e-4)
    assert result.values["resid_pre"].abs().max() > 0.05, "the corruption should have effects to compare"


def test_atp_star_is_exact_for_queries_and_keys_through_one_softmax():
    """Layer 0 keeps a (sharpened) softmax; everything after it is linear, so the metric is linear in layer
    0's pattern and AtP*'s recomputed softmax makes its q/k estimates exact, where plain AtP is not."""
    model = linear_model(frozen={1})
    tp, metric = random_pairs(change=(1, 3))
    star = atp_star(model, tp, metric, components=["q", "k", "z"], graddrop=False, progress=False)
    plain = atp(model, tp, metric, components=["q", "k"], progress=False)
    for comp in (Component.Q, Component.K):
        exact = exact_effect(model, tp, metric, comp)
        torch.testing.assert_close(star.values[comp.value], exact, atol=2e-6, rtol=1e-4)
        assert (plain.values[comp.value] - exact).abs().max() > 100 * (star.values[comp.value] - exact).abs().max()
        assert exact[:, 0].abs().max() > 1e-3
    torch.testing.assert_close(star.values["z"][:, 1], exact_effect(model, tp, metric, Component.HEAD_OUT)[:, 1],
                               atol=2e-6, rtol=1e-4)


def test_qk_fix_matches_a_softmax_recomputed_per_site(tiny_llama):
    """Oracle for the closed form (rotary, grouped-query attention): patch one query row or one key
    column in the target's scores, recompute the softmax in full, and dot the change with the gradient."""
    tp, metric = random_pairs(change=(2,), n_pos=5)
    stack = build_stack(tiny_llama)
    prep = prepare(tiny_llama, tp, metric)
    record = {"q", "k", "pattern"}
    with torch.enable_grad():
        logits, trace = run(stack, tp.corrupt, record=record, read_pos=prep.read,
                            embed_edit=lambda x: x.detach().requires_grad_())
        keys = sorted(trace.acts)
        grads = dict(zip(keys, torch.autograd.grad(metric(logits).sum(), [trace.acts[k] for k in keys])))
    with torch.no_grad():
        _, src = run(stack, tp.clean, record=record)
    with torch.no_grad():
        tgt = run(stack, tp.corrupt, record=record)[1]
    n, rep = tp.n_pos, stack.n_heads // stack.n_kv_heads
    pos = torch.arange(n)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for layer in range(stack.n_layers):
        g = grads[("pattern", layer)]
        q_eff, k_eff = _qk_effects(stack, layer, tgt, src, g)
        rot = {(name, p): rotate(stack, tr.acts[(p, layer)].transpose(1, 2).detach(), pos)
               for name, tr in (("t", tgt), ("s", src)) for p in ("q", "k")}
        kt, ks = (rot[(x, "k")].repeat_interleave(rep, 1) for x in ("t", "s"))
        base = torch.softmax((rot[("t", "q")] @ kt.transpose(-1, -2) * stack.attn_scale).masked_fill(~causal, -torch.inf), -1)
        for h in range(stack.n_heads):
            for t in range(n):
                q = rot[("t", "q")].clone()
                q[:, h, t] = rot[("s", "q")][:, h, t]
                p = torch.softmax((q @ kt.transpose(-1, -2) * stack.attn_scale).masked_fill(~causal, -torch.inf), -1)
                torch.testing.assert_close(q_eff[:, h, t], (g[:, h] * (p - base)[:, h]).sum((-1, -2)), atol=1e-6, rtol=1e-4)
        for kv in range(stack.n_kv_heads):
            for s in range(n):
                k = kt.clone()
                k[:, kv * rep:(kv + 1) * rep, s] = ks[:, kv * rep:(kv + 1) * rep, s]
                p = torch.softmax((rot[("t", "q")] @ k.transpose(-1, -2) * stack.attn_scale).masked_fill(~causal, -torch.inf), -1)
                want = (g * (p - base))[:, kv * rep:(kv + 1) * rep].sum((1, 2, 3))
                torch.testing.assert_close(k_eff[:, kv, s], want, atol=1e-6, rtol=1e-4)


def test_graddrop_matches_backward_passes_with_one_layer_detached():
    """Oracle: for each layer, a fresh forward whose attention and MLP outputs of that layer are detached
    (same values, no gradient through them); average |AtP| over layers, divide by L - 1."""
    model = native_model(n_layers=3, seed=1)
    tp, metric = random_pairs(change=(1,))
    comps = ["resid_pre", "mlp_out", "z", "v"]
    result = atp(model, tp, metric, components=comps, qk_fix=True, graddrop=True, progress=False)
    stack = build_stack(model)
    prep = prepare(model, tp, metric)
    with torch.no_grad():
        _, src = run(stack, tp.clean, record=set(comps))
    total = {c: torch.zeros_like(result.values[c]) for c in comps}
    for drop in range(stack.n_layers):
        def edit(point, layer, t, drop=drop):
            return t.detach().requires_grad_() if layer == drop and point in ("attn_out", "mlp_out") else t
        with torch.enable_grad():
            logits, tr = run(stack, tp.corrupt, edit=edit, record=set(comps), read_pos=prep.read,
                             embed_edit=lambda x: x.detach().requires_grad_())
            keys = sorted(tr.acts)
            acts = [tr.acts[k] for k in keys]
            gs = torch.autograd.grad(metric(logits).sum(), acts, allow_unused=True)
        for (point, layer), a, g in zip(keys, acts, gs):
            g = torch.zeros_like(a) if g is None else g
            total[point][:, layer] += _reduce(point, g, src.acts[(point, layer)] - a.detach()).abs()
    for c in comps:
        torch.testing.assert_close(result.graddrop[c], total[c] / (stack.n_layers - 1), atol=1e-6, rtol=1e-4)


def test_ig_with_one_step_is_the_gradient_at_the_midpoint_and_converges_to_exact_on_embeddings(tiny_gpt2):
    tp, metric = random_pairs(change=(2,))
    exact = exact_effect(tiny_gpt2, tp, metric, Component.RESID_PRE)[:, 0, 2]
    errors = [float((atp(tiny_gpt2, tp, metric, components=["resid_pre"], ig_steps=m, progress=False)
                     .values["resid_pre"][:, 0, 2] - exact).abs().max()) for m in (1, 4, 16)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 2e-3 * float(exact.abs().max())


def test_result_plumbing(tmp_path, tiny_gpt2):
    tp, metric = random_pairs()
    result = atp_star(tiny_gpt2, tp, metric, components=["resid_pre", "mlp_out", "k"], progress=False)
    patching = result.component("k")
    assert isinstance(patching, PatchingResult) and patching.axes == ("layer", "head", "pos")
    torch.testing.assert_close(patching.effect().values, result.values["k"])
    top = result.ranked(5)
    assert len(top) == 5 and abs(top[0][1]) >= abs(top[-1][1])
    assert len(result.ranked(3, score="graddrop")) == 3
    assert len(result.plot(top=8).data) >= 1 and len(result.plot_grid().data) == 2
    loaded = AttributionResult.load(result.save(tmp_path / "atp"))
    for c in result.values:
        torch.testing.assert_close(loaded.values[c], result.values[c])
        torch.testing.assert_close(loaded.graddrop[c], result.graddrop[c])
    assert loaded.config == result.config and loaded.direction == result.direction


def test_bad_configurations_raise_clear_errors(tiny_gpt2):
    tp, metric = random_pairs()
    with pytest.raises(ConfigError, match="unknown"):
        atp(tiny_gpt2, tp, metric, components=["nope"], progress=False)
    with pytest.raises(ConfigError, match="separate estimators"):
        atp(tiny_gpt2, tp, metric, ig_steps=3, qk_fix=True, progress=False)
    with pytest.raises(ConfigError, match="resample"):
        atp(tiny_gpt2, tp, metric, corruption="zero", progress=False)
    with pytest.raises(ConfigError, match="holds"):
        atp(tiny_gpt2, tp, metric, components=["z"], progress=False).mean("q")
