"""run_method: each named method returns its typed result, its figures and a summary consistent with it."""

import pytest

from recallscope.attribution import AttributionResult, DLAResult, EdgeScores, run_method
from recallscope.errors import ConfigError
from recallscope.tasks.pairs import PromptPair

PAIRS = [PromptPair("The capital of France is", "The capital of Spain is", " Paris", " Madrid",
                    spans={"bos": (0, 1), "subject": (4, 5)}),
         PromptPair("The capital of Italy is", "The capital of Japan is", " Rome", " Tokyo",
                    spans={"bos": (0, 1), "subject": (4, 5)})]


@pytest.mark.parametrize("method,kind,figures", [("atp", AttributionResult, {"", "_grid"}),
                                                 ("atp*", AttributionResult, {"", "_grid"}),
                                                 ("eap-ig", EdgeScores, {"", "_circuit"}),
                                                 ("dla", DLAResult, {"", "_sources"})])
def test_run_method(tiny_gpt2, tmp_path, method, kind, figures):
    run = run_method(tiny_gpt2, PAIRS, method, top=5, top_edges=30, steps=2, progress=False)
    assert isinstance(run.result, kind) and set(run.figures) == figures
    assert all(len(fig.data) >= 1 for fig in run.figures.values())
    assert type(run.result).load(run.result.save(tmp_path / "r")).config == run.result.config
    if method == "eap-ig":
        assert run.summary["circuit"]["edges"] <= 30 and len(run.summary["top_edges"]) == 5
    else:
        assert len(run.summary["top"]) == 5
        values = [abs(v) for _, v in run.summary["top"]]
        assert values == sorted(values, reverse=True)
    with pytest.raises(ConfigError, match="unknown attribution method"):
        run_method(tiny_gpt2, PAIRS, "integrated-gradients-please")
