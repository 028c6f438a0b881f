"""The result of node attribution (AtP, AtP*, integrated gradients): one estimate per prompt and site.

:class:`AttributionResult` holds, for each component of the patching engine, the estimated change of
the metric when that component is patched at each (layer, [head], position) site, from the source run
into the target run (denoising: clean into corrupt). ``component(c)`` turns one component into a
:class:`~recallscope.results.PatchingResult` on the same axes as exact patching, so every patching
figure and statistic applies; ``plot()`` ranks the sites of every component together.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from recallscope.errors import ConfigError, ResultFileError
from recallscope.results import PatchingResult, bootstrap_ci, load_result_dir, register_result, save_result_dir
from recallscope.sites import Site
from recallscope.vocab import Component, Direction


def component_axes(component: Component) -> tuple[str, ...]:
    """The axes of one component's sites, as the patching engine lays them out."""
    return ("layer", "head", "pos") if Component(component).per_head else ("layer", "pos")


@register_result
@dataclass(frozen=True)
class AttributionResult:
    """Estimated patching effects for every site of several components.

    Attributes:
        values: component name -> ``[prompt, layer, (head,) pos]`` estimated ``metric(patched) -
            metric(target)`` (the target is the corrupt run when denoising, the clean run when noising).
        clean: ``[prompt]`` metric of the clean run; corrupt: ``[prompt]`` of the corrupt run.
        direction: ``"denoising"`` or ``"noising"``.
        labels: tick labels (``"pos"``: the clean prompt's tokens of the first prompt).
        graddrop: AtP*'s GradDrop magnitudes per component, same shapes as ``values`` (empty when off):
            a ranking score that exposes sites whose effects cancel, not an estimate of the effect.
        config / manifest: how the result was made.
    """

    values: dict[str, Float[Tensor, "prompt ..."]]
    clean: Float[Tensor, " prompt"]
    corrupt: Float[Tensor, " prompt"]
    direction: str = Direction.DENOISING.value
    labels: dict[str, list[str]] = field(default_factory=dict)
    graddrop: dict[str, Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.clean.shape[0]
        if self.corrupt.shape != (n,):
            raise ResultFileError(f"clean and corrupt must both be [{n}], got {tuple(self.corrupt.shape)}")
        for name, v in self.values.items():
            axes = component_axes(Component(name))
            if v.ndim != len(axes) + 1 or v.shape[0] != n:
                raise ResultFileError(f"values[{name!r}] has shape {tuple(v.shape)}; expected [{n}, {', '.join(axes)}]")
            if name in self.graddrop and self.graddrop[name].shape != v.shape:
                raise ResultFileError(f"graddrop[{name!r}] has shape {tuple(self.graddrop[name].shape)}, "
                                      f"values {tuple(v.shape)}")
        if Direction(self.direction) not in (Direction.DENOISING, Direction.NOISING):
            raise ResultFileError(f"unknown direction {self.direction!r}")

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.values)

    @property
    def target(self) -> Tensor:
        """``[prompt]`` metric of the run that is patched into."""
        return self.corrupt if Direction(self.direction) == Direction.DENOISING else self.clean

    def _get(self, component: Component | str) -> Tensor:
        name = Component(component).value
        if name not in self.values:
            raise ConfigError(f"this result has no {name!r} sites; it holds {list(self.values)}.")
        return self.values[name]

    def mean(self, component: Component | str) -> Tensor:
        """Mean estimated effect over prompts, ``[layer, (head,) pos]``."""
        return self._get(component).mean(0)

    def component(self, component: Component | str) -> PatchingResult:
        """One component as a :class:`PatchingResult`: values = target metric + estimated effect."""
        comp = Component(component)
        vals = self._get(comp)
        shape = (-1,) + (1,) * (vals.ndim - 1)
        labels = {k: v for k, v in self.labels.items() if k in ("layer", "pos")}
        if comp.per_head:
            labels["head"] = [str(h) for h in range(vals.shape[2])]
        cfg = {**self.config, "component": comp.value, "direction": self.direction}
        return PatchingResult(values=vals + self.target.reshape(shape), axes=component_axes(comp), clean=self.clean,
                              corrupt=self.corrupt, labels=labels, config=cfg, manifest=self.manifest)

    def flat(self, *, score: str = "values") -> tuple[list[Site], Float[Tensor, "prompt site"]]:
        """Every site of every component and the ``[prompt, site]`` matrix of its values (or, with
        ``score="graddrop"``, its GradDrop magnitudes), components in stored order, row-major."""
        source = self.values if score == "values" else self.graddrop
        if score not in ("values", "graddrop") or not source:
            raise ConfigError(f"score must be 'values' or 'graddrop' (the latter only for AtP* with GradDrop); "
                              f"got {score!r}.")
        sites: list[Site] = []
        cols = []
        for name, v in source.items():
            comp = Component(name)
            for idx in torch.cartesian_prod(*(torch.arange(s) for s in v.shape[1:])).reshape(-1, v.ndim - 1).tolist():
                head = idx[1] if comp.per_head else None
                sites.append(Site(comp, idx[0], idx[-1], head))
            cols.append(v.reshape(v.shape[0], -1))
        return sites, torch.cat(cols, dim=1)

    def ranked(self, k: int = 20, *, score: str = "values") -> list[tuple[Site, float]]:
        """The ``k`` sites with the largest ``|mean|`` (over prompts), with their mean."""
        sites, flat = self.flat(score=score)
        mean = flat.mean(0)
        order = mean.abs().argsort(descending=True)[:k]
        return [(sites[i], float(mean[i])) for i in order.tolist()]

    def site_label(self, site: Site) -> str:
        """``site.label`` with the position's token, e.g. ``mlp_out L5 @3 (␣France)``."""
        from recallscope.plotting import display_token

        pos = self.labels.get("pos")
        if not pos or site.pos is None:
            return site.label
        return f"{site.label} ({display_token(pos[site.pos].rsplit('·', 1)[0])})"

    def plot(self, *, top: int = 20, score: str = "values", title: str | None = None) -> go.Figure:
        """Ranked bar chart of the ``top`` sites across all components, with 95% bootstrap CIs."""
        from recallscope.attribution.plots import ranked_bars

        sites, flat = self.flat(score=score)
        mean = flat.mean(0)
        order = mean.abs().argsort(descending=True)[:top]
        lo, hi = bootstrap_ci(flat[:, order])
        method = self.config.get("method", "attribution")
        return ranked_bars([self.site_label(sites[i]) for i in order.tolist()], mean[order].numpy(),
                           lo=lo.numpy(), hi=hi.numpy(), groups=[sites[i].component.value for i in order.tolist()],
                           title=title or f"{method}: top {len(order)} sites ({self.direction})",
                           x_title=f"estimated effect on {self.config.get('metric', 'metric')}")

    def plot_grid(self, components: tuple[str, ...] | None = None, *, title: str | None = None) -> go.Figure:
        """One layer x position heatmap per (non-per-head) component, side by side, sharing a colour axis."""
        from plotly.subplots import make_subplots

        from recallscope.plotting import display_token
        from recallscope.plotting.style import DIVERGING, apply_style

        comps = [c for c in (components or self.components) if not Component(c).per_head]
        if not comps:
            raise ConfigError("plot_grid draws layer x position components (resid_*, attn_out, mlp_out); "
                              "use .component(c).plot() for per-head components.")
        fig = make_subplots(rows=1, cols=len(comps), shared_yaxes=True, subplot_titles=comps,
                            horizontal_spacing=0.03)
        pos = [display_token(p) for p in self.labels.get("pos", [])] or None
        for i, c in enumerate(comps):
            mean = self.mean(c).numpy()
            fig.add_trace(go.Heatmap(z=mean, x=pos, y=[str(layer) for layer in range(mean.shape[0])],
                                     coloraxis="coloraxis", xgap=1, ygap=1,
                                     hovertemplate=f"{c}<br>layer %{{y}}<br>%{{x}}<br>%{{z:.4g}}<extra></extra>"),
                          row=1, col=i + 1)
        apply_style(fig, title=title or f"{self.config.get('method', 'attribution')} ({self.direction}): "
                                        f"estimated effect on {self.config.get('metric', 'metric')}")
        fig.update_layout(coloraxis=dict(colorscale=DIVERGING, cmid=0.0), height=26 * mean.shape[0] + 200)
        fig.update_yaxes(type="category", autorange="reversed", showgrid=False, title_text=None)
        fig.update_yaxes(title_text="layer", row=1, col=1)
        fig.update_xaxes(type="category", showgrid=False, tickangle=-60)
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the result atomically (values/graddrop tensors + result.json + manifest.json)."""
        tensors = {f"values.{k}": v for k, v in self.values.items()}
        tensors.update({f"graddrop.{k}": v for k, v in self.graddrop.items()})
        tensors.update(clean=self.clean, corrupt=self.corrupt)
        meta = {"direction": self.direction, "labels": self.labels, "config": self.config,
                "components": list(self.values), "graddrop": list(self.graddrop)}
        return save_result_dir(directory, "AttributionResult", tensors, meta, self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "AttributionResult":
        """Read a result written by :meth:`save`."""
        tensors, meta, manifest = load_result_dir(directory, "AttributionResult")
        try:
            values = {k: tensors[f"values.{k}"] for k in meta["components"]}
            graddrop = {k: tensors[f"graddrop.{k}"] for k in meta.get("graddrop", [])}
        except KeyError as exc:
            raise ResultFileError(f"{directory}: tensor {exc} listed in result.json is missing; the files are "
                                  "from different runs.") from exc
        return cls(values=values, clean=tensors["clean"], corrupt=tensors["corrupt"], direction=meta["direction"],
                   labels=meta.get("labels", {}), graddrop=graddrop, config=meta.get("config", {}),
                   manifest=manifest)
