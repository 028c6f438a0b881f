"""The result of :func:`~recallscope.routes.family.route_family_report`: per-pairing transplant rates, the
statistics and verdicts derived from them (steps 5-9 of :mod:`recallscope.routes.family`'s module doc)."""

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError, ResultFileError
from recallscope.results import RichReprMixin, load_result_dir, register_result, save_result_dir
from recallscope.routes.transplant import TransplantConfig, max_sign_flip_p, verdict_of
from recallscope.routes.transplant_attr import joint_ci
from recallscope.routes.verdict import sign_flip_max_t
from recallscope.stats import holm

__all__ = ["FamilyConfig", "FamilyRow", "RouteFamilyReport", "with_config"]

FamilyVerdict = Literal["route", "no route", "inconclusive", "competitor"]
ATTR_TENSORS = ("attr_receiver", "attr_source", "attr_fitted", "attr_shuffled", "attr_ceiling")
"""The second-attribute check's tensors (all present or all None)."""
UNREQUIRED = ("input",)
"""Competitor classes reported beside the candidates but not required to be beaten (the ceiling)."""


@dataclass(frozen=True)
class FamilyConfig:
    """Settings of :func:`route_family_report` (the transplant's own settings in ``transplant``)."""

    transplant: TransplantConfig = TransplantConfig(min_layer=1)
    """Default ``min_layer = 1``: the configuration that met every target on fresh organism seeds (the
    token embedding gives false routes: a transplant there is a token substitution)."""
    layer_stride: int = 1
    """With ``transplant.layers`` None: score every ``layer_stride``-th layer from ``min_layer``."""
    max_answer_variants: int = 5
    """Pairings of the ``answer`` class: the answer as given, then other casings / spacings, at most this many."""
    n_boot: int = 1000

    def __post_init__(self) -> None:
        if self.layer_stride < 1 or self.max_answer_variants < 1:
            raise ConfigError("layer_stride and max_answer_variants must be >= 1.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FamilyConfig":
        d = dict(d)
        tc = TransplantConfig.from_dict(dict(d.pop("transplant", {}) or {"min_layer": 1}))
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"family config keys {unknown} are unknown; known: {[f.name for f in fields(cls)]}.")
        return cls(transplant=tc, **d)

    def to_dict(self) -> dict[str, Any]:
        return {"transplant": asdict(self.transplant), "layer_stride": self.layer_stride,
                "max_answer_variants": self.max_answer_variants, "n_boot": self.n_boot}


@dataclass(frozen=True)
class FamilyRow:
    """One pairing's verdict. Rates are means over units at the pairing's chosen layer; ``heldout`` is the mean
    of ``H`` (each source read at the layer chosen on the other folds); ``margins[class]`` = mean of
    ``H[this] - max H[class]`` over sources, ``margin_ci[class]`` its 95% bootstrap CI; ``p_competitors``: the
    largest of the pairing's own transplant p and the p of every required competitor class (before Holm)."""

    name: str
    role: str
    cls: str
    verdict: FamilyVerdict
    transplant_verdict: str
    score: float
    ci: tuple[float, float]
    p_value: float
    layer: int
    heldout: float
    fitted: float
    shuffled: float
    identity: float
    random: float
    ceiling: float
    margins: dict[str, float]
    margin_ci: dict[str, tuple[float, float]]
    p_competitors: float
    p_holm: float
    strongest_competitor: str
    n_sources: int
    n_units: int
    example: str
    answer_code: str = "not tested"
    """Step 10: "ruled out" (the reverse check passes), "not ruled out", or "not tested" (no attribute given, or
    a competitor pairing)."""
    attr_layer: int = -1
    """Step 10 at the layer with the largest min(forward, reverse): the reverse score (mean over sources of
    fitted - shuffled) with its 95% CI, its p (max over layers), the joint min with its CI, the success rates."""
    attr_score: float = float("nan")
    attr_ci: tuple[float, float] = (float("nan"), float("nan"))
    attr_p: float = float("nan")
    attr_joint: float = float("nan")
    attr_joint_ci: tuple[float, float] = (float("nan"), float("nan"))
    attr_fitted: float = float("nan")
    attr_shuffled: float = float("nan")
    attr_ceiling: float = float("nan")
    attr_units: int = 0


# ------------------------------------------------------------------------------------------ statistics
def _boot(values: Float[Tensor, " n"], n_boot: int, seed: int) -> tuple[float, float]:
    if values.numel() < 2:
        v = float(values.mean()) if values.numel() else float("nan")
        return v, v
    gen = torch.Generator().manual_seed(seed)
    means = values[torch.randint(0, len(values), (n_boot, len(values)), generator=gen)].mean(1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


def _heldout(d: Float[Tensor, "layer source"], src_fold: Int[Tensor, " source"]) -> Float[Tensor, " source"]:
    """Each source read at the layer that maximises the mean over the other folds' sources (step 7)."""
    out = torch.zeros(d.shape[1])
    for k in src_fold.unique().tolist():
        here, rest = src_fold == k, src_fold != k
        best = int(d[:, rest].mean(1).argmax()) if bool(rest.any()) else int(d.mean(1).argmax())
        out[here] = d[best, here]
    return out


# ------------------------------------------------------------------------------------------ result
@register_result
@dataclass(frozen=True)
class RouteFamilyReport(RichReprMixin):
    """Held-out transplant rates of every pairing of one family (module doc); verdicts are derived.

    Attributes:
        pairs: the family (prompt, input, concept, answer per pair).
        pairings / roles / classes / concepts: per pairing: its name, ``candidate`` or ``competitor``, its
            class (``candidate``, ``input``, ``answer`` or a caller's class) and one concept per pair.
        layers: the scored block inputs. receiver / source: ``[unit]`` pair indices; fold: ``[pair]``.
        fitted / shuffled / identity / random: ``[pairing, layer, unit]`` transplant success (identity and
            random only for candidates, NaN elsewhere); ceiling: ``[layer, unit]`` the source's own site state.
        attr_receiver / attr_source: ``[aunit]`` the second-attribute check's units (step 10); attr_fitted /
            attr_shuffled / attr_ceiling: ``[pairing, layer, aunit]`` its success (candidates only, NaN
            elsewhere). All None when no attribute template was given (the check was not run).
    """

    name: str
    pairs: tuple[dict[str, str], ...]
    pairings: tuple[str, ...]
    roles: tuple[str, ...]
    classes: tuple[str, ...]
    concepts: tuple[tuple[str, ...], ...]
    layers: tuple[int, ...]
    receiver: Int[Tensor, " unit"]
    source: Int[Tensor, " unit"]
    fold: Int[Tensor, " pair"]
    fitted: Float[Tensor, "pairing layer unit"]
    shuffled: Float[Tensor, "pairing layer unit"]
    identity: Float[Tensor, "pairing layer unit"]
    random: Float[Tensor, "pairing layer unit"]
    ceiling: Float[Tensor, "layer unit"]
    config: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    attr_receiver: Int[Tensor, " aunit"] | None = None
    attr_source: Int[Tensor, " aunit"] | None = None
    attr_fitted: Float[Tensor, "pairing layer aunit"] | None = None
    attr_shuffled: Float[Tensor, "pairing layer aunit"] | None = None
    attr_ceiling: Float[Tensor, "pairing layer aunit"] | None = None

    def __post_init__(self) -> None:
        n = len(self.pairings)
        if not (len(self.roles) == len(self.classes) == len(self.concepts) == n):
            raise ResultFileError("RouteFamilyReport: pairings, roles, classes and concepts disagree.")
        shape = (n, len(self.layers), len(self.receiver))
        for t in (self.fitted, self.shuffled, self.identity, self.random):
            if tuple(t.shape) != shape:
                raise ResultFileError(f"RouteFamilyReport: a rate tensor is {tuple(t.shape)}, expected {shape}.")
        attr = [getattr(self, k) for k in ATTR_TENSORS]
        if any(t is None for t in attr) and any(t is not None for t in attr):
            raise ResultFileError(f"RouteFamilyReport: give all of {ATTR_TENSORS} (the attribute check) or none.")
        if self.attr_source is not None:
            ashape = (n, len(self.layers), len(self.attr_source))
            if any(tuple(t.shape) != ashape for t in attr[2:]) or len(self.attr_receiver) != len(self.attr_source):
                raise ResultFileError(f"RouteFamilyReport: attribute-check tensors disagree (expected {ashape}).")

    def cfg(self) -> FamilyConfig:
        return FamilyConfig.from_dict(self.config) if self.config else FamilyConfig()

    # ------------------------------------------------------------------------------ statistics
    def sources(self) -> Tensor:
        return self.source.unique()

    def per_source(self, values: Float[Tensor, "layer unit"], source: Int[Tensor, " unit"] | None = None
                   ) -> Float[Tensor, "layer source"]:
        """Mean over each source's units (step 5): the tests run over held-out concepts. ``source``: the units'
        sources when they are not the forward transplant's (the attribute check's units)."""
        source = self.source if source is None else source
        return torch.stack([values[:, source == s].mean(1) for s in source.unique().tolist()], dim=1)

    def diff(self, i: int) -> Float[Tensor, "layer source"]:
        return self.per_source(self.fitted[i] - self.shuffled[i])

    def heldout(self, i: int) -> Float[Tensor, " source"]:
        return _heldout(self.diff(i), self.fold[self.sources()])

    def layer_scores(self) -> Float[Tensor, "pairing layer"]:
        """Family transplant score per pairing and layer (mean over sources of fitted - shuffled)."""
        return torch.stack([self.diff(i).mean(1) for i in range(len(self.pairings))])

    def _own(self, i: int, cfg: FamilyConfig) -> tuple[str, float, tuple[float, float], float, int]:
        d = self.diff(i)
        best = int(d.mean(1).argmax())
        score = float(d[best].mean())
        p = max_sign_flip_p(d, cfg.transplant.n_perm, cfg.transplant.seed)
        ci = _boot(d[best], cfg.n_boot, cfg.transplant.seed)
        return verdict_of(score, p, ci[1], cfg.transplant), score, ci, p, best

    @property
    def attribute_tested(self) -> bool:
        """Whether the second-attribute check (step 10) was run."""
        return self.attr_source is not None

    def attr_diff(self, i: int) -> Float[Tensor, "layer source"]:
        """Reverse transplant fitted - shuffled, mean over each source's units (step 10)."""
        assert self.attr_source is not None and self.attr_fitted is not None and self.attr_shuffled is not None
        return self.per_source(self.attr_fitted[i] - self.attr_shuffled[i], self.attr_source)

    def _attribute(self, i: int, cfg: FamilyConfig) -> dict[str, Any]:
        """Step 10 of a candidate: the FamilyRow's attr_* fields and ``answer_code``; ``{}`` when not tested."""
        if not self.attribute_tested or self.roles[i] != "candidate":
            return {}
        assert self.attr_fitted is not None and self.attr_shuffled is not None and self.attr_ceiling is not None
        assert self.attr_source is not None
        tc = cfg.transplant
        fwd, rev = self.diff(i), self.attr_diff(i)
        joint = torch.minimum(fwd.mean(1), rev.mean(1))
        best = int(joint.argmax())
        p = max_sign_flip_p(rev, tc.n_perm, tc.seed + 1)
        jci = joint_ci(fwd[best], rev[best], cfg.n_boot, tc.seed)
        at = lambda t: float(t[i, best].mean())  # noqa: E731
        return {"answer_code": "ruled out" if p <= tc.alpha and float(joint[best]) >= tc.min_score else "not ruled out",
                "attr_layer": self.layers[best], "attr_score": float(rev[best].mean()),
                "attr_ci": _boot(rev[best], cfg.n_boot, tc.seed + 2), "attr_p": p, "attr_joint": float(joint[best]),
                "attr_joint_ci": jci, "attr_fitted": at(self.attr_fitted), "attr_shuffled": at(self.attr_shuffled),
                "attr_ceiling": at(self.attr_ceiling), "attr_units": int(self.attr_source.numel())}

    def _margins(self, i: int, cfg: FamilyConfig) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Per class (other than this pairing's own): per-source margin ``H[i] - max H[class]`` and its p."""
        own = self.heldout(i)
        out, ps = {}, {}
        for cls in dict.fromkeys(c for j, c in enumerate(self.classes) if self.roles[j] == "competitor"):
            members = [j for j, c in enumerate(self.classes) if c == cls and j != i and self.roles[j] == "competitor"]
            if not members:
                continue
            m = own - torch.stack([self.heldout(j) for j in members]).amax(0)
            out[cls] = m
            ps[cls] = sign_flip_max_t(m[:, None], n_perm=cfg.transplant.n_perm, seed=cfg.transplant.seed)
        return out, ps

    def rows(self) -> list[FamilyRow]:
        """Every pairing's :class:`FamilyRow`: candidates (Holm over them) then competitors."""
        cfg = self.cfg()
        alpha = cfg.transplant.alpha
        parts = []
        for i in range(len(self.pairings)):
            own = self._own(i, cfg)
            margins, ps = self._margins(i, cfg)
            required = [c for c in ps if c not in UNREQUIRED]
            attr = self._attribute(i, cfg)
            # intersection-union: the transplant's own test, the attribute check and every required margin must hold
            parts.append((own, margins, ps, max([own[3], attr.get("attr_p", 0.0), *(ps[c] for c in required)]), attr))
        cands = [i for i, r in enumerate(self.roles) if r == "candidate"]
        adjusted = dict(zip(cands, holm([parts[i][3] for i in cands])))
        rows = []
        for i, ((tv, score, ci, p, best), margins, ps, p_comp, attr) in enumerate(parts):
            mean = {c: float(m.mean()) for c, m in margins.items()}
            mci = {c: _boot(m, cfg.n_boot, cfg.transplant.seed + 1) for c, m in margins.items()}
            required = [c for c in margins if c not in UNREQUIRED]
            p_holm = adjusted.get(i, float("nan"))
            code = attr.get("answer_code", "not tested")
            if self.roles[i] != "candidate":
                verdict: FamilyVerdict = "competitor"
            elif (tv == "route" and p_holm <= alpha and all(mean[c] > 0 for c in required)
                  and code != "not ruled out"):
                verdict = "route"
            elif (tv == "no route" or any(mci[c][1] < 0 for c in required)
                  or (code == "not ruled out" and attr["attr_joint_ci"][1] < cfg.transplant.min_score)):
                verdict = "no route"
            else:
                verdict = "inconclusive"
            at = lambda t: float(t[i, best].nanmean())  # noqa: E731
            rows.append(FamilyRow(
                name=self.pairings[i], role=self.roles[i], cls=self.classes[i], verdict=verdict, transplant_verdict=tv,
                score=score, ci=ci, p_value=p, layer=self.layers[best], heldout=float(self.heldout(i).mean()),
                fitted=at(self.fitted), shuffled=at(self.shuffled), identity=at(self.identity), random=at(self.random),
                ceiling=float(self.ceiling[best].mean()), margins=mean, margin_ci=mci, p_competitors=p_comp,
                p_holm=p_holm, strongest_competitor=min((c for c in required), key=mean.get, default=""),
                n_sources=int(self.sources().numel()), n_units=int(self.receiver.numel()),
                example=f"{self.pairs[0]['input']!r} -> {self.concepts[i][0]!r} -> {self.pairs[0]['answer']!r}",
                **attr))
        return rows

    def routes(self) -> list[FamilyRow]:
        return [r for r in self.rows() if r.role == "candidate"]

    def verdict(self) -> str:
        """``route`` if a candidate pairing is a route, ``no route`` if every one is not (or none is left: every
        pairing was the input or the answer itself), else ``inconclusive``."""
        verdicts = {r.verdict for r in self.routes()}
        return "route" if "route" in verdicts else "no route" if verdicts <= {"no route"} else "inconclusive"

    def summary(self) -> dict[str, Any]:
        rows = self.rows()
        return {"name": self.name, "verdict": self.verdict(), "detector": "held-out concept transplant (family)",
                "n_pairs": len(self.pairs), "n_units": int(self.receiver.numel()), "layers": list(self.layers),
                "ceiling_by_layer": [round(float(v), 4) for v in self.ceiling.mean(1)],
                # the source's own site state is the best any transplant can do: below min_score at every layer,
                # no pairing can pass, so "no route" then says the site alone does not set the answer
                "site_sufficient": bool(float(self.ceiling.mean(1).max()) >= self.cfg().transplant.min_score),
                # step 10: without it a route verdict cannot tell "the site holds the concept" from "its answer"
                "answer_code": ("tested: " + self.cfg().transplant.attribute_template if self.attribute_tested
                                else "not tested (no attribute given)"),
                "rows": [asdict(r) for r in rows], "config": self.config}

    def summary_extra(self) -> list[tuple[str, str]]:
        return [("verdict", self.verdict())] + [
            (r.name, f"{r.verdict} (transplant {r.transplant_verdict}, score {r.score:+.2f}, layer {r.layer}"
                     + (f"; answer code {r.answer_code}" + (f": reverse {r.attr_score:+.2f}, p {r.attr_p:.3g}, layer "
                                                           f"{r.attr_layer}" if r.attr_layer >= 0 else "")
                        if r.role == "candidate" else "") + ")")
            for r in self.rows()]

    # ------------------------------------------------------------------------------ plot and files
    def plot(self, *, title: str | None = None) -> Any:
        """Per-layer family transplant score of every pairing (candidates solid, competitors dashed, the
        input's own site state dotted) beside the held-out scores with 95% CIs."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4],
                            subplot_titles=("transplant score by layer (fitted - shuffled)", "held-out score"))
        scores = self.layer_scores()
        for i, name in enumerate(self.pairings):
            dash = "solid" if self.roles[i] == "candidate" else "dash"
            fig.add_trace(go.Scatter(x=list(self.layers), y=scores[i].tolist(), name=f"{name} ({self.classes[i]})",
                                     line={"dash": dash}), row=1, col=1)
        fig.add_trace(go.Scatter(x=list(self.layers), y=self.ceiling.mean(1).tolist(), name="ceiling (source's site)",
                                 line={"dash": "dot", "color": "grey"}), row=1, col=1)
        cfg = self.cfg()
        held = [self.heldout(i) for i in range(len(self.pairings))]
        cis = [_boot(h, cfg.n_boot, cfg.transplant.seed) for h in held]
        means = [float(h.mean()) for h in held]
        fig.add_trace(go.Bar(x=list(self.pairings), y=means, showlegend=False,
                             marker_color=["#1f77b4" if r == "candidate" else "#aaaaaa" for r in self.roles],
                             error_y={"type": "data", "symmetric": False,
                                      "array": [c[1] - m for c, m in zip(cis, means)],
                                      "arrayminus": [m - c[0] for c, m in zip(cis, means)]}), row=1, col=2)
        fig.update_layout(title=title or f"route family {self.name}: {self.verdict()}", template="plotly_white")
        fig.update_xaxes(title_text="layer (block input)", row=1, col=1)
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        tensors = {k: getattr(self, k) for k in ("receiver", "source", "fold", "fitted", "shuffled", "identity",
                                                  "random", "ceiling")}
        if self.attribute_tested:
            tensors.update({k: getattr(self, k) for k in ATTR_TENSORS})
        meta = {"name": self.name, "pairs": list(self.pairs), "pairings": list(self.pairings), "roles": list(self.roles),
                "classes": list(self.classes), "concepts": [list(c) for c in self.concepts],
                "layers": list(self.layers), "config": self.config}
        return save_result_dir(directory, "RouteFamilyReport", tensors, meta, self.manifest)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RouteFamilyReport":
        t, meta, manifest = load_result_dir(directory, "RouteFamilyReport")
        return cls(name=meta["name"], pairs=tuple(meta["pairs"]), pairings=tuple(meta["pairings"]),
                   roles=tuple(meta["roles"]), classes=tuple(meta["classes"]),
                   concepts=tuple(tuple(c) for c in meta["concepts"]), layers=tuple(meta["layers"]),
                   receiver=t["receiver"], source=t["source"], fold=t["fold"], fitted=t["fitted"],
                   shuffled=t["shuffled"], identity=t["identity"], random=t["random"], ceiling=t["ceiling"],
                   config=meta.get("config", {}), manifest=manifest,
                   **{k: t.get(k) for k in ATTR_TENSORS})  # absent in reports saved before the attribute check


def with_config(report: RouteFamilyReport, **changes: Any) -> RouteFamilyReport:
    """The same report judged under other statistics settings (``n_perm``, ``alpha``, ``min_score`` ...)."""
    cfg = report.cfg()
    tc = replace(cfg.transplant, **{k: v for k, v in changes.items() if k in TransplantConfig.__dataclass_fields__})
    rest = {k: v for k, v in changes.items() if k not in TransplantConfig.__dataclass_fields__}
    return replace(report, config=replace(cfg, transplant=tc, **rest).to_dict())
