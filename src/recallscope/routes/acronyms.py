"""Acronym routes: does recalling an acronym's expansion ("VAT" -> " Value") pass through the concept the
expansion names ("tax"), and does a base64-like chunk ("VA" in "VA==") evoke the acronyms it begins?

1. :func:`known_acronyms`: lexicon acronyms whose expansion's first word (either case) is among the
   model's top-``k`` continuations of "The acronym X stands for"; the better-cased variant becomes the
   output (SmolLM2 says " Value" for VAT).
2. :func:`acronym_query`: prompts ``ACRONYM_TEMPLATES`` with the acronym as input, that output, and the
   candidate concepts: the full expansion, each of its content words, and the model's own continuation.
3. :func:`chunk_query`: the chunk inside base64 few-shot prompts (``CHUNK_TEMPLATES``), output = the
   decoded character, candidates = the lexicon acronyms and expansions the chunk begins.
4. :func:`acronym_routes` runs :func:`~recallscope.routes.route_report` on each and collects verdicts
   (the three templates are expanded to ``RouteConfig.n_templates``; the output's own casings, the
   acronym itself, the output's neighbours and matched random directions compete with every candidate,
   so an expansion word equal to the output, e.g. "value" for " Value", is reported as a competitor).
"""

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from recallscope.models.forward import run
from recallscope.models.selfcheck import checked_stack
from recallscope.routes.concepts import Concept, ConceptSource, lexicon_candidates, load_acronym_lexicon
from recallscope.routes.report import RouteConfig, RouteReport
from recallscope.routes.scores import RouteQuery
from recallscope.tasks.b64_codec import decode_text

ACRONYM_TEMPLATES: tuple[str, ...] = ("The acronym {} stands for", "In full, {} stands for", "The letters {} stand for")
"""Prompts asking for an acronym's expansion."""

CHUNK_TEMPLATES: tuple[str, ...] = ("Base64 decode: SGk= -> Hi, b2s= -> ok, {}== ->",
                                    "Decode base64.\nSGk= : Hi\nb2s= : ok\n{}== :")
"""Few-shot base64 prompts ending in a one-character encoding whose first two characters are the chunk."""

STOPWORDS = frozenset("a an and at by for from in of on or the to with".split())


@dataclass(frozen=True)
class KnownAcronym:
    """An acronym the model expands: its expansion, the output text it gives and its rank."""

    acronym: str
    expansion: str
    output: str
    rank: int


def _next_logits(model: Any, prompt: str) -> torch.Tensor:
    tokens = model.to_tokens(prompt, truncate=False)
    with torch.no_grad():
        logits, _ = run(checked_stack(model, "the acronym check"), tokens, read_pos=torch.tensor([tokens.shape[1] - 1]))
    return logits[0, -1]


def known_acronyms(model: Any, lexicon: dict[str, tuple[str, ...]] | None = None, *, k: int = 3,
                   min_letters: int = 3) -> list[KnownAcronym]:
    """Acronyms (at least ``min_letters`` long) whose expansion's first word the model ranks in its top ``k``."""
    lexicon = load_acronym_lexicon() if lexicon is None else lexicon
    out = []
    for acronym, expansions in lexicon.items():
        if len(acronym) < min_letters:
            continue
        logits = _next_logits(model, ACRONYM_TEMPLATES[0].format(acronym))
        for expansion in expansions:
            first = expansion.split()[0]
            best = None
            for variant in {" " + first, " " + first[:1].upper() + first[1:], " " + first.lower()}:
                tid = model.tokenizer.encode(variant, add_special_tokens=False)[0]
                rank = int((logits > logits[tid]).sum())
                if best is None or rank < best[1]:
                    best = (variant, rank)
            if best[1] < k:
                out.append(KnownAcronym(acronym, expansion, best[0], best[1]))
                break
    return out


def acronym_query(known: KnownAcronym) -> tuple[RouteQuery, list[Concept]]:
    """The query (acronym -> first expansion word) and its candidates (expansion, its content words)."""
    query = RouteQuery(tuple(t.format(known.acronym) for t in ACRONYM_TEMPLATES), " " + known.acronym,
                       known.output, name=f"{known.acronym} -> {known.output.strip()}")
    words = [w for w in known.expansion.split() if w.lower() not in STOPWORDS]
    concepts = [Concept(" " + known.expansion, ConceptSource.LEXICON, label=f"{known.expansion} (full expansion)")]
    concepts += [Concept(" " + w.lower(), ConceptSource.LEXICON, label=f"{w.lower()} (expansion word)")
                 for w in dict.fromkeys(words)]
    return query, concepts


def chunk_query(chunk: str, lexicon: dict[str, tuple[str, ...]] | None = None) -> tuple[RouteQuery, list[Concept]]:
    """The chunk (e.g. "VA") in base64 prompts decoding ``chunk + "=="`` (output: the character, "T"),
    with the acronyms it begins and their expansions as candidates."""
    lexicon = load_acronym_lexicon() if lexicon is None else lexicon
    char = decode_text(chunk + "==")
    query = RouteQuery(tuple(t.format(chunk) for t in CHUNK_TEMPLATES), chunk, " " + char,
                       name=f"{chunk}== -> {char}")
    return query, lexicon_candidates(chunk, lexicon)


def acronym_routes(model: Any, items: Sequence[tuple[RouteQuery, list[Concept]]], *,
                   config: RouteConfig = RouteConfig(stride=3), pool: Any = None,
                   progress: bool = True, checkpoint_dir: str | os.PathLike | None = None) -> list[RouteReport]:
    """A :class:`~recallscope.routes.report.RouteReport` per (query, candidates); ``checkpoint_dir``:
    checkpoint every finished prompt of every query there, so a rerun resumes (see :func:`route_report`)."""
    from recallscope.routes.analysis import route_report

    return [route_report(model, q, c, config=config, pool=pool, progress=progress, checkpoint_dir=checkpoint_dir)
            for q, c in items]
