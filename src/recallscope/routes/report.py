"""Route reports: rank candidate concepts for an (input, output) pair and give a verdict.

:func:`route_report` runs the four route scores of :mod:`.scores` for every concept and its controls over
every prompt of a :class:`~recallscope.routes.scores.RouteQuery`, and returns a :class:`RouteReport`.

The verdict for a concept ``c`` with controls ``k = 1..K`` (effects ``E`` = causal effect of ablating a
direction, in nats, averaged over prompts; ``TE`` = the input's total effect on the output):

1. Route score per layer window ``w``: ``S_c(w) = (E_c(w) - median_k E_k(w)) / |TE|``, the share of the
   total effect removed by ablating the concept beyond what control directions remove. The peak window
   is the argmax; the score is ``S_c`` there.
2. p-value by the max statistic over windows (which corrects for choosing the best layer): each control
   gets the same statistic against the other controls; ``p = (1 + #{k: max_w S_k >= max_w S_c}) / (1 + K)``.
3. 95% bootstrap CI of the score at the peak, resampling prompts and controls.
4. ``route`` if ``p <= alpha`` and the CI's lower end is at least ``min_share``; ``no route`` if the CI's
   upper end is below ``min_share``; otherwise ``inconclusive``. When ``TE < min_total_effect`` the input
   does not help the output (alternative inputs do as well or better), so there is no route to find and
   every verdict is ``inconclusive``.
5. The route lives in the windows where ``S_c(w) >= min_share`` and ``E_c(w)`` exceeds every control's.
"""

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError, ResultFileError
from recallscope.results import load_result_dir, save_result_dir

Verdict = Literal["route", "no route", "inconclusive"]


@dataclass(frozen=True)
class RouteConfig:
    """How :func:`route_report` scores routes."""

    n_controls: int = 19
    """Controls per concept (19 lets p reach 0.05)."""
    layers: tuple[int, ...] | None = None
    """First layers of the intervention windows (hidden-state layers); None = every ``stride``-th."""
    window: int = 1
    """Layers intervened on together."""
    stride: int = 1
    """Spacing of the default windows."""
    max_output_tokens: int = 3
    """Output tokens in the teacher-forced log-prob metric."""
    n_alternatives: int = 4
    """Random alternative inputs when the query gives none (total effect, mediation)."""
    method: Literal["exact", "attribution"] = "exact"
    """Causal effect by exact ablation or by its first-order (gradient) estimate."""
    mediation: bool = True
    """Compute the mediation share (d) (costs one run per alternative, window and slot)."""
    remove_output_direction: bool = True
    """Project the output tokens' direct logit directions out of every concept direction."""
    prefixes: tuple[str, ...] | None = None
    """Neutral contexts of concept representations (None: ``directions.NEUTRAL_PREFIXES``, English)."""
    baseline_words: tuple[str, ...] | None = None
    """Words whose mean representation is the baseline (None: ``directions.BASELINE_WORDS``, English)."""
    alpha: float = 0.05
    """Significance level of the route verdict."""
    min_share: float = 0.1
    """Smallest share of the total effect (beyond controls) that counts as a route."""
    min_total_effect: float = 0.5
    """Smallest input -> output total effect (nats, ``M_clean - M_alt``) for a conclusive verdict."""
    n_boot: int = 1000
    """Bootstrap resamples for the CIs."""
    seed: int = 0
    """Seed for alternatives and the bootstrap."""
    batch_size: int = 64
    """Interventions per forward batch."""

    def __post_init__(self) -> None:
        if self.n_controls < 1 or self.window < 1 or self.stride < 1 or not 0 < self.alpha < 1:
            raise ConfigError(f"invalid RouteConfig {self}: n_controls, window, stride >= 1 and 0 < alpha < 1.")
        if self.method not in ("exact", "attribution"):
            raise ConfigError(f"method must be 'exact' or 'attribution', not {self.method!r}.")


@dataclass(frozen=True)
class ConceptRoute:
    """The verdict on one concept (a row of :meth:`RouteReport.routes`)."""

    name: str
    source: str
    verdict: Verdict
    score: float
    ci: tuple[float, float]
    p_value: float
    peak_layer: int
    layers: tuple[int, ...]
    ablation: float
    control_ablation: float
    mediation: float
    control_mediation: float
    best_rank: float
    rank_percentile: float
    similarity_z: float
    n_controls: int


def _median_excluding(values: Tensor, skip: int) -> Tensor:
    keep = torch.cat([values[:skip], values[skip + 1:]])
    return keep.median(0).values


@dataclass(frozen=True)
class RouteReport:
    """Route scores of candidate concepts (and their controls) for one query.

    Slots are the concepts (first ``n_concepts``) followed by the control concepts.

    Attributes:
        query: the :class:`RouteQuery` fields.
        names / sources: per slot.
        controls: ``[concept, n_controls]`` slot index of each concept's controls.
        windows: first hidden-state layer of each intervention window.
        readout_rank: ``[prompt, slot, layer]`` best rank of the slot's first token over the input span
            under the lens (NaN for direction-only concepts); layers are hidden-state layers ``0..n_layers``.
        similarity: ``[prompt, slot, layer]`` cosine of the input's state with the slot's direction.
        ablation: ``[prompt, slot, window]`` causal effect (nats) of ablating the slot's direction.
        mediation: ``[prompt, slot, window]`` mediated share of the total effect.
        clean: ``[prompt]`` output log-prob; total_effect: ``[prompt]`` input -> output total effect.
        config / manifest: the :class:`RouteConfig` and provenance.
    """

    query: dict[str, Any]
    names: tuple[str, ...]
    sources: tuple[str, ...]
    controls: Int[Tensor, "concept control"]
    windows: tuple[int, ...]
    readout_rank: Float[Tensor, "prompt slot layer"]
    similarity: Float[Tensor, "prompt slot layer"]
    ablation: Float[Tensor, "prompt slot window"]
    mediation: Float[Tensor, "prompt slot window"]
    clean: Float[Tensor, " prompt"]
    total_effect: Float[Tensor, " prompt"]
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_slots = len(self.names)
        if len(self.sources) != n_slots or self.ablation.shape[1] != n_slots or self.readout_rank.shape[1] != n_slots:
            raise ResultFileError("RouteReport: names, sources and the slot axis of the scores disagree.")
        if self.ablation.shape[2] != len(self.windows) or self.mediation.shape != self.ablation.shape:
            raise ResultFileError("RouteReport: ablation/mediation do not match the windows.")
        if int(self.controls.max()) >= n_slots or self.controls.shape[0] > n_slots:
            raise ResultFileError("RouteReport: control indices point outside the slots.")

    @property
    def n_concepts(self) -> int:
        return int(self.controls.shape[0])

    def _scale(self, total: Tensor) -> Tensor:
        te = total.nanmean().abs()
        return te if torch.isfinite(te) and te > 0 else torch.tensor(1.0)

    def route_scores(self, concept: int) -> Float[Tensor, " window"]:
        """``S_c(w)``: the concept's ablation effect beyond its controls' median, as a share of |TE|."""
        effect = self.ablation.nanmean(0)
        ctrl = self.controls[concept]
        return (effect[concept] - effect[ctrl].median(0).values) / self._scale(self.total_effect)

    def _p_value(self, concept: int) -> float:
        effect = self.ablation.nanmean(0)
        ctrl = effect[self.controls[concept]]
        scale = self._scale(self.total_effect)
        t_c = float(self.route_scores(concept).max())
        t_k = torch.stack([((ctrl[k] - _median_excluding(ctrl, k)) / scale).max() for k in range(len(ctrl))])
        return (1 + int((t_k >= t_c).sum())) / (1 + len(ctrl))

    def _ci(self, concept: int, peak: int) -> tuple[float, float]:
        cfg = self.config
        gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
        n_boot, n_prompts, ctrl = int(cfg.get("n_boot", 1000)), self.ablation.shape[0], self.controls[concept]
        cols = self.ablation[:, torch.cat([torch.tensor([concept]), ctrl]), peak]  # [prompt, 1 + K]
        pidx = torch.randint(n_prompts, (n_boot, n_prompts), generator=gen)
        kidx = torch.randint(len(ctrl), (n_boot, len(ctrl)), generator=gen)
        means = cols[pidx].nanmean(1)  # [boot, 1 + K]
        te = self.total_effect[pidx].nanmean(1).abs()
        scale = torch.where(torch.isfinite(te) & (te > 0), te, torch.ones_like(te))
        s = (means[:, 0] - means[:, 1:].gather(1, kidx).median(1).values) / scale
        return float(s.quantile(0.025)), float(s.quantile(0.975))

    def _verdict(self, score_ci: tuple[float, float], p: float) -> Verdict:
        cfg = self.config
        te = float(self.total_effect.nanmean()) if torch.isfinite(self.total_effect).any() else float("inf")
        if te < float(cfg.get("min_total_effect", 0.5)):  # the input does not help the output: nothing to route
            return "inconclusive"
        if p <= float(cfg.get("alpha", 0.05)) and score_ci[0] >= float(cfg.get("min_share", 0.1)):
            return "route"
        if score_ci[1] < float(cfg.get("min_share", 0.1)):
            return "no route"
        return "inconclusive"

    def concept_route(self, concept: int) -> ConceptRoute:
        """The verdict and summary statistics of concept ``concept`` (see the module doc)."""
        scores = self.route_scores(concept)
        peak = int(scores.argmax())
        ctrl = self.controls[concept]
        effect, med = self.ablation.nanmean(0), self.mediation.nanmean(0)
        ci, p = self._ci(concept, peak), self._p_value(concept)
        live = (scores >= float(self.config.get("min_share", 0.1))) & (effect[concept] > effect[ctrl].max(0).values)
        best = self.readout_rank.amin(-1).nanmedian(0).values  # [slot]
        sim = self.similarity.mean(0)  # [slot, layer]
        z = (sim[concept] - sim[ctrl].mean(0)) / sim[ctrl].std(0).clamp_min(1e-6)
        return ConceptRoute(
            name=self.names[concept], source=self.sources[concept], verdict=self._verdict(ci, p),
            score=float(scores[peak]), ci=ci, p_value=p, peak_layer=self.windows[peak],
            layers=tuple(self.windows[w] for w in torch.nonzero(live).flatten().tolist()),
            ablation=float(effect[concept, peak]), control_ablation=float(effect[ctrl, peak].median()),
            mediation=float(med[concept, peak]), control_mediation=float(med[ctrl, peak].nanmedian()),
            best_rank=float(best[concept]),
            rank_percentile=float(((best[ctrl] > best[concept]).float() + 0.5 * (best[ctrl] == best[concept]).float())
                                  .mean()),
            similarity_z=float(z.max()), n_controls=len(ctrl))

    def routes(self) -> list[ConceptRoute]:
        """Every concept's :class:`ConceptRoute`, best route score first."""
        return sorted((self.concept_route(i) for i in range(self.n_concepts)), key=lambda r: -r.score)

    def verdict(self) -> Verdict:
        """``route`` if any concept is a route, ``no route`` if every concept is not, else ``inconclusive``."""
        verdicts = {r.verdict for r in self.routes()}
        return "route" if "route" in verdicts else "no route" if verdicts == {"no route"} else "inconclusive"

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the query, total effect, overall verdict and every concept's route row."""
        return {"query": self.query, "verdict": self.verdict(), "clean_logprob": self.clean.mean().item(),
                "total_effect": self.total_effect.nanmean().item(), "routes": [asdict(r) for r in self.routes()]}

    def plot(self, *, top: int = 8, title: str | None = None):
        """Route diagram (Sankey input -> concept -> output, widths = route scores) over the per-layer
        route scores of the top concepts with their controls' range."""
        from recallscope.routes.plots import plot_route_report

        return plot_route_report(self, top=top, title=title)

    def save(self, directory: str | os.PathLike) -> Path:
        tensors = {"controls": self.controls, "readout_rank": self.readout_rank, "similarity": self.similarity,
                   "ablation": self.ablation, "mediation": self.mediation, "clean": self.clean,
                   "total_effect": self.total_effect}
        meta = {"query": self.query, "names": list(self.names), "sources": list(self.sources),
                "windows": list(self.windows), "config": self.config}
        return save_result_dir(directory, "RouteReport", tensors, meta, self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RouteReport":
        t, meta, manifest = load_result_dir(directory, "RouteReport")
        return cls(query=meta["query"], names=tuple(meta["names"]), sources=tuple(meta["sources"]),
                   controls=t["controls"], windows=tuple(meta["windows"]), readout_rank=t["readout_rank"],
                   similarity=t["similarity"], ablation=t["ablation"], mediation=t["mediation"], clean=t["clean"],
                   total_effect=t["total_effect"], config=meta.get("config", {}), manifest=manifest)
