"""The acronym facts the route analysis builds on, on the embedded SmolLM2."""

import pytest

from recallscope.routes.acronyms import acronym_query, chunk_query, known_acronyms
from recallscope.routes.concepts import model_candidates

pytestmark = pytest.mark.smollm2


def test_smollm2_expands_vat(smollm2):
    (vat,) = known_acronyms(smollm2, {"VAT": ("value added tax",)})
    assert (vat.output, vat.rank) == (" Value", 0)
    query, concepts = acronym_query(vat)
    assert query.input == " VAT" and [c.text for c in concepts] == [" value added tax", " value", " added", " tax"]
    assert model_candidates(smollm2, "VAT")[0].text.startswith(" Value")


def test_chunk_query_decodes_the_hook():
    query, concepts = chunk_query("VA")
    assert query.output == " T" and all("VA==" in p for p in query.prompts)
    assert {" VAT", " Virginia"} <= {c.text for c in concepts}
