"""The adjusted keyword effect: does the human keyword carry the definition recall more than matched
controls with the same relatedness, spelling and state alignment?

Per card, the human keyword and its matched controls (:mod:`.human_match`) are the alternatives of one
stratum; their causal scores are interchange effects (:mod:`.human_causal`). Steps:

1. **Outcome ("route-like").** Primary: the alternative with the largest interchange effect in its card
   is the one chosen (ties broken at random): a conditional logit of "which candidate moves the definition
   most". Secondary: the rank-ordered (exploded) logit over the top ``rank_depth`` places, which uses
   more of each card's ranking (:func:`recallscope.clogit.ranked_choice_sets`).
2. **Model** (:func:`recallscope.clogit.fit_clogit`), per stratum = card:
   ``route-like ~ is_keyword + relatedness(keyword, definition) + string(keyword, term) + |cos(h - b, u)|``;
   the three continuous covariates are z-scored over all candidates of the analysed cards, so their
   coefficients are per standard deviation. The keyword effect is the coefficient of ``is_keyword``: the
   log odds ratio of being chosen for the human keyword against a control with the same covariates
   (``exp`` = odds ratio; 0 = no effect). Cards whose scores are not all finite are left out.
3. **Uncertainty.** 95% percentile CIs from a bootstrap over cards (``n_boot`` resamples, refitting each);
   p = the bootstrap two-sided p (:func:`recallscope.clogit.bootstrap_p`, floor ``2 / (n_boot + 1)``);
   the model-based Wald p is reported beside it.
4. **Sensitivity.** Matching cannot always find controls as string-similar to the term as a sound-alike
   keyword; ``common_support`` refits the top-choice model on the cards whose keyword is no more similar
   to the term than its most similar control, where no extrapolation over string similarity is needed.
5. **Multiplicity.** Holm and Benjamini-Hochberg over every keyword-effect test reported: (top choice,
   rank-ordered) x (all cards, sound/orthographic, meaning/etymology), and the common-support fit.
6. **Block** (:func:`adjusted_block`): ``{"keyword_effect", "ci", "p", "n_cards", "by_link", ...}`` for
   ``summary.json``; :func:`plot_adjusted` draws every coefficient with its CI.
"""

import math
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.clogit import bootstrap_clogit, bootstrap_p, fit_clogit, ranked_choice_sets, wald_p
from recallscope.stats import benjamini_hochberg, holm

FEATURES = ("is_keyword", "relatedness", "string", "abs_cos")
"""Covariates of the conditional logit, in order (the keyword effect is the first)."""


def design(causal: Float[Tensor, "card cand"], related: Float[Tensor, "card cand"],
           string: Float[Tensor, "card cand"], abs_cos: Float[Tensor, "card cand"]) -> Float[Tensor, "card cand feature"]:
    """``[is_keyword, z(relatedness), z(string), z(|cos|)]`` per candidate (candidate 0 is the keyword)."""
    is_kw = torch.zeros_like(causal, dtype=torch.float64)
    is_kw[:, 0] = 1.0
    cols = [is_kw]
    for v in (related, string, abs_cos):
        v = v.double()
        cols.append((v - v.mean()) / v.std().clamp_min(1e-12))
    return torch.stack(cols, dim=-1)


def _fit(x: Tensor, score: Tensor, depth: int, n_boot: int, seed: int, ridge: float) -> dict[str, Any]:
    """Fit and bootstrap one conditional logit; coefficients with CIs and p-values."""
    chosen, mask = ranked_choice_sets(score, depth, seed=seed)
    xs = x[:, None].expand(-1, depth, -1, -1)
    fit = fit_clogit(xs, chosen, mask, ridge=ridge)
    draws, failed = bootstrap_clogit(xs, chosen, mask, n_boot=n_boot, seed=seed, ridge=ridge)
    lo, hi = torch.quantile(draws, 0.025, dim=0), torch.quantile(draws, 0.975, dim=0)
    coefs = {name: {"beta": float(fit.beta[j]), "ci": [float(lo[j]), float(hi[j])],
                    "p": bootstrap_p(draws[:, j]), "se_model": float(fit.se[j]),
                    "p_wald": wald_p(float(fit.beta[j]), float(fit.se[j]))} for j, name in enumerate(FEATURES)}
    kw = coefs["is_keyword"]
    top1 = float((chosen[:, 0] == 0).double().mean())
    return {"keyword_effect": kw["beta"], "odds_ratio": math.exp(kw["beta"]), "ci": kw["ci"], "p": kw["p"],
            "p_wald": kw["p_wald"], "n_cards": int(x.shape[0]), "keyword_top1": top1,
            "top1_chance": 1.0 / x.shape[1], "coefficients": coefs, "converged": fit.converged,
            "bootstrap_not_converged": failed}


def adjusted_block(causal: Float[Tensor, "card cand"], related: Float[Tensor, "card cand"],
                   string: Float[Tensor, "card cand"], abs_cos: Float[Tensor, "card cand"], links: Sequence[str], *,
                   n_boot: int = 1999, seed: int = 0, rank_depth: int = 3, ridge: float = 1e-4) -> dict[str, Any]:
    """The ``adjusted`` block of ``summary.json`` (see the module doc). ``links``: each card's link type."""
    ok = torch.isfinite(torch.stack([causal, related, string, abs_cos])).all(0).all(1)
    x_all = design(causal[ok], related[ok], string[ok], abs_cos[ok])
    score = causal[ok].double()
    kept_links = [l for l, k in zip(links, ok.tolist()) if k]
    groups = {"all": list(range(len(kept_links)))}
    for link in sorted(set(kept_links)):
        groups[link] = [i for i, l in enumerate(kept_links) if l == link]
    s_ok = string[ok]
    groups["common_support"] = [i for i in range(len(kept_links)) if float(s_ok[i, 0]) <= float(s_ok[i, 1:].max())]
    depth = max(1, min(rank_depth, causal.shape[1] - 1))
    fits: dict[tuple[str, str], dict[str, Any]] = {}
    for outcome, d in (("top_choice", 1), ("rank_ordered", depth)):
        for name, idx in groups.items():
            if outcome == "rank_ordered" and name == "common_support":
                continue
            if len(idx) >= 2:
                fits[(outcome, name)] = _fit(x_all[idx], score[idx], d, n_boot, seed, ridge)
            else:
                fits[(outcome, name)] = {"n_cards": len(idx), "keyword_effect": float("nan"), "ci": [float("nan")] * 2,
                                         "p": float("nan")}
    tested = [k for k, v in fits.items() if v["p"] == v["p"]]
    for k, ph, pb in zip(tested, holm([fits[k]["p"] for k in tested]), benjamini_hochberg([fits[k]["p"] for k in tested])):
        fits[k]["p_holm"], fits[k]["p_bh"] = ph, pb
    top = fits[("top_choice", "all")]
    return {
        **{k: top[k] for k in ("keyword_effect", "ci", "p") if k in top},
        "p_holm": top.get("p_holm"), "p_bh": top.get("p_bh"), "n_cards": top["n_cards"],
        "by_link": {name: fits[("top_choice", name)] for name in groups if name not in ("all", "common_support")},
        "overall": top,
        "common_support": {**fits[("top_choice", "common_support")],
                           "rule": "cards whose keyword is no more string-similar to the term than its most similar "
                                   "control (no extrapolation over string similarity)"},
        "rank_ordered": {"depth": depth, **{name: fits[("rank_ordered", name)] for name in groups
                                            if name != "common_support"}},
        "n_cards_left_out_not_finite": int((~ok).sum()),
        "outcome": ("top_choice: the candidate with the largest interchange effect in its card is 'route-like' "
                    "(conditional logit, strata = cards); rank_ordered: exploded logit over the top "
                    f"{depth} places"),
        "model": "route-like ~ is_keyword + relatedness(keyword, definition) + string(keyword, term) + "
                 "|cos(h - b, u)|; continuous covariates z-scored; keyword_effect = log odds ratio",
        "features": list(FEATURES), "n_boot": n_boot, "ridge": ridge,
        "ci_method": "percentile bootstrap over cards", "p_method": "two-sided bootstrap p (floor 2/(n_boot+1))",
        "correction": {"tests": [f"{o}/{n}" for o, n in tested], "methods": ["holm", "benjamini-hochberg"]},
    }


def plot_adjusted(block: dict[str, Any], *, title: str | None = None) -> Any:
    """Every coefficient of every fit (top choice and rank-ordered; all, sound, meaning) with its 95% CI."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from recallscope.plotting import apply_style

    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("top choice (conditional logit)",
                                        f"rank-ordered (top {block['rank_ordered']['depth']})"))
    colors = {"all": "#444444", "sound/orthographic": "#d62728", "meaning/etymology": "#1f77b4",
              "common support": "#9467bd"}
    fits = [("top_choice", {"all": block["overall"], **block["by_link"], "common support": block["common_support"]}),
            ("rank_ordered", {k: v for k, v in block["rank_ordered"].items() if k != "depth"})]
    for col, (outcome, groups) in enumerate(fits, start=1):
        for g, (name, fit) in enumerate(groups.items()):
            coefs = fit.get("coefficients")
            if not coefs:
                continue
            beta = [coefs[f]["beta"] for f in FEATURES]
            lo = [coefs[f]["beta"] - coefs[f]["ci"][0] for f in FEATURES]
            hi = [coefs[f]["ci"][1] - coefs[f]["beta"] for f in FEATURES]
            y = [f"{f}" for f in FEATURES]
            fig.add_trace(go.Scatter(
                x=beta, y=y, mode="markers", marker=dict(color=colors.get(name, "#2ca02c"), size=9),
                error_x=dict(type="data", symmetric=False, array=hi, arrayminus=lo),
                name=f"{name} (n={fit['n_cards']}, keyword p_holm={fit.get('p_holm', float('nan')):.3g})",
                legendgroup=name, showlegend=col == 1, offsetgroup=str(g),
                customdata=[coefs[f]["p"] for f in FEATURES],
                hovertemplate="%{y}: %{x:.3f}, bootstrap p = %{customdata:.3g}<extra>" + outcome + " " + name
                              + "</extra>"), row=1, col=col)
        fig.add_vline(x=0, line=dict(dash="dash", color="#888888"), row=1, col=col)
    fig.update_xaxes(title_text="log odds (covariates per SD), 95% bootstrap CI")
    apply_style(fig, title=title or (f"adjusted keyword effect: {block['keyword_effect']:+.3f} "
                                     f"[{block['ci'][0]:+.3f}, {block['ci'][1]:+.3f}], p = {block['p']:.3g}, "
                                     f"{block['n_cards']} cards"))
    fig.update_layout(height=480, legend=dict(orientation="h", y=-0.2), scattermode="group")
    return fig
