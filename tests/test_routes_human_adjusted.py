"""The adjusted human-mnemonic analysis: the conditional logit against brute force and a planted
coefficient, the overlap filter, matched-control selection, the batched interchange against the
per-prompt oracle, and the adjusted block on synthetic cards with a known answer."""

import itertools
import math

import pytest
import torch

from recallscope.clogit import (
    bootstrap_clogit,
    bootstrap_p,
    clogit_loglik,
    fit_clogit,
    ranked_choice_sets,
    wald_p,
)
from recallscope.routes.human_adjusted import FEATURES, adjusted_block, design, plot_adjusted
from recallscope.routes.human_match import balance, definition_overlap, match_card_controls
from recallscope.routes.text import similarity


def _brute_loglik(beta, x, chosen, mask):
    """Log of the product of choice probabilities, one alternative at a time in plain Python."""
    total = 0.0
    for c in range(x.shape[0]):
        for s in range(x.shape[1]):
            util = {a: math.exp(sum(float(x[c, s, a, f]) * float(beta[f]) for f in range(x.shape[3])))
                    for a in range(x.shape[2]) if mask[c, s, a]}
            total += math.log(util[int(chosen[c, s])] / sum(util.values()))
    return total


def _simulate(beta, n_cluster, n_alt, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_cluster, 1, n_alt, len(beta), generator=gen, dtype=torch.float64)
    x[..., 0] = 0.0
    x[:, :, 0, 0] = 1.0  # feature 0: "is the first alternative" (like is_keyword)
    p = torch.softmax(torch.einsum("csaf,f->csa", x, torch.tensor(beta, dtype=torch.float64)), dim=-1)
    chosen = torch.multinomial(p[:, 0], 1, generator=gen)
    return x, chosen


def test_clogit_loglik_matches_brute_force_and_is_invariant_to_set_constants():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 4, 3, generator=gen, dtype=torch.float64)
    chosen = torch.randint(0, 3, (5, 2), generator=gen)
    mask = torch.ones(5, 2, 4, dtype=torch.bool)
    mask[1, 0, 3] = mask[4, 1, 3] = False
    beta = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    assert float(clogit_loglik(beta, x, chosen, mask)) == pytest.approx(_brute_loglik(beta, x, chosen, mask), rel=1e-10)
    shifted = x + torch.randn(5, 2, 1, 3, generator=gen, dtype=torch.float64)  # a constant per choice set
    assert float(clogit_loglik(beta, shifted, chosen, mask)) == pytest.approx(float(clogit_loglik(beta, x, chosen, mask)))


def test_fit_clogit_maximises_the_brute_force_likelihood():
    x, chosen = _simulate([0.8, -0.5, 0.3], n_cluster=40, n_alt=4, seed=2)
    mask = torch.ones(x.shape[:3], dtype=torch.bool)
    fit = fit_clogit(x, chosen, mask)
    assert fit.converged and fit.loglik == pytest.approx(_brute_loglik(fit.beta, x, chosen, mask), rel=1e-10)
    best = _brute_loglik(fit.beta, x, chosen, mask)
    for j, step in itertools.product(range(3), (-1e-3, 1e-3)):  # every coordinate move lowers it
        moved = fit.beta.clone()
        moved[j] += step
        assert _brute_loglik(moved, x, chosen, mask) < best
    # an independent optimiser (LBFGS on the autograd likelihood) finds the same maximum
    beta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = -clogit_loglik(beta, x, chosen, mask)
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(fit.beta, beta.detach(), atol=1e-5, rtol=0)


def test_fit_clogit_recovers_a_planted_coefficient():
    true = [1.0, -0.7, 0.4]
    x, chosen = _simulate(true, n_cluster=3000, n_alt=6, seed=3)
    fit = fit_clogit(x, chosen)
    for j, b in enumerate(true):
        assert abs(float(fit.beta[j]) - b) < 3.5 * float(fit.se[j]), (j, fit.beta, fit.se)
    assert float(fit.se[0]) < 0.08  # precise enough that the check above means something
    draws, failed = bootstrap_clogit(x[:600], chosen[:600], n_boot=100, seed=0)
    assert failed == 0 and draws.shape == (100, 3)
    assert float(draws[:, 0].quantile(0.025)) < 1.0 < float(draws[:, 0].quantile(0.975))
    assert bootstrap_p(draws[:, 0]) == pytest.approx(2 / 101)  # every draw > 0: the floor


def test_bootstrap_p_and_wald_p():
    assert bootstrap_p(torch.tensor([-1.0, 1.0, -2.0, 2.0])) == pytest.approx(1.0)
    assert bootstrap_p(torch.tensor([-1.0] + [1.0] * 9)) == pytest.approx(0.2)
    assert wald_p(1.96, 1.0) == pytest.approx(0.05, abs=1e-3) and math.isnan(wald_p(1.0, 0.0))


def test_ranked_choice_sets_is_the_plackett_luce_likelihood_and_breaks_ties_at_random():
    score = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    chosen, mask = ranked_choice_sets(score, 3)
    assert chosen.tolist() == [[1, 2, 0]]
    assert mask.tolist() == [[[True] * 4, [True, False, True, True], [True, False, False, True]]]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, generator=gen, dtype=torch.float64)
    beta = torch.tensor([0.5, -0.3], dtype=torch.float64)
    u = (x[0] @ beta).exp()
    pl = math.log(u[1] / u.sum()) + math.log(u[2] / (u.sum() - u[1])) + math.log(u[0] / (u[0] + u[3]))
    assert float(clogit_loglik(beta, x[:, None].expand(-1, 3, -1, -1), chosen, mask)) == pytest.approx(pl)
    tied = torch.zeros(2000, 5)
    first = ranked_choice_sets(tied, 1, seed=1)[0][:, 0]
    assert abs(float((first == 0).double().mean()) - 0.2) < 0.04  # a tie never favours alternative 0


def test_definition_overlap_finds_glosses_and_stems():
    assert definition_overlap("rub with oil", "smear or rub with oil") == ["rub", "oil"]
    assert definition_overlap("approval", "approval or praise") == ["approval"]
    assert definition_overlap("approve", "approval or praise") == ["approve"]
    assert definition_overlap("car prices", "given to sudden and unaccountable changes of mood") == []
    assert definition_overlap("the one", "a thing of the one kind") == []  # stop words do not count


def test_usable_drops_overlapping_cards_unless_asked(tmp_path):
    from recallscope.routes.human import OVERLAP_REASON, HumanConfig, _usable
    from recallscope.routes.mnemonics import load_cards

    path = tmp_path / "c.tsv"
    path.write_text("#separator:tab\nanoint\trub with oil\tsmear or rub with oil\n"
                    "capricious\tCar prices are unpredictable\tgiven to sudden changes of mood\n")
    cards = load_cards(path)
    kept, skipped = _usable(cards, HumanConfig())
    assert [c.term for c in kept] == ["capricious"]
    assert skipped[0]["term"] == "anoint" and skipped[0]["reason"].startswith(OVERLAP_REASON)
    assert "rub" in skipped[0]["reason"] and skipped[0]["link"] == "meaning/etymology"
    kept, skipped = _usable(cards, HumanConfig(drop_definition_overlap=False))
    assert len(kept) == 2 and not skipped


def test_match_card_controls_takes_the_nearest_eligible_texts():
    texts = [" music box", " kitten", " puppy", " river", " sad cat", " music", " table", " garden", " storm", " piano"]
    n_tokens = torch.tensor([2, 1, 1, 1, 2, 1, 1, 1, 1, 1])
    logfreq = torch.tensor([-9.0, -8.0, -8.5, -6.0, -9.5, -7.0, -5.0, -7.5, -8.2, -8.1])
    related = torch.tensor([0.5, 0.45, 0.4, 0.0, 0.5, 0.2, -0.1, 0.1, 0.44, 0.3])
    term, definition = "musical", "a small pet cat"
    chosen = match_card_controls(1, term, definition, texts, n_tokens, logfreq, related, k=3,
                                 scale=(1.0, 0.2, 0.3))
    # eligible: one token, not the keyword, no shared word with term or keyword, no overlap with the definition
    eligible = [i for i in range(len(texts)) if n_tokens[i] == 1 and i != 1 and not definition_overlap(texts[i], definition)]
    assert 5 in eligible  # " music" shares no *word* with "musical"; the distance decides
    dist = {i: (float(logfreq[i]) + 8.0) ** 2 + ((float(related[i]) - 0.45) / 0.2) ** 2
            + ((similarity(term, texts[i]) - similarity(term, texts[1])) / 0.3) ** 2 for i in eligible}
    assert chosen == sorted(dist, key=dist.get)[:3]
    assert 4 not in chosen and 0 not in chosen  # other token count / overlaps the definition ("cat")
    with pytest.raises(Exception, match="controls within 2 tokens"):
        match_card_controls(1, term, definition, texts, n_tokens, logfreq, related, k=20, scale=(1.0, 0.2, 0.3))


def test_balance_is_zero_for_identical_groups_and_signed():
    kw = torch.tensor([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]])
    assert balance(kw, kw[:, None]).abs().max() < 1e-9
    assert (balance(kw + 5, kw[:, None]) > 0).all()


def _cards(n, n_cand, gen):
    related = torch.randn(n, n_cand, generator=gen)
    string = torch.rand(n, n_cand, generator=gen)
    abs_cos = torch.rand(n, n_cand, generator=gen)
    return related, string, abs_cos


def test_adjusted_block_finds_a_planted_keyword_effect_and_its_schema():
    gen = torch.Generator().manual_seed(0)
    related, string, abs_cos = _cards(150, 6, gen)
    causal = torch.randn(150, 6, generator=gen)
    causal[:, 0] += 1.5  # the keyword moves the definition more than any covariate explains
    links = ["sound/orthographic"] * 100 + ["meaning/etymology"] * 50
    block = adjusted_block(causal, related, string, abs_cos, links, n_boot=99, seed=0)
    assert {"keyword_effect", "ci", "p", "n_cards", "by_link"} <= set(block)
    assert set(block["by_link"]) == {"sound/orthographic", "meaning/etymology"}
    assert block["n_cards"] == 150 and block["by_link"]["meaning/etymology"]["n_cards"] == 50
    assert block["keyword_effect"] > 1.0 and block["ci"][0] > 0 and block["p"] == pytest.approx(2 / 100)
    assert block["overall"]["coefficients"].keys() == set(FEATURES)
    assert len(block["correction"]["tests"]) == 7  # (top choice, rank-ordered) x (all, sound, meaning) + support
    support = [i for i in range(150) if string[i, 0] <= string[i, 1:].max()]
    assert block["common_support"]["n_cards"] == len(support) < 150
    for fit in [block["overall"], *block["by_link"].values()]:
        assert fit["p_holm"] >= fit["p"] and fit["p_bh"] >= fit["p"]
    assert len(plot_adjusted(block).data) == 7


def test_adjusted_block_removes_a_relatedness_confound():
    """The interchange effect follows relatedness only, and the keyword is the most related candidate: the
    raw top-1 rate is far above chance, the adjusted keyword effect is not distinguishable from 0."""
    gen = torch.Generator().manual_seed(1)
    related, string, abs_cos = _cards(300, 6, gen)
    related[:, 0] += 1.5
    causal = 2.0 * related + torch.randn(300, 6, generator=gen)
    block = adjusted_block(causal, related, string, abs_cos, ["sound/orthographic"] * 300, n_boot=199, seed=0)
    assert block["overall"]["keyword_top1"] > 0.4  # chance 1/6
    assert block["ci"][0] < 0 < block["ci"][1] and block["p"] > 0.05
    assert block["overall"]["coefficients"]["relatedness"]["ci"][0] > 1.0


def test_adjusted_block_leaves_out_cards_with_missing_scores():
    gen = torch.Generator().manual_seed(2)
    related, string, abs_cos = _cards(30, 4, gen)
    causal = torch.randn(30, 4, generator=gen)
    causal[3, 2] = float("nan")
    block = adjusted_block(causal, related, string, abs_cos, ["sound/orthographic"] * 30, n_boot=20)
    assert block["n_cards"] == 29 and block["n_cards_left_out_not_finite"] == 1
    x = design(causal[:2], related[:2], string[:2], abs_cos[:2])
    assert x[:, 0, 0].tolist() == [1.0, 1.0] and x[:, 1:, 0].abs().sum() == 0


def test_card_interchange_matches_the_span_runner_oracle(tiny_llama):
    """The batched interchange at every layer (all cards, candidates and alternatives in a few forwards)
    equals recallscope.routes.interchange.interchange on one SpanRunner per prompt."""
    from test_routes_human import _same_shape_preps

    from recallscope.models.stack import build_stack
    from recallscope.routes.batched import BatchRunner
    from recallscope.routes.human_causal import alternative_runs, card_interchange, edit_norms
    from recallscope.routes.interchange import interchange
    from recallscope.routes.scores import SpanRunner
    from recallscope.routes.scores import alternative_runs as oracle_alternatives

    model = tiny_llama
    preps = _same_shape_preps(model, ["cat", "dog", "sun"], [" a small pet animal", " a loyal pet", " the star we see"],
                              alternatives=(("dog", "sun"), ("sun", "cat"), ("cat",)))
    stack = build_stack(model)
    n, d = stack.n_layers, stack.d_model
    gen = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(3, 4, n + 1, d, generator=gen), dim=-1)
    batch = BatchRunner(model, preps)
    alt_span, total = alternative_runs(batch, 2, batch_size=3)
    torch.testing.assert_close(total, batch.total_effect(batch_size=2), atol=1e-5, rtol=1e-5)
    got = card_interchange(batch, alt_span, unit, batch_size=5)
    norms = edit_norms(batch, alt_span, unit)
    assert got.shape == (3, 4, 2) and torch.isnan(got[2, :, 1]).all() and torch.isnan(norms[2, :, 1]).all()
    for b, prep in enumerate(preps):
        ref = SpanRunner(stack, prep)
        alt_states, _ = oracle_alternatives(ref)
        want = interchange(ref, alt_states, unit[b], [0], n, 64)[..., 0]  # [slot, alt]
        n_alt = alt_states.shape[1]
        torch.testing.assert_close(got[b, :, :n_alt], want, atol=1e-4, rtol=1e-4)
        s, e = prep.span
        diff = alt_states[:n, :, s:e] - ref.states[:n, :, s:e]  # [layer, alt, span, d]
        want_norm = torch.einsum("lapd,cld->calp", diff, unit[b, :, :n]).norm(dim=-1).mean(-1)
        torch.testing.assert_close(norms[b, :, :n_alt], want_norm, atol=1e-4, rtol=1e-4)
    assert got[:2].abs().max() > 0  # the edit does something on this model


def test_card_route_report_refuses_a_config_without_mediation(tiny_gpt2):
    from recallscope.errors import ConfigError
    from recallscope.routes.human import CARD_ROUTE_CONFIG, card_route_report
    from recallscope.routes.mnemonics import Card, Keyword, LinkType
    from recallscope.routes.report import RouteConfig

    assert CARD_ROUTE_CONFIG["mediation"] is True
    card = Card("venal", "Looks like venue", "showing a willingness to be bribed",
                keywords=(Keyword("venue", LinkType.SOUND, "looks/sounds like"),))
    with pytest.raises(ConfigError, match="mediation=True"):
        card_route_report(tiny_gpt2, card, config=RouteConfig(mediation=False))


def test_bootstrap_clogit_equals_refitting_each_resample():
    from recallscope.stats import bootstrap_indices

    x, chosen = _simulate([0.6, -0.4, 0.2], n_cluster=60, n_alt=5, seed=4)
    draws, failed = bootstrap_clogit(x, chosen, n_boot=7, seed=3, ridge=1e-3, chunk=3)
    assert failed == 0
    for b, idx in enumerate(bootstrap_indices(60, 7, 3)):
        torch.testing.assert_close(draws[b], fit_clogit(x[idx], chosen[idx], ridge=1e-3).beta, atol=1e-7, rtol=0)
