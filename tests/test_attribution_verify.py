"""Attribute-then-verify: rank statistics against oracles, exact re-scoring against the patching engine."""

import pytest
import torch

from recallscope.attribution import VerifyResult, attribute_then_verify, precision_at_k, spearman
from recallscope.attribution.verify import exact_effects
from recallscope.errors import ConfigError
from recallscope.patching.activation import PatchingConfig, patch_tokens
from recallscope.vocab import Component
from test_attribution_toys import linear_model, random_pairs


def test_spearman_and_precision_against_formulas():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, generator=gen), torch.randn(30, generator=gen)
    d = (a.argsort().argsort() - b.argsort().argsort()).double()
    assert spearman(a, b) == pytest.approx(1 - 6 * float((d ** 2).sum()) / (30 * (30 ** 2 - 1)))
    assert spearman(a, 2 * a + 1) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    tied = torch.tensor([1.0, 1.0, 2.0, 3.0])
    assert spearman(tied, torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.9486833, abs=1e-6)
    assert precision_at_k(torch.tensor([5.0, -4, 0.1, 0.2]), torch.tensor([-3.0, 0.1, 2, 0.0]), 2) == 0.5


def test_verification_is_exact_patching_and_atp_is_perfect_on_a_linear_model(tmp_path):
    model = linear_model(frozen={0, 1})
    tp, metric = random_pairs(change=(1, 3))
    result = attribute_then_verify(model, tp, metric, method="atp", k=5, exhaustive=True, progress=False)
    torch.testing.assert_close(result.estimated, result.exact, atol=2e-6, rtol=1e-4)
    assert result.spearman > 0.999 and result.precision_at_k == 1.0  # ties at 0 differ only by float noise
    for comp in (Component.RESID_PRE, Component.MLP_OUT):
        values, _, corrupt, _ = patch_tokens(model, tp.clean, tp.corrupt, metric, PatchingConfig(component=comp),
                                             progress=False)
        idx = [i for i, s in enumerate(result.sites) if s.component == comp]
        want = torch.stack([(values - corrupt[:, None, None]).mean(0)[result.sites[i].layer, result.sites[i].pos]
                            for i in idx])
        torch.testing.assert_close(result.exact[idx], want, atol=1e-6, rtol=1e-5)
    loaded = VerifyResult.load(result.save(tmp_path / "verify"))
    assert loaded.sites == result.sites and loaded.spearman == result.spearman
    assert len(result.plot().data) >= 2


def test_top_k_verification_on_a_nonlinear_model(tiny_gpt2):
    tp, metric = random_pairs(change=(2,))
    result = attribute_then_verify(tiny_gpt2, tp, metric, method="atp*", k=6, progress=False)
    assert len(result.sites) == 6 and result.precision_at_k is None and 0.0 <= result.hit_rate <= 1.0
    again = exact_effects(tiny_gpt2, tp, metric, result.sites, progress=False).mean(0)
    torch.testing.assert_close(result.exact, again)
    assert result.estimated.abs().argsort(descending=True).tolist() == list(range(6))
    with pytest.raises(ConfigError, match="unknown method"):
        attribute_then_verify(tiny_gpt2, tp, metric, method="acdc", progress=False)
