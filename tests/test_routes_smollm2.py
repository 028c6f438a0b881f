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


ACRONYM_FAMILY = [("VAT", "Value Added Tax"), ("IQ", "Intelligence Quotient"), ("BCD", "Binary Coded Decimal"),
                  ("IP", "Internet Protocol"), ("HMI", "Human Machine Interface"), ("CFG", "Context Free Grammar"),
                  ("DVR", "Digital Video Recorder"), ("FM", "Frequency Modulation"), ("NPC", "Non Player Character"),
                  ("QA", "Quality Assurance"), ("WAN", "Wide Area Network"), ("RDF", "Resource Description Framework")]


def _acronym_pairs():
    from recallscope.routes.transplant import TransplantPair

    return [TransplantPair(f"The acronym {a} stands for {e.rsplit(' ', 1)[0]}", f" {a}", f" {e}", " " + e.split()[-1])
            for a, e in ACRONYM_FAMILY]


def test_smollm2_completes_the_acronym_family(smollm2):
    """The family experiments/smollm2_routes.py builds on: SmolLM2's greedy continuation of "The acronym VAT stands
    for Value Added" is " Tax" (the expansion's last word) for each of these 12 acronyms."""
    for p in _acronym_pairs():
        logits = smollm2(smollm2.to_tokens(p.prompt), return_type="logits")[0, -1]
        assert int(logits.argmax()) == int(smollm2.to_tokens(p.answer, prepend_bos=False)[0, 0]), p


def test_smollm2_family_report_on_unequal_prompts_files_the_input_as_competitor(smollm2):
    """route_family_report on SmolLM2 with prompts of several token lengths (acronyms of 1-2 tokens, expansions of
    1-3 tokens), two layers: the acronym itself as the concept is a competitor (never a route) beside the
    expansion; every pairing is scored on the same units."""
    from recallscope.routes.family import FamilyConfig, _sites, route_family_report
    from recallscope.routes.transplant import TransplantConfig

    pairs = _acronym_pairs()
    assert len(_sites(smollm2, pairs, [1]).tokens) >= 2
    config = FamilyConfig(transplant=TransplantConfig(layers=(1, 8), n_perm=199, n_boot=100), max_answer_variants=1)
    report = route_family_report(smollm2, pairs, candidates={"acronym": [p.input_text for p in pairs]}, config=config)
    rows = {r.name: r for r in report.rows()}
    assert rows["acronym"].role == "competitor" and rows["acronym"].cls == "input"
    assert rows["concept"].role == "candidate" and rows["concept"].verdict in ("route", "no route", "inconclusive")
    assert rows["answer (as given)"].cls == "answer" and report.fitted.shape[0] == 4
    assert report.verdict() == rows["concept"].verdict
