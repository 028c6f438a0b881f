"""The fast engine's self-check and engine selection ("auto" | "fast" | "hooks")."""

import dataclasses
import warnings

import pytest
import torch

from recallscope.errors import ConfigError
from recallscope.models import tiny_model
from recallscope.models import selfcheck as S
from recallscope.models.stack import UnsupportedArchitectureError, build_stack
from recallscope.patching import activation_patching
from recallscope.tasks.pairs import PromptPair

PAIRS = [PromptPair(clean="The Eiffel Tower is in the city of", corrupt="The Eiffel Tower is in the town of",
                    answer=" Paris", wrong=" London")]


@pytest.fixture()
def fresh(gpt2_tokenizer):
    """A model of its own per test (the self-check is cached on the model object)."""
    return tiny_model("llama", tokenizer=gpt2_tokenizer, seed=3)


def test_passes_and_is_cached(tiny):
    check = S.self_check(tiny)
    assert check.passed, check.reason
    assert check.logits_max_diff <= check.tolerance and check.patch_max_diff <= check.tolerance
    assert S.self_check(tiny) is check
    assert S.resolve_engine(tiny, "auto") == "fast"
    assert S.resolve_engine(tiny, "hooks") == "hooks"


def test_wrong_adapter_falls_back_to_hooks(fresh):
    """A fast Stack that is silently wrong (here: a wrong attention scale) fails the check."""
    stack = build_stack(fresh)
    fresh._recallscope_stack = dataclasses.replace(stack, attn_scale=stack.attn_scale * 1.5)
    check = S.self_check(fresh)
    assert not check.passed and "logits differ" in check.reason
    with pytest.warns(UserWarning, match="fails its self-check.*TransformerLensNative.*engine='hooks'"):
        assert S.resolve_engine(fresh, "auto") == "hooks"
    with pytest.raises(S.EngineSelfCheckError, match="engine='hooks'"):
        S.resolve_engine(fresh, "fast")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = activation_patching(fresh, PAIRS, component="resid_pre", progress=False)
    assert auto.config["engine"] == "hooks"
    assert auto.manifest["engine_self_check"]["passed"] is False
    fresh._recallscope_stack = stack  # the true adapter: hooks and fast agree
    assert S.self_check(fresh, refresh=True).passed
    fast = activation_patching(fresh, PAIRS, component="resid_pre", progress=False, engine="fast")
    torch.testing.assert_close(auto.values, fast.values, atol=1e-4, rtol=0)


def test_unsupported_architecture(fresh, monkeypatch):
    def refuse(model):
        raise UnsupportedArchitectureError("no adapter for FooForCausalLM")

    monkeypatch.setattr("recallscope.models.stack.build_stack", refuse)
    check = S.self_check(fresh)
    assert not check.passed and "no fast adapter" in check.reason and "FooForCausalLM" in check.reason


def test_patch_mismatch_is_caught(fresh, monkeypatch):
    """Logits agree but a fast patch does not: step 3 of the check fails."""
    import recallscope.patching.engine as E

    real = E.sweep
    monkeypatch.setattr(E, "sweep", lambda *a, **k: real(*a, **k) + 0.1)
    check = S.self_check(fresh)
    assert not check.passed and "patch differs" in check.reason


def test_unknown_engine(tiny_gpt2):
    with pytest.raises(ConfigError, match="unknown engine"):
        S.resolve_engine(tiny_gpt2, "turbo")


def test_attribution_on_a_model_that_fails_the_check(fresh):
    """Plain AtP falls back to hooks; AtP* and EAP (fast forward only) refuse instead of being wrong."""
    from recallscope.attribution import atp, atp_star, eap

    stack = build_stack(fresh)
    fresh._recallscope_stack = dataclasses.replace(stack, attn_scale=stack.attn_scale * 1.5)
    with pytest.warns(UserWarning, match="fails its self-check"):
        res = atp(fresh, PAIRS, components=["resid_pre"], progress=False)
    assert res.config["engine"] == "hooks"
    with pytest.raises(S.EngineSelfCheckError, match="engine='hooks'"):
        atp(fresh, PAIRS, components=["resid_pre"], progress=False, engine="fast")
    with pytest.raises(S.EngineSelfCheckError, match="fails its self-check"):
        atp_star(fresh, PAIRS, components=["q"], progress=False)
    with pytest.raises(S.EngineSelfCheckError, match="fails its self-check"):
        eap(fresh, PAIRS, progress=False)


def test_probe_fits_a_short_context(fact_organism):
    """The fact-store organism has n_ctx=5: the probe is cut to the context, and the check passes."""
    assert int(fact_organism.cfg.n_ctx) < S.PROBE_LEN
    check = S.self_check(fact_organism, refresh=True)
    assert check.passed, check.reason


def test_fast_only_methods_refuse_engine_hooks(tiny_gpt2):
    from recallscope.attribution import atp_star, eap

    with pytest.raises(ConfigError, match="no hook path"):
        eap(tiny_gpt2, PAIRS, progress=False, engine="hooks")
    with pytest.raises(ConfigError, match="plain AtP only"):
        atp_star(tiny_gpt2, PAIRS, components=["q"], progress=False, engine="hooks")
    assert eap(tiny_gpt2, PAIRS, progress=False, steps=1, engine="fast").config["engine"] == "fast"


def test_stack_consumers_refuse_a_model_that_fails_the_check(fresh):
    """Lenses, DLA, back-patching and route scores run on the fast forward only: on a model where it is
    wrong they raise EngineSelfCheckError naming the method, instead of returning wrong numbers."""
    from recallscope.attribution import direct_logit_attribution
    from recallscope.lens import LogitLens
    from recallscope.routes.analysis import route_report, swap_effect
    from recallscope.routes.competitors import unembedding
    from recallscope.routes.scores import RouteQuery

    stack = build_stack(fresh)
    fresh._recallscope_stack = dataclasses.replace(stack, attn_scale=stack.attn_scale * 1.5)
    with pytest.raises(S.EngineSelfCheckError, match="the lens runs on recallscope's fast forward"):
        LogitLens(fresh)
    with pytest.raises(S.EngineSelfCheckError, match="route competitors"):
        unembedding(fresh)
    with pytest.raises(S.EngineSelfCheckError, match="direct logit attribution"):
        direct_logit_attribution(fresh, PAIRS)
    query = RouteQuery(prompts=("The acronym VAT stands for",), input=" VAT", output=" value")
    with pytest.raises(S.EngineSelfCheckError, match="route_report"):
        route_report(fresh, query, [" tax"], progress=False)
    with pytest.raises(S.EngineSelfCheckError, match="swap_effect"):
        swap_effect(fresh, query, " tax", " levy")
    fresh._recallscope_stack = stack
    assert S.self_check(fresh, refresh=True).passed
    assert LogitLens(fresh).stack is stack
