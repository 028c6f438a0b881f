"""Entity facts for a like-for-like ROME comparison: multi-token subjects, ROME's noise level.

ROME's causal trace (Meng et al. 2022) is run on facts about entities (people, landmarks, companies,
products) whose subjects span several tokens, with noise of 3 x the standard deviation of the
subject-token embeddings over its corpus of subjects. This module supplies the pieces:

1. **Facts**: :func:`load_entity_facts` reads ``recallscope/data/entity_facts.jsonl`` (relations in
   :data:`ENTITY_TEMPLATES`, written for recallscope) and, by default, adds the built-in set's entity
   relations; the lexical relations in :data:`LEXICAL_RELATIONS` (word -> word mappings: opposites,
   chemical symbols, acronyms) are never included.
2. **Subject length**: :func:`subject_token_count` counts the subject's tokens in the prompt, in the
   model's own tokenisation; :func:`split_by_subject_length` separates multi- from single-token subjects.
3. **Noise level**: :func:`subject_embedding_std` is the standard deviation of all token-embedding
   entries of the subject tokens (each distinct subject once, tokenised as in its prompt);
   :func:`rome_noise` returns ROME's sigma (3 x that) and the matching ``noise_scale`` for
   :func:`recallscope.patching.causal_trace`, which measures noise in units of the whole embedding
   matrix's standard deviation.
4. **Normalised effects**: :func:`normalized_indirect_effect` divides the mean indirect effect by the
   mean total effect (AIE / ATE, the ratio ROME's averages give), with a bootstrap CI over facts.
"""

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.errors import ConfigError, EmptyDatasetError
from recallscope.results import PatchingResult
from recallscope.stats import bootstrap_indices
from recallscope.tasks.facts import Fact, fact_spans, load_builtin_facts, token_char_bounds

LEXICAL_RELATIONS: frozenset[str] = frozenset({"element_symbol", "acronym", "opposite"})
"""Built-in relations that map words to words rather than entities to attributes; not ROME's kind of fact."""

ENTITY_TEMPLATES: dict[str, str] = {
    "landmark_country": "The {} is located in the country of",
    "city_country": "{} is a city in the country of",
    "person_country": "{} was born in the country of",
    "person_language": "The native language of {} was",
    "person_company": "{} is the founder of",
    "company_headquarters": "{} is headquartered in",
    "product_maker": "The {} is manufactured by",
}
"""Relations of ``entity_facts.jsonl`` and their templates (countries as they are today)."""


def load_entity_facts(*, include_builtin: bool = True) -> list[Fact]:
    """Entity facts: ``entity_facts.jsonl`` plus (``include_builtin``) the built-in non-lexical facts."""
    from importlib.resources import as_file, files

    from recallscope.tasks.loaders import load_facts

    with as_file(files("recallscope") / "data" / "entity_facts.jsonl") as path:
        facts = load_facts(path)
    if include_builtin:
        facts = [f for f in load_builtin_facts() if f.relation not in LEXICAL_RELATIONS] + facts
    return facts


def subject_token_count(model: Any, fact: Fact) -> int:
    """Number of tokens the subject occupies in the fact's prompt (model tokenisation)."""
    start, stop = fact_spans(model, fact)["subject"]
    return stop - start


def split_by_subject_length(model: Any, facts: Sequence[Fact]) -> tuple[list[Fact], list[Fact]]:
    """``(multi, single)``: facts whose subject spans several tokens, and those with a one-token subject."""
    multi, single = list[Fact](), list[Fact]()
    for fact in facts:
        (multi if subject_token_count(model, fact) > 1 else single).append(fact)
    return multi, single


def _embedding_matrix(model: Any) -> Float[Tensor, "vocab d_model"]:
    """The token embeddings as the residual stream receives them (Gemma's sqrt(d_model) scale applied)."""
    from recallscope.models.stack import build_stack, embedding_output_scale

    embed = build_stack(model).embed_tokens
    weight = getattr(embed, "weight", None)
    if weight is None:
        raise ConfigError("cannot find the token-embedding matrix; this model does not expose "
                          "embed_tokens.weight, so the subject-embedding noise level cannot be computed.")
    return weight.detach().float() * embedding_output_scale(embed)


def subject_embedding_std(model: Any, facts: Sequence[Fact]) -> float:
    """Std of every entry of the subject tokens' embeddings, each distinct subject counted once.

    A subject is tokenised as it appears in its (first) prompt: the tokens the causal trace noises.
    """
    if not facts:
        raise EmptyDatasetError("subject_embedding_std got no facts; pass the corpus of subjects.")
    seen: dict[str, list[int]] = {}
    for fact in facts:
        if fact.subject not in seen:
            ids, _ = token_char_bounds(model, fact.prompt)
            start, stop = fact_spans(model, fact)["subject"]
            seen[fact.subject] = ids[start:stop]
    rows = torch.tensor([i for ids in seen.values() for i in ids])
    return float(_embedding_matrix(model)[rows].std())


def rome_noise(model: Any, facts: Sequence[Fact], *, multiple: float = 3.0) -> dict[str, float]:
    """ROME's noise: ``sigma = multiple x subject_embedding_std``, and ``noise_scale`` for causal_trace.

    ``causal_trace(..., noise_scale=out["noise_scale"])`` draws noise with standard deviation ``sigma``
    (it multiplies ``noise_scale`` by the whole embedding matrix's std, returned as ``embedding_std``).
    """
    subject_std = subject_embedding_std(model, facts)
    embedding_std = float(_embedding_matrix(model).std())
    sigma = multiple * subject_std
    return {"sigma": sigma, "subject_embedding_std": subject_std, "embedding_std": embedding_std,
            "multiple": multiple, "noise_scale": sigma / embedding_std}


def normalized_indirect_effect(result: PatchingResult, *, level: float = 0.95, n_boot: int = 2000,
                               seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Mean indirect effect / mean total effect per cell, with a percentile bootstrap CI over prompts.

    The indirect effect is ``values - corrupt`` and the total effect ``clean - corrupt`` (ROME's AIE
    and ATE); facts are resampled together for numerator and denominator. Returns ``(ratio, lo, hi)``
    shaped like the cell axes. Cells a prompt lacks (NaN) are skipped in the mean.
    """
    n = result.n_prompts
    if n == 0:
        raise EmptyDatasetError("normalized_indirect_effect got a result with no prompts.")
    shape = (-1,) + (1,) * len(result.axes)
    ie = (result.values - result.corrupt.reshape(shape)).double()
    te = (result.clean - result.corrupt).double()
    if float(te.mean()) <= 0:
        raise ConfigError(f"the mean total effect is {float(te.mean()):.4g} <= 0: noising the subject does "
                          "not lower p(answer), so effects cannot be normalised by it.")
    ratio = ie.nanmean(0) / te.mean()
    idx = bootstrap_indices(n, n_boot, seed)
    boots = torch.stack([ie[i].nanmean(0) / te[i].mean() for i in idx])  # [n_boot, *cells]
    alpha = (1 - level) / 2
    lo, hi = torch.nanquantile(boots, alpha, dim=0), torch.nanquantile(boots, 1 - alpha, dim=0)
    return ratio.float(), lo.float(), hi.float()
