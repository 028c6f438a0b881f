"""An interactive explorer: pick a prompt, site type, layer and head; patching, attribution and route
figures update without running the model again.

1. **Precompute** (:func:`explore`): run activation patching once per site type (component), attribution
   patching once for all of them, and a route result (a lens trajectory of the answer and candidate
   concepts) once per prompt. Any precomputed results can also be handed to :class:`Explorer` directly.
2. **Select**: an :class:`ExplorerState` names the prompt (or the mean over prompts), the site type, the
   layer and, for per-head site types, the head. :meth:`Explorer.select` validates it and fills defaults.
3. **Slice and plot**: :meth:`Explorer.view` slices the cached tensors (prompt, head) into a layer x
   position matrix, a per-position row at the chosen layer, and the route of the chosen prompt, and draws
   them; views are cached per state. Nothing here touches a model.
4. **Widget**: :meth:`Explorer.widget` wires ipywidgets controls to :meth:`Explorer.view` (needs
   ``pip install 'recallscope[notebook]'``).
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch

from recallscope.errors import ConfigError
from recallscope.plotting.heatmaps import heatmap
from recallscope.plotting.labels import display_token
from recallscope.plotting.style import apply_style
from recallscope.results import PatchingResult

MEAN = None
"""``ExplorerState.prompt`` value meaning "the mean over all prompts"."""
_LINE_COLORS = {"patching": "rgb(214, 39, 40)", "attribution": "rgb(31, 119, 180)"}


@dataclass(frozen=True)
class ExplorerState:
    """What the explorer shows."""

    prompt: int | None = MEAN
    """Index of the prompt shown, or None for the mean over prompts."""
    site: str = "resid_pre"
    """Site type: the patched component (``resid_pre``, ``attn_out``, ``mlp_out``, ``z``...)."""
    layer: int = 0
    """Index into the results' layer axis (layer ``labels["layer"][layer]``): the row shown per position and
    marked on the heatmaps."""
    head: int | None = None
    """The head, for per-head site types (``z``, ``q``, ``k``, ``v``, ``pattern``); None otherwise."""


@dataclass(frozen=True)
class ExplorerView:
    """Everything drawn for one state: the data (numpy) and the figures built from it.

    Attributes:
        state: the validated state.
        patching: ``[layer, pos]`` exact patching values (selected prompt or mean, selected head).
        attribution: the same slice of the attribution estimate, or None when there is none for the site.
        row: per source (``"patching"``, ``"attribution"``), the values at ``state.layer`` by position.
        x_labels / y_labels: position (token) and layer labels.
        figures: name (``"patching"``, ``"attribution"``, ``"layer"``, ``"route"``) -> figure.
    """

    state: ExplorerState
    patching: np.ndarray
    attribution: np.ndarray | None
    row: dict[str, np.ndarray]
    x_labels: list[str]
    y_labels: list[str]
    figures: dict[str, go.Figure] = field(default_factory=dict)


def _prepared(result: PatchingResult, normalized: bool, what: str) -> PatchingResult:
    if result.axes not in (("layer", "pos"), ("layer", "head", "pos")):
        raise ConfigError(f"the explorer shows results with axes (layer, pos) or (layer, head, pos); {what} has "
                          f"{result.axes}. Patch with per_position=True.")
    return result.normalized() if normalized else result


def _match(est: PatchingResult, ref: PatchingResult, what: str) -> PatchingResult:
    """``est`` restricted, by axis labels, to the layers and positions of ``ref`` (e.g. attribution over every
    layer beside exact patching of a subset of layers)."""
    values = est.values
    for ax in ref.axes:
        dim = 1 + ref.axes.index(ax)
        if ax not in est.axes or values.shape[dim] == ref.values.shape[dim]:
            continue
        mine, theirs = est.labels.get(ax) or [], ref.labels.get(ax) or []
        missing = [lab for lab in theirs if lab not in mine]
        if not theirs or missing:
            raise ConfigError(f"{what} has {values.shape[dim]} {ax} entries and patching {ref.values.shape[dim]}, "
                              f"and their labels do not match ({missing[:3] or 'no labels'}); compute both on the "
                              "same prompts.")
        values = values.index_select(dim, torch.tensor([mine.index(lab) for lab in theirs]))
    labels = {**est.labels, **{ax: ref.labels[ax] for ax in ref.axes if ax in ref.labels}}
    return replace(est, values=values, labels=labels)


class Explorer:
    """Cached results of several methods on one set of prompts, sliced and plotted on demand.

    Args:
        patching: site type -> :class:`PatchingResult` (``values[prompt, layer, (head,) pos]``).
        attribution: optional; anything with ``component(name) -> PatchingResult`` on the same axes
            (e.g. :class:`recallscope.attribution.results.AttributionResult`), shown next to patching.
        routes: optional; one result per prompt with a ``.plot()`` whose x axis is the layer (e.g.
            :class:`recallscope.lens.LensTrajectory`), shown for the selected prompt.
        route: optional; one result over all the prompts (e.g. a :class:`recallscope.routes.RouteReport`),
            shown with every selection.
        prompts: one label per prompt for the picker (default ``"prompt i"``).
        tokens: per prompt, its token strings (default: the patching result's position labels).
        normalized: show normalised recovery (0 = corrupt, 1 = clean) instead of raw metric values.
    """

    def __init__(self, patching: Mapping[str, PatchingResult], *, attribution: Any = None,
                 routes: Sequence[Any] | None = None, route: Any = None, prompts: Sequence[str] | None = None,
                 tokens: Sequence[Sequence[str]] | None = None, normalized: bool = True) -> None:
        if not patching:
            raise ConfigError("the explorer needs at least one patching result (site type -> PatchingResult).")
        self.patching = {str(k): _prepared(v, normalized, f"patching[{k!r}]") for k, v in patching.items()}
        n = {r.n_prompts for r in self.patching.values()}
        if len(n) != 1:
            raise ConfigError(f"the patching results cover different numbers of prompts {sorted(n)}; run every "
                              "site type on the same prompts.")
        self.n_prompts = n.pop()
        self.attribution: dict[str, PatchingResult] = {}
        components = set(getattr(attribution, "components", ()) or ())
        for site in self.patching:
            if attribution is not None and site in components:
                est = _match(_prepared(attribution.component(site), normalized, f"attribution[{site!r}]"),
                             self.patching[site], f"attribution[{site!r}]")
                if est.values.shape != self.patching[site].values.shape:
                    raise ConfigError(f"attribution for {site!r} has shape {tuple(est.values.shape)} but patching "
                                      f"has {tuple(self.patching[site].values.shape)}; use the same prompts.")
                self.attribution[site] = est
        self.routes = self._check_len(routes, "routes")
        self.route = route
        self.prompts = self._check_len(prompts, "prompts") or tuple(f"prompt {i}" for i in range(self.n_prompts))
        self.tokens = self._check_len(tokens, "tokens")
        self.normalized = normalized
        self._views: dict[ExplorerState, ExplorerView] = {}

    def _check_len(self, items: Sequence[Any] | None, what: str) -> tuple[Any, ...] | None:
        if items is None:
            return None
        if len(items) != self.n_prompts:
            raise ConfigError(f"{what} has {len(items)} entries for {self.n_prompts} prompts; give one per prompt.")
        return tuple(items)

    # ------------------------------------------------------------------ state

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.patching)

    def n_layers(self, site: str) -> int:
        return int(self._result(site).values.shape[1])

    def heads(self, site: str) -> tuple[int, ...]:
        """The heads of a per-head site type; empty for the others."""
        r = self._result(site)
        return tuple(range(r.values.shape[2])) if "head" in r.axes else ()

    def _result(self, site: str) -> PatchingResult:
        if site not in self.patching:
            raise ConfigError(f"no results for site type {site!r}; this explorer holds {list(self.patching)}.")
        return self.patching[site]

    def select(self, state: ExplorerState | None = None, **changes: Any) -> ExplorerState:
        """``state`` (default: the first site type, layer 0, mean) with ``changes``, validated.

        The head is filled in (0) for per-head site types and dropped for the others, so switching the
        site type never leaves a stale head; anything out of range raises :class:`ConfigError`.
        """
        state = replace(state or ExplorerState(site=self.sites[0]), **changes)
        heads = self.heads(state.site)
        if state.prompt is not None and not 0 <= state.prompt < self.n_prompts:
            raise ConfigError(f"prompt {state.prompt} is out of range: there are {self.n_prompts} prompts "
                              "(use None for the mean).")
        if not 0 <= state.layer < self.n_layers(state.site):
            raise ConfigError(f"layer {state.layer} is out of range for {state.site!r}: 0..{self.n_layers(state.site) - 1}.")
        head = (state.head if state.head is not None else 0) if heads else None
        if heads and head not in heads:
            raise ConfigError(f"head {state.head} is out of range for {state.site!r}: 0..{heads[-1]}.")
        return replace(state, head=head)

    # ------------------------------------------------------------------ slicing

    def _slice(self, result: PatchingResult, state: ExplorerState) -> np.ndarray:
        values = result.values if state.prompt is None else result.values[state.prompt:state.prompt + 1]
        mean = values.float().nanmean(0)  # [layer, (head,) pos]
        if "head" in result.axes:
            mean = mean[:, state.head]
        return mean.detach().cpu().numpy()

    def _labels(self, state: ExplorerState) -> tuple[list[str], list[str]]:
        r = self._result(state.site)
        if self.tokens is not None and state.prompt is not None:
            x = [f"{t}·{i}" for i, t in enumerate(self.tokens[state.prompt])]
        else:
            x = r.labels.get("pos") or [str(i) for i in range(r.values.shape[-1])]
        y = r.labels.get("layer") or [str(i) for i in range(r.values.shape[1])]
        return [display_token(s) for s in x], list(y)

    def view(self, state: ExplorerState | None = None, **changes: Any) -> ExplorerView:
        """The data and figures for ``state`` (see :meth:`select`); cached, so revisiting a state is free."""
        state = self.select(state, **changes)
        if state not in self._views:
            self._views[state] = self._build(state)
        return self._views[state]

    def _build(self, state: ExplorerState) -> ExplorerView:
        exact = self._slice(self._result(state.site), state)
        est = self._slice(self.attribution[state.site], state) if state.site in self.attribution else None
        x, y = self._labels(state)
        row = {"patching": exact[state.layer]}
        if est is not None:
            row["attribution"] = est[state.layer]
        view = ExplorerView(state, exact, est, row, x, y)
        return replace(view, figures=self._figures(view))

    # ------------------------------------------------------------------ figures

    def _caption(self, state: ExplorerState) -> str:
        who = "mean over prompts" if state.prompt is None else self.prompts[state.prompt]
        head = f", head {state.head}" if state.head is not None else ""
        return f"{state.site}{head} · {who}"

    def _heat(self, z: np.ndarray, view: ExplorerView, what: str) -> go.Figure:
        unit = "recovery" if self.normalized else "metric"
        fig = heatmap(z, view.x_labels, view.y_labels, title=f"{what}: {self._caption(view.state)}",
                      colorbar_title=unit)
        fig.update_xaxes(title_text="token")
        fig.update_yaxes(title_text="layer")
        fig.add_shape(type="rect", xref="paper", x0=0, x1=1, y0=view.state.layer - 0.5, y1=view.state.layer + 0.5,
                      line=dict(color="#111111", width=2))
        return fig

    def _row_figure(self, view: ExplorerView) -> go.Figure:
        fig = go.Figure()
        for name, values in view.row.items():
            fig.add_trace(go.Scatter(x=view.x_labels, y=values, name=name, mode="lines+markers",
                                     line=dict(color=_LINE_COLORS[name], dash="dot" if name == "attribution" else None)))
        apply_style(fig, title=f"layer {view.y_labels[view.state.layer]}, by token: {self._caption(view.state)}")
        fig.add_hline(y=0, line=dict(color="#888888", width=1, dash="dot"))
        fig.update_xaxes(type="category", title_text="token")
        fig.update_yaxes(title_text="normalized recovery" if self.normalized else "metric")
        fig.update_layout(height=360)
        return fig

    def _figures(self, view: ExplorerView) -> dict[str, go.Figure]:
        figs = {"patching": self._heat(view.patching, view, "activation patching")}
        if view.attribution is not None:
            figs["attribution"] = self._heat(view.attribution, view, "attribution estimate")
        figs["layer"] = self._row_figure(view)
        source = self.route
        if self.routes is not None and view.state.prompt is not None:
            source = self.routes[view.state.prompt]
        if source is not None:
            fig = go.Figure(source.plot())
            if any(t.type in ("scatter", "bar", "heatmap") for t in fig.data):  # a layer axis to mark
                label = view.y_labels[view.state.layer]
                x = int(label) if label.isdigit() else view.state.layer  # the layer number, not the row index
                fig.add_vline(x=x, line=dict(color="#111111", width=1.5, dash="dot"))
            figs["route"] = fig
        return figs

    # ------------------------------------------------------------------ widget

    def widget(self, state: ExplorerState | None = None) -> "ExplorerWidget":
        """An ipywidgets control panel; display it (or ``.container``) in a notebook."""
        return ExplorerWidget(self, self.select(state))


class ExplorerWidget:
    """ipywidgets controls (prompt, site type, layer, head) over an :class:`Explorer`.

    ``state`` and ``view`` hold what is shown; every control change calls :meth:`Explorer.view` (cached
    slices, no model) and redraws the figures in ``output``.
    """

    def __init__(self, explorer: Explorer, state: ExplorerState) -> None:
        try:
            import ipywidgets as W
        except ImportError as exc:
            raise ConfigError("the explorer widget needs ipywidgets: pip install 'recallscope[notebook]'. "
                              "Explorer.view() works without it.") from exc
        self.explorer = explorer
        options = [("mean over prompts", -1)] + [(p[:60], i) for i, p in enumerate(explorer.prompts)]
        self.prompt = W.Dropdown(options=options, value=-1 if state.prompt is None else state.prompt,
                                 description="prompt")
        self.site = W.Dropdown(options=list(explorer.sites), value=state.site, description="site")
        self.layer = W.IntSlider(value=state.layer, min=0, max=explorer.n_layers(state.site) - 1,
                                 description="layer", continuous_update=False)
        self.head = W.Dropdown(options=[("-", -1)], value=-1, description="head")
        self.output = W.Output()
        self.container = W.VBox([W.HBox([self.prompt, self.site]), W.HBox([self.layer, self.head]), self.output])
        self.state = state
        self.view: ExplorerView | None = None
        self._sync_head(state)
        for control in (self.prompt, self.site, self.layer, self.head):
            control.observe(self._changed, names="value")
        self._refresh(state)

    def _sync_head(self, state: ExplorerState) -> None:
        heads = self.explorer.heads(state.site)
        self.head.options = [(str(h), h) for h in heads] or [("-", -1)]
        self.head.value = state.head if state.head is not None else -1
        self.head.disabled = not heads
        self.layer.max = self.explorer.n_layers(state.site) - 1

    def _changed(self, _change: Any = None) -> None:
        if getattr(self, "_syncing", False):
            return
        site = self.site.value
        heads = self.explorer.heads(site)
        head = self.head.value if self.head.value in heads else None
        state = self.explorer.select(prompt=None if self.prompt.value == -1 else self.prompt.value, site=site,
                                     layer=min(self.layer.value, self.explorer.n_layers(site) - 1), head=head)
        self._syncing = True
        try:
            self._sync_head(state)
        finally:
            self._syncing = False
        self._refresh(state)

    def _refresh(self, state: ExplorerState) -> None:
        self.state = state
        self.view = self.explorer.view(state)
        self._show(self.view.figures)

    def _show(self, figures: Mapping[str, go.Figure]) -> None:
        """Replace what ``output`` shows by the figures.

        Sets the Output widget's ``outputs`` from the kernel instead of capturing ``display()`` in
        ``with self.output:``. Captured output is mirrored back to the kernel by the frontend; a headless
        executor (nbclient) does that with comm messages on the shell socket while the cell runs, and a send
        there can hide the cell's execute_reply until the cell timeout (jupyter/nbclient#312: the notebook tests
        stalled for the 600 s cell timeout). Setting ``outputs`` sends nothing on the shell.
        """
        self.output.outputs = tuple(_display_data(fig) for fig in figures.values())

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.container)


def _display_data(fig: go.Figure) -> dict[str, Any]:
    """An nbformat ``display_data`` output for a figure: the mime bundle of plotly's default renderer."""
    bundle = fig._repr_mimebundle_() or {}
    return {"output_type": "display_data", "data": dict(bundle) or {"text/plain": repr(fig)}, "metadata": {}}


def explore(model: Any, pairs: Sequence[Any], metric: Any = "logit_diff", *,
            sites: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"), attribution: bool = True,
            route_targets: Sequence[str] | Callable[[Any], Sequence[str]] | None = None,
            normalized: bool = True, progress: bool = True) -> Explorer:
    """Run every method once on ``pairs`` (one token length) and return an :class:`Explorer` over them.

    ``sites``: component names to patch (per-head ones such as ``"z"`` get a head picker).
    ``attribution``: also run attribution patching (AtP) on the same sites.
    ``route_targets``: texts (or a function of the pair giving texts) whose lens trajectory at the last
    position is the route view, e.g. ``["VAT", " Value"]``; the answer is always added.
    """
    from recallscope.patching import activation_patching
    from recallscope.tasks.pairs import tokenize_pairs

    tp = tokenize_pairs(model, pairs)
    patching = {s: activation_patching(model, tp, metric, component=s, progress=progress) for s in sites}
    attr = None
    if attribution:
        from recallscope.attribution.atp import atp

        attr = atp(model, tp, metric, components=list(sites), progress=progress)
    routes = None
    if route_targets is not None:
        from recallscope.lens import lens_trajectory

        routes = []
        for p in tp.pairs:
            extra = route_targets(p) if callable(route_targets) else route_targets
            routes.append(lens_trajectory(model, p.clean, list(dict.fromkeys([p.answer, *extra]))))
    tokens = [model.tokenizer.convert_ids_to_tokens(row.tolist()) for row in tp.clean]
    return Explorer(patching, attribution=attr, routes=routes, prompts=[p.clean for p in tp.pairs],
                    tokens=tokens, normalized=normalized)
