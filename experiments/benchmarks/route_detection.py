"""Benchmark: recallscope's methods scored against the model organisms' known mechanisms.

1. **Localisation** on the base64 and fact organisms (ground truth: the dependency map / the circuit's
   residual cells, :mod:`recallscope.bench.scoring`): exact activation patching, AtP and EAP-IG, each
   as the ROC AUC of its per-(prompt, cell) noising effects against the truth. EAP-IG's effect on a cell is
   the sum of the per-position EAP-IG (inputs, 5 steps) scores of the edges crossing it, one run per prompt.
2. **Circuit discovery** on the same organisms and pairs (one group per output byte of the base64
   organism; one group for the fact organism): per-position EAP-IG edge scores over each group's pairs,
   then (a) threshold circuits ``|score| >= tau`` over every ``tau``: the ROC AUC of the residual cells they
   use (a cell's score is the largest ``|score|`` of the edges crossing it) against the true cells;
   (b) the top-n circuit with the smallest n on a doubling grid whose faithfulness reaches 0.9; (c) ACDC
   (threshold 0.01 of the clean-corrupt gap) over every edge at every position. (b) and (c): TPR / FPR of
   the cells they use. Groups are pooled; a control scores Gaussian random edge scores the same way.
   The truth names residual cells, not heads or MLPs, so circuits are scored on the cells they route
   through (:func:`recallscope.bench.scoring.cell_recovery`).
3. **Routes** on the mnemonic organisms, with the detector fixed in ``route_detector.toml`` (committed
   before the held-out families were trained; ``--detector``). For each organism and each mnemonic-hook
   chunk (VA, TA, SA, RA, MA, NA, WA, UA: tasks.b64_stimuli.MNEMONIC_HOOKS) the detector scores the
   chunk's concept (``VAT``) against 19 control concepts of the same organism, represented in the
   organism's own neutral context (``<s> VAT``) (one call site: :func:`recallscope.bench.route_bench.detect`).
   Organisms: the shipped ``route`` / ``rote`` families (the detector was developed on them) and the
   held-out families of :mod:`recallscope.organisms.families` (positives ``route-iit``, ``route-l2``,
   ``route-rot``; negatives ``bypass``, ``share``, ``rote-early``, ``answer-at-site``), seeds 0-4 by
   default; seed 0 ships, the others are trained once, deterministically, into ``--cache-dir`` (first
   run 5-300 s per organism, with a progress bar). ``--seeds 10-14`` scores FRESH seeds (any seed has a
   recipe): the held-out check of a committed detector file, trained only after it was committed
   (route_detector.toml v2: seeds 10-14). Such a run writes ``figures/organisms/route_detection_s10-14.json``.
   Per family: ROC AUC of the route score against the other class (all families pooled), the share of
   "route" verdicts (the false-route rate of a negative family) and verdict accuracy ("inconclusive"
   counts as wrong); and the AUROC of every positive family against every negative family.

Prints tables, writes every row to figures/organisms/route_detection.json (when every part ran, or to
``--out``), and ends with one JSON line:
``{"route_auroc": a, "heldout_auroc_min": h, "false_route_rate_max": f, "verdict_accuracy": v,
"old_route_auroc": ..., "old_verdict_accuracy": ..., "patching_auroc": z, "atp_auroc": w, "eapig_auroc": e,
"circuit_auroc": c}``: ``route_auroc`` over every routes row; ``heldout_auroc_min`` the smallest per-family
AUROC of the held-out families; ``false_route_rate_max`` the largest false-route rate of a held-out negative
family; ``verdict_accuracy`` over the held-out families' rows; ``old_*`` the same on the shipped route /
rote organisms; the other AUROCs are the mean over the organisms they cover; null when a part is missing.
Targets (issue 13): heldout_auroc_min >= 0.9, false_route_rate_max <= 0.1, verdict_accuracy >= 0.85.

    nice -n 10 python experiments/benchmarks/route_detection.py --threads 1 [--quick] [--only routes]
    nice -n 10 python experiments/benchmarks/route_detection.py --only routes --seeds 10-14   # fresh seeds

Figures of the organisms' ground truth against exact patching: experiments/organisms/figures.py.
"""

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from recallscope import load_model
from recallscope.attribution.scoring import roc_auc
from recallscope.bench import route_bench
from recallscope.organisms.families import FAMILIES
from recallscope.organisms.recipes import N_SEEDS
from recallscope.bench.scoring import (b64_cells, cell_recovery, eapig_effects, exact_patching_effects, fact_cells,
                                           truth_groups)

ORGANISMS = ("b64-decoder", "fact-store")
FAITHFUL = 0.9
"""Top-n circuits: the smallest n (1, 2, 4, ...) whose faithfulness reaches this."""
ACDC_THRESHOLD = 0.01
"""ACDC's threshold, a fraction of the clean-corrupt gap (its default)."""


def atp_effects(model, pairs, *, layers, positions):
    """AtP's estimate of the same noising effects as exact_patching_effects (gradient x activation difference)."""
    from recallscope.attribution import atp

    result = atp(model, list(pairs), "logprob", components=["resid_pre"], direction="noising", progress=False)
    return -result.values["resid_pre"][:, list(layers)][:, :, list(positions)]


def localisation(effects, n: int) -> dict[str, float]:
    """ROC AUC of a method's effects on the base64 and fact organisms."""
    out = {}
    scores, labels = b64_cells(load_model("organism:b64-decoder"), effects, n_per_byte=max(2, n // 4))
    out["b64-decoder"] = roc_auc(scores.abs(), labels)
    scores, labels = fact_cells(load_model("organism:fact-store"), effects, n=n)
    out["fact-store"] = roc_auc(scores.abs(), labels)
    return out


def discover(model, pairs):
    """Per-position EAP-IG scores, the smallest faithful top-n circuit and ACDC's circuit for one group."""
    from recallscope.attribution import Circuit, acdc, eap_ig, evaluate_circuit
    from recallscope.attribution.circuits import CircuitRunner

    scores = eap_ig(model, pairs, "logprob", per_position=True, progress=False)
    g, n_pos = scores.graph, scores.scores.shape[-1]
    runner, total, n = CircuitRunner(model, pairs, "logprob"), int(g.valid.sum()) * n_pos, 1
    while True:
        top = scores.top(n)
        faith = evaluate_circuit(model, pairs, "logprob", top, runner=runner).faithfulness
        if faith >= FAITHFUL or n >= total:
            break
        n = min(2 * n, total)
    everything = Circuit(g, g.valid[..., None].expand(-1, -1, n_pos).clone())
    found = acdc(model, pairs, "logprob", threshold=ACDC_THRESHOLD, candidates=everything, progress=False)
    info = {"top_n": n, "top_n_faithfulness": faith, "acdc_edges": found.n_edges,
            "acdc_faithfulness": found.info["faithfulness"], "edges_total": total}
    return scores, {"top-n": top, "acdc": found}, info


def random_scores(scores, *, seed: int):
    """Control: Gaussian scores on the same edges (what the cell AUROC gives with no information)."""
    from dataclasses import replace

    noise = torch.randn(scores.scores.shape, generator=torch.Generator().manual_seed(seed))
    return replace(scores, scores=noise * scores.graph.valid[..., None])


def circuit_discovery(n: int) -> dict[str, dict]:
    """Cell recovery of EAP-IG threshold circuits (ROC AUC), top-n and ACDC circuits (TPR/FPR), per organism."""
    out = {}
    for name, per_group in zip(ORGANISMS, (max(2, n // 4), n)):
        model = load_model(f"organism:{name}")
        groups = truth_groups(model, n=per_group)
        runs = [discover(model, pairs) for _, pairs in groups]
        truths = [cells for cells, _ in groups]
        rec = cell_recovery(truths, [r[0] for r in runs], {k: [r[1][k] for r in runs] for k in ("top-n", "acdc")})
        control = cell_recovery(truths, [random_scores(r[0], seed=i) for i, r in enumerate(runs)])
        info = [r[2] for r in runs]
        mean = lambda key: statistics.fmean(i[key] for i in info)  # noqa: E731
        out[name] = {"auroc": rec.auc, "groups": len(groups), "cells": rec.n_cells, "true_cells": rec.n_true,
                     "top_n": {"tpr": rec.tpr["top-n"], "fpr": rec.fpr["top-n"], "mean_n": mean("top_n"),
                               "mean_faithfulness": mean("top_n_faithfulness")},
                     "acdc": {"tpr": rec.tpr["acdc"], "fpr": rec.fpr["acdc"], "threshold": ACDC_THRESHOLD,
                              "mean_edges": mean("acdc_edges"), "mean_faithfulness": mean("acdc_faithfulness")},
                     "mean_edges_total": mean("edges_total"), "control_auroc": control.auc, "roc": rec.roc}
    return out


def parse_seeds(text: str) -> list[int]:
    """``"10-14"`` -> [10, ..., 14]; ``"0,3,7"`` -> [0, 3, 7]; ranges and lists mix (``"0-2,9"``)."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or (dash and int(hi) < int(lo)):
            raise SystemExit(f"--seeds {text!r}: give seeds like 10-14 or 0,3,7 (non-negative, low-high).")
        seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    return list(dict.fromkeys(seeds))


def train_missing(families: list[str], seeds: list[int], cache_dir: str | None) -> None:
    """Train every organism of ``families`` x ``seeds`` that neither ships nor is cached (progress bars)."""
    from tqdm.auto import tqdm

    from recallscope.organisms import shipped
    from recallscope.organisms.recipes import _config_dict, get_recipe
    from recallscope.models.cache import cache_root

    root = Path(cache_dir) if cache_dir is not None else cache_root() / "organisms"
    missing = []
    for name in (f"{f}-s{s}" for f in families for s in seeds):
        config = root / name / "config.json"
        fresh = config.is_file() and json.loads(config.read_text())["recipe"]["config"] == _config_dict(
            get_recipe(name).config)
        if name not in shipped() and not fresh:
            missing.append(name)
    for name in tqdm(missing, desc="organisms to train", disable=not missing):
        _, where = route_bench.organism_model(name, cache_dir, progress=True)
        print(f"routes: {name} {where}", flush=True)


def route_rows(spec, families: list[str], seeds: list[int], cache_dir: str | None) -> list[dict]:
    """One row per (organism, hook chunk) of every family and seed (:func:`route_bench.organism_rows`)."""
    from recallscope.bench import route_bench

    train_missing(families, seeds, cache_dir)
    rows = []
    for family in families:
        for seed in seeds:
            name = f"{family}-s{seed}"
            t0 = time.perf_counter()
            model, where = route_bench.organism_model(name, cache_dir)
            t1 = time.perf_counter()
            mine = route_bench.organism_rows(model, name, family, seed, spec)
            rows += mine
            print(f"routes: {name} ({where}, load {t1 - t0:.0f}s, detect {time.perf_counter() - t1:.0f}s): "
                  f"{sum(r['verdict'] == 'route' for r in mine)}/{len(mine)} route", flush=True)
    return rows


def _run(name: str, fn):
    """Run one part; a missing module gives None (and says so) instead of failing the benchmark."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except ModuleNotFoundError as exc:
        print(f"{name}: skipped ({exc})")
        return None, 0.0
    return out, time.perf_counter() - t0


PARTS = ("patching", "atp", "eapig", "circuits", "routes")


def print_tables(loc: dict, secs: dict, circuits: dict | None, rows: list | None) -> None:
    print(f"{'method':<16} {'organism':<14} {'ROC AUC':>8} {'seconds':>8}")
    for name, key in (("exact patching", "patching"), ("AtP", "atp"), ("EAP-IG", "eapig")):
        for org, auc in (loc.get(key) or {}).items():
            print(f"{name:<16} {org:<14} {auc:>8.3f} {secs[key]:>8.1f}")
    if circuits:
        print(f"\ncircuit discovery, scored on residual cells ({secs['circuits']:.0f}s)")
        print(f"{'organism':<14} {'cells':>9} {'AUROC':>6} {'random':>6}  {'top-n TPR/FPR':>13} {'n':>6} {'faith':>5}  "
              f"{'ACDC TPR/FPR':>12} {'edges':>6} {'faith':>5}")
        for org, c in circuits.items():
            t, a = c["top_n"], c["acdc"]
            print(f"{org:<14} {c['true_cells']:>3}/{c['cells']:<5} {c['auroc']:>6.3f} {c['control_auroc']:>6.3f}  {t['tpr']:>6.2f}/{t['fpr']:<6.2f} "
                  f"{t['mean_n']:>6.0f} {t['mean_faithfulness']:>5.2f}  {a['tpr']:>5.2f}/{a['fpr']:<6.2f} "
                  f"{a['mean_edges']:>6.0f} {a['mean_faithfulness']:>5.2f}")
    if rows:
        from recallscope.bench.route_bench import family_metrics, pairwise_auroc

        print(f"\n{'organism':<16} {'chunk':<6} {'concept':<8} {'truth':<9} {'score':>7} {'p':>6} {'verdict':<12} {'medi.':>6} strongest competitor")
        for r in rows:
            print(f"{r['organism']:<16} {r['chunk']:<6} {r['concept']:<8} {'route' if r['is_route'] else 'no route':<9} "
                  f"{r['score']:>7.3f} {r['p']:>6.3f} {r['verdict']:<12} {r.get('mediation', float('nan')):>6.2f} "
                  f"{r.get('strongest_competitor', '')}")
        print(f"\n{'family':<11} {'truth':<9} {'n':>4} {'AUROC':>6} {'route':>6} {'no rt':>6} {'incon':>6} "
              f"{'compet':>6} {'acc':>6} {'score':>7}")
        for fam, m in family_metrics(rows).items():
            auc = "  n/a" if m["auroc"] is None else f"{m['auroc']:.3f}"
            print(f"{fam:<11} {m['class']:<9} {m['n']:>4} {auc:>6} {m['route_rate']:>6.2f} {m['no_route_rate']:>6.2f} "
                  f"{m['inconclusive_rate']:>6.2f} {m.get('competitor_rate', 0.0):>6.2f} {m['verdict_accuracy']:>6.2f} "
                  f"{m['mean_score']:>7.3f}")
        print("\nper family: AUROC against the other class; route rate (positive family) or false-route rate "
              "(negative family)")
        for fam, m in family_metrics(rows).items():
            auc = "n/a" if m["auroc"] is None else f"{m['auroc']:.3f}"
            kind = "route rate" if m["class"] == "route" else "FALSE-route rate"
            print(f"  {fam:<15} AUROC {auc:>5}  {kind} {m['route_rate']:.3f}  accuracy {m['verdict_accuracy']:.3f}")
        pair = pairwise_auroc(rows)
        negs = list(next(iter(pair.values()), {}))
        print("\nAUROC, positive family (rows) against negative family (columns)")
        print(f"{'':<11} " + " ".join(f"{n:>10}" for n in negs))
        for p, row in pair.items():
            print(f"{p:<11} " + " ".join(f"{'n/a' if v is None else f'{v:.3f}':>10}" for v in row.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer prompts, 2 seeds, 9 controls")
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts")
    ap.add_argument("--detector", default=str(Path(__file__).with_name("route_detector.toml")),
                    help="the detector's configuration (TOML; default: route_detector.toml beside this script)")
    ap.add_argument("--families", nargs="+", default=None, help="organism families for the routes part (default: "
                    "the shipped route/rote and every held-out family)")
    ap.add_argument("--cache-dir", default=None, help="where held-out organisms that do not ship are trained and "
                    "cached (default: <recallscope cache>/organisms)")
    ap.add_argument("--seeds", default=None, help="organism seeds for the routes part, e.g. 10-14 or 0,3 "
                    "(default 0-4; 0-1 with --quick); seeds that do not ship are trained into --cache-dir first")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the organisms are tiny: one is fastest)")
    ap.add_argument("--out", default=None, help="where to write every row as JSON (default: figures/organisms/"
                    "route_detection.json when every part ran; '' = nowhere)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    n = 16 if args.quick else 64
    effects = {"patching": exact_patching_effects, "atp": atp_effects, "eapig": eapig_effects}
    names = {"patching": "exact patching", "atp": "AtP", "eapig": "EAP-IG", "circuits": "circuit discovery",
             "routes": "routes"}
    seeds = parse_seeds(args.seeds) if args.seeds else list(range(2) if args.quick else range(N_SEEDS))
    default_seeds = args.seeds is None or seeds == list(range(N_SEEDS))
    spec = route_bench.load_detector(args.detector)
    if args.quick:
        spec = replace(spec, route_config={**spec.route_config, "n_controls": 9, "n_boot": 200})
    fams = args.families or [*route_bench.OLD_FAMILIES, *FAMILIES]
    jobs = {**{k: (lambda f=f: localisation(f, n)) for k, f in effects.items()},
            "circuits": lambda: circuit_discovery(n),
            "routes": lambda: route_rows(spec, fams, seeds, args.cache_dir)}
    res, secs = {}, {}
    for part in PARTS:
        res[part], secs[part] = _run(names[part], jobs[part]) if part in args.only else (None, 0.0)
    rows, circuits = res["routes"], res["circuits"]
    print_tables(res, secs, circuits, rows)
    head = dict.fromkeys(("route_auroc", "heldout_auroc_min", "false_route_rate_max", "verdict_accuracy",
                          "old_route_auroc", "old_verdict_accuracy"))
    if rows:
        head = route_bench.summary(rows, [f for f in fams if f not in route_bench.OLD_FAMILIES])
        print(f"routes: {len(rows)} queries in {secs['routes']:.0f}s; " + ", ".join(
            f"{k} {'n/a' if v is None else f'{v:.3f}'}" for k, v in head.items()))
    mean = lambda d: None if not d else round(sum(d.values()) / len(d), 4)  # noqa: E731
    final = {**{k: None if v is None else round(v, 4) for k, v in head.items()},
             "patching_auroc": mean(res["patching"]), "atp_auroc": mean(res["atp"]), "eapig_auroc": mean(res["eapig"]),
             "circuit_auroc": mean({k: v["auroc"] for k, v in circuits.items()}) if circuits else None}
    figures = Path(__file__).resolve().parents[2] / "figures" / "organisms"
    final["seeds"] = seeds
    out = args.out if args.out is not None else (
        str(figures / "route_detection.json") if set(args.only) == set(PARTS) and default_seeds and not args.quick
        else str(figures / f"route_detection_s{args.seeds}.json") if not default_seeds and rows else "")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({**final, "quick": args.quick, "detector": args.detector,
                                         "detector_commit": _commit(args.detector),
                                         "families": route_bench.family_metrics(rows) if rows else None, "patching": res["patching"], "atp": res["atp"],
                                         "eapig": res["eapig"], "circuits": circuits, "routes": rows,
                                         "seconds": secs}, indent=1) + "\n")
    print(json.dumps(final))


def _commit(path: str) -> str | None:
    """The last commit that changed the detector file (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %cI", "--", str(Path(path).resolve())],
                             capture_output=True, text=True,
                             cwd=Path(path).resolve().parent, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


if __name__ == "__main__":
    main()
