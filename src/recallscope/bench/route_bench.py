"""The route detector scored on mnemonic organisms: one call site, per-family metrics, cached training.

1. :func:`load_detector` reads the committed detector configuration (``experiments/benchmarks/
   route_detector.toml``): the ``[route_config]`` table (:class:`~recallscope.routes.RouteConfig`
   fields, plus ``baseline = "vocabulary"``: the baseline is every word of the organism's vocabulary).
2. :func:`detect` is the **only** place that calls the detector: for hook chunk ``c`` of an organism
   it scores ``c``'s linked concept (``VA`` -> ``VAT``) on the query ``<s> c ==`` -> ``letter(c)`` with
   ``n_controls`` other concepts of the organism drawn with ``random.Random(seed)`` as controls and
   ``n_alternatives_from_hooks`` alternative inputs: the other hook chunks, then the world's other chunks
   in order (the organisms have a 4-token context, so there is one prompt per query and the detector's
   statistics run over (prompt, alternative) units: ``test_unit = "alternative"`` in the TOML).
3. :func:`organism_model` loads a shipped organism, or trains a recipe once into a cache directory
   (deterministic; the cached directory is reused while its stored config equals the recipe's).
4. :func:`family_metrics`: per family, ROC AUC of the route score against the other class (a positive
   family's rows against every negative row; a negative family's rows against every positive row), the
   share of "route" verdicts (false-route rate for negative families, hit rate for positive ones) and
   verdict accuracy ("inconclusive" counts as wrong).
"""

import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from recallscope.attribution.scoring import roc_auc
from recallscope.errors import ConfigError

DETECTORS: tuple[str, ...] = ("report", "transplant", "both")
"""Values of ``[detector] use`` in the detector TOML."""
OLD_FAMILIES: tuple[str, ...] = ("route", "rote")
"""The shipped route / rote organisms (the families the detector was developed on)."""


@dataclass(frozen=True)
class DetectorSpec:
    """The committed detector configuration: RouteConfig fields and how the harness builds queries."""

    route_config: dict[str, Any]
    baseline: str = "vocabulary"
    n_hook_alternatives: int = 8
    path: str = ""
    use: str = "report"
    """``[detector] use``: "report" (route_report), "transplant" (:mod:`recallscope.routes.transplant`) or
    "both" (the transplant score and verdict head the row; route_report's ride along as ``report_*``)."""
    transplant: dict[str, Any] = field(default_factory=dict)
    """The ``[transplant]`` table: :class:`~recallscope.routes.transplant.TransplantConfig` fields."""


def load_detector(path: str | os.PathLike) -> DetectorSpec:
    """Read a detector TOML file (see the module doc); unknown RouteConfig keys are a clear error."""
    from recallscope.config import read_config_file
    from recallscope.routes import RouteConfig

    data = read_config_file(path)
    table = dict(data.get("route_config") or {})
    if not table:
        raise ConfigError(f"{path} has no [route_config] table; see experiments/benchmarks/route_detector.toml.")
    baseline = table.pop("baseline", "vocabulary")
    known = {f.name for f in fields(RouteConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{path}: [route_config] keys {unknown} are not RouteConfig fields; known: {sorted(known)}.")
    n_alt = int((data.get("queries") or {}).get("n_alternatives_from_hooks", 8))
    use = str((data.get("detector") or {}).get("use", "report"))
    if use not in DETECTORS:
        raise ConfigError(f"{path}: [detector] use = {use!r}; choose one of {DETECTORS}.")
    transplant = dict(data.get("transplant") or {})
    from recallscope.routes.transplant import TransplantConfig

    TransplantConfig.from_dict(transplant)  # unknown keys / bad values: a clear error now, not mid-run
    return DetectorSpec(table, str(baseline), n_alt, str(path), use, transplant)


def route_config(model: Any, spec: DetectorSpec, *, seed: int = 0) -> Any:
    """The :class:`~recallscope.routes.RouteConfig` of ``spec`` for ``model`` (tuples; vocabulary baseline)."""
    from recallscope.routes import RouteConfig

    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.route_config.items()}
    if spec.baseline == "vocabulary":
        kwargs["baseline_words"] = tuple(" " + w for w in model.tokenizer.get_vocab() if not w.startswith("<"))
    elif spec.baseline != "default":
        raise ConfigError(f"baseline must be 'vocabulary' or 'default', not {spec.baseline!r}.")
    if "seed" in {f.name for f in fields(RouteConfig)} and "seed" not in kwargs:
        kwargs["seed"] = 0
    return RouteConfig(**kwargs)


def detect(model: Any, chunk: str, spec: DetectorSpec, *, seed: int) -> dict[str, Any]:
    """The detector's verdict on "``chunk`` is decoded through its linked concept" (module doc, step 2;
    ``spec.use`` picks the detector: :func:`detect_report`, :func:`detect_transplant` or both)."""
    if spec.use == "report":
        return detect_report(model, chunk, spec, seed=seed)
    row = detect_transplant(model, chunk, spec)
    if spec.use == "both":
        rep = detect_report(model, chunk, spec, seed=seed)
        row.update({f"report_{k}": v for k, v in rep.items() if k not in ("chunk", "concept", "is_route")})
    return row


def _transplant_prep(model: Any, spec: DetectorSpec) -> tuple[Any, Any]:
    """``(config, prep)`` of the transplant score for ``model``: every world chunk paired with its linked
    concept (``<chunk> ==`` -> `` <letter>``; concept context ``<s> <concept>``; with an
    ``attribute_template`` the concept's kind is its other attribute, `` animal``), prepared once per model
    (kept on the model object, like the model's stack)."""
    from recallscope.organisms import ground_truth
    from recallscope.routes.transplant import TransplantConfig, TransplantPair, prepare_transplant

    config = TransplantConfig.from_dict(spec.transplant)
    cache = getattr(model, "_recallscope_transplant", None)
    if cache is None:
        cache = {}
        model._recallscope_transplant = cache
    key = repr(config)
    if key not in cache:
        truth = ground_truth(model)
        kind = (lambda k: " " + truth.concept_kind[k]) if config.attribute_template else (lambda k: "")
        pairs = [TransplantPair(f"{c} ==", c, " " + k, " " + truth.chunk_letter[c], _decoy(truth, k), kind(k))
                 for c, k in truth.chunk_concept.items()]
        cache[key] = (config, prepare_transplant(model, pairs, config))
    return cache[key]


def _decoy(truth: Any, concept: str) -> str:
    """`` <the world's other concept with concept's letter>`` (its same-letter distractor; "" if none)."""
    letter = truth.concept_letter[concept]
    return next((" " + k for k, v in truth.concept_letter.items() if v == letter and k != concept), "")


def detect_transplant(model: Any, chunk: str, spec: DetectorSpec) -> dict[str, Any]:
    """The held-out concept transplant score of ``chunk``'s pair (:mod:`recallscope.routes.transplant`)."""
    from recallscope.organisms import ground_truth
    from recallscope.routes.transplant import transplant_score

    config, prep = _transplant_prep(model, spec)
    r = transplant_score(model, prep, chunk, config)
    return {"chunk": chunk, "concept": r.concept.strip(), "is_route": ground_truth(model).is_route,
            "score": r.score, "verdict": r.verdict, "p": r.p_value, "ci": list(r.ci), "peak_layer": r.layer,
            "fitted": r.fitted, "shuffled": r.shuffled, "identity": r.identity, "random": r.random,
            "ceiling": r.ceiling, "logprob": r.logprob, "n_units": r.n_units, "decoy": r.decoy,
            "per_layer": {str(k): v for k, v in r.per_layer.items()}, "answer_code": r.answer_code,
            "forward_score": r.forward_score, "forward_p": r.forward_p, "forward_verdict": r.forward_verdict,
            **{k: getattr(r, k) for k in ("attr_score", "attr_p", "attr_fitted", "attr_shuffled", "attr_identity",
                                          "attr_random", "attr_ceiling", "attr_units")},
            "attr_per_layer": {str(k): v for k, v in (r.attr_per_layer or {}).items()}}


def detect_report(model: Any, chunk: str, spec: DetectorSpec, *, seed: int) -> dict[str, Any]:
    """route_report's verdict on ``chunk``'s linked concept (the committed h3 detector)."""
    from recallscope.organisms import ground_truth
    from recallscope.routes import RouteQuery, route_report

    truth = ground_truth(model)
    config = route_config(model, spec)
    concept = truth.chunk_concept[chunk]
    others = [c for c in truth.concept_letter if c != concept]
    controls = [" " + c for c in random.Random(seed).sample(others, config.n_controls)]
    hooks = hook_chunks()
    pool = [c for c in hooks if c != chunk] + [c for c in truth.chunk_letter if c != chunk and c not in hooks]
    alts = tuple(pool[:spec.n_hook_alternatives])
    query = RouteQuery((f"{chunk} ==",), chunk, " " + truth.chunk_letter[chunk], alts)
    report = route_report(model, query, [" " + concept], controls={concept: controls}, config=config, progress=False)
    rows = report.routes()
    if not rows:  # the detector filed the candidate as a competitor (e.g. the input or the output): not a route
        rows = [r for r in report.competitor_rows() if r.name == concept]
    if not rows:
        raise ConfigError(f"the detector returned no row for the candidate {concept!r} (query {query.name!r}).")
    r = rows[0]
    extra = {k: getattr(r, k) for k in ("p_holm", "mediation", "strongest_competitor", "peak_layer")
             if hasattr(r, k)}
    return {"chunk": chunk, "concept": concept, "is_route": truth.is_route, "score": float(r.score),
            "verdict": r.verdict, "p": float(r.p_value), **extra}


ORGANISM_CONFIG: dict[str, Any] = {"n_templates": 0, "test_unit": "alternative", "n_alternatives": 0,
                                   "prefixes": [""]}
"""RouteConfig settings every mnemonic organism needs (4-token context: one prompt, 8 alternatives as units)."""


def default_spec(**route_config: Any) -> DetectorSpec:
    """A :class:`DetectorSpec` with :data:`ORGANISM_CONFIG` (vocabulary baseline) plus ``route_config``."""
    return DetectorSpec({**ORGANISM_CONFIG, **route_config})


def hook_chunks() -> list[str]:
    from recallscope.tasks.b64_stimuli import MNEMONIC_HOOKS

    return sorted(MNEMONIC_HOOKS)


def organism_rows(model: Any, name: str, family: str, seed: int, spec: DetectorSpec) -> list[dict[str, Any]]:
    """One :func:`detect` row per hook chunk, labelled with the organism, family and seed."""
    return [{"organism": name, "family": family, "seed": seed, **detect(model, c, spec, seed=seed)}
            for c in hook_chunks()]


def organism_model(name: str, cache_dir: str | os.PathLike | None = None, *, progress: bool = False
                   ) -> tuple[Any, str]:
    """``(model, where)``: the shipped organism ``name``, else the recipe trained once into ``cache_dir``
    (default ``<recallscope cache>/organisms``; ``progress``: a bar over the training steps) and loaded from
    there. Any seed of a held-out family or of route / rote has a recipe (:func:`.recipes.get_recipe`)."""
    import json

    from recallscope import load_model
    from recallscope.models.cache import cache_root
    from recallscope.organisms import shipped
    from recallscope.organisms.recipes import _config_dict, get_recipe, save_recipe, train_recipe
    from recallscope.organisms.store import load_organism_dir

    if name in shipped():
        return load_model(f"organism:{name}"), "shipped"
    recipe = get_recipe(name)
    directory = Path(cache_dir) if cache_dir is not None else cache_root() / "organisms"
    directory = directory / name
    config = directory / "config.json"
    if config.is_file() and json.loads(config.read_text())["recipe"]["config"] == _config_dict(recipe.config):
        return load_organism_dir(directory), "cached"
    net, record = train_recipe(recipe, progress=progress)
    save_recipe(recipe, net, record, directory)
    return load_organism_dir(directory), f"trained ({record['train_seconds']} s)"


# ------------------------------------------------------------------------------------------ metrics
def _auc(pos: list[float], neg: list[float]) -> float | None:
    """ROC AUC of positives over negatives; a NaN score (a candidate the detector filed as a competitor and
    did not score) ranks below every scored row."""
    if not pos or not neg:
        return None
    scores = torch.tensor(pos + neg, dtype=torch.float64)
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    return roc_auc(scores, torch.tensor([True] * len(pos) + [False] * len(neg)))


def _correct(row: dict[str, Any]) -> bool:
    return row["verdict"] == ("route" if row["is_route"] else "no route")


def family_metrics(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per family: class, n, AUROC against the other class (all families pooled), share of "route",
    "no route", "inconclusive" and "competitor" verdicts (the detector filed the candidate as the input or
    the output), verdict accuracy, mean score over the scored rows."""
    rows = list(rows)
    pos_all = [r["score"] for r in rows if r["is_route"]]
    neg_all = [r["score"] for r in rows if not r["is_route"]]
    out = {}
    for fam in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == fam]
        is_pos = mine[0]["is_route"]
        scores = [r["score"] for r in mine]
        n = len(mine)
        share = {v: sum(r["verdict"] == v for r in mine) / n
                 for v in ("route", "no route", "inconclusive", "competitor")}
        scored = [s for s in scores if s == s]
        out[fam] = {"class": "route" if is_pos else "no route", "n": n,
                    "auroc": _auc(scores, neg_all) if is_pos else _auc(pos_all, scores),
                    "route_rate": share["route"], "no_route_rate": share["no route"],
                    "inconclusive_rate": share["inconclusive"], "competitor_rate": share["competitor"],
                    "verdict_accuracy": sum(_correct(r) for r in mine) / n,
                    "mean_score": sum(scored) / len(scored) if scored else float("nan")}
    return out


def pairwise_auroc(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """AUROC of every positive family against every negative family (rows: positive families)."""
    rows = list(rows)
    fams = list(dict.fromkeys(r["family"] for r in rows))
    pos = [f for f in fams if any(r["is_route"] for r in rows if r["family"] == f)]
    neg = [f for f in fams if f not in pos]
    score = lambda f: [r["score"] for r in rows if r["family"] == f]  # noqa: E731
    return {p: {n: _auc(score(p), score(n)) for n in neg} for p in pos}


def summary(rows: Sequence[dict[str, Any]], heldout: Sequence[str]) -> dict[str, Any]:
    """The benchmark's headline numbers (see experiments/benchmarks/route_detection.py)."""
    per = family_metrics(rows)
    new = [r for r in rows if r["family"] in heldout]
    old = [r for r in rows if r["family"] not in heldout]
    held = [per[f] for f in heldout if f in per]
    fr = [m["route_rate"] for m in held if m["class"] == "no route"]
    aucs = [m["auroc"] for m in held if m["auroc"] is not None]
    all_auc = _auc([r["score"] for r in rows if r["is_route"]], [r["score"] for r in rows if not r["is_route"]])
    old_auc = _auc([r["score"] for r in old if r["is_route"]], [r["score"] for r in old if not r["is_route"]])
    out = {"route_auroc": all_auc, "heldout_auroc_min": min(aucs) if aucs else None,
           "false_route_rate_max": max(fr) if fr else None,
           "verdict_accuracy": sum(_correct(r) for r in new) / len(new) if new else None,
           "old_route_auroc": old_auc,
           "old_verdict_accuracy": sum(_correct(r) for r in old) / len(old) if old else None}
    if rows and all("report_score" in r for r in rows):  # [detector] use = "both": route_report's headline too
        rep = [{**{k: v for k, v in r.items() if not k.startswith("report_")},
                "score": r["report_score"], "verdict": r["report_verdict"]} for r in rows]
        out.update({f"report_{k}": v for k, v in summary(rep, heldout).items()})
    return out
