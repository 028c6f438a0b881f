"""Where does SmolLM2 recall a fact? ROME-style causal traces and attention knockout on the built-in facts.

Keeps the built-in facts the model recalls top-1, samples ``--n-facts`` of them (seeded), and runs:

- the causal trace of the residual stream (window 1), MLP outputs and attention outputs (window 10),
  pooled over facts by ROME's token categories, with bootstrap 95% CIs;
- attention knockout (window 9) of last -> subject, last -> relation and last -> last.

Finished chunks go to a checkpoint store (``--checkpoint-dir``), so an interrupted run resumes.
Writes figures (HTML, and PNG when a Chromium is available) and ``summary.json`` with the peaks to
``--out`` (default ``figures/fact_trace``), each result with its manifest.

    python experiments/trace_fact_recall.py --n-facts 40 --samples 5
"""

import argparse
import json
import random
import time
from pathlib import Path

import torch

from recallscope import load_model
from recallscope.patching import attention_knockout, causal_trace
from recallscope.plotting import export_all
from recallscope.results import PatchingResult
from recallscope.tasks.facts import load_builtin_facts, recalled_facts, trace_items


def peak_summary(result, category: str | None = None) -> dict:
    """Peak of the mean indirect effect (overall, or within one token category), with its CI."""
    eff = result.effect()
    mean, (lo, hi) = eff.mean(), eff.ci()
    if category is not None:
        col = result.labels["token"].index(category)
        layer = int(mean[:, col].nan_to_num(nan=-1e9).argmax())
        return {"token": category, "layer": layer, "effect": float(mean[layer, col]),
                "ci95": [float(lo[layer, col]), float(hi[layer, col])]}
    p = eff.peak()
    return {"token": p.get("token_label"), "layer": p["layer"], "effect": p["mean"], "ci95": list(p["ci95"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n-facts", type=int, default=40)
    ap.add_argument("--samples", type=int, default=5, help="noise samples per fact (ROME: 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="figures/fact_trace")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="store finished chunks here; rerunning the same command resumes (default: OUT/ckpt)")
    ap.add_argument("--reuse-saved", action="store_true",
                    help="load a trace already saved in OUT (from an earlier run with the same settings) instead of "
                         "recomputing it")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "ckpt"
    t0 = time.perf_counter()
    model = load_model(args.model)
    recall = recalled_facts(model, load_builtin_facts())
    known = recall.kept
    facts = random.Random(args.seed).sample(known, min(args.n_facts, len(known)))
    items = trace_items(model, facts)
    print(f"{len(known)} facts recalled top-1; tracing {len(items)} of them")
    summary = {"model": args.model, "n_recalled": len(known), "n_traced": len(items), "samples": args.samples,
               "seed": args.seed, "facts": [it.clean + it.answer for it in items]}
    for name, comp, window in [("resid", "resid_post", 1), ("mlp", "mlp_out", 10), ("attn", "attn_out", 10)]:
        saved = out / f"trace_{name}"
        if args.reuse_saved and saved.exists():
            res = PatchingResult.load(saved)
            if len(res.values) != len(items) or res.config.get("n_samples") != args.samples:
                raise SystemExit(f"{saved} was traced with other settings ({len(res.values)} facts, "
                                 f"{res.config.get('n_samples')} samples); "
                                 "drop --reuse-saved or delete it")
        else:
            res = causal_trace(model, items, component=comp, window=window, n_samples=args.samples,
                               seed=args.seed, checkpoint_dir=ckpt / f"trace_{name}")
            res.save(saved)
        fig = res.effect().plot(title=f"Causal trace, {name} (window {window}): indirect effect on p(answer)")
        summary[f"export_{name}"] = export_all(fig, out / f"trace_{name}").failed
        summary[name] = {"peak": peak_summary(res), "at_last_subject": peak_summary(res, "subject_last"),
                         "at_last_token": peak_summary(res, "last")}
        summary["total_effect"] = {"mean": float((res.clean - res.corrupt).mean()),
                                   "p_clean": float(res.clean.mean()), "p_noised": float(res.corrupt.mean())}
        print(name, json.dumps(summary[name]))
    ko = attention_knockout(model, items, window=9, checkpoint_dir=ckpt / "knockout")
    ko.save(out / "knockout")
    rel = ko.effect().values / ko.clean[:, None, None]
    summary["knockout_relative_change"] = {lab: [float(v) for v in rel[:, :, e].mean(0)]
                                           for e, lab in enumerate(ko.labels["edge"])}
    summary["export_knockout"] = export_all(ko.effect().plot(title="Attention knockout (window 9): change in p(answer)"),
                                            out / "knockout").failed
    summary["seconds"] = time.perf_counter() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: summary[k] for k in ("resid", "mlp", "attn", "total_effect")}, indent=1))


if __name__ == "__main__":
    main()
