"""The explorer: state changes give the right slices and figure data, with no model run after precompute.

Synthetic results (no model) check the slicing against hand-indexed tensors; one tiny-model test checks
that ``explore`` precomputes everything, so browsing states never calls the forward pass again.
"""

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from recallscope.errors import ConfigError
from recallscope.explorer import Explorer, ExplorerState, explore
from recallscope.results import PatchingResult
from recallscope.tasks.pairs import PromptPair

N_PROMPTS, N_LAYERS, N_HEADS, N_POS = 3, 4, 2, 5
POS = [f"t{i}·{i}" for i in range(N_POS)]


def _result(axes, seed, *, clean=2.0, corrupt=-1.0):
    sizes = {"layer": N_LAYERS, "head": N_HEADS, "pos": N_POS}
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn((N_PROMPTS, *(sizes[a] for a in axes)), generator=gen)
    labels = {"layer": [str(i) for i in range(N_LAYERS)], "pos": POS}
    if "head" in axes:
        labels["head"] = [str(h) for h in range(N_HEADS)]
    return PatchingResult(values=values, axes=axes, clean=torch.full((N_PROMPTS,), clean),
                          corrupt=torch.full((N_PROMPTS,), corrupt), labels=labels, config={"method": "test"})


class FakeAttribution:
    """Duck-typed attribution: ``component(name)`` returns a PatchingResult on the patching axes."""

    def __init__(self):
        self.components = ("resid_pre", "z")
        self._results = {"resid_pre": _result(("layer", "pos"), 10), "z": _result(("layer", "head", "pos"), 11)}

    def component(self, name):
        return self._results[name]


class FakeRoute:
    def __init__(self, i):
        self.i = i

    def plot(self):
        return go.Figure(go.Scatter(x=list(range(N_LAYERS + 1)), y=[self.i] * (N_LAYERS + 1), name=f"route {self.i}"))


@pytest.fixture()
def explorer():
    patching = {"resid_pre": _result(("layer", "pos"), 0), "z": _result(("layer", "head", "pos"), 1)}
    return Explorer(patching, attribution=FakeAttribution(), routes=[FakeRoute(i) for i in range(N_PROMPTS)],
                    prompts=[f"p{i}" for i in range(N_PROMPTS)], normalized=False)


def test_default_state_and_validation(explorer):
    assert explorer.select() == ExplorerState(prompt=None, site="resid_pre", layer=0, head=None)
    assert explorer.select(site="z").head == 0
    assert explorer.select(ExplorerState(site="z", head=1), site="resid_pre").head is None  # no stale head
    for bad, match in [({"layer": N_LAYERS}, "layer"), ({"prompt": N_PROMPTS}, "prompt"),
                       ({"site": "z", "head": N_HEADS}, "head"), ({"site": "mlp_out"}, "mlp_out")]:
        with pytest.raises(ConfigError, match=match):
            explorer.select(**bad)


def test_slices_match_the_tensors(explorer):
    resid, z = explorer.patching["resid_pre"].values, explorer.patching["z"].values
    v = explorer.view(prompt=None, layer=2)
    np.testing.assert_allclose(v.patching, resid.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(v.row["patching"], resid.mean(0)[2].numpy(), rtol=1e-6)
    v = explorer.view(prompt=1, site="z", head=1, layer=3)
    np.testing.assert_allclose(v.patching, z[1, :, 1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(v.row["patching"], z[1, 3, 1].numpy(), rtol=1e-6)
    est = FakeAttribution().component("z").values
    np.testing.assert_allclose(v.attribution, est[1, :, 1].numpy(), rtol=1e-6)
    np.testing.assert_allclose(v.row["attribution"], est[1, 3, 1].numpy(), rtol=1e-6)
    assert not np.allclose(v.patching, explorer.view(prompt=1, site="z", head=0, layer=3).patching)


def test_figures_follow_the_state(explorer):
    v = explorer.view(prompt=2, site="z", head=0, layer=1)
    assert set(v.figures) == {"patching", "attribution", "layer", "route"}
    (heat,) = v.figures["patching"].data
    np.testing.assert_allclose(np.asarray(heat.z), v.patching, rtol=1e-6)
    assert heat.zmid == 0 and list(heat.y) == [str(i) for i in range(N_LAYERS)]
    (marker,) = v.figures["patching"].layout.shapes
    assert (marker.y0, marker.y1) == (0.5, 1.5)  # the selected layer's row is outlined
    assert "head 0" in v.figures["patching"].layout.title.text and "p2" in v.figures["patching"].layout.title.text
    np.testing.assert_allclose(np.asarray(v.figures["attribution"].data[0].z), v.attribution, rtol=1e-6)
    exact, est = v.figures["layer"].data
    np.testing.assert_allclose(np.asarray(exact.y), v.row["patching"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(est.y), v.row["attribution"], rtol=1e-6)
    route = v.figures["route"]
    assert route.data[0].name == "route 2" and route.layout.shapes[0].x0 == 1
    mean_view = explorer.view(prompt=None, site="resid_pre", layer=0)
    assert "route" not in mean_view.figures  # a per-prompt route belongs to one prompt
    shared = Explorer(explorer.patching, route=FakeRoute(7), normalized=False)
    for prompt in (None, 1):
        assert shared.view(prompt=prompt).figures["route"].data[0].name == "route 7"  # one route for every prompt


def test_views_are_cached_and_normalisation_applies():
    raw = _result(("layer", "pos"), 0)
    ex = Explorer({"resid_pre": raw}, normalized=True)
    v = ex.view(prompt=0)
    assert ex.view(ExplorerState(prompt=0, site="resid_pre")) is v
    np.testing.assert_allclose(v.patching, ((raw.values[0] + 1.0) / 3.0).numpy(), rtol=1e-5)
    assert set(v.figures) == {"patching", "layer"}


def test_attribution_over_all_layers_is_matched_to_a_patched_subset():
    full = _result(("layer", "pos"), 5)
    subset = PatchingResult(values=full.values[:, [1, 3]] * 2, axes=("layer", "pos"), clean=full.clean,
                            corrupt=full.corrupt, labels={"layer": ["1", "3"], "pos": POS})

    class Attr:
        components = ("resid_pre",)

        def component(self, name):
            return full

    ex = Explorer({"resid_pre": subset}, attribution=Attr(), route=FakeRoute(0), normalized=False)
    v = ex.view(prompt=0, layer=1)
    np.testing.assert_allclose(v.attribution, full.values[0, [1, 3]].numpy(), rtol=1e-6)
    assert v.y_labels == ["1", "3"]
    assert v.figures["route"].layout.shapes[0].x0 == 3  # the route marks layer 3, the row's label, not row 1
    bad = PatchingResult(values=full.values[:, :2], axes=("layer", "pos"), clean=full.clean, corrupt=full.corrupt,
                         labels={"layer": ["7", "8"], "pos": POS})
    with pytest.raises(ConfigError, match="labels do not match"):
        Explorer({"resid_pre": bad}, attribution=Attr())


def test_inconsistent_inputs_are_rejected():
    with pytest.raises(ConfigError, match="at least one"):
        Explorer({})
    with pytest.raises(ConfigError, match="routes has 1"):
        Explorer({"resid_pre": _result(("layer", "pos"), 0)}, routes=[FakeRoute(0)])
    line = PatchingResult(values=torch.zeros(2, 3), axes=("layer",), clean=torch.ones(2), corrupt=torch.zeros(2))
    with pytest.raises(ConfigError, match="axes"):
        Explorer({"resid_pre": line})


def test_widget_controls_drive_the_state(explorer):
    pytest.importorskip("ipywidgets")
    w = explorer.widget()
    assert w.state == explorer.select() and w.head.disabled
    # the figures are set as the Output widget's state, not captured from display() (jupyter/nbclient#312)
    assert len(w.output.outputs) == len(w.view.figures) and w.output.msg_id == ""
    assert all(o["output_type"] == "display_data" and o["data"] for o in w.output.outputs)
    w.site.value = "z"
    assert w.state.site == "z" and w.state.head == 0 and not w.head.disabled
    assert w.head.options == (("0", 0), ("1", 1))
    w.head.value = 1
    w.layer.value = 3
    w.prompt.value = 2
    assert w.state == ExplorerState(prompt=2, site="z", layer=3, head=1)
    assert w.view is explorer.view(w.state)
    w.site.value = "resid_pre"
    assert w.state.head is None and w.head.disabled
    w.prompt.value = -1
    assert w.state.prompt is None
    assert len(w.output.outputs) == len(w.view.figures)  # redrawn, replaced rather than appended


def test_explore_precomputes_and_never_reruns_the_model(tiny_gpt2, monkeypatch):
    pairs = [PromptPair("The capital of France is", "The capital of Spain is", " Paris", " Madrid"),
             PromptPair("The capital of Italy is", "The capital of Japan is", " Rome", " Tokyo")]
    ex = explore(tiny_gpt2, pairs, sites=("resid_pre", "z"), route_targets=[" Europe"], normalized=False,
                 progress=False)
    assert ex.sites == ("resid_pre", "z") and set(ex.attribution) == {"resid_pre", "z"}
    import recallscope.models.forward as fwd

    def boom(*args, **kwargs):
        raise AssertionError("the explorer ran the model after precomputing")

    monkeypatch.setattr(fwd, "run", boom)
    monkeypatch.setattr(fwd, "forward", boom)
    monkeypatch.setattr(type(tiny_gpt2), "forward", boom)
    for prompt in (None, 0, 1):
        for site, head in (("resid_pre", None), ("z", 1)):
            v = ex.view(prompt=prompt, site=site, head=head, layer=1)
            assert v.patching.shape == (tiny_gpt2.cfg.n_layers, 6)
    v = ex.view(prompt=1, site="z", head=1, layer=1)
    np.testing.assert_allclose(v.patching, ex.patching["z"].values[1, :, 1].numpy(), rtol=1e-6)
    assert v.x_labels[1] == "The·1" and v.x_labels[4] == "␣Italy·4"  # the selected prompt's own tokens
    route = v.figures["route"]
    assert {t.name for t in route.data} == {"␣Rome", "␣Europe"}  # the answer is always a route target
