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


def test_smollm2_vat_input_and_output_are_never_routes(smollm2):
    """Issue 13's done-when on SmolLM2: " VAT" (the input) and " value" / " Value" (the output in two casings),
    passed as explicit concepts, come back as competitors, never as routes; only " price" is a candidate and
    it must beat the input, every casing of the output, the output's neighbours and matched random directions."""
    from recallscope.routes import RouteConfig, RouteQuery, route_report

    query = RouteQuery(("The acronym VAT stands for",), " VAT", " Value")
    config = RouteConfig(layers=(0, 10, 20), n_controls=0, n_random=2, n_neighbours=1, n_alternatives=2,
                         ablation=False, n_boot=200)
    report = route_report(smollm2, query, [" value", " VAT", " Value", " price"], config=config, progress=False)
    assert len(report.query["prompts"]) == 8
    assert [r.name for r in report.routes()] == ["price"]
    competitors = {r.name: r for r in report.competitor_rows()}
    assert {"value", "VAT", "Value"} <= set(competitors)
    assert {"'Value' (output)", "' VALUE' (output)"} <= set(competitors)
    assert all(r.verdict == "competitor" for r in competitors.values())
    assert competitors["VAT"].mediation > 0.3  # the input itself carries the recall: a strong competitor
    assert report.routes()[0].verdict in ("no route", "inconclusive")
