"""Steps 2-6 of :func:`~recallscope.routes.human.compare_human`: the pool, the matched controls and the
per-card scores (see that module's doc for the algorithm). ``config`` is a
:class:`~recallscope.routes.human.HumanConfig` throughout."""

import random
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import Tensor

from recallscope.errors import EmptyDatasetError
from recallscope.lens.base import LogitLens
from recallscope.routes.batched import BatchRunner, shape_key
from recallscope.routes.concepts import Concept, ConceptSource, word_vocabulary
from recallscope.routes.controls import ControlPool
from recallscope.routes.human_causal import alternative_runs, card_interchange, edit_norms
from recallscope.routes.human_match import balance, clean_definition, match_card_controls
from recallscope.routes.mnemonics import Card
from recallscope.routes.scores import PreparedPrompt, RouteQuery, output_directions, prepare_prompt, readout_ranks
from recallscope.routes.text import letters, similarity
from recallscope.store import json_tensor


def pool_concepts(model: Any, keywords: Sequence[str], n_vocab: int, terms: Sequence[str] = (),
                  n_neighbours: int = 0) -> list[Concept]:
    """The cards' keywords, then every ``len/n_vocab``-th whole-word vocabulary token, then each term's
    ``n_neighbours`` most string-similar vocabulary words (:func:`~recallscope.routes.human_match.term_neighbours`)."""
    from recallscope.routes.human_match import term_neighbours

    words = word_vocabulary(model)
    step = max(1, len(words) // max(n_vocab, 1))
    vocab = [w for _, w in words[::step]][:n_vocab] if n_vocab else []
    near = term_neighbours([w for _, w in words], terms, k=n_neighbours) if n_neighbours else {}
    texts = list(dict.fromkeys(list(keywords) + vocab + [w for t in terms for w in near.get(t, [])]))
    n_kw = len(set(keywords))
    return [Concept(text=t, source=ConceptSource.HUMAN if i < n_kw else ConceptSource.VOCABULARY)
            for i, t in enumerate(texts)]


@dataclass
class Shared:
    """What every card's scoring reads: the pool's directions, ids, token counts, frequencies and
    relatedness to every card's definition (``related [concept, card]``)."""

    concepts: list[Concept]
    index: dict[str, int]
    vectors: Tensor
    baseline: Tensor
    first_ids: Tensor
    unit: Tensor
    absent: Tensor
    n_tokens: Tensor
    logfreq: Tensor
    related: Tensor
    scale: tuple[float, float, float]

    @classmethod
    def build(cls, concepts: list[Concept], vectors: Tensor, baseline: Tensor, first_ids: Tensor, pool: ControlPool,
              related: Tensor, terms: Sequence[str], seed: int) -> "Shared":
        unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        at = {t: i for i, t in enumerate(pool.texts)}
        where = [at.get(c.text if c.text.startswith(" ") else " " + c.text, -1) for c in concepts]
        n_tokens = torch.tensor([int(pool.n_tokens[i]) if i >= 0 else -99 for i in where])
        logfreq = torch.tensor([float(pool.logfreq[i]) if i >= 0 else float("nan") for i in where])
        rng = random.Random(seed)
        pairs = [(rng.choice(list(terms)), rng.choice(concepts).text) for _ in range(500)]
        string_sd = float(torch.tensor([similarity(t, c) for t, c in pairs]).std())
        scale = (float(logfreq.nan_to_num(0).std()), float(related.std()), string_sd)
        return cls(concepts, {c.text: i for i, c in enumerate(concepts)}, vectors, baseline, first_ids, unit,
                   torch.einsum("cld,ld->cl", unit, baseline), n_tokens, logfreq.nan_to_num(-1e9), related,
                   tuple(max(s, 1e-6) for s in scale))


@dataclass(frozen=True)
class Item:
    """One card ready to score: the pool slots of its keyword (first) and controls, and its prompt."""

    card: Card
    column: int
    slots: Tensor
    names: tuple[str, ...]
    prep: PreparedPrompt
    definition: str
    alternatives: tuple[str, ...] = ()


def plan(model: Any, kept: Sequence[Card], sh: Shared, config: Any) -> tuple[list[Item], list[dict[str, Any]]]:
    """Matched controls and the prepared prompt of every card; cards with too few controls or without an
    alternative term of their token shape are skipped."""
    items, skipped = [], []
    texts = [c.text for c in sh.concepts]
    for column, card in enumerate(kept):
        keyword = " " + card.primary.text
        definition = " " + clean_definition(card.definition)
        try:
            chosen = match_card_controls(sh.index[keyword], card.term, definition, texts, sh.n_tokens, sh.logfreq,
                                         sh.related[:, column], k=config.n_controls, scale=sh.scale)
        except EmptyDatasetError as exc:  # too few controls with this token count
            skipped.append({"term": card.term, "line": card.line, "reason": str(exc)})
            continue
        names = (keyword, *(texts[i] for i in chosen))
        prompt = config.template.format(term=card.term)
        prep = prepare_prompt(model, prompt, RouteQuery((prompt,), card.term, definition),
                              max_output_tokens=config.definition_tokens, n_alternatives=0, seed=config.seed)
        items.append(Item(card, column, torch.tensor([sh.index[n] for n in names]), names, prep, definition))
    return _with_alternatives(model, items, config.n_alternatives, config.seed), skipped


def _with_alternatives(model: Any, items: list[Item], n: int, seed: int) -> list[Item]:
    """Each item's prompt with the terms of the next ``n`` items of its token shape (cyclically) in place of
    its own term: alternative inputs with the same tokens around the span. A card alone in its shape gets
    ``n`` random whole-word tokens at the term's positions instead (its row lists no alternative terms)."""
    from recallscope.routes.scores import _random_alternatives

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(shape_key(item.prep), []).append(i)
    out = list(items)
    for idx in groups.values():
        if len(idx) == 1:
            prep = items[idx[0]].prep
            tail = prep.tokens[0, prep.tokens.shape[1] - len(prep.targets) + 1:]
            ids = prep.tokens[0, : prep.tokens.shape[1] - len(prep.targets) + 1].tolist()
            alts = [torch.cat([torch.tensor(a), tail]) for a in _random_alternatives(model, ids, prep.span, n, seed)]
            out[idx[0]] = replace(items[idx[0]], prep=replace(prep, alt_tokens=torch.stack(alts)))
            continue
        for j, i in enumerate(idx):
            s, e = items[i].prep.span
            others = [items[idx[(j + d) % len(idx)]] for d in range(1, min(n, len(idx) - 1) + 1)]
            alt = items[i].prep.tokens.repeat(len(others), 1)
            for row, other in enumerate(others):
                alt[row, s:e] = other.prep.tokens[0, s:e]
            out[i] = replace(items[i], prep=replace(items[i].prep, alt_tokens=alt),
                             alternatives=tuple(o.card.term for o in others))
    return out


def batches(items: Sequence[Item], size: int) -> list[list[int]]:
    """Item indices in batches of at most ``size`` prompts of one shape (a stable plan: the checkpoint
    chunks are named by their place in it)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(shape_key(item.prep), []).append(i)
    return [idx[j:j + size] for _, idx in sorted(groups.items()) for j in range(0, len(idx), size)]


def batch_scores(model: Any, batch: Sequence[Item], sh: Shared, lens: LogitLens, config: Any) -> dict[str, Any]:
    """A batch of cards of one shape scored together (:mod:`.batched`, :mod:`.human_causal`): ``scores
    [card, 1 + K, score]``, ``covariates [card, 1 + K, covariate]``, ``profile [card, layer]``, the pool's
    attributions ``attr [card, pool]`` and ``rows``."""
    runner = BatchRunner(model, [it.prep for it in batch])
    n_layers = runner.stack.n_layers
    pool_attr = runner.attribution(sh.unit, sh.absent).sum(-1)  # [card, pool]
    vectors = sh.vectors[torch.stack([it.slots for it in batch])]  # [card, slot, layer, d]
    if config.remove_output_direction:
        q = torch.stack([output_directions(runner.stack, t, vectors.dtype) for t in runner.targets])  # [card, out, d]
        vectors = vectors - torch.einsum("bcld,bod,boe->bcle", vectors, q, q)
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    absent = torch.einsum("bcld,ld->bcl", unit, sh.baseline)
    alt_span, term_effect = alternative_runs(runner, config.interchange_alternatives, batch_size=config.batch_size)
    causal = card_interchange(runner, alt_span, unit, batch_size=config.batch_size).nanmean(-1)  # [card, slot]
    norms = edit_norms(runner, alt_span, unit).nanmean(-1)
    attr = runner.attribution(unit, absent)  # [card, slot, layer]
    last = runner.span[1] - 1
    scores, covariates, rows = [], [], []
    for b, it in enumerate(batch):
        ranks = readout_ranks(lens, runner.states[:, b, last:last + 1], sh.first_ids[it.slots])
        sim = torch.nn.functional.cosine_similarity((runner.states[:, b, last] - sh.baseline)[None], vectors[b], dim=-1)
        string = torch.tensor([similarity(it.card.term, n) for n in it.names])
        scores.append(torch.stack([causal[b], attr[b].sum(-1), sim.amax(1), -ranks.amin(1), string], dim=1))
        covariates.append(torch.stack([sh.related[it.slots, it.column], sim[:, :n_layers].abs().mean(1), norms[b]], 1))
        c = causal[b]
        rows.append({"term": it.card.term, "keyword": it.card.primary.text, "link": it.card.primary.link.value,
                     "rule": it.card.primary.rule, "line": it.card.line, "mnemonic": it.card.mnemonic,
                     "definition": it.definition.strip(), "definition_logprob": float(runner.clean[b]),
                     "term_effect": float(term_effect[b]), "alternatives": list(it.alternatives),
                     "keyword_effect": float(c[0]), "controls": [n.strip() for n in it.names[1:]],
                     "control_effect_median": float(c[1:].median()), "keyword_rank": int((c[1:] > c[0]).sum()),
                     "keyword_relatedness": float(covariates[-1][0, 0]), "keyword_string": float(string[0])})
    profile = attr[:, 0] - attr[:, 1:].median(1).values
    return {"scores": torch.stack(scores).detach(), "covariates": torch.stack(covariates).detach(),
            "profile": profile.detach(), "attr": pool_attr.detach(), "rows": rows}


class LazyBatch:
    """A batch's scores, computed on first use: only when one of its cards is not checkpointed yet. A
    resumed run recomputes the same batch, so every card's numbers are bitwise those of a fresh run."""

    def __init__(self, model: Any, items: Sequence[Item], sh: Shared, lens: LogitLens, config: Any):
        self.args = (model, items, sh, lens, config)
        self.done: dict[str, Any] | None = None

    def get(self) -> dict[str, Any]:
        if self.done is None:
            self.done = batch_scores(*self.args)
        return self.done


def card_scores(batch: LazyBatch, k: int) -> dict[str, Tensor]:
    """The checkpoint chunk of card ``k`` of a batch: scores, covariates, profile, pool attributions, row."""
    done = batch.get()
    return {"scores": done["scores"][k], "covariates": done["covariates"][k], "profile": done["profile"][k],
            "attr": done["attr"][k], "row": json_tensor(done["rows"][k])}


def own_concepts(rows: list[dict[str, Any]], attr: Tensor, sh: Shared, config: Any) -> None:
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


def matching_balance(scores: Tensor, covariates: Tensor, rows: Sequence[dict[str, Any]], sh: Shared,
                     columns: Sequence[int], seed: int) -> dict[str, Any]:
    """Standardised keyword - control differences of (log-frequency, relatedness, string similarity) after
    matching, and before it (against 20 random pool texts per card with any token count)."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.stack([torch.tensor([sh.index[" " + r["keyword"]]] + [sh.index[" " + c] for c in r["controls"]])
                         for r in rows])  # [card, cand]
    string = scores[..., 4]
    after = torch.stack([sh.logfreq[slots], covariates[..., 0], string], dim=-1)  # [card, cand, 3]
    rand = torch.randint(len(sh.concepts), (len(rows), 20), generator=gen)
    cols = torch.tensor(list(columns))
    before = torch.stack([sh.logfreq[rand], sh.related[rand, cols[:, None]],
                          torch.tensor([[similarity(r["term"], sh.concepts[int(j)].text) for j in rr]
                                        for r, rr in zip(rows, rand)])], dim=-1)
    names = ("logfreq", "relatedness", "string")
    smd_after = balance(after[:, 0], after[:, 1:])
    smd_before = balance(after[:, 0], before)
    return {"standardised_mean_difference": {n: {"matched": float(a), "unmatched": float(b)}
                                             for n, a, b in zip(names, smd_after, smd_before)},
            "keyword_mean": {n: float(v) for n, v in zip(names, after[:, 0].mean(0))},
            "control_mean": {n: float(v) for n, v in zip(names, after[:, 1:].flatten(0, 1).mean(0))}}
