"""The hook engine: hook names exist, equality with transformer_lens.patching and with the fast engine,
chunking, checkpoint resume, knockout by pattern renormalisation, causal trace and path patching."""

import pytest
import torch
import transformer_lens.patching as tlp

from recallscope import metrics as M
from recallscope.errors import ConfigError
from recallscope.patching import attention_knockout, causal_trace, path_patching
from recallscope.patching import hook_engine as H
from recallscope.patching.activation import PatchingConfig, activation_patching, patch_tokens
from recallscope.patching.engine import Cell
from recallscope.sites import Site
from recallscope.tasks.pairs import PromptPair
from recallscope.vocab import Component, Corruption, Direction

PAIRS = [PromptPair(clean="The Eiffel Tower is in the city of", corrupt="The Eiffel Tower is in the town of",
                    answer=" Paris", wrong=" London", spans={"subject": (1, 4)}),
         PromptPair(clean="The Colosseum is in the city of", corrupt="The Colosseum is in the town of",
                    answer=" Rome", wrong=" Paris", spans={"subject": (1, 4)})]


@pytest.fixture(scope="module")
def hf_models(gpt2_tokenizer, tmp_path_factory):
    """Tiny Hugging Face models loaded from directories like any checkpoint: Llama-like and GPT-2."""
    from recallscope import load_model
    from recallscope.models.tiny_hf import save_tiny_hf

    root = tmp_path_factory.mktemp("hooks_hf")
    return {fam: load_model(str(save_tiny_hf(fam, root / fam, gpt2_tokenizer))) for fam in ("llama", "gpt2")}


def _batch(model, n_pos=6, batch=2, seed=0):
    vocab = int(model.cfg.d_vocab)
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(10, vocab, (batch, n_pos), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(10, vocab, (batch,), generator=g)
    metric = M.LogitDiff(torch.randint(10, vocab, (batch,), generator=g), torch.randint(10, vocab, (batch,), generator=g))
    return clean, corrupt, metric


def test_hook_names_exist_on_native_and_hf_bridges(tiny_gpt2, tiny_llama, hf_models):
    for model in (tiny_gpt2, tiny_llama, *hf_models.values()):
        last = int(model.cfg.n_layers) - 1
        names = {Site(c, layer).hook_name for c in Component for layer in (0, last)}
        assert "blocks.0.attn.hook_z" in names and f"blocks.{last}.hook_resid_mid" in names
        assert names | {H.EMBED_HOOK, H.UNEMBED_IN} <= set(model.hook_dict)


TL_FUNCS = {
    Component.RESID_PRE: tlp.get_act_patch_resid_pre,
    Component.ATTN_OUT: tlp.get_act_patch_attn_out,
    Component.MLP_OUT: tlp.get_act_patch_mlp_out,
    Component.HEAD_OUT: tlp.get_act_patch_attn_head_out_by_pos,
    Component.Q: tlp.get_act_patch_attn_head_q_by_pos,
    Component.K: tlp.get_act_patch_attn_head_k_by_pos,
    Component.V: tlp.get_act_patch_attn_head_v_by_pos,
    Component.PATTERN: tlp.get_act_patch_attn_head_pattern_by_pos,
}


def _vs_tl(model, component):
    clean, corrupt, metric = _batch(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        ref = TL_FUNCS[component](model, corrupt, cache, M.on_full_logits(metric, clean.shape[1]))
    values, *_ = patch_tokens(model, clean, corrupt, metric, PatchingConfig(component=component), progress=False,
                              engine="hooks")
    ours = values.mean(0)
    if component.per_head and component != Component.PATTERN:  # TL: [layer, pos, head]; ours: [layer, head, pos]
        ref = ref.permute(0, 2, 1)
    torch.testing.assert_close(ours, ref.cpu(), atol=1e-4, rtol=0)
    assert ours.std() > 1e-4, "the cells should differ (a patch that did nothing would be constant)"


@pytest.mark.parametrize("component", list(TL_FUNCS))
def test_matches_transformer_lens_native(tiny_gpt2, component):
    _vs_tl(tiny_gpt2, component)


@pytest.mark.parametrize("component", [Component.RESID_PRE, Component.ATTN_OUT, Component.MLP_OUT,
                                       Component.HEAD_OUT, Component.Q])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_transformer_lens_hf(hf_models, family, component):
    _vs_tl(hf_models[family], component)


CONFIGS = [dict(), dict(per_position=False, window=2),
           dict(direction=Direction.NOISING, corruption=Corruption.MEAN),
           dict(direction=Direction.NOISING, corruption=Corruption.ZERO, per_head=False)]


@pytest.mark.parametrize("component", list(Component))
@pytest.mark.parametrize("kw", CONFIGS, ids=["denoise", "window", "mean", "zero"])
def test_equals_fast_engine(tiny, component, kw):
    """Every component the fast engine has, incl. resid_mid (the residual stream itself is patched)."""
    clean, corrupt, metric = _batch(tiny)
    config = PatchingConfig(component=component, **kw)
    fast, clean_f, corrupt_f, axes = patch_tokens(tiny, clean, corrupt, metric, config, progress=False, engine="fast")
    hooks, clean_h, corrupt_h, axes_h = patch_tokens(tiny, clean, corrupt, metric, config, progress=False,
                                                     engine="hooks")
    assert axes == axes_h
    torch.testing.assert_close(hooks, fast, atol=1e-4, rtol=0)
    torch.testing.assert_close(clean_h, clean_f, atol=1e-4, rtol=0)
    torch.testing.assert_close(corrupt_h, corrupt_f, atol=1e-4, rtol=0)


def test_chunks_and_resume(tiny_llama, tmp_path, monkeypatch):
    """One cell per chunk equals one big chunk; a rerun loads every chunk instead of recomputing it."""
    kw = dict(component="z", progress=False, engine="hooks", metric="logit_diff")
    big = activation_patching(tiny_llama, PAIRS, **kw)
    small = activation_patching(tiny_llama, PAIRS, memory_budget_mb=1e-6, checkpoint_dir=tmp_path, **kw)
    torch.testing.assert_close(small.values, big.values, atol=1e-5, rtol=0)
    n_chunks = len(list(tmp_path.rglob("*.safetensors")))
    assert n_chunks == small.values[0].numel()  # one cell per chunk
    assert small.config["engine"] == "hooks"

    def boom(*args, **kwargs):
        raise AssertionError("a checkpointed chunk was recomputed")

    monkeypatch.setattr(H.HookSweepJob, "compute", boom)
    again = activation_patching(tiny_llama, PAIRS, memory_budget_mb=1e-6, checkpoint_dir=tmp_path, **kw)
    torch.testing.assert_close(again.values, small.values, atol=0, rtol=0)


def test_pattern_renormalisation_equals_masked_softmax():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 5, 5, generator=g)
    masks = torch.zeros(2, 5, 5, dtype=torch.bool)
    masks[0, 4, 1:3] = True
    masks[1, 3, 0] = True
    ((name, hook),) = H.knockout_hooks([Cell((Site(Component.ATTN_OUT, 0),))], masks, 2)
    assert name == "blocks.0.attn.hook_pattern"
    ours = hook(torch.softmax(scores, -1), None)
    ref = torch.softmax(scores.masked_fill(masks[:, None], float("-inf")), -1)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_methods_equal_fast_engine(tiny_gpt2):
    """Causal trace, knockout and path patching: hook engine == fast engine (which masks scores)."""
    runs = [
        (causal_trace, dict(items=PAIRS, n_samples=2, window=2, component="mlp_out", by="pos")),
        (attention_knockout, dict(items=PAIRS, window=1, metric="logprob", edges=("subject", "relation"))),
        (path_patching, dict(pairs=PAIRS, metric="logprob",
                             senders=[Site(Component.HEAD_OUT, 0, None, h) for h in range(2)]
                             + [Site(Component.MLP_OUT, 0, 3)],
                             receivers=[Site(Component.Q, 1, None, 0), Site(Component.V, 1, 5, 1),
                                        Site(Component.MLP_OUT, 1)])),
        (path_patching, dict(pairs=PAIRS, metric="logprob", senders=[Site(Component.HEAD_OUT, 0, None, 1)],
                             receivers=[Site(Component.RESID_POST, 1)])),
    ]
    for fn, kw in runs:
        fast = fn(tiny_gpt2, engine="fast", progress=False, **kw)
        hooks = fn(tiny_gpt2, engine="hooks", progress=False, **kw)
        assert (fast.config["engine"], hooks.config["engine"]) == ("fast", "hooks")
        torch.testing.assert_close(hooks.values, fast.values, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(hooks.clean, fast.clean, atol=1e-4, rtol=1e-4)
        assert hooks.values.std() > 0, fn.__name__


def test_knockout_of_every_key_is_reported(tiny_gpt2):
    n_pos = tiny_gpt2.to_tokens("A B C").shape[1]
    item = PromptPair(clean="A B C", corrupt="A B C", answer=" D", spans={"all": (0, n_pos)})
    with pytest.raises(Exception, match="block every key|NaN"):
        attention_knockout(tiny_gpt2, [item], edges=("all",), window=1, progress=False, engine="hooks")


def test_missing_hook_is_a_clear_error(tiny_gpt2):
    clean, corrupt, metric = _batch(tiny_gpt2)
    with pytest.raises(ConfigError, match="no hook"):
        H.record(tiny_gpt2, clean, ["blocks.0.hook_nonexistent"], [5])


def test_cli_engine_option(tiny_gpt2, monkeypatch, tmp_path):
    """`recallscope patch --engine hooks` runs the hook engine and records it; the numbers equal --engine fast."""
    import json

    import recallscope.models
    from recallscope import cli
    from recallscope.results import PatchingResult

    monkeypatch.setattr(recallscope.models, "load_model", lambda spec, **kw: tiny_gpt2)
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-browser"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"clean": p.clean, "corrupt": p.corrupt, "answer": p.answer,
                                         "wrong": p.wrong}) + "\n" for p in PAIRS[:1]))
    results = {}
    for engine in ("hooks", "fast"):
        out = tmp_path / engine
        assert cli.main(["patch", "--pairs", str(pairs), "--layers", "0", "--engine", engine, "--out", str(out),
                         "--quiet"]) == 0
        (result_dir,) = [d for d in out.iterdir() if d.is_dir()]
        results[engine] = PatchingResult.load(result_dir)
        assert results[engine].config["engine"] == engine
    torch.testing.assert_close(results["hooks"].values, results["fast"].values, atol=1e-4, rtol=0)
    with pytest.raises(SystemExit):
        cli.main(["patch", "--pairs", str(pairs), "--engine", "turbo"])


@pytest.mark.parametrize("kw", [dict(), dict(direction="noising", corruption="zero")], ids=["denoise", "zero"])
def test_atp_on_hooks_equals_fast(tiny, kw):
    """Plain AtP through hooks (resid_mid: ln2-input gradient + resid_post gradient) == the fast AtP."""
    from recallscope.attribution import atp

    fast = atp(tiny, PAIRS, progress=False, engine="fast", **kw)
    hooks = atp(tiny, PAIRS, progress=False, engine="hooks", **kw)
    assert hooks.config["engine"] == "hooks" and set(hooks.values) == set(fast.values)
    for c in fast.values:
        torch.testing.assert_close(hooks.values[c], fast.values[c], atol=1e-5, rtol=1e-4, msg=c)
        assert fast.values[c].abs().max() > 1e-3, c
    torch.testing.assert_close(hooks.clean, fast.clean, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="plain AtP only"):
        atp(tiny, PAIRS, progress=False, engine="hooks", qk_fix=True)


def test_atp_on_hooks_hf_llama(hf_models):
    from recallscope.attribution import atp

    model = hf_models["llama"]
    fast = atp(model, PAIRS, components=["resid_mid", "z", "k"], progress=False, engine="fast")
    hooks = atp(model, PAIRS, components=["resid_mid", "z", "k"], progress=False, engine="hooks")
    for c in fast.values:
        torch.testing.assert_close(hooks.values[c], fast.values[c], atol=1e-5, rtol=1e-4, msg=c)


@pytest.fixture(scope="module")
def hf_family(gpt2_tokenizer, tmp_path_factory):
    """``hf_family(name)``: a tiny HF model of that family (recallscope.models.tiny_hf), built once."""
    from recallscope import load_model
    from recallscope.models.tiny_hf import save_tiny_hf

    root, cache = tmp_path_factory.mktemp("hooks_fam"), {}

    def get(family):
        if family not in cache:
            cache[family] = load_model(str(save_tiny_hf(family, root / family, gpt2_tokenizer)))
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["gemma2", "olmo2", "gpt_neox"])
def test_methods_equal_fast_engine_hf_families(hf_family, family):
    """Softcaps and sliding windows (Gemma-2), post-norms and q/k norms (OLMo-2), parallel blocks (NeoX)."""
    from recallscope.attribution import atp

    model = hf_family(family)
    runs = [(causal_trace, dict(items=PAIRS[:1], n_samples=2, window=2, component="mlp_out", metric="logprob")),
            (attention_knockout, dict(items=PAIRS[:1], window=1, metric="logprob")),
            (path_patching, dict(pairs=PAIRS[:1], metric="logprob", senders=[Site(Component.HEAD_OUT, 0, None, 1)],
                                 receivers=[Site(Component.Q, 1, None, 0), Site(Component.MLP_OUT, 1)])),
            (atp, dict(pairs=PAIRS[:1], components=["resid_pre", "attn_out", "z", "q", "k", "pattern"]))]
    for fn, kw in runs:
        fast = fn(model, engine="fast", progress=False, **kw)
        hooks = fn(model, engine="hooks", progress=False, **kw)
        for name in (fast.values if isinstance(fast.values, dict) else [None]):
            f, h = (fast.values[name], hooks.values[name]) if name else (fast.values, hooks.values)
            torch.testing.assert_close(h, f, atol=1e-4, rtol=1e-4, msg=f"{fn.__name__} {name}")


def test_read_only_hooks_are_an_error_not_a_silent_no_op(hf_family):
    """GPT-J's attention runs inside the HF module: TransformerBridge fires hook_pattern after the fact, so an
    edit there would be discarded. The hook engine raises instead of returning unpatched numbers."""
    from recallscope.attribution import atp

    model = hf_family("gptj")
    with pytest.raises(H.ReadOnlyHookError, match="read-only"):
        attention_knockout(model, PAIRS[:1], window=1, engine="hooks", progress=False)
    with pytest.raises(H.ReadOnlyHookError, match="read-only"):
        activation_patching(model, PAIRS[:1], component="pattern", engine="hooks", progress=False)
    with pytest.raises(H.ReadOnlyHookError, match="does not flow on"):
        atp(model, PAIRS[:1], components=["pattern"], engine="hooks", progress=False)
    fast = attention_knockout(model, PAIRS[:1], window=1, engine="fast", progress=False)  # the fast engine can
    assert fast.config["engine"] == "fast"
