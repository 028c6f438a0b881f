"""Does a transcoder feature set carry a route? The family concept transplant read through the set's features.

The validated route detector is the family transplant (:mod:`recallscope.routes.family`): a pairing maps each
query's input to a concept; the concept's own state (its last token in a neutral context) is mapped by a ridge
map, fitted outside the fold, into the input's site; a route transplants the source's answer into held-out
receivers, beating the answer itself in every casing. :func:`feature_family_report` asks the same question of
a feature set ``S`` (one layer or several; a :class:`~recallscope.features.concepts.FeatureSet`, a
:class:`~recallscope.features.interventions.Supernode` or ``(layer, features)``):

1. **Read through S.** Every pairing's concept (the candidate, the input itself, the answer in every casing)
   is read as the features' **encoder pre-activations** ``ln2(h) @ W_enc[:, S] + b_enc[S]`` at its last token
   (``reading="pre"``, default) or their TopK activations (``reading="acts"``); the ridge maps of the family
   transplant then have ``|S|`` inputs. Why pre-activations: TopK activations of small transcoders are nearly
   token-specific, so no linear map from them generalises to held-out concepts (measured on route-s0: all 256
   layer-0 activations transplant at 0.01 against 0.99 for the residual itself); the pre-activations are what
   the features read of the concept state, densely. Site layers: the residual entering the set's first layer
   (what its features read, with that block's attention) and every later one, from ``min_layer``, unless the
   config names them.
2. **Competitors** exactly as in :func:`~recallscope.routes.family.route_family_report`, read through the same
   features: the set's candidate row must pass the family verdict (transplant route, beats every answer variant,
   the input itself reported as the ceiling).
3. **Placebo class.** ``n_placebo`` feature sets of the same size at the same layers, matched on activation
   frequency and decoder norm (:func:`~recallscope.features.concepts.matched_placebos`, statistics on the
   family's own prompts and concepts), read the candidate concepts the same way, on the same folds, units and
   shuffled pairings. Statistic: the mean held-out transplant score ``H`` (each source read at the layer chosen
   on the other folds). ``p_placebo = (1 + #{T(P) >= T(S)}) / (1 + n_placebo)`` (99 draws: p can reach 0.01).
4. **Verdict** per set (Holm over the sets of one call on ``max(p_family, p_placebo)``, an intersection-union
   test): **route** iff the family row is a route and ``p_holm <= alpha``; **no route** iff the family row is no
   route or the set is no better than a typical placebo (``p_placebo > 0.5``); else **inconclusive**; a set whose
   concept is the input or the answer is a **competitor**.
5. **The causal half** (:func:`feature_swap`, reported beside the verdict, not in it): the set's site activations
   swapped from a source pair into a receiver pair (the MLP output plus the decoded difference), against the
   same placebo sets. Not in the verdict because the site is read in rote models too: a swap that moves the
   answer shows the set carries what the readout uses, not that it holds the concept. Measured on the organisms:
   no 24-feature set (planted, attribution-selected or placebo) moves the answer (<= 0.5% of units), and
   swapping all 128 layer-0 features moves 7% in route-s0: the site's content there is written by the embedding
   and attention (and the transcoders' skip path), not by MLP features.

Selection must not double dip: a set chosen from data is chosen on pairs disjoint from those it is tested on.
:func:`feature_family_crossfit` does that (selection pairs drawn first, seeded; the family test, its folds and
its placebos see only the other pairs) with :func:`select_by_attribution` (the features with the largest mean
``|activation x gradient|`` of the answer logit at the input's site: the nodes an attribution graph would keep).
:func:`planted_route_features` builds a positive control with known truth: features whose encoders read the
principal subspace of the concept states (fitted on selection pairs only).
"""

import copy
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.features.concepts import FeatureSet, check_members, feature_stats, matched_placebos
from recallscope.features.interventions import Supernode
from recallscope.features.transcoder import TranscoderSet, feature_activations
from recallscope.routes.family import FamilyConfig, route_family_report
from recallscope.routes.transplant import TransplantPair, site_position
from recallscope.stats import holm

__all__ = ["FeatureRouteConfig", "FeatureRouteReport", "FeatureRouteRow", "feature_family_crossfit",
           "crossfit_split", "feature_family_report", "planted_route_features", "select_by_attribution"]

SetSpec = FeatureSet | Supernode | tuple[int, Sequence[int]]


@dataclass(frozen=True)
class FeatureRouteConfig:
    """Settings of :func:`feature_family_report` (the family transplant's own settings in ``family``)."""

    family: FamilyConfig = FamilyConfig()
    n_placebo: int = 99
    """Matched placebo sets per feature set (>= 19 so that p can fall below 0.05)."""
    pool: int = 8
    """A placebo member is drawn from this many nearest features (frequency rank, decoder norm)."""
    reading: Literal["pre", "acts"] = "pre"
    """How a concept is read through the features: encoder pre-activations or TopK activations (module doc)."""
    placebo_max_p: float = 0.5
    """``p_placebo`` above this: the set is no better than a typical placebo set ("no route")."""
    swap: bool = True
    """Also run the causal half (:func:`feature_swap`, reported beside the verdict) for one-layer sets."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_placebo < 19:
            raise ConfigError(f"n_placebo={self.n_placebo} cannot give p below 0.05; use at least 19 (default 99).")
        if self.reading not in ("pre", "acts"):
            raise ConfigError(f"reading must be 'pre' or 'acts', not {self.reading!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family.to_dict(), "n_placebo": self.n_placebo, "pool": self.pool,
                "reading": self.reading, "placebo_max_p": self.placebo_max_p, "swap": self.swap, "seed": self.seed}


@dataclass(frozen=True)
class FeatureRouteRow:
    """One feature set's verdict and the numbers behind it."""

    name: str
    members: tuple[tuple[int, int], ...]
    verdict: str
    family_verdict: str
    score: float
    """The family transplant score of the set's candidate pairing (max over layers of fitted - shuffled)."""
    heldout: float
    """The placebo statistic T(S): mean held-out score (layer chosen on the other folds)."""
    layer: int
    margin_answer: float
    margin_input: float
    p_family: float
    p_placebo: float
    p_holm: float
    placebo_scores: tuple[float, ...]
    placebo_sets: tuple[tuple[tuple[int, int], ...], ...]
    swap: dict[str, Any] = field(default_factory=dict)
    """The causal half (:func:`feature_swap`): score, edit norm, placebo scores and norms, p; empty if not run."""

    @property
    def placebo_median(self) -> float:
        return float(torch.tensor(self.placebo_scores).median())


@dataclass(frozen=True)
class FeatureRouteReport:
    """Verdicts of :func:`feature_family_report` with each set's family report (competitor rows included)."""

    name: str
    rows: tuple[FeatureRouteRow, ...]
    reports: dict[str, Any]
    config: dict[str, Any]
    pairs_tested: tuple[int, ...] = ()
    """Indices (into the caller's pairs) the family test ran on; with cross-fitting, disjoint from selection."""
    pairs_selected_on: tuple[int, ...] = ()
    manifest: dict[str, Any] = field(default_factory=dict)

    def verdict(self) -> str:
        verdicts = {r.verdict for r in self.rows}
        return "route" if "route" in verdicts else "no route" if verdicts <= {"no route", "competitor"} else "inconclusive"

    def row(self, name: str) -> FeatureRouteRow:
        found = [r for r in self.rows if r.name == name]
        if not found:
            raise ConfigError(f"no feature set named {name!r}; sets: {[r.name for r in self.rows]}.")
        return found[0]

    def summary(self) -> dict[str, Any]:
        rows = [{**{k: v for k, v in asdict(r).items() if k not in ("placebo_scores", "placebo_sets", "swap")},
                 "swap": {k: v for k, v in r.swap.items() if not k.startswith("placebo_")},
                 "swap_placebo_median": float(torch.tensor(r.swap["placebo_scores"]).median()) if r.swap else None,
                 "placebo_median": r.placebo_median, "placebo_max": max(r.placebo_scores),
                 "n_placebo": len(r.placebo_scores)} for r in self.rows]
        return {"name": self.name, "verdict": self.verdict(), "detector": "family concept transplant read through "
                "transcoder features, against matched placebo feature sets", "rows": rows,
                "pairs_tested": list(self.pairs_tested), "pairs_selected_on": list(self.pairs_selected_on),
                "config": self.config, "manifest": self.manifest}

    def save(self, directory: str | os.PathLike) -> Path:
        """``feature_routes.json`` (every row with its placebo sets and scores) and each set's family report in
        ``family/<i>/`` (:meth:`RouteFamilyReport.save`)."""
        from recallscope.manifest import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = [r.name for r in self.rows]
        for i, name in enumerate(names):
            self.reports[name].save(directory / "family" / str(i))
        meta = {"format": "recallscope-feature-routes/1", "name": self.name, "rows": [asdict(r) for r in self.rows],
                "config": self.config, "pairs_tested": list(self.pairs_tested),
                "pairs_selected_on": list(self.pairs_selected_on), "manifest": self.manifest}
        atomic_write_text(directory / "feature_routes.json", json.dumps(meta, indent=1, default=str) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "FeatureRouteReport":
        from recallscope.errors import ResultFileError
        from recallscope.routes.family_report import RouteFamilyReport

        directory = Path(directory)
        path = directory / "feature_routes.json"
        if not path.is_file():
            raise ResultFileError(f"{directory} holds no feature_routes.json; write one with FeatureRouteReport.save.")
        meta = json.loads(path.read_text())
        pairs_of = lambda ms: tuple((int(a), int(b)) for a, b in ms)  # noqa: E731
        rows = tuple(FeatureRouteRow(**{**r, "members": pairs_of(r["members"]),
                                        "placebo_scores": tuple(r["placebo_scores"]),
                                        "placebo_sets": tuple(pairs_of(p) for p in r["placebo_sets"])})
                     for r in meta["rows"])
        reports = {r.name: RouteFamilyReport.load(directory / "family" / str(i)) for i, r in enumerate(rows)}
        return cls(name=meta["name"], rows=rows, reports=reports, config=meta["config"],
                   pairs_tested=tuple(meta["pairs_tested"]), pairs_selected_on=tuple(meta["pairs_selected_on"]),
                   manifest=meta["manifest"])

    def plot(self, *, title: str | None = None) -> Any:
        """Each set's held-out score beside its placebo sets' scores (grey)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for r in self.rows:
            fig.add_trace(go.Box(y=list(r.placebo_scores), name=r.name, marker_color="#aaaaaa", boxpoints="all",
                                 jitter=0.4, showlegend=False))
            fig.add_trace(go.Scatter(x=[r.name], y=[r.heldout], mode="markers", marker={"size": 14, "color": "#d62728"},
                                     name=f"{r.name}: {r.verdict}"))
        fig.update_layout(title=title or f"feature routes {self.name}: {self.verdict()}", template="plotly_white",
                          yaxis_title="held-out transplant score (fitted - shuffled)")
        return fig


# ------------------------------------------------------------------------------------------ reading
class _Reader:
    """Per-text readings of every feature of ``layers`` (cached), sliced to a member list on demand."""

    def __init__(self, model: Any, tset: TranscoderSet, layers: Sequence[int], reading: str) -> None:
        self.model, self.tset, self.layers, self.reading = model, tset, list(layers), reading
        self.cache: dict[str, dict[int, Tensor]] = {}

    @torch.no_grad()
    def _fill(self, texts: Sequence[str]) -> None:
        """Read every uncached text, in batches of equal token length (one forward per length)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        seqs = {t: self.model.to_tokens(t)[0] for t in todo}
        hooks = {self.tset.input_hook(layer): layer for layer in self.layers}
        for n in sorted({len(v) for v in seqs.values()}):
            group = [t for t in todo if len(seqs[t]) == n]
            _, cache = self.model.run_with_cache(torch.stack([seqs[t] for t in group]), names_filter=lambda h: h in hooks)
            for name, layer in hooks.items():
                x = cache[name][:, -1].float()
                tc = self.tset[layer]
                read = tc.pre_acts(x) if self.reading == "pre" else tc.encode(x)
                for i, t in enumerate(group):
                    self.cache.setdefault(t, {})[layer] = read[i].detach()

    def states(self, members: Sequence[tuple[int, int]], texts: Sequence[str], prefix: str) -> Tensor:
        """``[text, |S|]``: each text's reading through ``members``."""
        full = [prefix + t for t in texts]
        self._fill(full)
        return torch.stack([torch.stack([self.cache[t][layer][f] for layer, f in members]) for t in full])

    def for_members(self, members: Sequence[tuple[int, int]]) -> Any:
        def read(model: Any, texts: Sequence[str], layers: Sequence[int], prefix: str) -> Tensor:
            x = self.states(members, texts, prefix)
            return x[None].expand(len(layers), -1, -1).contiguous()
        return read


def _site_layers(model: Any, fs: FeatureSet, config: FamilyConfig) -> tuple[int, ...]:
    n = int(model.cfg.n_layers)
    tc = config.transplant
    if tc.layers is not None:
        return tuple(tc.layers)
    layers = tuple(range(max(tc.min_layer, min(fs.layers)), n))
    if not layers:
        raise ConfigError(f"no site layer for the set {fs.label} in this {n}-layer model (min_layer "
                          f"{tc.min_layer}); lower min_layer or name the site layers in config.family.transplant.layers.")
    return layers


def _heldout_score(model: Any, pairs: Sequence[TransplantPair], x: Tensor, layers: Sequence[int],
                   config: FamilyConfig, sites: Any) -> float:
    """Mean held-out transplant score of one pairing read as ``x`` (the family report's ``FamilyRow.heldout``)."""
    from recallscope.routes import family as fam
    from recallscope.routes.family_report import _heldout

    tc = config.transplant
    answers = torch.tensor([int(model.to_tokens(p.answer, prepend_bos=False)[0, 0]) for p in pairs])
    fold, perms = fam._folds(len(pairs), tc)
    receiver, source = fam._units(fold, answers)
    rates = fam._pairing_rates(model, sites, x, layers, fold, perms, (receiver, source), answers[source], tc,
                               controls=False)
    d = rates["fitted"] - rates["shuffled"]
    src = source.unique()
    per_source = torch.stack([d[:, source == s].mean(1) for s in src.tolist()], dim=1)
    return float(_heldout(per_source, fold[src]).mean())


def _normalise(sets: "Mapping[str, SetSpec] | SetSpec", tset: TranscoderSet) -> dict[str, FeatureSet]:
    if isinstance(sets, Mapping):
        out = {str(k): FeatureSet.of(v, str(k)) for k, v in sets.items()}
    else:
        fs = FeatureSet.of(sets)
        out = {fs.label: fs}
    if not out:
        raise ConfigError("no feature sets given; pass one set or a mapping name -> set.")
    for fs in out.values():
        check_members(tset, fs.members)
    return out


def _placebo_scores(model: Any, tset: TranscoderSet, pairs: Sequence[TransplantPair], fs: FeatureSet,
                    layers: tuple[int, ...], reader: _Reader, config: FeatureRouteConfig
                    ) -> tuple[list[float], list[tuple[tuple[int, int], ...]]]:
    from recallscope.routes import family as fam

    texts = [p.prompt for p in pairs] + [config.family.transplant.concept_prefix + p.concept for p in pairs]
    stats = {layer: feature_stats(model, tset, layer, texts) for layer in fs.layers}
    placebos = matched_placebos(stats, fs.members, config.n_placebo, seed=config.seed, pool=config.pool)
    sites = fam._sites(model, pairs, layers)
    concepts = [p.concept for p in pairs]
    prefix = config.family.transplant.concept_prefix
    scores = [_heldout_score(model, pairs, reader.for_members(p)(model, concepts, layers, prefix), layers,
                             config.family, sites) for p in placebos]
    return scores, placebos


def feature_family_report(model: Any, tset: TranscoderSet, pairs: Sequence[TransplantPair],
                          sets: "Mapping[str, SetSpec] | SetSpec", *, config: FeatureRouteConfig = FeatureRouteConfig(),
                          name: str = "", progress: bool = False) -> FeatureRouteReport:
    """Does each feature set carry the family's route? (module doc, steps 1-4).

    Raises:
        ConfigError: an empty set, a layer without a transcoder, a feature index out of range, a set with no
            site layer after it, transcoders for another model, and every error of ``route_family_report``.
    """
    from tqdm.auto import tqdm

    tset.check_model(model)
    pairs = tuple(pairs)
    named = _normalise(sets, tset)
    all_layers = sorted({layer for fs in named.values() for layer in fs.layers})
    reader = _Reader(model, tset, all_layers, config.reading)
    parts = []
    for set_name, fs in tqdm(named.items(), desc=f"feature sets {name}", disable=not progress):
        layers = _site_layers(model, fs, config.family)
        fam_cfg = replace(config.family, transplant=replace(config.family.transplant, layers=layers))
        report = route_family_report(model, pairs, config=fam_cfg, name=f"{name} {set_name}".strip(),
                                     concept_reader=reader.for_members(fs.members))
        row = next(r for r in report.rows() if r.name == "concept")
        scores, placebos = _placebo_scores(model, tset, pairs, fs, layers, reader,
                                           replace(config, family=fam_cfg))
        p_placebo = (1 + sum(s >= row.heldout for s in scores)) / (1 + len(scores))
        swap = (feature_swap(model, tset, pairs, fs, placebos) if config.swap and len(fs.layers) == 1 else {})
        parts.append((set_name, fs, report, row, scores, placebos, p_placebo, swap))
    p_holm = holm([max(part[3].p_competitors, part[6]) for part in parts])
    alpha = config.family.transplant.alpha
    rows, reports = [], {}
    for (set_name, fs, report, row, scores, placebos, p_pl, swap), ph in zip(parts, p_holm):
        if row.role != "candidate":
            verdict = "competitor"
        elif row.verdict == "route" and ph <= alpha:
            verdict = "route"
        elif row.verdict == "no route" or p_pl > config.placebo_max_p:
            verdict = "no route"
        else:
            verdict = "inconclusive"
        rows.append(FeatureRouteRow(
            name=set_name, members=fs.members, verdict=verdict, family_verdict=row.verdict, score=row.score,
            heldout=row.heldout, layer=row.layer, margin_answer=row.margins.get("answer", float("nan")),
            margin_input=row.margins.get("input", float("nan")), p_family=row.p_competitors, p_placebo=p_pl,
            p_holm=ph, placebo_scores=tuple(scores), placebo_sets=tuple(placebos), swap=swap))
        reports[set_name] = report
    from recallscope.manifest import build_manifest

    manifest = build_manifest(model, [p.prompt for p in pairs], config.to_dict(), seed=config.seed)
    return FeatureRouteReport(name=name, rows=tuple(rows), reports=reports, config=config.to_dict(),
                              pairs_tested=tuple(range(len(pairs))), manifest=manifest)


# ------------------------------------------------------------------------------------------ the causal half
@torch.no_grad()
def _site_acts(model: Any, tset: TranscoderSet, layer: int, pairs: Sequence[TransplantPair]
               ) -> tuple[list[Tensor], Tensor, Tensor]:
    """Each pair's tokens, site position and layer-``layer`` activations at the site ``[pair, d_sae]``."""
    tokens = [model.to_tokens(p.prompt)[0] for p in pairs]
    pos = torch.tensor([site_position(model, p) for p in pairs])
    acts = torch.stack([feature_activations(model, tset, t[None], [layer])[layer][0, int(q)] for t, q in zip(tokens, pos)])
    return tokens, pos, acts


@torch.no_grad()
def swap_logits(model: Any, tset: TranscoderSet, layer: int, features: Sequence[int],
                site: tuple[list[Tensor], Tensor, Tensor], units: tuple[Tensor, Tensor], batch_size: int = 512
                ) -> tuple[Tensor, Tensor]:
    """``([unit, d_vocab] next-token logits, [unit] edit norm)`` after swapping ``features`` at the receiver's site
    to the source's activations: the real MLP output plus ``(a_source - a_receiver) @ W_dec``, as
    :func:`~recallscope.features.interventions.intervened` applies edits (tested against it)."""
    tokens, pos, acts = site
    receiver, source = units
    feats = torch.tensor(list(features))
    delta = (acts[source][:, feats] - acts[receiver][:, feats]) @ tset[layer].W_dec[0, feats].detach().float()
    out = torch.zeros(len(receiver), int(model.cfg.d_vocab))
    lengths = torch.tensor([len(t) for t in tokens])
    for n in lengths.unique().tolist():
        for chunk in (lengths[receiver] == n).nonzero().squeeze(1).split(batch_size):
            rec = receiver[chunk]
            rows = torch.arange(len(chunk))

            def add(y: Tensor, hook: Any, rec: Tensor = rec, rows: Tensor = rows, chunk: Tensor = chunk) -> Tensor:
                y = y.clone()
                y[rows, pos[rec]] += delta[chunk].to(y.dtype)
                return y

            with model.hooks(fwd_hooks=[(tset.output_hook(layer), add)]):
                out[chunk] = model(torch.stack([tokens[int(r)] for r in rec]), return_type="logits")[:, -1].float()
    return out, delta.norm(dim=-1)


def swap_success(model: Any, tset: TranscoderSet, layer: int, features: Sequence[int],
                 site: tuple[list[Tensor], Tensor, Tensor], units: tuple[Tensor, Tensor], answers: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """``([unit] success, [unit] edit norm)``: success = after :func:`swap_logits` the receiver's argmax next
    token is the source's answer."""
    logits, norm = swap_logits(model, tset, layer, features, site, units)
    return (logits.argmax(-1) == answers[units[1]]).float(), norm


def feature_swap(model: Any, tset: TranscoderSet, pairs: Sequence[TransplantPair], fs: FeatureSet,
                 placebos: Sequence[tuple[tuple[int, int], ...]]) -> dict[str, Any]:
    """The causal half, for a one-layer set: swap the set's site activations from a source pair into a receiver
    pair (every ordered pair with different answers) and count the source's answer; the same for each placebo
    set (same size and layer). Reported, not in the verdict: the site is read in rote models as well, so a swap
    that moves the answer says the set carries what the readout uses there, not that it is the concept."""
    if len(fs.layers) != 1:
        raise ConfigError(f"the swap needs a one-layer set; {fs.label} spans layers {fs.layers}.")
    layer = fs.layers[0]
    answers = torch.tensor([int(model.to_tokens(p.answer, prepend_bos=False)[0, 0]) for p in pairs])
    rec, src = torch.meshgrid(torch.arange(len(pairs)), torch.arange(len(pairs)), indexing="ij")
    keep = answers[rec.flatten()] != answers[src.flatten()]
    units = (rec.flatten()[keep], src.flatten()[keep])
    site = _site_acts(model, tset, layer, pairs)
    own, norm = swap_success(model, tset, layer, fs.at(layer), site, units, answers)
    runs = [swap_success(model, tset, layer, [f for _, f in p], site, units, answers) for p in placebos]
    scores = [float(s.mean()) for s, _ in runs]
    score = float(own.mean())
    return {"score": score, "edit_norm": float(norm.mean()), "placebo_scores": scores,
            "placebo_edit_norms": [float(n.mean()) for _, n in runs], "n_units": int(len(units[0])),
            "p_placebo": (1 + sum(x >= score for x in scores)) / (1 + len(scores))}


# ------------------------------------------------------------------------------------------ selection
def select_by_attribution(model: Any, tset: TranscoderSet, pairs: Sequence[TransplantPair], layer: int,
                          size: int, *, name: str = "") -> FeatureSet:
    """The ``size`` features of ``layer`` with the largest mean ``|a * d logit(answer) / d a|`` at each pair's
    input site (the last token of its input), over ``pairs`` (give selection pairs only: module doc)."""
    check_members(tset, [(layer, 0)])
    if not 1 <= size <= tset[layer].spec.d_sae:
        raise ConfigError(f"size must be in 1..{tset[layer].spec.d_sae} (the layer's features), got {size}.")
    total = torch.zeros(tset[layer].spec.d_sae)
    for p in pairs:
        tokens = model.to_tokens(p.prompt)
        target = int(model.to_tokens(p.answer, prepend_bos=False)[0, 0])
        box: dict[str, Tensor] = {}

        def read(x: Tensor, hook: Any) -> None:
            box["a"] = tset.activations(layer, x.detach().float()).detach().requires_grad_(True)

        def write(y: Tensor, hook: Any) -> Tensor:  # adds zero; carries the gradient to the activations
            a = box["a"]
            return y + tset[layer].decode(a - a.detach()).to(y.dtype)

        with torch.enable_grad(), model.hooks(fwd_hooks=[(tset.input_hook(layer), read), (tset.output_hook(layer), write)]):
            logits = model(tokens, return_type="logits")
            logits[0, -1, target].backward()
        a = box["a"]
        total += (a * a.grad)[0, site_position(model, p)].detach().abs()  # type: ignore[operator]
    top = total.argsort(descending=True)[:size].tolist()
    return FeatureSet(tuple((layer, int(f)) for f in top), name)


def crossfit_split(n: int, n_select: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(selection, test)`` pair indices: a seeded permutation, the first ``n_select`` for selection."""
    if not 1 <= n_select < n:
        raise ConfigError(f"n_select must be in 1..{n - 1} (some pairs must remain for the test), got {n_select}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[:n_select]), sorted(perm[n_select:])


def feature_family_crossfit(model: Any, tset: TranscoderSet, pairs: Sequence[TransplantPair], layer: int, size: int,
                            *, n_select: int = 20, config: FeatureRouteConfig = FeatureRouteConfig(), name: str = "",
                            extra: Mapping[str, SetSpec] | None = None) -> FeatureRouteReport:
    """Select ``size`` features of ``layer`` by attribution on ``n_select`` pairs, test them (and ``extra``
    sets) with :func:`feature_family_report` on the other pairs only."""
    pairs = list(pairs)
    sel, test = crossfit_split(len(pairs), n_select, config.seed)
    chosen = select_by_attribution(model, tset, [pairs[i] for i in sel], layer, size, name="attribution")
    report = feature_family_report(model, tset, [pairs[i] for i in test],
                                   {"attribution": chosen, **dict(extra or {})}, config=config, name=name)
    return replace(report, pairs_tested=tuple(test), pairs_selected_on=tuple(sel))


def planted_route_features(model: Any, tset: TranscoderSet, pairs: Sequence[TransplantPair], layer: int, size: int,
                           *, prefix: str = "") -> tuple[TranscoderSet, FeatureSet]:
    """A positive control with known truth: a copy of ``tset`` whose ``size`` least-used features of ``layer``
    read (encoder) and write (decoder) the top ``size`` principal directions of the concept states (the MLP input
    at each concept's last token in ``prefix + concept``), estimated on ``pairs`` (give selection pairs only).
    Their biases are zero, so their pre-activation reading is a projection onto the concept's own principal
    subspace: by construction these features read the concept. (The top directions of the between-answer
    scatter, and the input directions of a ridge map from concept to site states, were tried on route-s0 and did
    no better.)"""
    check_members(tset, [(layer, 0)])
    if not 1 <= size <= min(tset[layer].spec.d_in, tset[layer].spec.d_sae):
        raise ConfigError(f"size must be in 1..{min(tset[layer].spec.d_in, tset[layer].spec.d_sae)}, got {size}.")
    hook = tset.input_hook(layer)
    with torch.no_grad():
        xs = torch.stack([model.run_with_cache(model.to_tokens(prefix + p.concept), names_filter=[hook])[1][hook]
                          [0, -1].float() for p in pairs])
    _, _, vh = torch.linalg.svd(xs - xs.mean(0), full_matrices=False)
    dirs = vh[:size]  # [size, d_in]: the concept states' top principal directions
    planted = copy.deepcopy(tset)
    tc = planted[layer]
    stats = feature_stats(model, tset, layer, [p.prompt for p in pairs])
    features = stats.frequency.argsort()[:size].tolist()
    with torch.no_grad():
        scale = tc.W_enc.norm(dim=0).median()
        for f, d in zip(features, dirs):
            tc.W_enc[:, f] = d * scale
            tc.b_enc[f] = 0.0
            tc.W_dec[:, f] = d * tc.W_dec[0].norm(dim=-1).median()
    return planted, FeatureSet(tuple((layer, int(f)) for f in features), "planted")
