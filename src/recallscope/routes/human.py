"""Compare the model's routes with human mnemonics: does recalling a term's definition pass through the
keyword people use to remember it ("capricious" -> "car prices")?

:func:`compare_human` steps:

1. Load the cards and keep those with a keyword (:mod:`.mnemonics`). Each card gives a query: the prompt
   ``'The word "<term>" means'``, the input span ``<term>`` and the output = the first tokens of the
   definition (teacher-forced log-prob).
2. Controls: every card's keyword competes with ``n_controls`` other cards' keywords matched on token
   count and frequency (:func:`~recallscope.routes.controls.match_controls`): the shuffled-keyword
   baseline. The model's own candidates add a sample of whole-word vocabulary tokens.
3. Directions of every keyword and vocabulary concept in neutral contexts (:mod:`.directions`), centred
   on the pool's mean representation so that each keeps what is specific to its concept.
4. Per card, scores of the human keyword and its controls (their directions with the definition tokens'
   direct logit directions projected out, as in :func:`~recallscope.routes.route_report`):
   ``causal`` = exact drop of the definition log-prob when the concept direction is mean-ablated at the
   term's positions in every layer at once; ``attribution`` = its first-order estimate; ``similarity`` =
   the best-layer cosine of the term's state with the concept direction; ``readout`` = minus the best rank
   of the concept's first token under the logit lens at the term's last token; ``string`` = letter/sound
   similarity of keyword and term (a text-only reference, not the model). Cards of one token shape are
   scored ``cards_per_batch`` at a time (:mod:`.batched`; the same numbers as one
   :class:`~recallscope.routes.scores.SpanRunner` per card, the tests' oracle, only faster); with a
   checkpoint directory every card is one chunk.
5. The model's own top concepts: every pool concept's attribution effect on every card, standardised per
   concept across cards (a direction that disrupts every definition is not a route for any one term),
   the top ``own_top`` z-scores per card kept (first-order estimates, labelled as such).
6. Term effect: the definition's log-prob with the term minus its mean with ``n_alternatives`` other
   cards' terms of the same token shape in its place. Cards with a term effect of at least
   ``min_term_effect`` are "recalled": the model's definition depends on the term, so a route can exist.
7. Agreement per score, overall and by link type (:mod:`.agreement`), in :class:`HumanComparison`; also
   on the recalled cards and on cards whose keyword shares at most 3 consecutive letters with the term.
"""

import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
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
from recallscope.routes.concepts import Concept, ConceptSource, word_vocabulary
from recallscope.routes.controls import control_pool, match_controls, text_tokens
from recallscope.routes.directions import concept_directions
from recallscope.routes.mnemonics import Card, LinkType
from recallscope.routes.batched import BatchRunner, shape_key
from recallscope.routes.scores import (
    PreparedPrompt,
    RouteQuery,
    input_span,
    output_directions,
    prepare_prompt,
    readout_ranks,
)
from recallscope.routes.text import common_run, letters, similarity
from recallscope.stats import spearman
from recallscope.store import json_tensor, open_store, tensor_json

SCORES = ("causal", "attribution", "similarity", "readout", "string")
"""Score types of :class:`HumanComparison`; ``string`` is text similarity (a reference, not the model)."""


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

    def __post_init__(self) -> None:
        if "{term}" not in self.template:
            raise ConfigError(f"the template {self.template!r} must contain {{term}}.")
        if self.n_controls < 1 or self.definition_tokens < 1:
            raise ConfigError("n_controls and definition_tokens must be >= 1.")


def clean_definition(text: str) -> str:
    """The first clause of a definition, without a leading "(of ...)" or "1." (what the model should say)."""
    text = re.sub(r"^\s*(?:\d+[.)]\s*)?(?:\([^)]*\)\s*)?", "", text.strip())
    return re.split(r"[.;]|\s\d+[.)]\s", text)[0].strip()


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
    """

    scores: Float[Tensor, "card candidate score"]
    rows: tuple[dict[str, Any], ...]
    profile: Float[Tensor, "card layer"]
    skipped: tuple[dict[str, Any], ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.ndim != 3 or self.scores.shape[0] != len(self.rows) or self.scores.shape[2] != len(SCORES):
            raise RecallscopeError(f"HumanComparison: scores {tuple(self.scores.shape)} do not match {len(self.rows)} "
                                   f"cards and {len(SCORES)} score types.")

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
                "scores": list(SCORES)}
        return save_result_dir(directory, "HumanComparison", {"scores": self.scores, "profile": self.profile}, meta,
                               self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "HumanComparison":
        t, meta, manifest = load_result_dir(directory, "HumanComparison")
        return cls(scores=t["scores"], rows=tuple(meta["rows"]), profile=t["profile"],
                   skipped=tuple(meta.get("skipped", [])), config=meta.get("config", {}), manifest=manifest)


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
        if why:
            skipped.append({"term": c.term, "line": c.line, "reason": why})
        else:
            kept.append(c)
    if config.max_cards is not None:
        kept = kept[: config.max_cards]
    if not kept:
        raise EmptyDatasetError("no card has both a mnemonic keyword and a definition; nothing to compare.")
    return kept, skipped


def _pool_concepts(model: Any, keywords: Sequence[str], n_vocab: int) -> list[Concept]:
    words = word_vocabulary(model)
    step = max(1, len(words) // max(n_vocab, 1))
    vocab = [w for _, w in words[::step]][:n_vocab] if n_vocab else []
    texts = list(dict.fromkeys(list(keywords) + vocab))
    n_kw = len(set(keywords))
    return [Concept(text=t, source=ConceptSource.HUMAN if i < n_kw else ConceptSource.VOCABULARY)
            for i, t in enumerate(texts)]


@dataclass
class _Shared:
    """What every card's scoring reads: the pool's directions, ids and frequencies."""

    concepts: list[Concept]
    index: dict[str, int]
    vectors: Tensor
    baseline: Tensor
    first_ids: Tensor
    pool: Any
    unit: Tensor
    absent: Tensor

    @classmethod
    def build(cls, concepts: list[Concept], vectors: Tensor, baseline: Tensor, first_ids: Tensor, pool: Any
              ) -> "_Shared":
        unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return cls(concepts, {c.text: i for i, c in enumerate(concepts)}, vectors, baseline, first_ids, pool, unit,
                   torch.einsum("cld,ld->cl", unit, baseline))


@dataclass(frozen=True)
class _Item:
    """One card ready to score: the pool slots of its keyword (first) and controls, and its prompt."""

    card: Card
    slots: Tensor
    names: tuple[str, ...]
    prep: PreparedPrompt
    definition: str
    alternatives: tuple[str, ...] = ()


def _plan(model: Any, kept: Sequence[Card], sh: _Shared, config: HumanConfig
          ) -> tuple[list[_Item], list[dict[str, Any]]]:
    """Controls and the prepared prompt of every card; cards with too few controls are skipped."""
    items, skipped = [], []
    for card in kept:
        keyword = " " + card.primary.text
        try:
            controls = match_controls(model, sh.concepts[sh.index[keyword]], sh.pool, k=config.n_controls,
                                      exclude=[card.term], logfreq=float(sh.pool.logfreq[sh.pool.texts.index(keyword)]))
        except EmptyDatasetError as exc:  # too few controls with this token count
            skipped.append({"term": card.term, "line": card.line, "reason": str(exc)})
            continue
        names = (keyword, *(c.text for c in controls))
        prompt = config.template.format(term=card.term)
        definition = " " + clean_definition(card.definition)
        prep = prepare_prompt(model, prompt, RouteQuery((prompt,), card.term, definition),
                              max_output_tokens=config.definition_tokens, n_alternatives=0, seed=config.seed)
        items.append(_Item(card, torch.tensor([sh.index[n] for n in names]), names, prep, definition))
    return _with_alternatives(items, config.n_alternatives), skipped


def _with_alternatives(items: list[_Item], n: int) -> list[_Item]:
    """Each item's prompt with the terms of the next ``n`` items of its token shape (cyclically) in place of
    its own term: alternative inputs with the same tokens around the span."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(shape_key(item.prep), []).append(i)
    out = list(items)
    for idx in groups.values():
        for j, i in enumerate(idx):
            s, e = items[i].prep.span
            others = [items[idx[(j + d) % len(idx)]] for d in range(1, min(n, len(idx) - 1) + 1)]
            alt = items[i].prep.tokens.repeat(len(others), 1)
            for row, other in enumerate(others):
                alt[row, s:e] = other.prep.tokens[0, s:e]
            out[i] = replace(items[i], prep=replace(items[i].prep, alt_tokens=alt),
                             alternatives=tuple(o.card.term for o in others))
    return out


def _batches(items: Sequence[_Item], size: int) -> list[list[int]]:
    """Item indices in batches of at most ``size`` prompts of one shape (a stable plan: the checkpoint
    chunks are named by their place in it)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(shape_key(item.prep), []).append(i)
    return [idx[j:j + size] for _, idx in sorted(groups.items()) for j in range(0, len(idx), size)]


def _batch_scores(model: Any, batch: Sequence[_Item], sh: _Shared, lens: LogitLens, config: HumanConfig
                  ) -> dict[str, Any]:
    """A batch of cards of one shape scored together (:mod:`.batched`): ``scores [card, 1 + K,
    len(SCORES)]``, ``profile [card, layer]``, the pool's attributions ``attr [card, pool]`` and ``rows``."""
    runner = BatchRunner(model, [it.prep for it in batch])
    pool_attr = runner.attribution(sh.unit, sh.absent).sum(-1)  # [card, pool]
    vectors = sh.vectors[torch.stack([it.slots for it in batch])]  # [card, slot, layer, d]
    if config.remove_output_direction:
        q = torch.stack([output_directions(runner.stack, t, vectors.dtype) for t in runner.targets])  # [card, out, d]
        vectors = vectors - torch.einsum("bcld,bod,boe->bcle", vectors, q, q)
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    absent = torch.einsum("bcld,ld->bcl", unit, sh.baseline)
    with torch.no_grad():
        causal = runner.ablation(unit, absent, batch_size=config.batch_size)  # [card, slot]
    attr = runner.attribution(unit, absent)  # [card, slot, layer]
    term_effect = runner.total_effect(batch_size=config.batch_size)
    last = runner.span[1] - 1
    scores, rows = [], []
    for b, it in enumerate(batch):
        ranks = readout_ranks(lens, runner.states[:, b, last:last + 1], sh.first_ids[it.slots])
        sim = torch.nn.functional.cosine_similarity((runner.states[:, b, last] - sh.baseline)[None], vectors[b], dim=-1)
        string = torch.tensor([similarity(it.card.term, n) for n in it.names])
        scores.append(torch.stack([causal[b], attr[b].sum(-1), sim.amax(1), -ranks.amin(1), string], dim=1))
        c = causal[b]
        rows.append({"term": it.card.term, "keyword": it.card.primary.text, "link": it.card.primary.link.value,
                     "rule": it.card.primary.rule, "line": it.card.line, "mnemonic": it.card.mnemonic,
                     "definition": it.definition.strip(), "definition_logprob": float(runner.clean[b]),
                     "term_effect": float(term_effect[b]), "alternatives": list(it.alternatives),
                     "keyword_effect": float(c[0]), "controls": [n.strip() for n in it.names[1:]],
                     "control_effect_median": float(c[1:].median()), "keyword_rank": int((c[1:] > c[0]).sum())})
    profile = attr[:, 0] - attr[:, 1:].median(1).values
    return {"scores": torch.stack(scores).detach(), "profile": profile.detach(), "attr": pool_attr.detach(),
            "rows": rows}


class _LazyBatch:
    """A batch's scores, computed on first use: only when one of its cards is not checkpointed yet. A
    resumed run recomputes the same batch, so every card's numbers are bitwise those of a fresh run."""

    def __init__(self, model: Any, items: Sequence[_Item], sh: _Shared, lens: LogitLens, config: HumanConfig):
        self.args, self.done = (model, items, sh, lens, config), None

    def get(self) -> dict[str, Any]:
        if self.done is None:
            self.done = _batch_scores(*self.args)
        return self.done


def _card_scores(batch: _LazyBatch, k: int) -> dict[str, Tensor]:
    """The checkpoint chunk of card ``k`` of a batch: its scores, profile, pool attributions and row (JSON)."""
    done = batch.get()
    return {"scores": done["scores"][k], "profile": done["profile"][k], "attr": done["attr"][k],
            "row": json_tensor(done["rows"][k])}


def _own_concepts(rows: list[dict[str, Any]], attr: Tensor, sh: _Shared, config: HumanConfig) -> None:
    """Add each row's top pool concepts by attribution z-score across cards (never the term itself)."""
    z = (attr - attr.mean(0)) / attr.std(0).clamp_min(1e-6)  # [card, pool]
    for row, zc, ac in zip(rows, z, attr):
        term = letters(row["term"])
        allowed = torch.tensor([not (letters(c.text) in term or term in letters(c.text)) for c in sh.concepts])
        best = zc.masked_fill(~allowed, float("-inf")).topk(config.own_top).indices
        row["own"] = [{"concept": sh.concepts[int(i)].text.strip(), "z": float(zc[i]), "attribution": float(ac[i]),
                       "source": sh.concepts[int(i)].source.value} for i in best]
        kw = sh.index[" " + row["keyword"]]
        row["keyword_attribution_z"] = float(zc[kw])


def compare_human(model: Any, cards: Sequence[Card], *, config: HumanConfig = HumanConfig(),
                  progress: bool = True, checkpoint_dir: str | os.PathLike | None = None) -> HumanComparison:
    """Score every card's human keyword against its controls and find the model's own concepts.

    ``checkpoint_dir``: checkpoint each finished card there (step 4, the expensive one); the same call
    resumes from them (keyed by the model, cards, config and the pool's directions).
    """
    t0 = time.perf_counter()
    kept, skipped = _usable(cards, config)
    keywords = [" " + c.primary.text for c in kept]
    concepts = _pool_concepts(model, keywords, config.own_vocabulary)
    with torch.no_grad():
        pool = control_pool(model, keywords)
        dirs = concept_directions(model, concepts, prefixes=config.prefixes, baseline_words=None,
                                  batch_size=config.batch_size)
        first_ids = torch.tensor([text_tokens(model, c.text)[0] for c in concepts])
    t_prep = time.perf_counter() - t0
    sh = _Shared.build(concepts, dirs.vectors, dirs.baseline, first_ids, pool)
    lens = LogitLens(model)
    cfg = {**asdict(config), "n_pool": len(concepts)}
    store = open_store(checkpoint_dir, build_manifest(model, [c.term for c in kept], cfg, seed=config.seed),
                       inputs={"cards": kept, "vectors": dirs.vectors, "baseline": dirs.baseline})
    items, skipped_controls = _plan(model, kept, sh, config)
    skipped += skipped_controls
    found: dict[int, dict[str, Tensor]] = {}
    with tqdm(total=len(items), desc="cards", disable=not progress) as bar:
        for idx in _batches(items, config.cards_per_batch):
            batch = _LazyBatch(model, [items[i] for i in idx], sh, lens, config)
            for k, i in enumerate(idx):  # a chunk per card (named by its place in the plan)
                found[i] = store.get_or_compute(f"card{i:05d}", lambda batch=batch, k=k: _card_scores(batch, k))
                bar.update(1)
    if not found:
        raise EmptyDatasetError(f"no card could be scored; skipped: {skipped_text(skipped) or 'none'}. Fix those "
                                "cards or use more cards.")
    order = sorted(found)  # the cards' order
    rows = [tensor_json(found[i]["row"]) for i in order]
    _own_concepts(rows, torch.stack([found[i]["attr"] for i in order]), sh, config)
    timings = {"prepare": t_prep, "total": time.perf_counter() - t0}
    manifest = build_manifest(model, [r["term"] for r in rows], cfg, seed=config.seed, timings=timings)
    return HumanComparison(scores=torch.stack([found[i]["scores"] for i in order]), rows=tuple(rows),
                           profile=torch.stack([found[i]["profile"] for i in order]),
                           skipped=tuple(skipped), config=cfg, manifest={**manifest, **store.manifest_entry()})


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


def card_route_report(model: Any, card: Card, *, concepts: Sequence[str] = (), pool: Any = None,
                      config: Any = None, template: str = HumanConfig.template, definition_tokens: int = 6,
                      alternatives: Sequence[str] = (), progress: bool = False) -> Any:
    """A :class:`~recallscope.routes.report.RouteReport` for one card: its keyword (plus ``concepts``) as
    routes from the term to its definition, scored layer by layer (the worked examples of the README).
    ``alternatives``: other terms with the same token count (:func:`term_alternatives`) for the total
    effect; empty = random vocabulary tokens."""
    from recallscope.routes.analysis import route_report
    from recallscope.routes.report import RouteConfig

    if card.primary is None:
        raise ConfigError(f"card {card.term!r} (line {card.line}) has no keyword to test.")
    prompt = template.format(term=card.term)
    query = RouteQuery((prompt,), card.term, " " + clean_definition(card.definition), tuple(alternatives),
                       name=card.term)
    cands = [" " + card.primary.text] + [" " + c.strip() for c in concepts if c.strip() != card.primary.text]
    cfg = config or RouteConfig(n_controls=19, stride=3, max_output_tokens=definition_tokens, mediation=False)
    return route_report(model, query, cands, pool=pool, config=cfg, progress=progress)
