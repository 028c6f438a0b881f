"""Benchmark: recallscope's methods scored against the model organisms' known mechanisms.

1. **Localisation** on the base64 and fact organisms (ground truth: the dependency map / the circuit's
   residual nodes, :mod:`recallscope.organisms.scoring`): exact activation patching and AtP, each as the
   ROC AUC of its per-cell noising effects against the truth.
2. **Routes** on the mnemonic organisms: for each route and rote organism and each mnemonic-hook chunk
   (VA, TA, SA, RA, MA, NA, WA, UA: the chunks of tasks.b64_stimuli.MNEMONIC_HOOKS), the route module
   (:func:`recallscope.routes.route_report`) scores the chunk's concept (``VAT``) against 19 control
   concepts of the same organism, represented in the organism's own neutral context (``<s> VAT``). ``route_auroc``: ROC AUC of the
   concept's route score for "this organism routes" (route organisms are positive); ``verdict_accuracy``:
   share of (organism, chunk) verdicts equal to the truth ("inconclusive" counts as wrong).

Prints a table, writes every row to figures/organisms/route_detection.json (``--out``), and ends with one
JSON line:
``{"route_auroc": x, "verdict_accuracy": y, "patching_auroc": z, "atp_auroc": w}`` (each AUROC the
mean over the organisms it covers; null when a module is missing).

    nice -n 10 python experiments/benchmarks/route_detection.py [--quick]

Figures of the organisms' ground truth against exact patching: experiments/organisms/figures.py.
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch

from recallscope import load_model
from recallscope.attribution.scoring import roc_auc
from recallscope.organisms import ground_truth
from recallscope.organisms.recipes import N_SEEDS
from recallscope.organisms.scoring import b64_cells, exact_patching_effects, fact_cells
from recallscope.tasks.b64_stimuli import MNEMONIC_HOOKS


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


def route_rows(n_controls: int, n_boot: int, seeds: range) -> list[dict]:
    """One row per (organism, hook chunk): the concept's route score, verdict and the truth.

    Concepts are represented in the organism's own neutral context (``<s> VAT``: English prefixes are
    unknown words to it) against a baseline over its whole vocabulary."""
    from recallscope.routes import RouteConfig, RouteQuery, route_report

    rows = []
    for kind in ("route", "rote"):
        for seed in seeds:
            model = load_model(f"organism:{kind}-s{seed}")
            truth = ground_truth(model)
            vocab = tuple(" " + w for w in model.tokenizer.get_vocab() if not w.startswith("<"))
            config = RouteConfig(n_controls=n_controls, n_boot=n_boot, n_alternatives=0, prefixes=("",),
                                 baseline_words=vocab)
            chunks = sorted(MNEMONIC_HOOKS)
            for chunk in chunks:
                concept = truth.chunk_concept[chunk]
                others = [c for c in truth.concept_letter if c != concept]
                controls = [" " + c for c in random.Random(seed).sample(others, n_controls)]
                alts = tuple(c for c in chunks if c != chunk)[:4]
                query = RouteQuery((f"{chunk} ==",), chunk, " " + truth.chunk_letter[chunk], alts)
                report = route_report(model, query, [" " + concept], controls={concept: controls}, config=config,
                                      progress=False)
                r = report.routes()[0]
                rows.append({"organism": f"{kind}-s{seed}", "chunk": chunk, "concept": concept, "is_route": truth.is_route,
                             "score": r.score, "verdict": r.verdict, "p": r.p_value})
    return rows


def route_metrics(rows: list[dict]) -> tuple[float, float]:
    scores = torch.tensor([r["score"] for r in rows])
    labels = torch.tensor([r["is_route"] for r in rows])
    right = [(r["verdict"] == "route") if r["is_route"] else (r["verdict"] == "no route") for r in rows]
    return roc_auc(scores, labels), sum(right) / len(right)


def _run(name: str, fn):
    """Run one part; a missing module gives None (and says so) instead of failing the benchmark."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except ModuleNotFoundError as exc:
        print(f"{name}: skipped ({exc})")
        return None, 0.0
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer prompts, 2 seeds, 9 controls")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "figures" / "organisms" /
                                         "route_detection.json"), help="where to write every row as JSON ('' = nowhere)")
    args = ap.parse_args()
    torch.manual_seed(0)
    n = 16 if args.quick else 64
    patch, t_patch = _run("exact patching", lambda: localisation(exact_patching_effects, n))
    atp_, t_atp = _run("AtP", lambda: localisation(atp_effects, n))
    seeds = range(2) if args.quick else range(N_SEEDS)
    rows, t_route = _run("routes", lambda: route_rows(9 if args.quick else 19, 200 if args.quick else 1000, seeds))
    print(f"{'method':<16} {'organism':<14} {'ROC AUC':>8} {'seconds':>8}")
    for name, res, secs in (("exact patching", patch, t_patch), ("AtP", atp_, t_atp)):
        for org, auc in (res or {}).items():
            print(f"{name:<16} {org:<14} {auc:>8.3f} {secs:>8.1f}")
    route_auroc = verdict_acc = None
    if rows:
        route_auroc, verdict_acc = route_metrics(rows)
        print(f"\n{'organism':<10} {'chunk':<6} {'concept':<8} {'truth':<8} {'score':>7} {'p':>6} verdict")
        for r in rows:
            print(f"{r['organism']:<10} {r['chunk']:<6} {r['concept']:<8} {'route' if r['is_route'] else 'rote':<8} "
                  f"{r['score']:>7.3f} {r['p']:>6.3f} {r['verdict']}")
        print(f"routes: {len(rows)} queries in {t_route:.0f}s; route AUROC {route_auroc:.3f}, verdict accuracy "
              f"{verdict_acc:.3f}")
    mean = lambda d: None if not d else round(sum(d.values()) / len(d), 4)  # noqa: E731
    final = {"route_auroc": None if route_auroc is None else round(route_auroc, 4),
             "verdict_accuracy": None if verdict_acc is None else round(verdict_acc, 4),
             "patching_auroc": mean(patch), "atp_auroc": mean(atp_)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**final, "patching": patch, "atp": atp_, "routes": rows,
                                              "seconds": {"patching": t_patch, "atp": t_atp, "routes": t_route}},
                                             indent=1) + "\n")
    print(json.dumps(final))


if __name__ == "__main__":
    main()
