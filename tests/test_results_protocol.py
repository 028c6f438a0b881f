"""Every registered result type implements the Result protocol: plot, save, load (checksums verified), HTML.

The builders below make one small instance of each type (tiny models or synthetic tensors). A new result type
registered with ``@register_result`` fails :func:`test_every_registered_type_has_a_builder` until it gets one.
"""

import json

import plotly.graph_objects as go
import pytest
import torch
from safetensors.torch import load_file

from recallscope.errors import ResultFileError
from recallscope.outputs import load_result
from recallscope.results import RESULT_FILES, Result, discover_results
from recallscope.tasks.pairs import PromptPair

PAIRS = [PromptPair("The capital of France is", "The capital of Spain is", " Paris", " Madrid"),
         PromptPair("The capital of Italy is", "The capital of Japan is", " Rome", " Tokyo")]
CARDS = "\n".join(["#separator:tab",
                   "capricious\tCar prices are unpredictable\tgiven to sudden changes of mood",
                   "venal\tLooks like venue. A corrupt venue\tshowing a willingness to be bribed",
                   "tractable\tTractor makes it easy to manage the field\teasy to control or influence",
                   "edify\tEdit it to improve it\tinstruct or improve someone morally"])


@pytest.fixture(scope="module")
def edge_scores(tiny_gpt2):
    from recallscope.attribution.eap import eap_ig

    return eap_ig(tiny_gpt2, PAIRS, "logit_diff", steps=2, progress=False)


def _patching(model, tmp):
    from recallscope.results import PatchingResult

    values = torch.arange(12, dtype=torch.float32).reshape(2, 2, 3)
    return PatchingResult(values=values, axes=("layer", "pos"), clean=torch.ones(2), corrupt=torch.zeros(2),
                          labels={"layer": ["0", "1"], "pos": ["a·0", "b·1", "c·2"]})


def _attribution(model, tmp):
    from recallscope.attribution.atp import atp

    return atp(model, PAIRS, "logit_diff", components=["resid_pre"], progress=False)


def _dla(model, tmp):
    from recallscope.attribution.dla import direct_logit_attribution

    return direct_logit_attribution(model, PAIRS)


def _verify(model, tmp):
    from recallscope.attribution.verify import attribute_then_verify

    return attribute_then_verify(model, PAIRS, "logit_diff", method="atp", k=3, progress=False)


def _circuit_eval(model, tmp, scores):
    from recallscope.attribution.circuits import evaluate_circuit

    return evaluate_circuit(model, PAIRS, "logit_diff", scores.top(5))


def _faithfulness(model, tmp, scores):
    from recallscope.attribution.circuits import faithfulness_curve

    return faithfulness_curve(model, PAIRS, "logit_diff", scores, [1, 5], progress=False)


def _recovery(model, tmp, scores):
    from recallscope.attribution.scoring import score_recovery

    return score_recovery(scores.top(5), scores=scores, found=scores.top(3))


def _trajectory(model, tmp):
    from recallscope.lens import lens_trajectory

    return lens_trajectory(model, "The capital of France is", [" Paris", " Rome"])


def _backpatch(model, tmp):
    from recallscope.lens.backpatch import backpatch

    return backpatch(model, "The capital of France is", " Paris", position=-2)


def _recall(model, tmp):
    from recallscope.tasks.facts import load_builtin_facts, recalled_facts

    return recalled_facts(model, load_builtin_facts()[:3], criterion="rank<=25000")


def _b64_map(model, tmp):
    from recallscope.bench.organism_figures import B64DependencyMap

    depends = torch.tensor([[True, False, False], [True, True, False]])
    return B64DependencyMap(drop=depends.float() * 3.0, depends=depends, n_per_byte=4, manifest={})


def _human(model, tmp):
    from recallscope.routes.human import HumanConfig, compare_human
    from recallscope.routes.mnemonics import load_cards

    (tmp / "cards.tsv").write_text(CARDS)
    config = HumanConfig(n_controls=2, own_vocabulary=10, n_perm=50, definition_tokens=2, own_top=2)
    return compare_human(model, load_cards(tmp / "cards.tsv"), config=config, progress=False)


def _route_report(model, tmp):
    from recallscope.routes import RouteConfig, RouteQuery, route_report

    query = RouteQuery(("The acronym VAT stands for", "In tax law, VAT stands for"), " VAT", " Value")
    config = RouteConfig(n_controls=2, layers=(0, 1), window=1, mediation=False, n_boot=20, max_output_tokens=1,
                         n_alternatives=1)
    return route_report(model, query, [" tax"], controls={"tax": [" car", " land"]}, config=config, progress=False)


def _jlens(model, tmp):
    from recallscope.routes.jacobian import JLensRouteResult

    return JLensRouteResult(ranks=torch.tensor([[3.0, 1.0], [5.0, 2.0]]), layers=(0, 1),
                            drops=torch.tensor([[1.0, 0.2, 0.1], [0.8, 0.3, 0.0]]), clean=torch.tensor([-1.0, -2.0]),
                            norms=torch.tensor([[2.0, 1.0, 1.5], [2.5, 1.0, 0.5]]), tokens=(" dog", " red", " sun"), p_value=0.25, config={"layer": 1, "alpha": 2.0},
                            manifest={})


def _das(model, tmp):
    from recallscope.routes.das import DASRouteResult

    return DASRouteResult(correct=torch.tensor([1.0, 0.0, 1.0, 1.0]), controls={"placebo": torch.tensor([0.0, 0.0, 1.0, 0.0])},
                          target_logprob=torch.tensor([-0.1, -2.0, -0.3, -0.2]), basis=torch.eye(4)[:, :2],
                          p_values={"placebo": 0.1}, losses={"route": [1.0, 0.5]}, hook_name="blocks.1.hook_resid_pre",
                          classes=("a", "b"), config={"rank": 2}, manifest={})


def _attribution_graph(model, tmp):
    from test_attribution_mib import hand_graph

    return hand_graph()


def _mib_curve(model, tmp, scores):
    from recallscope.attribution.mib import mib_curve

    return mib_curve(model, PAIRS, "logit_diff", scores, fractions=(0.01, 0.1, 1.0), progress=False)


def _route_family(model, tmp):
    from recallscope.routes.family import RouteFamilyReport

    gen = torch.Generator().manual_seed(0)
    rate = lambda: (torch.rand(2, 2, 8, generator=gen) > 0.5).float()  # noqa: E731
    nan = torch.full((2, 2, 8), float("nan"))
    return RouteFamilyReport(name="toy", pairs=tuple({"prompt": f"p{i}", "input": "x", "concept": "c", "answer": "a"}
                                                     for i in range(4)),
                             pairings=("concept", "input itself"), roles=("candidate", "competitor"),
                             classes=("candidate", "input"), concepts=(("c",) * 4, ("x",) * 4), layers=(1, 2),
                             receiver=torch.tensor([0, 1, 0, 1, 2, 3, 2, 3]), source=torch.tensor([1, 0, 1, 0, 3, 2, 3, 2]),
                             fold=torch.tensor([0, 0, 1, 1]), fitted=rate(), shuffled=rate(), identity=nan, random=nan,
                             ceiling=torch.ones(2, 8), config={}, manifest={})


BUILDERS = {
    "PatchingResult": _patching, "AttributionResult": _attribution, "DLAResult": _dla, "VerifyResult": _verify,
    "LensTrajectory": _trajectory, "BackpatchResult": _backpatch, "RecallResult": _recall,
    "B64DependencyMap": _b64_map, "HumanComparison": _human, "RouteReport": _route_report,
    "JLensRouteResult": _jlens, "DASRouteResult": _das, "AttributionGraph": _attribution_graph,
    "RouteFamilyReport": _route_family,
}
FROM_SCORES = {"EdgeScores": lambda m, t, s: s, "Circuit": lambda m, t, s: s.top(5), "CircuitEval": _circuit_eval,
               "FaithfulnessCurve": _faithfulness, "RecoveryScore": _recovery, "MIBCurve": _mib_curve}


def test_every_registered_type_has_a_builder():
    assert set(discover_results()) == set(BUILDERS) | set(FROM_SCORES)


def _flip_one_bit(path):
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    at = min(len(data) - 1, 8 + header + (len(data) - 8 - header) // 2)
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", sorted(set(BUILDERS) | set(FROM_SCORES)))
def test_result_protocol(kind, tiny_gpt2, edge_scores, tmp_path):
    result = (FROM_SCORES[kind](tiny_gpt2, tmp_path, edge_scores) if kind in FROM_SCORES
              else BUILDERS[kind](tiny_gpt2, tmp_path))
    assert type(result).__name__ == kind and isinstance(result, Result)
    fig = result.plot()
    assert isinstance(fig, go.Figure) and len(fig.data) >= 1
    html = result._repr_html_()
    assert "rs-summary" in html and kind in html

    saved = result.save(tmp_path / "saved")
    back = type(result).load(saved)
    assert type(load_result(saved)) is type(result)
    # the loaded result saves to the same tensors and the same JSON: nothing was lost on the way
    again = back.save(tmp_path / "again")
    first, second = load_file(str(saved / RESULT_FILES[0])), load_file(str(again / RESULT_FILES[0]))
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], equal_nan=True, rtol=0, atol=0)
    for name in RESULT_FILES[1:]:
        assert json.loads((saved / name).read_text()) == json.loads((again / name).read_text()), name
    assert set(json.loads((saved / RESULT_FILES[1]).read_text())["sha256"]) == {RESULT_FILES[0], RESULT_FILES[2]}

    _flip_one_bit(saved / RESULT_FILES[0])
    with pytest.raises(ResultFileError, match="checksum recorded when it was saved"):
        type(result).load(saved)
    with pytest.raises(ResultFileError, match="checksum"):
        load_result(saved)
