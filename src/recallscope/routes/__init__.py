"""The mnemonic-route module: does a model recall X -> Y through a concept C (VA -> VAT -> value added tax -> T)?

- Candidates: :func:`candidate_concepts` (vocabulary, acronym lexicon, human mnemonics, the model itself),
  :class:`Concept` (text and/or direction), :func:`load_acronym_lexicon`.
- Controls: :func:`match_controls` (frequency and token count), :func:`default_control_pool`.
- Scores and verdicts: :class:`RouteQuery`, :func:`route_report` -> :class:`RouteReport`
  (``.routes()``, ``.competitor_rows()``, ``.verdict()``, ``.plot()``, ``.save()``), :class:`RouteConfig`
  (every default of the detector; ``RouteConfig.from_toml``), :func:`swap_effect`, :func:`expand_prompts`.
- Competitors: :func:`output_variants`, :func:`output_neighbours`, :func:`matched_random`.
- Human mnemonics: :func:`load_cards`, :func:`extract_keywords`, :class:`LinkType`,
  :func:`compare_human` -> :class:`HumanComparison`, :func:`card_route_report`.
- Acronyms: :func:`known_acronyms`, :func:`acronym_query`, :func:`chunk_query`, :func:`acronym_routes`.
"""

from recallscope.routes.acronyms import acronym_query, acronym_routes, chunk_query, known_acronyms
from recallscope.routes.analysis import route_report, swap_effect
from recallscope.routes.competitors import matched_random, output_neighbours, output_variants
from recallscope.routes.concepts import (
    Concept,
    ConceptSource,
    as_concept,
    candidate_concepts,
    lexicon_candidates,
    load_acronym_lexicon,
    model_candidates,
    vocabulary_candidates,
)
from recallscope.routes.controls import ControlPool, control_pool, default_control_pool, frequency_logprob, match_controls
from recallscope.routes.directions import ConceptDirections, concept_directions, representations
from recallscope.routes.human import HumanComparison, HumanConfig, card_route_report, compare_human
from recallscope.routes.mnemonics import Card, Keyword, LinkType, extract_keywords, load_cards, primary_keyword
from recallscope.routes.config import RouteConfig
from recallscope.routes.family import family_attribute_template, load_family_tsv, route_family_report
from recallscope.routes.family_report import FamilyConfig, RouteFamilyReport
from recallscope.routes.report import ConceptRoute, RouteReport
from recallscope.routes.scores import RouteQuery
from recallscope.routes.templates import expand_prompts

__all__ = [
    "Card",
    "FamilyConfig",
    "RouteFamilyReport",
    "family_attribute_template",
    "load_family_tsv",
    "route_family_report",
    "HumanComparison",
    "HumanConfig",
    "acronym_query",
    "acronym_routes",
    "card_route_report",
    "chunk_query",
    "compare_human",
    "known_acronyms",
    "Concept",
    "ConceptDirections",
    "ConceptRoute",
    "ConceptSource",
    "ControlPool",
    "Keyword",
    "LinkType",
    "RouteConfig",
    "RouteQuery",
    "RouteReport",
    "as_concept",
    "candidate_concepts",
    "concept_directions",
    "control_pool",
    "default_control_pool",
    "expand_prompts",
    "extract_keywords",
    "frequency_logprob",
    "lexicon_candidates",
    "load_acronym_lexicon",
    "load_cards",
    "match_controls",
    "matched_random",
    "output_neighbours",
    "output_variants",
    "model_candidates",
    "primary_keyword",
    "representations",
    "route_report",
    "swap_effect",
    "vocabulary_candidates",
]
