"""The architecture matrix: tiny random Hugging Face models of 13 decoder families (plus Granite, which
has no fast adapter), built offline from their configs with the GPT-2 tokenizer and loaded through
``recallscope.load_model(dir)``.

Per family:

1. the bridge loads it and gives the Hugging Face model's logits;
2. the fast engine's Stack reproduces the bridge's logits and, at every edit point of every layer, the
   tensor of the bridge hook of the same name (so a patch means the same thing on both engines);
3. every extra an adapter carries (q/k norms, post-norms, windows, softcaps, per-layer rotary) changes
   the logits of the tiny model when dropped, so the models exercise what they are meant to check;
4. activation patching of resid_pre, attn_out, mlp_out and per-head z equals
   ``transformer_lens.patching`` to 1e-4 on the same bridge, on the fast and on the hook engine;
5. the self-check passes (engine="auto" runs fast); a family without an adapter is refused by
   ``build_stack`` and engine="auto" falls back to hooks, still equal to TransformerLens.
"""

import dataclasses
import logging

import pytest
import torch
import transformer_lens.patching as tlp

from recallscope import metrics as M
from recallscope.models.tiny_hf import FAMILIES, save_tiny_hf
from recallscope.vocab import Component
from recallscope.errors import ConfigError
from recallscope.patching.activation import PatchingConfig, patch_tokens

FAST = sorted(f for f in FAMILIES if f != "granite")
NO_ADAPTER = ["granite"]
HOOKS = {"resid_pre": "hook_resid_pre", "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v",
         "scores": "attn.hook_attn_scores", "pattern": "attn.hook_pattern", "z": "attn.hook_z",
         "attn_out": "hook_attn_out", "resid_mid": "hook_resid_mid", "mlp_out": "hook_mlp_out",
         "resid_post": "hook_resid_post"}
TL_FUNCS = {
    Component.RESID_PRE: tlp.get_act_patch_resid_pre,
    Component.ATTN_OUT: tlp.get_act_patch_attn_out,
    Component.MLP_OUT: tlp.get_act_patch_mlp_out,
    Component.HEAD_OUT: tlp.get_act_patch_attn_head_out_by_pos,
}
SCORES_HOLD_PATTERN = {"gptj", "opt"}
"""TransformerLens 4.3's bridge records the softmaxed pattern in hook_attn_scores for GPT-J and OPT
(measured: equal to hook_pattern, masked entries 0). The fast engine's ``scores`` are the real scores;
no recallscope component patches scores through hooks (knockout's hook path masks the pattern)."""
EXTRAS = ("q_norm", "k_norm", "post_attn", "post_mlp", "window", "softcap", "rope")


@pytest.fixture(scope="module")
def arch(tmp_path_factory, gpt2_tokenizer):
    """``arch(family)``: the family's tiny model as a TransformerBridge (built once per module)."""
    from recallscope import load_model

    root = tmp_path_factory.mktemp("arch")
    models = {}

    def get(family: str):
        if family not in models:
            logging.getLogger("transformers").setLevel(logging.ERROR)
            models[family] = load_model(save_tiny_hf(family, root / family, gpt2_tokenizer, seed=0))
        return models[family]

    return get


def _tokens(model, n: int = 9, batch: int = 2) -> torch.Tensor:
    return torch.randint(100, 50000, (batch, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAST + NO_ADAPTER)
def test_family_loads_and_bridge_gives_the_hf_logits(arch, family):
    model = arch(family)
    tokens = _tokens(model)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), model.original_model(tokens).logits, atol=1e-5, rtol=0)
    assert len(model.tokenizer) == 50257 and model.cfg.n_layers == 2


@pytest.mark.parametrize("family", FAST)
def test_stack_points_are_the_bridge_hooks(arch, family):
    """Every edit point of the fast forward holds what the bridge hook of the same name holds."""
    from recallscope.models.forward import POINTS, run
    from recallscope.models.stack import build_stack

    model = arch(family)
    stack = build_stack(model)
    assert stack.family == type(model.original_model).__name__
    tokens = _tokens(model)
    with torch.no_grad():
        ref, cache = model.run_with_cache(tokens)
        logits, trace = run(stack, tokens, record=set(POINTS))
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    compared = 0
    for (point, layer), ours in trace.acts.items():
        name = f"blocks.{layer}.{HOOKS[point]}"
        if point == "resid_mid" and stack.parallel_attn_mlp:
            raise AssertionError("a parallel block records no resid_mid")
        theirs = cache[name]
        if point == "scores" and family in SCORES_HOLD_PATTERN:
            torch.testing.assert_close(theirs, cache[f"blocks.{layer}.attn.hook_pattern"])  # fails once TL fixes it
            theirs = torch.where(torch.isfinite(ours), ours, torch.zeros_like(ours))  # compared via pattern
        if point == "scores":  # masked entries: -inf here, a large negative number in some bridges
            keep = torch.isfinite(ours)
            ours, theirs = ours[keep], theirs[keep]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        compared += 1
    assert compared == stack.n_layers * (len(POINTS) - (1 if stack.parallel_attn_mlp else 0))


PATTERN_HOOK_IGNORED = {"gptj", "opt"}
"""TransformerLens 4.3's bridge only observes the attention pattern of GPT-J and OPT: a hook_pattern (or
hook_attn_scores) edit does not change the output (measured below). Pattern patching and knockout
through hooks are therefore no-ops on these families; the fast engine edits its own pattern and agrees
with Hugging Face's eager attention given the same mask (see /work/notes/h2-arch.md)."""


def _flip(t: torch.Tensor) -> torch.Tensor:
    return t.flip(-2)


def _other_pattern(t: torch.Tensor) -> torch.Tensor:
    """Another causal attention pattern: uniform over the visible keys."""
    causal = torch.ones(t.shape[-2:], dtype=t.dtype).tril()
    return (causal / causal.sum(-1, keepdim=True)).expand_as(t).clone()


@pytest.mark.parametrize("family", FAST)
def test_an_edit_at_each_point_has_the_same_effect_as_the_bridge_hook(arch, family):
    """Replacing an activation at layer 0 through the fast forward's edit or through the bridge hook of
    the same name gives the same logits, except where the bridge's hook means something else."""
    from recallscope.models.forward import run
    from recallscope.models.stack import build_stack

    model = arch(family)
    stack = build_stack(model)
    tokens = _tokens(model, n=6, batch=1)
    for point in ("resid_pre", "q", "k", "v", "pattern", "z", "attn_out", "resid_mid", "mlp_out", "resid_post"):
        if point == "resid_mid" and stack.parallel_attn_mlp:
            continue
        new = _other_pattern if point == "pattern" else _flip
        with torch.no_grad():
            fast, _ = run(stack, tokens, edit=lambda p, layer, t: new(t) if (p, layer) == (point, 0) else t)
            hooked = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.0.{HOOKS[point]}", lambda t, hook: new(t))])
        differs = (fast - hooked).abs().max() > 1e-3
        # the bridge's hook_resid_mid feeds only ln2 (the residual carried on is unchanged), see
        # tests/test_patching_activation.py; recallscope's resid_mid is the residual stream itself.
        known = point == "resid_mid" or (point == "pattern" and family in PATTERN_HOOK_IGNORED)
        assert bool(differs) == known, f"{family} {point}: fast vs hook edit differ={bool(differs)}"


@pytest.mark.parametrize("family", FAST)
def test_bf16_stack_logits_follow_the_models_rounding(arch, family, tmp_path, gpt2_tokenizer):
    """In bf16 the Stack repeats each family's order of operations (GPT-J's fp32 scores, OPT's scaled
    queries, parallel blocks' (attn + mlp) + x), so its logits match the bridge's to 1e-3 of their scale
    (measured: bit-equal on CPU; before those three, GPT-J, GPT-NeoX and OPT were off by 0.5-0.9%)."""
    from recallscope import load_model
    from recallscope.models.forward import run
    from recallscope.models.stack import build_stack

    model = load_model(save_tiny_hf(family, tmp_path / family, gpt2_tokenizer, seed=0), dtype="bf16")
    tokens = _tokens(model)
    with torch.no_grad():
        try:
            ref = model(tokens).float()
        except RuntimeError as exc:  # TL 4.3's OLMo-2 attention mixes float32 and bf16 on CPU
            pytest.xfail(f"the bridge itself fails in bf16: {exc}")
        ours, _ = run(build_stack(model), tokens)
    torch.testing.assert_close(ours.float(), ref, atol=1e-3 * float(ref.abs().max()), rtol=0)


@pytest.mark.parametrize("family", FAST)
def test_every_adapter_extra_matters_on_the_tiny_model(arch, family):
    """Dropping any extra the adapter carries changes the logits: the tiny model exercises it."""
    from recallscope.models.forward import run
    from recallscope.models.stack import build_stack

    stack = build_stack(arch(family))
    tokens = _tokens(arch(family))
    with torch.no_grad():
        base, _ = run(stack, tokens)
        for extra in EXTRAS:
            if all(getattr(lp, extra) is None for lp in stack.layers):
                continue
            layers = tuple(dataclasses.replace(lp, **{extra: None}) for lp in stack.layers)
            without, _ = run(dataclasses.replace(stack, layers=layers), tokens)
            assert (without - base).abs().max() > 1e-2, f"{family}: dropping {extra} changes nothing"


def test_adapter_extras_per_family(arch):
    """The families' documented differences are present in their stacks (and absent elsewhere)."""
    from recallscope.models.stack import build_stack

    def has(family: str, extra: str) -> bool:
        return any(getattr(lp, extra) is not None for lp in build_stack(arch(family)).layers)

    assert has("qwen3", "q_norm") and has("gemma3", "q_norm") and has("olmo2", "q_norm")
    assert not has("qwen2", "q_norm") and not has("llama", "q_norm")
    assert all(has(f, "post_attn") and has(f, "post_mlp") for f in ("gemma2", "gemma3", "olmo2"))
    assert has("gemma2", "softcap") and not has("gemma3", "softcap")  # Gemma-3 ignores the attention softcap
    assert has("gemma2", "window") and has("gemma3", "window") and has("mistral", "window")
    assert has("gemma3", "rope")
    assert build_stack(arch("gemma2")).final_softcap == 3.0
    assert build_stack(arch("gpt_neox")).parallel_attn_mlp and build_stack(arch("gptj")).parallel_attn_mlp
    assert not build_stack(arch("opt")).parallel_attn_mlp


def _patch_inputs(model):
    tok = model.tokenizer
    clean = model.to_tokens(["The capital of France is", "The capital of Spain is"])
    corrupt = model.to_tokens(["The capital of Spain is", "The capital of Italy is"])
    ids = [tok.encode(w, add_special_tokens=False)[0] for w in (" Paris", " Madrid", " Rome")]
    metric = M.LogitDiff(torch.tensor(ids[:2]), torch.tensor(ids[1:]))
    return clean, corrupt, metric


_REFERENCE: dict[tuple[str, Component], torch.Tensor] = {}


def _tl_reference(model, family: str, component: Component) -> torch.Tensor:
    """``transformer_lens.patching`` on the bridge, in recallscope's axis order [layer, (head,) pos]."""
    if (family, component) not in _REFERENCE:
        clean, corrupt, metric = _patch_inputs(model)
        _, cache = model.run_with_cache(clean)
        ref = TL_FUNCS[component](model, corrupt, cache, M.on_full_logits(metric, clean.shape[1]))
        _REFERENCE[(family, component)] = ref.permute(0, 2, 1) if component == Component.HEAD_OUT else ref
    return _REFERENCE[(family, component)]


@pytest.mark.parametrize("engine", ["fast", "hooks"])
@pytest.mark.parametrize("component", list(TL_FUNCS), ids=lambda c: c.value)
@pytest.mark.parametrize("family", FAST)
def test_patching_equals_transformer_lens(arch, family, component, engine):
    from recallscope.patching.activation import PatchingConfig, patch_tokens

    model = arch(family)
    clean, corrupt, metric = _patch_inputs(model)
    ref = _tl_reference(model, family, component)
    values, *_ = patch_tokens(model, clean, corrupt, metric, PatchingConfig(component=component),
                              progress=False, engine=engine)
    ours = values.mean(0)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert ref.abs().max() > 1e-3, "the sweep should show some effect on these prompts"


@pytest.mark.parametrize("family", FAST)
def test_self_check_passes_and_auto_runs_fast(arch, family):
    from recallscope.models.selfcheck import resolve_engine, self_check

    model = arch(family)
    check = self_check(model, refresh=True)
    assert check.passed, check.reason
    assert check.logits_max_diff <= check.tolerance and check.patch_max_diff <= check.tolerance
    assert resolve_engine(model, "auto") == "fast"


@pytest.mark.parametrize("family", NO_ADAPTER)
def test_family_without_adapter_is_refused_and_auto_falls_back_to_hooks(arch, family):
    from recallscope.models.selfcheck import resolve_engine, self_check
    from recallscope.models.stack import UnsupportedArchitectureError, build_stack
    from recallscope.patching.activation import PatchingConfig, patch_tokens

    model = arch(family)
    with pytest.raises(UnsupportedArchitectureError, match="no adapter for GraniteForCausalLM.*engine='hooks'"):
        build_stack(model)
    check = self_check(model, refresh=True)
    assert not check.passed and "adapter" in check.reason
    with pytest.warns(UserWarning, match="hook"):
        assert resolve_engine(model, "auto") == "hooks"
    clean, corrupt, metric = _patch_inputs(model)
    for component in (Component.RESID_PRE, Component.HEAD_OUT):
        values, *_ = patch_tokens(model, clean, corrupt, metric, PatchingConfig(component=component),
                                  progress=False, engine="auto")
        torch.testing.assert_close(values.mean(0), _tl_reference(model, family, component), atol=1e-4, rtol=0)


def test_methods_that_need_plain_parts_refuse_extras(arch):
    """Methods that split the residual or recompute scores refuse what they cannot reproduce."""
    from recallscope.models.stack import UnsupportedArchitectureError, build_stack

    gemma2, qwen3, llama = (build_stack(arch(f)) for f in ("gemma2", "qwen3", "llama"))
    with pytest.raises(UnsupportedArchitectureError, match="norm after attention"):
        gemma2.require("direct logit attribution", post_norms=True)
    with pytest.raises(UnsupportedArchitectureError, match="final logit softcap"):
        gemma2.require("direct logit attribution", linear_logits=True)
    with pytest.raises(UnsupportedArchitectureError, match="q/k norms"):
        qwen3.require("AtP*'s q/k fix", attention=True)
    qwen3.require("edge attribution", post_norms=True, linear_logits=True)
    llama.require("everything", attention=True, post_norms=True, linear_logits=True)


POST_NORMED = {"gemma2", "gemma3", "olmo2"}


@pytest.mark.parametrize("family", FAST)
def test_edge_graph_and_dla_are_exact_or_refused(arch, family):
    """The edge-attribution graph with every edge kept reproduces the model's logits and DLA's parts add
    up to the logit difference, on every family without post-norms; post-normed families are refused."""
    from recallscope.attribution.dla import direct_logit_attribution
    from recallscope.attribution.graph import Graph, run_graph
    from recallscope.attribution.weights import attn_weights
    from recallscope.models.forward import run
    from recallscope.models.stack import UnsupportedArchitectureError, build_stack
    from recallscope.tasks.pairs import TokenizedPairs

    model = arch(family)
    stack = build_stack(model)
    tokens = _tokens(model, n=6, batch=2)
    pairs = TokenizedPairs(tokens, tokens, torch.tensor([11, 12]), torch.tensor([13, 14]), ())
    if family in POST_NORMED:
        with pytest.raises(UnsupportedArchitectureError, match="norm after attention"):
            Graph.of(stack)
        with pytest.raises(UnsupportedArchitectureError, match="norm after attention"):
            direct_logit_attribution(model, pairs)
        return
    read = torch.arange(tokens.shape[1])
    with torch.no_grad():
        x0 = stack.embed(tokens, read)
        graph_logits = run_graph(stack, Graph.of(stack), attn_weights(stack, like=x0), x0, read=read).logits
        logits, _ = run(stack, tokens)
    torch.testing.assert_close(graph_logits, logits, atol=1e-4, rtol=1e-4)
    if family == "gemma":  # DLA's frozen norm reads gamma from .weight; Gemma scales by (1 + weight)
        with pytest.raises(UnsupportedArchitectureError, match="GemmaRMSNorm is not a plain"):
            direct_logit_attribution(model, pairs)
        return
    res = direct_logit_attribution(model, pairs)
    torch.testing.assert_close(res.sum(), res.total, atol=1e-3, rtol=1e-4)
    want = logits[:, -1, 11:13].diagonal() - logits[:, -1, 13:15].diagonal()
    torch.testing.assert_close(res.total, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt_neox", "gptj"])
@pytest.mark.parametrize("engine", ["fast", "hooks"])
def test_resid_mid_on_parallel_blocks_is_refused_not_silently_unpatched(arch, family, engine):
    """Parallel attention+MLP blocks have no resid_mid; patching it must raise, never return the corrupt
    baseline as if it were a measurement (the fast engine once did exactly that)."""
    model = arch(family)
    clean, corrupt, metric = _patch_inputs(model)
    with pytest.raises(ConfigError, match="resid_mid"):
        patch_tokens(model, clean, corrupt, metric, PatchingConfig(component=Component.RESID_MID), engine=engine,
                     progress=False)
