"""Compare the model's routes with human mnemonics: does recalling a term's definition pass through the
keyword people use to remember it ("capricious" -> "car prices")?

:func:`compare_human` steps:

1. Load the cards and keep those with a keyword (:mod:`.mnemonics`). Each card gives a query: the prompt
   ``'The word "<term>" means'``, the input span ``<term>`` and the output = the first tokens of the
   definition (teacher-forced log-prob). With ``drop_definition_overlap`` (default) cards whose keyword
   shares a content word with the definition's first clause are dropped
   (:func:`~recallscope.routes.human_match.definition_overlap`; listed in ``skipped``).
2. Pool: every card's keyword, a sample of ``own_vocabulary`` whole-word vocabulary tokens and each
   term's ``term_neighbours`` most string-similar vocabulary words, with their
   token counts and model log-frequencies (:mod:`.controls`), directions (step 3) and relatedness to every
   card's definition (the model's representation cosine; :mod:`.human_match`).
3. Directions of every pool concept in neutral contexts (:mod:`.directions`), centred on the pool's mean
   representation so that each keeps what is specific to its concept.
4. Controls: every card's keyword competes with ``n_controls`` pool texts matched on token count,
   log-frequency, relatedness to the card's definition and string similarity to the card's term
   (:func:`~recallscope.routes.human_match.match_card_controls`); none overlaps the definition.
5. Per card, scores of the human keyword and its controls (their directions with the definition tokens'
   direct logit directions projected out, as in :func:`~recallscope.routes.route_report`):
   ``causal`` = the interchange intervention (:mod:`.human_causal`): the drop of the definition log-prob
   when the component along the concept direction at the term's positions of every layer takes the value
   the model produces for another card's term in the same context (``interchange_alternatives`` terms,
   effects averaged); ``attribution`` = the first-order estimate of mean-ablating it; ``similarity`` =
   the best-layer cosine of the term's state with the concept direction; ``readout`` = minus the best rank
   of the concept's first token under the logit lens at the term's last token; ``string`` = letter/sound
   similarity of keyword and term (a text-only reference, not the model). Cards of one token shape are
   scored ``cards_per_batch`` at a time (:mod:`.batched`; the same numbers as one
   :class:`~recallscope.routes.scores.SpanRunner` per card, the tests' oracle, only faster); with a
   checkpoint directory every card is one chunk. Covariates per candidate (:data:`COVARIATES`):
   relatedness to the definition, ``|cos(h - b, u)|`` of the term's last state (averaged over layers) and
   the interchange edit norm.
6. The model's own top concepts: every pool concept's attribution effect on every card, standardised per
   concept across cards (a direction that disrupts every definition is not a route for any one term),
   the top ``own_top`` z-scores per card kept (first-order estimates, labelled as such).
7. Term effect: the definition's log-prob with the term minus its mean with ``n_alternatives`` other
   cards' terms of the same token shape in its place (a card alone in its token shape: random whole-word
   tokens at the term's positions). These are also the interchange's alternative inputs. Cards with a term effect of at least ``min_term_effect`` are "recalled".
8. Agreement per score, overall and by link type (:mod:`.agreement`), in :class:`HumanComparison`; also
   on the recalled cards and on cards whose keyword shares at most 3 consecutive letters with the term.
   The adjusted keyword effect (a conditional logit per card; :mod:`.human_adjusted`) is
   :meth:`HumanComparison.adjusted`.
"""

import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from recallscope.errors import ConfigError, EmptyDatasetError, RecallscopeError
from recallscope.lens.base import LogitLens
from recallscope.manifest import build_manifest
from recallscope.results import load_result_dir, register_result, save_result_dir
from recallscope.routes.agreement import agreement
from recallscope.routes.controls import control_pool, text_tokens
from recallscope.routes.directions import concept_directions
from recallscope.routes.human_match import clean_definition, definition_overlap, definition_vectors, relatedness
from recallscope.routes.human_scoring import card_scores as _card_scores
from recallscope.routes.mnemonics import Card, LinkType
from recallscope.routes.scores import RouteQuery, input_span
from recallscope.routes.text import common_run, letters
from recallscope.stats import spearman
from recallscope.store import open_store, tensor_json

SCORES = ("causal", "attribution", "similarity", "readout", "string")
"""Score types of :class:`HumanComparison`; ``string`` is text similarity (a reference, not the model)."""

COVARIATES = ("relatedness", "abs_cos", "edit_norm")
"""Per-candidate covariates of :class:`HumanComparison`: representation cosine with the card's definition,
``|cos(h - b, u)|`` of the term's last state with the direction (mean over layers ``0..n_layers-1``), and
the interchange edit norm (mean over alternatives and layers)."""

OVERLAP_REASON = "keyword overlaps the definition's first clause"
"""Start of the ``skipped`` reason of a card dropped by the overlap filter."""


@dataclass(frozen=True)
class HumanConfig:
    """How :func:`compare_human` scores cards."""

    template: str = 'The word "{term}" means'
    """Prompt with ``{term}``; the model continues it with the definition."""
    definition_tokens: int = 6
    """Definition tokens in the teacher-forced output metric."""
    n_controls: int = 9
    """Control keywords per card (top-1 chance = 1 / (n_controls + 1))."""
    top_k: tuple[int, ...] = (1, 3)
    """Hit rates reported."""
    own_vocabulary: int = 500
    """Whole-word vocabulary tokens added to the pool of the model's own candidate concepts."""
    own_top: int = 3
    """Own concepts reported per card."""
    prefixes: tuple[str, ...] = ("", "The word")
    """Neutral contexts for concept directions."""
    n_perm: int = 10000
    """Permutations for p-values."""
    remove_output_direction: bool = True
    """Project the definition tokens' direct logit directions out of concept directions."""
    max_cards: int | None = None
    """Score only the first ``max_cards`` cards with keywords (None = all)."""
    seed: int = 0
    """Seed for permutations and bootstraps."""
    batch_size: int = 64
    """Sequences per forward batch (ablation rows = cards x candidates)."""
    cards_per_batch: int = 16
    """Cards of one token shape scored together; only speed depends on it."""
    n_alternatives: int = 4
    """Other cards' terms of the same token shape put in place of the term: the term's total effect on
    its definition (``term_effect`` = clean log-prob minus their mean)."""
    min_term_effect: float = 0.5
    """Cards whose term raises its definition's log-prob by at least this (nats) over other terms are
    "recalled"; the summary reports agreement on them separately and draws worked examples from them."""
    interchange_alternatives: int = 2
    """Alternative terms whose values the interchange swaps in (each separately, effects averaged)."""
    term_neighbours: int = 8
    """Vocabulary words most similar in spelling/sound to each term added to the control pool (so that
    sound-alike keywords get string-similar controls)."""
    drop_definition_overlap: bool = True
    """Drop cards whose keyword shares a content word with the definition's first clause."""
    n_boot: int = 1999
    """Bootstrap resamples over cards for the adjusted keyword effect's CI and p."""
    rank_depth: int = 3
    """Places of each card's ranking used by the rank-ordered (secondary) logit."""

    def __post_init__(self) -> None:
        if "{term}" not in self.template:
            raise ConfigError(f"the template {self.template!r} must contain {{term}}.")
        if self.n_controls < 1 or self.definition_tokens < 1:
            raise ConfigError("n_controls and definition_tokens must be >= 1.")
        if self.interchange_alternatives < 1 or self.n_alternatives < self.interchange_alternatives:
            raise ConfigError(f"need 1 <= interchange_alternatives <= n_alternatives (got "
                              f"{self.interchange_alternatives}, {self.n_alternatives}).")
        if self.n_boot < 1 or self.rank_depth < 1:
            raise ConfigError("n_boot and rank_depth must be >= 1.")


@register_result
@dataclass(frozen=True)
class HumanComparison:
    """Per-card route scores of human keywords and their controls, with the model's own top concepts.

    Attributes:
        scores: ``[card, candidate, score]``; candidate 0 is the human keyword, the rest its controls;
            scores in the order of :data:`SCORES` (higher = more route-like).
        rows: per card: term, keyword, link type, rule, source line, definition, clean log-prob,
            control keywords, the model's own top concepts with their exact effects.
        profile: ``[card, layer]`` attribution effect of the human keyword minus its controls' median,
            per layer (where the route would live).
        skipped: cards left out and why.
        covariates: ``[card, candidate, covariate]`` in the order of :data:`COVARIATES` (None for a result
            saved before they existed).
        matching: how well the controls match the keywords (:func:`~recallscope.routes.human_match.balance`).
    """

    scores: Float[Tensor, "card candidate score"]
    rows: tuple[dict[str, Any], ...]
    profile: Float[Tensor, "card layer"]
    skipped: tuple[dict[str, Any], ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    covariates: Float[Tensor, "card candidate covariate"] | None = None
    matching: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.ndim != 3 or self.scores.shape[0] != len(self.rows) or self.scores.shape[2] != len(SCORES):
            raise RecallscopeError(f"HumanComparison: scores {tuple(self.scores.shape)} do not match {len(self.rows)} "
                                   f"cards and {len(SCORES)} score types.")
        if self.covariates is not None and self.covariates.shape != (*self.scores.shape[:2], len(COVARIATES)):
            raise RecallscopeError(f"HumanComparison: covariates {tuple(self.covariates.shape)} do not match scores "
                                   f"{tuple(self.scores.shape[:2])} x {len(COVARIATES)} covariates.")

    @cached_property
    def adjusted(self) -> dict[str, Any]:
        """The adjusted keyword effect (:func:`~recallscope.routes.human_adjusted.adjusted_block`): a
        conditional logit per card of the top interchange effect on is_keyword, relatedness, string
        similarity and ``|cos(h - b, u)|``, bootstrap CI over cards, Holm/BH over the reported tests."""
        from recallscope.routes.human_adjusted import adjusted_block

        if self.covariates is None:
            raise RecallscopeError("this HumanComparison has no covariates (saved by an older version); re-run "
                                   "compare_human to get the adjusted keyword effect.")
        cfg = self.config
        cov = self.covariates
        block = adjusted_block(self.scores[..., SCORES.index("causal")], cov[..., COVARIATES.index("relatedness")],
                               self.scores[..., SCORES.index("string")], cov[..., COVARIATES.index("abs_cos")],
                               [r["link"] for r in self.rows], n_boot=int(cfg.get("n_boot", 1999)),
                               seed=int(cfg.get("seed", 0)), rank_depth=int(cfg.get("rank_depth", 3)))
        dropped = [s for s in self.skipped if str(s.get("reason", "")).startswith(OVERLAP_REASON)]
        block["n_cards_dropped_overlap"] = len(dropped)
        block["n_cards_dropped_overlap_by_link"] = {l.value: sum(s.get("link") == l.value for s in dropped)
                                                    for l in LinkType}
        block["balance"] = self.matching
        return block

    def agreement(self, score: str = "causal", link: LinkType | str | None = None, *,
                  max_overlap: int | None = None, min_term_effect: float | None = None) -> dict[str, Any]:
        """Agreement statistics (:func:`~recallscope.routes.agreement.agreement`) for one score, optionally
        only for cards of one link type, cards whose keyword shares at most ``max_overlap`` consecutive
        letters with the term (:func:`~recallscope.routes.text.common_run`), and cards whose term raises
        its definition's log-prob by at least ``min_term_effect`` nats over other terms."""
        if score not in SCORES:
            raise ConfigError(f"unknown score {score!r}; use one of {SCORES}.")
        keep = [i for i in range(len(self.rows)) if self._keep(self.rows[i], link, max_overlap, min_term_effect)]
        values = self.scores[keep, :, SCORES.index(score)] if keep else self.scores[:0, :, 0]
        cfg = self.config
        return agreement(values, ks=tuple(cfg.get("top_k", (1, 3))), n_perm=int(cfg.get("n_perm", 10000)),
                         seed=int(cfg.get("seed", 0)))

    @staticmethod
    def _keep(row: dict[str, Any], link: LinkType | str | None, max_overlap: int | None,
              min_term_effect: float | None) -> bool:
        return ((link is None or row["link"] == LinkType(link).value)
                and (max_overlap is None or common_run(row["term"], row["keyword"]) <= max_overlap)
                and (min_term_effect is None or row.get("term_effect", float("nan")) >= min_term_effect))

    def summary(self, *, examples: int = 8, max_overlap: int = 3) -> dict[str, Any]:
        """JSON-ready summary: agreement per score and link type on all cards, on the "recalled" cards
        (term effect >= ``config["min_term_effect"]``), and on cards whose keyword shares at most
        ``max_overlap`` consecutive letters with the term (so that it cannot carry the term's own
        sub-word tokens); counts; worked examples (the recalled cards where the human keyword's causal
        effect most exceeds its controls' median, and the cards where it falls furthest below)."""
        by_link = {"all": None, "sound": LinkType.SOUND, "meaning": LinkType.MEANING}
        min_te = float(self.config.get("min_term_effect", 0.5))
        table = {s: {name: self.agreement(s, link) for name, link in by_link.items()} for s in SCORES}
        model_scores = [s for s in SCORES if s != "string"]
        low = {s: {name: self.agreement(s, link, max_overlap=max_overlap) for name, link in by_link.items()}
               for s in model_scores}
        recalled = {s: {name: self.agreement(s, link, min_term_effect=min_te) for name, link in by_link.items()}
                    for s in model_scores}
        causal = self.scores[:, :, 0]
        order = torch.argsort(-(causal[:, 0] - causal[:, 1:].median(1).values)).tolist()
        best = [i for i in order if self._keep(self.rows[i], None, None, min_te)] or order
        te = torch.tensor([r.get("term_effect", float("nan")) for r in self.rows])
        return {
            "n_cards_scored": len(self.rows), "n_cards_skipped": len(self.skipped),
            "links": {l.value: sum(r["link"] == l.value for r in self.rows) for l in LinkType},
            "term_effect_median": float(te.nanmedian()), "n_cards_recalled": int((te >= min_te).sum()),
            "agreement": table,
            "agreement_recalled": {"min_term_effect": min_te, **recalled},
            "agreement_low_overlap": {"max_common_letters": max_overlap, **low},
            "string_vs_causal_spearman": spearman(self.scores[..., SCORES.index("string")].flatten(),
                                                  causal.flatten(), min_n=3),
            **({"adjusted": self.adjusted} if self.covariates is not None else {}),
            "examples_best": [self.rows[i] for i in best[:examples]],
            "examples_worst": [self.rows[i] for i in order[::-1][:max(2, examples // 4)]],
            "config": self.config, "timings_s": self.manifest.get("timings_s", {}),
        }

    def plot(self, *, title: str | None = None):
        """Mean percentile of the human keyword (with 95% CI; 0.5 = chance) and top-k hit rates (vs chance)
        per score type, overall and by link type."""
        from recallscope.routes.plots import plot_human_comparison

        return plot_human_comparison(self, title=title)

    def save(self, directory: str | os.PathLike) -> Path:
        meta = {"rows": list(self.rows), "skipped": list(self.skipped), "config": self.config,
                "scores": list(SCORES), "covariates": list(COVARIATES), "matching": self.matching}
        tensors = {"scores": self.scores, "profile": self.profile}
        if self.covariates is not None:
            tensors["covariates"] = self.covariates
        return save_result_dir(directory, "HumanComparison", tensors, meta, self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HumanComparison":
        t, meta, manifest = load_result_dir(directory, "HumanComparison")
        return cls(scores=t["scores"], rows=tuple(meta["rows"]), profile=t["profile"],
                   skipped=tuple(meta.get("skipped", [])), config=meta.get("config", {}), manifest=manifest,
                   covariates=t.get("covariates"), matching=meta.get("matching", {}))


def skipped_text(skipped: Sequence[dict[str, Any]], limit: int = 10) -> str:
    """The skipped cards as one line: ``term (line N): reason; ...`` (the first ``limit``, then a count)."""
    parts = [f"{s.get('term')!r} (line {s.get('line')}): {s.get('reason')}" for s in skipped[:limit]]
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return "; ".join(parts) + more


def _usable(cards: Sequence[Card], config: HumanConfig) -> tuple[list[Card], list[dict[str, Any]]]:
    kept, skipped = [], []
    for c in cards:
        why = ("no keyword found in the mnemonic" if c.primary is None else
               "empty definition" if not clean_definition(c.definition) else None)
        shared = definition_overlap(c.primary.text, clean_definition(c.definition)) if why is None else []
        if shared and config.drop_definition_overlap:
            why = f"{OVERLAP_REASON} ({', '.join(shared)})"
        if why:
            skipped.append({"term": c.term, "line": c.line, "reason": why,
                            "link": c.primary.link.value if c.primary is not None else None})
        else:
            kept.append(c)
    if config.max_cards is not None:
        kept = kept[: config.max_cards]
    if not kept:
        raise EmptyDatasetError("no card has both a mnemonic keyword and a definition; nothing to compare.")
    return kept, skipped


def compare_human(model: Any, cards: Sequence[Card], *, config: HumanConfig = HumanConfig(),
                  progress: bool = True, checkpoint_dir: str | os.PathLike | None = None) -> HumanComparison:
    """Score every card's human keyword against its matched controls and find the model's own concepts.

    ``checkpoint_dir``: checkpoint each finished card there (step 5, the expensive one); the same call
    resumes from them (keyed by the model, cards, config and the pool's directions).
    """
    from recallscope.routes import human_scoring as hs

    t0 = time.perf_counter()
    kept, skipped = _usable(cards, config)
    keywords = [" " + c.primary.text for c in kept]
    concepts = hs.pool_concepts(model, keywords, config.own_vocabulary, [c.term for c in kept],
                                config.term_neighbours)
    with torch.no_grad():
        pool = control_pool(model, [c.text for c in concepts])
        dirs = concept_directions(model, concepts, prefixes=config.prefixes, baseline_words=None,
                                  batch_size=config.batch_size)
        first_ids = torch.tensor([text_tokens(model, c.text)[0] for c in concepts])
        defs = definition_vectors(model, [clean_definition(c.definition) for c in kept], batch_size=config.batch_size)
    related = relatedness(dirs.vectors, defs)  # [concept, card]
    sh = hs.Shared.build(concepts, dirs.vectors, dirs.baseline, first_ids, pool, related, [c.term for c in kept],
                         config.seed)
    lens = LogitLens(model)
    cfg = {**asdict(config), "n_pool": len(concepts)}
    store = open_store(checkpoint_dir, build_manifest(model, [c.term for c in kept], cfg, seed=config.seed),
                       inputs={"cards": kept, "vectors": dirs.vectors, "baseline": dirs.baseline, "related": related})
    items, skipped_plan = hs.plan(model, kept, sh, config)
    skipped += skipped_plan
    t_prep = time.perf_counter() - t0
    found: dict[int, dict[str, Tensor]] = {}
    with tqdm(total=len(items), desc="cards", disable=not progress) as bar:
        for idx in hs.batches(items, config.cards_per_batch):
            batch = hs.LazyBatch(model, [items[i] for i in idx], sh, lens, config)
            for k, i in enumerate(idx):  # a chunk per card (named by its place in the plan)
                found[i] = store.get_or_compute(f"card{i:05d}", lambda batch=batch, k=k: _card_scores(batch, k))
                bar.update(1)
    if not found:
        raise EmptyDatasetError(f"no card could be scored; skipped: {skipped_text(skipped) or 'none'}. Fix those "
                                "cards or use more cards.")
    order = sorted(found)  # the cards' order
    rows = [tensor_json(found[i]["row"]) for i in order]
    hs.own_concepts(rows, torch.stack([found[i]["attr"] for i in order]), sh, config)
    scores = torch.stack([found[i]["scores"] for i in order])
    covariates = torch.stack([found[i]["covariates"] for i in order])
    matching = hs.matching_balance(scores, covariates, rows, sh, [items[i].column for i in order], config.seed)
    timings = {"prepare": t_prep, "total": time.perf_counter() - t0}
    manifest = build_manifest(model, [r["term"] for r in rows], cfg, seed=config.seed, timings=timings)
    return HumanComparison(scores=scores, rows=tuple(rows), profile=torch.stack([found[i]["profile"] for i in order]),
                           skipped=tuple(skipped), config=cfg, manifest={**manifest, **store.manifest_entry()},
                           covariates=covariates, matching=matching)


def term_alternatives(model: Any, card: Card, others: Sequence[Card], *, n: int = 4,
                      template: str = HumanConfig.template) -> tuple[str, ...]:
    """Up to ``n`` other cards' terms that fill ``template`` with the same token count and span as
    ``card.term``: alternative inputs for the total effect (replacing a multi-token term by random words
    token by token would keep its later tokens)."""
    ids, span = input_span(model, template.format(term=card.term), card.term)
    out: list[str] = []
    for other in others:
        if len(out) == n:
            break
        if letters(other.term) == letters(card.term) or other.term in out or '"' in other.term:
            continue
        alt_ids, alt_span = input_span(model, template.format(term=other.term), other.term)
        if len(alt_ids) == len(ids) and alt_span == span:
            out.append(other.term)
    return tuple(out)


CARD_ROUTE_CONFIG: dict[str, Any] = {"stride": 5, "n_controls": 8, "n_random": 4, "n_neighbours": 3,
                                     "n_templates": 8, "ablation": False, "mediation": True}
"""Route-report settings of the worked examples (:func:`card_route_report`): the detector's defaults
(8 templates, interchange mediation, competitors, Holm) with a window every 5th layer and no mean ablation
(it carries no verdict)."""


def card_route_report(model: Any, card: Card, *, concepts: Sequence[str] = (), pool: Any = None,
                      config: Any = None, template: str = HumanConfig.template, definition_tokens: int = 6,
                      alternatives: Sequence[str] = (), progress: bool = False) -> Any:
    """A :class:`~recallscope.routes.report.RouteReport` for one card: its keyword (plus ``concepts``) as
    routes from the term to its definition, scored layer by layer under the route module's evidence
    standard (the worked examples of the README): interchange mediation on, competitors (the term itself,
    the definition's first word in every casing, its neighbours, matched random directions) and
    frequency-matched controls, Holm over the candidates; "no route" is a valid answer.
    ``alternatives``: other terms with the same token count (:func:`term_alternatives`) for the total
    effect and the interchange; empty = random vocabulary tokens. ``config`` overrides
    :data:`CARD_ROUTE_CONFIG` (its ``max_output_tokens`` is then ``config``'s, not ``definition_tokens``)."""
    from recallscope.routes.analysis import route_report
    from recallscope.routes.report import RouteConfig

    if card.primary is None:
        raise ConfigError(f"card {card.term!r} (line {card.line}) has no keyword to test.")
    prompt = template.format(term=card.term)
    query = RouteQuery((prompt,), card.term, " " + clean_definition(card.definition), tuple(alternatives),
                       name=card.term)
    cands = [" " + card.primary.text] + [" " + c.strip() for c in concepts if c.strip() != card.primary.text]
    cfg = config or RouteConfig(**{**CARD_ROUTE_CONFIG, "max_output_tokens": definition_tokens})
    if not cfg.mediation:
        raise ConfigError("card_route_report needs mediation=True: without the interchange no verdict is given "
                          "(every route would be 'inconclusive').")
    return route_report(model, query, cands, pool=pool, config=cfg, progress=progress)
