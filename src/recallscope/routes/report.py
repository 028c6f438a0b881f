"""Route reports: does an (input, output) recall pass through a candidate concept? Verdicts against competitors.

:func:`~recallscope.routes.route_report` scores every slot of a report on every prompt: the candidates,
the competitors (:mod:`~recallscope.routes.competitors`: the input itself, the output in every casing and
spacing, the output's unembedding neighbours, random directions matched to each candidate on the cosine
with the state and on edit norm, and any classes the caller adds), and frequency-matched controls.

**The evidence standard** (what "route" means). The primary causal score is the *interchange*
(resample) intervention along the concept's direction at the input positions
(:mod:`~recallscope.routes.interchange`): the direction's component is set to the value the model produces
for alternative inputs in the same context; the effect ``E`` is the drop of the output's log-prob (nats).
A candidate ``c`` is a **route** only if all of these hold (:class:`~recallscope.routes.config.RouteConfig`
holds the thresholds):

1. the input matters: total effect ``TE = M_clean - M_alt >= min_total_effect``;
2. it beats *every* competitor class on the same prompts: the paired sign-flip test over prompts of the
   margin ``D = E_c - max_k class_k`` (max over windows, so the peak layer is selection-corrected;
   :mod:`~recallscope.routes.verdict`), Holm-corrected over the report's candidates, ``p_holm <= alpha``;
3. the held-out margin (each prompt read at the window chosen on the other prompts), as a share of
   ``|TE|``, is at least ``min_share``;
4. its mediated share (held-out interchange effect / TE) is at least ``min_mediated``.

**No route** when the CI of the mediated share lies below ``min_mediated`` (the concept does not carry the
effect) or that of the held-out margin below 0 (a competitor class clearly does better); otherwise
**inconclusive** (e.g. a concept that mediates but ties with the input itself, as when training aligned the
input's state with the concept's). A concept that *is* the input or the output (any casing or
spacing) is always a **competitor**, never a route, also when a user passes it as a candidate. Mean
ablation (``ablation``) is reported but no verdict rests on it.
"""

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ResultFileError
from recallscope.results import load_result_dir, register_result, save_result_dir
from recallscope.routes.config import RouteConfig
from recallscope.routes.verdict import bootstrap_ratio, class_effect, cross_fitted, holm, sign_flip_max_t, t_stats

__all__ = ["ConceptRoute", "RouteConfig", "RouteReport", "Verdict"]

Verdict = Literal["route", "no route", "inconclusive", "competitor"]


@dataclass(frozen=True)
class ConceptRoute:
    """The verdict on one concept (a row of :meth:`RouteReport.routes` or :meth:`RouteReport.competitor_rows`).

    ``score``: held-out margin over the strongest competitor class, as a share of ``|TE|``; ``margins``:
    per class, the margin at the peak window (share of ``|TE|``); ``mediation``: held-out interchange
    effect / TE; ``interchange``: interchange effect at the peak (nats); ``effect_per_norm``: that effect
    per unit of edit norm; ``ablation`` / ``control_ablation``: mean-ablation effects at the peak (nats).
    """

    name: str
    source: str
    role: str
    verdict: Verdict
    score: float
    ci: tuple[float, float]
    p_value: float
    p_holm: float
    peak_layer: int
    layers: tuple[int, ...]
    interchange: float
    mediation: float
    mediation_ci: tuple[float, float]
    edit_norm: float
    effect_per_norm: float
    margins: dict[str, float]
    strongest_competitor: str
    ablation: float
    control_ablation: float
    best_rank: float
    rank_percentile: float
    similarity_z: float
    n_controls: int
    n_prompts: int


@register_result
@dataclass(frozen=True)
class RouteReport:
    """Route scores of the candidates, their competitors and controls for one query (module doc).

    Attributes:
        query: the :class:`~recallscope.routes.scores.RouteQuery` fields (prompts after template expansion).
        names / sources: per slot.
        roles: per slot: ``candidate``, ``competitor`` (a concept the caller passed that is the input or
            the output), ``auto`` (a generated competitor), ``random`` (matched random direction),
            ``matched`` (a competitor's copy at a tested concept's edit norm) or ``control``.
        classes: per slot, its competitor class (``candidate``, ``input``, ``output``, ``neighbour``,
            ``random``, ``control`` or a caller's class name).
        owner: ``[slot]`` the tested slot a random direction, matched copy or control belongs to (-1: none).
        windows: first hidden-state layer of each intervention window.
        readout_rank / similarity: ``[prompt, slot, layer]`` lens rank of the slot's first token over the
            input span; cosine of the input's state (minus baseline) with the slot's direction.
        interchange / edit_norm / ablation: ``[prompt, slot, window]`` interchange effect (nats), its edit
            norm, mean-ablation effect (nats); NaN where not computed.
        clean / total_effect: ``[prompt]``.
        config / manifest: the :class:`RouteConfig` fields and provenance.
    """

    query: dict[str, Any]
    names: tuple[str, ...]
    sources: tuple[str, ...]
    roles: tuple[str, ...]
    classes: tuple[str, ...]
    owner: Int[Tensor, " slot"]
    windows: tuple[int, ...]
    readout_rank: Float[Tensor, "prompt slot layer"]
    similarity: Float[Tensor, "prompt slot layer"]
    interchange: Float[Tensor, "prompt slot window"]
    edit_norm: Float[Tensor, "prompt slot window"]
    ablation: Float[Tensor, "prompt slot window"]
    clean: Float[Tensor, " prompt"]
    total_effect: Float[Tensor, " prompt"]
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.names)
        if not (len(self.sources) == len(self.roles) == len(self.classes) == len(self.owner) == n):
            raise ResultFileError("RouteReport: names, sources, roles, classes and owner disagree on the slots.")
        for t in (self.interchange, self.edit_norm, self.ablation):
            if t.shape[1] != n or t.shape[2] != len(self.windows):
                raise ResultFileError("RouteReport: a score tensor does not match the slots and windows.")
        if self.readout_rank.shape[1] != n or (n and int(self.owner.max()) >= n):
            raise ResultFileError("RouteReport: readout/owner indices point outside the slots.")

    # ------------------------------------------------------------------------------ slots
    def cfg(self, name: str) -> Any:
        return self.config.get(name, getattr(RouteConfig(), name))

    def tested(self) -> list[int]:
        """Slots with the full statistics: the candidates, and the caller's competitors when they were
        given their own matched slots (``RouteConfig.test_competitors``)."""
        owned = set(self.owner.tolist())
        return [i for i, r in enumerate(self.roles) if r == "candidate" or (r == "competitor" and i in owned)]

    def candidates(self) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == "candidate"]

    def competitor_classes(self, slot: int) -> dict[str, list[int]]:
        """Class name -> member slots that ``slot`` must beat: its norm-matched copies of the competitors
        (or, without them, the competitors themselves) and its matched random directions."""
        owners = self.owner.tolist()
        has_matched = any(r == "matched" and o == slot for r, o in zip(self.roles, owners))
        out: dict[str, list[int]] = {}
        for j, (role, cls, owner) in enumerate(zip(self.roles, self.classes, owners)):
            own = role in ("random", "matched") and owner == slot
            shared = role in ("auto", "competitor") and not has_matched and j != slot
            if own or shared:
                out.setdefault(cls, []).append(j)
        return out

    def scale(self) -> Tensor:
        te = self.total_effect.nanmean().abs()
        return te if torch.isfinite(te) and te > 0 else torch.tensor(1.0)

    def margin(self, slot: int) -> tuple[Float[Tensor, "prompt window"], dict[str, Tensor]]:
        """``D[prompt, window] = E_slot - max_k class_k`` (nats) and each class's effect."""
        effects = {k: class_effect(self.interchange[:, m], "max") for k, m in self.competitor_classes(slot).items()}
        own = self.interchange[:, slot]
        strongest = torch.stack(list(effects.values())).amax(0) if effects else torch.zeros_like(own)
        return own - strongest, effects

    # ------------------------------------------------------------------------------ verdicts
    def _p_values(self) -> dict[int, float]:
        return {i: sign_flip_max_t(self.margin(i)[0], n_perm=int(self.cfg("n_perm")), seed=int(self.cfg("seed")))
                for i in self.tested()}

    def _verdict(self, role: str, p_holm: float, score: float, ci: tuple[float, float], med: float,
                 med_ci: tuple[float, float]) -> Verdict:
        if role != "candidate":
            return "competitor"
        te = float(self.total_effect.nanmean()) if torch.isfinite(self.total_effect).any() else float("nan")
        if not (te >= float(self.cfg("min_total_effect"))) or not torch.isfinite(torch.tensor(score)):
            return "inconclusive"  # the input does not help the output, or no interchange was run
        min_share, min_med = float(self.cfg("min_share")), float(self.cfg("min_mediated"))
        if p_holm <= float(self.cfg("alpha")) and score >= min_share and med >= min_med:
            return "route"
        if med_ci[1] < min_med or ci[1] < 0:  # it does not carry the effect, or a competitor clearly beats it
            return "no route"
        return "inconclusive"

    def _row(self, slot: int, p: float, p_adj: float) -> ConceptRoute:
        d, effects = self.margin(slot)
        te, scale = self.total_effect, self.scale()
        n_boot, seed = int(self.cfg("n_boot")), int(self.cfg("seed"))
        finite = bool(torch.isfinite(d).all())
        peak = int(torch.nan_to_num(t_stats(d.double()), nan=-float("inf")).argmax()) if finite else 0
        if finite and d.shape[0] > 1:
            _, d_out, e_out = cross_fitted(d, self.interchange[:, slot])
        else:
            d_out, e_out = d[:, peak], self.interchange[:, slot, peak]
        score, med = float(d_out.mean() / scale), float(e_out.mean() / scale)
        ci, med_ci = (bootstrap_ratio(d_out, te, n_boot=n_boot, seed=seed),
                      bootstrap_ratio(e_out, te, n_boot=n_boot, seed=seed + 1))
        margins = {k: float((self.interchange[:, slot, peak] - v[:, peak]).mean() / scale) for k, v in effects.items()}
        mean_d, mean_e = d.mean(0) / scale, self.interchange[:, slot].mean(0) / scale
        live = (mean_d >= float(self.cfg("min_share"))) & (mean_e >= float(self.cfg("min_mediated")))
        return ConceptRoute(
            name=self.names[slot], source=self.sources[slot], role=self.roles[slot],
            verdict=self._verdict(self.roles[slot], p_adj, score, ci, med, med_ci), score=score, ci=ci, p_value=p,
            p_holm=p_adj, peak_layer=self.windows[peak],
            layers=tuple(self.windows[w] for w in torch.nonzero(live).flatten().tolist()),
            margins=margins, strongest_competitor=min(margins, key=margins.get) if margins else "",
            mediation=med, mediation_ci=med_ci, **self._effects_at(slot, peak))

    def _effects_at(self, slot: int, peak: int) -> dict[str, Any]:
        effect = self.interchange[:, slot, peak].nanmean()
        norm = self.edit_norm[:, slot, peak].nanmean()
        ctrl = [j for j, (c, o) in enumerate(zip(self.classes, self.owner.tolist())) if c == "control" and o == slot]
        abl = self.ablation.nanmean(0)
        best = self.readout_rank.amin(-1).nanmedian(0).values  # [slot]
        sim = self.similarity.mean(0)
        if ctrl:
            pct = float(((best[ctrl] > best[slot]).float() + 0.5 * (best[ctrl] == best[slot]).float()).mean())
            z = float(((sim[slot] - sim[ctrl].mean(0)) / sim[ctrl].std(0).nan_to_num(0).clamp_min(1e-6)).max())
            ctrl_abl = float(abl[ctrl, peak].median())
        else:
            pct = z = ctrl_abl = float("nan")
        return dict(interchange=float(effect), edit_norm=float(norm),
                    effect_per_norm=float(effect / norm) if norm > 0 else float("nan"), ablation=float(abl[slot, peak]),
                    control_ablation=ctrl_abl, best_rank=float(best[slot]), rank_percentile=pct, similarity_z=z,
                    n_controls=len(ctrl), n_prompts=int(self.interchange.shape[0]))

    def _all_rows(self) -> list[ConceptRoute]:
        p = self._p_values()
        cands = self.candidates()
        adjusted = dict(zip(cands, holm([p[i] for i in cands])))
        return [self._row(i, p[i], adjusted.get(i, p[i])) for i in self.tested()]

    def routes(self) -> list[ConceptRoute]:
        """Every candidate's :class:`ConceptRoute`, best score first (competitors: :meth:`competitor_rows`)."""
        return sorted((r for r in self._all_rows() if r.role == "candidate"), key=lambda r: -r.score)

    def competitor_rows(self) -> list[ConceptRoute]:
        """Rows of the competitors: the caller's own (full statistics, verdict ``competitor``), then every
        generated one (effect at its own peak window; test statistics NaN)."""
        rows = [r for r in self._all_rows() if r.role != "candidate"]
        nan, scale, tested = float("nan"), self.scale(), set(self.tested())
        for j, role in enumerate(self.roles):
            if role not in ("auto", "competitor") or j in tested:
                continue
            mean = self.interchange[:, j].nanmean(0)
            peak = int(torch.nan_to_num(mean, nan=-float("inf")).argmax())
            rows.append(ConceptRoute(
                name=self.names[j], source=self.sources[j], role=role, verdict="competitor", score=nan,
                ci=(nan, nan), p_value=nan, p_holm=nan, peak_layer=self.windows[peak], layers=(), margins={},
                strongest_competitor="", mediation=float(mean[peak] / scale), mediation_ci=(nan, nan),
                **self._effects_at(j, peak)))
        return rows

    def verdict(self) -> Verdict:
        """``route`` if a candidate is a route, ``no route`` if every candidate is not, else ``inconclusive``."""
        verdicts = {r.verdict for r in self.routes()}
        return "route" if "route" in verdicts else "no route" if verdicts == {"no route"} else "inconclusive"

    def summary(self) -> dict[str, Any]:
        """JSON-ready: query, total effect, verdict, every candidate's row and every competitor's row."""
        return {"query": self.query, "verdict": self.verdict(), "clean_logprob": self.clean.mean().item(),
                "total_effect": self.total_effect.nanmean().item(), "routes": [asdict(r) for r in self.routes()],
                "competitors": [asdict(r) for r in self.competitor_rows()]}

    def plot(self, *, top: int = 8, title: str | None = None):
        """Route diagram (input -> concept -> output, candidates and competitors) over the per-layer
        interchange effects of the candidates beside each competitor class."""
        from recallscope.routes.plots import plot_route_report

        return plot_route_report(self, top=top, title=title)

    # ------------------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> Path:
        tensors = {k: getattr(self, k) for k in ("owner", "readout_rank", "similarity", "interchange", "edit_norm",
                                                  "ablation", "clean", "total_effect")}
        meta = {"query": self.query, "names": list(self.names), "sources": list(self.sources),
                "roles": list(self.roles), "classes": list(self.classes), "windows": list(self.windows),
                "config": self.config}
        return save_result_dir(directory, "RouteReport", tensors, meta, self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RouteReport":
        t, meta, manifest = load_result_dir(directory, "RouteReport")
        if "roles" not in meta:
            raise ResultFileError(f"{directory} is a route report of the old format (mean ablation against "
                                  "controls, no competitors); re-run the route analysis that produced it.")
        return cls(query=meta["query"], names=tuple(meta["names"]), sources=tuple(meta["sources"]),
                   roles=tuple(meta["roles"]), classes=tuple(meta["classes"]), owner=t["owner"],
                   windows=tuple(meta["windows"]), readout_rank=t["readout_rank"], similarity=t["similarity"],
                   interchange=t["interchange"], edit_norm=t["edit_norm"], ablation=t["ablation"], clean=t["clean"],
                   total_effect=t["total_effect"], config=meta.get("config", {}), manifest=manifest)
