"""Matched controls for the human-mnemonic comparison, and the keyword-definition overlap filter.

A human keyword can beat controls for reasons that are not a route: it is a gloss of the definition
("approbation": "approval", defined as "approval or praise"), it is related to the definition in the
model's own representation space, or it spells like the term. This module removes the first and
matches controls on the other two.

1. **Overlap filter** (:func:`definition_overlap`): content words (stop words removed) of the keyword
   against those of the definition's first clause (:func:`~recallscope.routes.human.clean_definition`);
   two words match when they are equal or share a prefix of at least ``max(4, shorter - 3)`` letters
   ("approval" / "approve"). Cards whose keyword overlaps are dropped; controls that overlap the card's
   definition are never chosen.
2. **Relatedness** (:func:`definition_vectors`, :func:`relatedness`): a definition is represented by the
   mean hidden state over its first clause's tokens (no prefix), centred on the mean over all
   definitions; a keyword by its concept direction (:mod:`.directions`, centred on the pool's mean).
   Relatedness = the cosine of the two, averaged over layers ``1..n_layers`` (the embedding layer left out).
3. **Matching** (:func:`match_card_controls`): the pool holds, besides the cards' keywords and a vocabulary
   sample, each term's ``k`` most string-similar vocabulary words (:func:`term_neighbours`), so that a
   sound-alike keyword can meet controls that resemble the term as much. Among pool texts with the keyword's token count (relaxed to
   +-1, +-2 only when too few) that share no word with the keyword or the term and do not overlap the
   definition, the ``k`` nearest to the keyword in standardised (log-frequency, relatedness to this
   card's definition, string similarity to this card's term) space. String similarity
   (:func:`~recallscope.routes.text.similarity`) is computed for the ``prefilter`` nearest on the first
   two only (it is Python-speed).
4. **Balance** (:func:`balance`): per covariate, the standardised mean difference between keywords and
   their controls (0 = balanced); reported before (against the unmatched pool) and after matching.

Rosenbaum & Rubin (1985) for matching on covariates and standardised differences.
"""

import re
from functools import lru_cache
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.errors import EmptyDatasetError
from recallscope.routes.directions import context_tokens, pad_batch
from recallscope.routes.text import letters, similarity

STOP_WORDS = frozenset("""a an the of to in on at by for from with without into onto upon about as and or
    but nor not no so than then that this these those it its be is are was were been being am do does did
    have has had having one ones someone something somebody anything anyone thing things some any all
    each every very more most less least much many such who whom whose which what when where why how
    he she they them their his her him we us our you your i me my oneself itself themselves
    make makes made cause causes give gives get gets become becomes state quality act way kind sort
    person people often especially usually typically etc""".split())
"""Words that do not count as shared content between a keyword and a definition."""


def clean_definition(text: str) -> str:
    """The first clause of a definition, without a leading "(of ...)" or "1." (what the model should say)."""
    text = re.sub(r"^\s*(?:\d+[.)]\s*)?(?:\([^)]*\)\s*)?", "", text.strip())
    return re.split(r"[.;]|\s\d+[.)]\s", text)[0].strip()


@lru_cache(maxsize=65536)
def content_words(text: str) -> tuple[str, ...]:
    """Lowercase alphabetic words of ``text`` that are not :data:`STOP_WORDS` (at least 2 letters)."""
    return tuple(w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 2 and w not in STOP_WORDS)


def _same_word(a: str, b: str) -> bool:
    if a == b:
        return True
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n >= max(4, min(len(a), len(b)) - 3)


def definition_overlap(keyword: str, definition: str) -> list[str]:
    """Content words of ``keyword`` that also occur (or share a stem) in ``definition``."""
    dwords = content_words(definition)
    return [k for k in content_words(keyword) if any(_same_word(k, d) for d in dwords)]


def definition_vectors(model: Any, definitions: Sequence[str], *, max_tokens: int = 16, batch_size: int = 64
                       ) -> Float[Tensor, "definition layer d_model"]:
    """Mean hidden state over each definition's first ``max_tokens`` tokens (BOS left out), every layer,
    centred on the mean over ``definitions``."""
    from recallscope.lens.base import hidden_states
    from recallscope.models.selfcheck import checked_stack

    stack = checked_stack(model, "keyword-definition relatedness")
    head = context_tokens(model, "", "")
    seqs = [context_tokens(model, "", " " + d.strip())[: len(head) + max_tokens] for d in definitions]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            tokens, last = pad_batch(seqs[i:i + batch_size], pad)
            states = hidden_states(stack, tokens)  # [layer, batch, pos, d]
            pos = torch.arange(tokens.shape[1])
            keep = ((pos[None] >= len(head)) & (pos[None] <= last[:, None])).to(states.dtype)  # [batch, pos]
            mean = torch.einsum("lbpd,bp->bld", states, keep) / keep.sum(1).clamp_min(1)[:, None, None]
            out.append(mean)
    vectors = torch.cat(out)
    return vectors - vectors.mean(0, keepdim=True)


def relatedness(concepts: Float[Tensor, "concept layer d_model"], definitions: Float[Tensor, "card layer d_model"]
                ) -> Float[Tensor, "concept card"]:
    """Cosine of every concept vector with every definition vector, averaged over layers ``1..``."""
    a = torch.nn.functional.normalize(concepts[:, 1:].float(), dim=-1)
    b = torch.nn.functional.normalize(definitions[:, 1:].float(), dim=-1)
    return torch.einsum("cld,kld->ck", a, b) / a.shape[1]


def _trigrams(text: str) -> set[str]:
    x = letters(text)
    return {x[i:i + 3] for i in range(len(x) - 2)}


def term_neighbours(words: Sequence[str], terms: Sequence[str], *, k: int = 8, max_candidates: int = 150
                    ) -> dict[str, list[str]]:
    """Per term, the ``k`` words most similar to it in letters and sound (:func:`~recallscope.routes.text.
    similarity`), among the ``max_candidates`` sharing most letter trigrams with it; never the term, an
    inflection of it, or a word it contains, one casing per word (string-similar controls for sound-alike
    keywords)."""
    index: dict[str, list[int]] = {}
    for i, w in enumerate(words):
        for g in _trigrams(w):
            index.setdefault(g, []).append(i)
    out: dict[str, list[str]] = {}
    for term in terms:
        t = letters(term)
        hits: dict[int, int] = {}
        for g in _trigrams(term):
            for i in index.get(g, ()):
                hits[i] = hits.get(i, 0) + 1
        top = sorted(hits, key=lambda i: -hits[i])[:max_candidates]
        ok = [i for i in top if len(letters(words[i])) >= 3 and not (letters(words[i]) in t or t in letters(words[i])
                                                                       or letters(words[i])[:5] == t[:5])]
        ok.sort(key=lambda i: -similarity(term, words[i]))
        firsts: dict[str, int] = {}
        for i in ok:
            firsts.setdefault(letters(words[i]), i)
        out[term] = [words[i] for i in firsts.values()][:k]
    return out


@lru_cache(maxsize=65536)
def _word_set(text: str) -> frozenset[str]:
    return frozenset(letters(w) for w in text.split() if letters(w))


def _shares_word(a: str, b: str) -> bool:
    return bool(_word_set(a) & _word_set(b)) or letters(a) == letters(b)


def match_card_controls(keyword: int, term: str, definition: str, texts: Sequence[str],
                        n_tokens: Tensor, logfreq: Tensor, related: Float[Tensor, " concept"], *, k: int,
                        scale: tuple[float, float, float], prefilter: int = 60) -> list[int]:
    """Indices (into ``texts``) of the ``k`` controls of one card's keyword (see the module doc).

    Args:
        keyword: index of the keyword in ``texts``.
        n_tokens, logfreq, related: per text: token count, model log-frequency, relatedness to this card's
            definition.
        scale: standard deviations of (log-frequency, relatedness, string similarity) for the distance.
    """
    kw = texts[keyword]
    ok = torch.tensor([i != keyword and not _shares_word(t, kw) and not _shares_word(t, term)
                       and not definition_overlap(t, definition) for i, t in enumerate(texts)])
    target = (float(logfreq[keyword]), float(related[keyword]), similarity(term, kw))
    for slack in (0, 1, 2):
        same = ok & ((n_tokens - n_tokens[keyword]).abs() <= slack)
        if int(same.sum()) >= k or slack == 2:
            break
    if int(same.sum()) < k:
        raise EmptyDatasetError(f"only {int(same.sum())} controls within 2 tokens of {kw!r} are in the pool; need "
                                f"{k}. Use a larger pool (own_vocabulary) or a smaller n_controls.")
    d2 = ((logfreq - target[0]) / scale[0]) ** 2 + ((related - target[1]) / scale[1]) ** 2
    d2 = d2.masked_fill(~same, float("inf"))
    near = d2.argsort()[: max(prefilter, k)]
    near = near[torch.isfinite(d2[near])]
    string = torch.tensor([similarity(term, texts[int(i)]) for i in near])
    full = d2[near] + ((string - target[2]) / scale[2]) ** 2
    return [int(near[j]) for j in full.argsort(stable=True)[:k]]


def balance(keyword: Float[Tensor, "card covariate"], controls: Float[Tensor, "card control covariate"]
            ) -> Float[Tensor, " covariate"]:
    """Standardised mean difference per covariate: (mean keyword - mean control) / pooled SD."""
    c = controls.flatten(0, 1)
    sd = ((keyword.var(0) + c.var(0)) / 2).sqrt().clamp_min(1e-12)
    return (keyword.mean(0) - c.mean(0)) / sd
