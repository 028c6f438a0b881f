"""Jupyter display of results: a summary table plus the figure; plotly.js embedded once, offline."""

from dataclasses import dataclass

import plotly.graph_objects as go
import pytest
import torch
from plotly.offline import get_plotlyjs

import recallscope
from recallscope.plotting import rich
from recallscope.results import PatchingResult, RichReprMixin

PLOTLYJS_MARK = get_plotlyjs()[:2000]


def _result(**config):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(4, 3, 5, generator=gen)
    values[:, 2, 1] += 10.0  # the peak
    return PatchingResult(values=values, axes=("layer", "pos"), clean=torch.full((4,), 2.0),
                          corrupt=torch.full((4,), -1.0),
                          labels={"layer": ["0", "1", "2"], "pos": [f"t{i}·{i}" for i in range(5)]},
                          config={"method": "activation_patching", "metric": "logit_diff", **config},
                          manifest={"model": {"spec": "tiny", "n_layers": 3, "weights_sha256": "abcdef0123456789"},
                                    "timings_s": {"total": 1.25}})


@pytest.fixture()
def fresh(monkeypatch):
    """Pretend no fragment has been rendered in this process yet."""
    monkeypatch.setitem(rich._STATE, "plotlyjs_sent", False)
    monkeypatch.delitem(__import__("sys").modules, "google.colab", raising=False)


def test_summary_rows_describe_the_result():
    rows = dict(rich.summary_rows(_result(component="resid_pre")))
    assert rows["result"] == "PatchingResult"
    assert rows["values"] == "prompt 4 × layer 3 × pos 5"
    assert rows["method"] == "activation_patching" and rows["component"] == "resid_pre"
    assert rows["model"] == "tiny (3 layers, weights abcdef012345)"
    assert rows["prompts"] == "4" and rows["clean metric (mean)"] == "2" and rows["corrupt metric (mean)"] == "-1"
    peak = _result().peak()
    assert rows["peak"].startswith(f"{peak['mean']:.4g} at layer 2, pos t1·1; 95% CI (")
    assert rows["time"] == "1.25 s"


def test_repr_html_embeds_plotlyjs_once_per_process(fresh):
    first = _result()._repr_html_()
    second = _result()._repr_html_()
    for page in (first, second):
        assert "<table class='rs-summary'>" in page and "plotly-graph-div" in page and "Plotly.newPlot" in page
    assert PLOTLYJS_MARK in first, "the first output must carry plotly.js (offline notebooks)"
    assert PLOTLYJS_MARK not in second and len(second) < len(first) / 50
    assert 'src="https://cdn.plot.ly' not in first
    assert PLOTLYJS_MARK in rich.result_html(_result(), embed_plotlyjs="always")
    assert PLOTLYJS_MARK not in rich.result_html(_result(), embed_plotlyjs="never")


def test_each_colab_output_carries_its_own_plotlyjs(fresh, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "google.colab", object())
    assert PLOTLYJS_MARK in _result()._repr_html_() and PLOTLYJS_MARK in _result()._repr_html_()


def test_text_is_escaped_and_unplottable_results_still_show_the_table(fresh):
    page = rich.result_html(_result(method="<script>alert(1)</script>"), embed_plotlyjs="never")
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    odd = PatchingResult(values=torch.zeros(2, 2, 2, 2, 2), axes=("a", "b", "c", "d"), clean=torch.ones(2),
                         corrupt=torch.zeros(2))
    page = odd._repr_html_()
    assert "prompt 2 × a 2 × b 2 × c 2 × d 2" in page
    assert "no figure: UnsupportedResultError" in page and "plotly-graph-div" not in page


def test_mixin_gives_any_result_a_rich_repr(fresh):
    @dataclass(frozen=True)
    class Toy(RichReprMixin):
        values: torch.Tensor
        config: dict

        def plot(self):
            return go.Figure(go.Bar(x=["a", "b"], y=self.values.tolist()))

        def summary_extra(self):
            return [("verdict", "routed")]

    page = Toy(torch.tensor([1.0, 2.0]), {"method": "toy"})._repr_html_()
    assert "<th>result</th><td>Toy</td>" in page and "<th>verdict</th><td>routed</td>" in page
    assert "<th>method</th><td>toy</td>" in page and '"type":"bar"' in page


def test_top_level_export_is_the_plotting_export(tmp_path):
    from recallscope.plotting import export

    assert recallscope.export is export
    out = recallscope.export(_result(), tmp_path / "r.html")
    assert "Plotly.newPlot" in out.read_text()
