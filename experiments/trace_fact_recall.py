"""Where does SmolLM2 recall a fact? ROME's causal trace, like for like, and attention knockout.

1. Facts: the entity facts (``recallscope.tasks.entity_facts``: people, landmarks, cities, companies,
   products, plus the built-in set's entity relations; lexical relations -- opposites, chemical
   symbols, acronyms -- excluded). Keep those the model recalls top-1 and split them by subject
   length: multi-token subjects (ROME's setting) and single-token subjects (reported separately).
2. Noise: sigma = 3 x the std of the subject-token embeddings over the recalled facts' subjects
   (ROME's choice), ``--samples`` noise draws per fact (ROME: 10).
3. Trace (per set, ``--n-multi`` / ``--n-single`` facts sampled with ``--seed``): residual stream
   (window 1), MLP outputs and attention outputs (window 10), pooled by ROME's token categories.
4. Normalise: mean indirect effect / mean total effect per (layer, token category), with a bootstrap
   95% CI over facts, compared with ROME's GPT-2 XL averages on the same basis.
5. Attention knockout (window 9) on the multi-token set: last -> subject / relation / last.

Finished chunks are checkpointed (``--checkpoint-dir``, default OUT/ckpt): rerunning resumes. Writes
figures (HTML, and PNG when Chromium is available), results with manifests and ``summary.json``.

    python experiments/trace_fact_recall.py --n-multi 40 --n-single 20 --samples 10 --layer-stride 5

(the committed figures/fact_trace; traced as three processes, --components mlp / attn / resid, then
assembled with --reuse-saved). ``--layer-stride 1`` traces every layer (about 5x the compute).
"""

import argparse
import json
import random
import time
from pathlib import Path

from recallscope import load_model
from recallscope.patching import attention_knockout, causal_trace
from recallscope.plotting import export_all
from recallscope.results import PatchingResult
from recallscope.tasks.entity_facts import (
    load_entity_facts,
    normalized_indirect_effect,
    rome_noise,
    split_by_subject_length,
)
from recallscope.tasks.facts import recalled_facts, trace_items

COMPONENTS = (("resid", "resid_post", 1), ("mlp", "mlp_out", 10), ("attn", "attn_out", 10))
ROME_GPT2_XL = {"model": "GPT-2 XL (48 layers)", "source": "Meng et al. 2022, causal traces over 1000 known facts",
                "total_effect": 0.186, "resid_subject_last": {"effect": 0.087, "layer": 15},
                "mlp_subject_last": {"effect": 0.066}, "attn_subject_last": {"effect": 0.016}}
"""ROME's average effects on p(answer); normalised below by the total effect (0.186)."""


def peak_summary(result: PatchingResult, category: str) -> dict:
    """Peak over layers, within one token category, of the mean indirect effect and of the normalised
    effect (AIE / ATE), each with its bootstrap 95% CI over facts."""
    col = result.labels["token"].index(category)
    eff = result.effect()
    mean, (lo, hi) = eff.mean(), eff.ci()
    ratio, rlo, rhi = normalized_indirect_effect(result)
    i = int(mean[:, col].nan_to_num(nan=-1e9).argmax())
    j = int(ratio[:, col].nan_to_num(nan=-1e9).argmax())
    layers = result.labels["layer"]
    return {"token": category, "layer": int(layers[i]), "effect": float(mean[i, col]),
            "ci95": [float(lo[i, col]), float(hi[i, col])],
            "normalized": {"layer": int(layers[j]), "value": float(ratio[j, col]),
                           "ci95": [float(rlo[j, col]), float(rhi[j, col])]}}


def curves(result: PatchingResult) -> dict:
    """Normalised indirect-effect curves per token category: layer, value, CI (JSON-ready)."""
    ratio, lo, hi = normalized_indirect_effect(result)
    return {cat: {"layer": [int(x) for x in result.labels["layer"]], "value": ratio[:, c].tolist(),
                  "lo": lo[:, c].tolist(), "hi": hi[:, c].tolist()}
            for c, cat in enumerate(result.labels["token"])}


def curve_figure(traces: dict[str, PatchingResult], title: str, categories=("subject_last", "last")):
    """Normalised indirect effect (AIE / ATE) against layer, one line per site and token, CI bands."""
    import plotly.graph_objects as go

    fig = go.Figure()
    dash = {"subject_last": "solid", "last": "dot", "subject_first": "dash"}
    colour = {"resid": (31, 119, 180), "mlp": (214, 39, 40), "attn": (44, 160, 44)}
    for name, res in traces.items():
        rgb = ",".join(str(v) for v in colour.get(name, (100, 100, 100)))
        for cat, cur in curves(res).items():
            if cat not in categories:
                continue
            label = f"{name} @ {cat}"
            fig.add_trace(go.Scatter(x=cur["layer"] + cur["layer"][::-1], y=cur["hi"] + cur["lo"][::-1],
                                     fill="toself", fillcolor=f"rgba({rgb},0.15)", mode="lines",
                                     line={"width": 0}, showlegend=False, hoverinfo="skip", legendgroup=label))
            fig.add_trace(go.Scatter(x=cur["layer"], y=cur["value"], name=label, legendgroup=label,
                                     line={"dash": dash.get(cat, "solid"), "color": f"rgb({rgb})"}))
    fig.update_layout(title=title, xaxis_title="layer (window centre for MLP / attention)",
                      yaxis_title="indirect effect / total effect", template="plotly_white")
    return fig


def trace_set(model, name: str, items, args, noise: dict, ckpt: Path, out: Path) -> dict:
    """Trace one fact set with the three components; save results and figures; return its summary."""
    n_layers = int(model.cfg.n_layers)
    layers = list(range(0, n_layers, args.layer_stride))
    traces: dict[str, PatchingResult] = {}
    summary: dict = {"n": len(items), "facts": [it.clean + it.answer for it in items],
                     "relations": sorted({it.meta["relation"] for it in items})}
    for comp_name, comp, window in [c for name in args.components for c in COMPONENTS if c[0] == name]:
        saved = out / name / f"trace_{comp_name}"
        if args.reuse_saved and saved.exists():
            res = PatchingResult.load(saved)
            if (len(res.values) != len(items) or res.config.get("n_samples") != args.samples
                    or res.labels["layer"] != [str(x) for x in layers]):
                raise SystemExit(f"{saved} was traced with other settings; drop --reuse-saved or delete it")
        else:
            res = causal_trace(model, items, component=comp, window=window, n_samples=args.samples,
                               noise_scale=noise["noise_scale"], seed=args.seed, layers=layers,
                               checkpoint_dir=ckpt / name / f"trace_{comp_name}")
            res.save(saved)
        traces[comp_name] = res
        fig = res.effect().plot(title=f"{name}-token subjects: causal trace, {comp_name} (window {window}), "
                                      "indirect effect on p(answer)")
        summary[f"export_{comp_name}"] = export_all(fig, out / name / f"trace_{comp_name}").failed
        summary[comp_name] = {cat: peak_summary(res, cat) for cat in res.labels["token"]
                              if not bool(res.values[:, :, res.labels["token"].index(cat)].isnan().all())}
        summary[f"curves_{comp_name}"] = curves(res)
        print(name, comp_name, json.dumps({k: summary[comp_name][k] for k in ("subject_last", "last")}), flush=True)
    res = next(iter(traces.values()))
    summary["total_effect"] = {"mean": float((res.clean - res.corrupt).mean()), "p_clean": float(res.clean.mean()),
                               "p_noised": float(res.corrupt.mean())}
    fig = curve_figure(traces, f"{name}-token subjects ({len(items)} facts): normalised indirect effect")
    summary["export_normalized"] = export_all(fig, out / f"normalized_{name}").failed
    return summary


def rome_comparison(multi: dict, n_layers: int) -> dict:
    """SmolLM2's normalised peaks at the last subject token beside ROME's, on the AIE / ATE basis."""
    ate = ROME_GPT2_XL["total_effect"]
    rows = {}
    for comp in [c for c in ("resid", "mlp", "attn") if c in multi]:
        ours = multi[comp]["subject_last"]["normalized"]
        rome = ROME_GPT2_XL[f"{comp}_subject_last"]
        rows[comp] = {"smollm2": ours["value"], "smollm2_ci95": ours["ci95"],
                      "smollm2_layer": ours["layer"], "smollm2_depth": ours["layer"] / n_layers,
                      "rome_gpt2xl": rome["effect"] / ate}
    if "resid" in rows:
        rows["resid"]["rome_depth"] = ROME_GPT2_XL["resid_subject_last"]["layer"] / 48
    return {"basis": "mean indirect effect / mean total effect, last subject token, peak over layers",
            "rome": ROME_GPT2_XL, "rows": rows}


def markdown_table(summary: dict) -> str:
    """The README's ROME table from a summary: normalised and raw peaks per set, site and token, with ROME's."""
    site = {"resid": "residual stream", "mlp": "MLP outputs, window 10", "attn": "attention outputs, window 10"}
    rome = {"resid": 0.087, "mlp": 0.066, "attn": 0.016}
    lines = ["| subjects | site restored | token | peak layer | AIE / ATE [95% CI] | AIE [95% CI] | ROME GPT-2 XL AIE / ATE |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in ("multi", "single"):
        if name not in summary:
            continue
        for comp in [c for c in ("resid", "mlp", "attn") if c in summary[name]]:
            for tok in ("subject_last", "last"):
                p = summary[name][comp][tok]
                nz = p["normalized"]
                ref = (f"{rome[comp] / ROME_GPT2_XL['total_effect']:.2f} ({rome[comp]:.3f} / 0.186)"
                       if name == "multi" and tok == "subject_last" else "")
                lines.append(f"| {name}-token ({summary[name]['n']}) | {site[comp]} | {tok.replace('_', ' ')} | "
                             f"{p['layer']} | {nz['value']:.2f} [{nz['ci95'][0]:.2f}, {nz['ci95'][1]:.2f}] | "
                             f"{p['effect']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] | {ref} |")
    te = [f"{name}-token: p(answer) {summary[name]['total_effect']['p_clean']:.3f} -> "
          f"{summary[name]['total_effect']['p_noised']:.3f} (ATE {summary[name]['total_effect']['mean']:.3f})"
          for name in ("multi", "single") if name in summary]
    return "\n".join(lines) + "\n\nTotal effects: " + "; ".join(te) + " (ROME, GPT-2 XL: ATE 0.186).\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n-multi", type=int, default=60, help="multi-token-subject facts to trace (0: all)")
    ap.add_argument("--n-single", type=int, default=40, help="single-token-subject facts to trace (0: none)")
    ap.add_argument("--samples", type=int, default=10, help="noise samples per fact (ROME: 10)")
    ap.add_argument("--layer-stride", type=int, default=1, help="trace every k-th layer (1: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="figures/fact_trace")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="store finished chunks here; rerunning the same command resumes (default: OUT/ckpt)")
    ap.add_argument("--skip-knockout", action="store_true")
    ap.add_argument("--components", default="resid,mlp,attn",
                    help="comma-separated subset of resid,mlp,attn to trace (parts can run as separate processes "
                         "sharing --out and --checkpoint-dir; a final run with --reuse-saved assembles them)")
    ap.add_argument("--sets", default="multi,single", help="comma-separated subset of multi,single")
    ap.add_argument("--reuse-saved", action="store_true",
                    help="load traces already saved in OUT (same settings) instead of recomputing them")
    args = ap.parse_args()
    args.components = args.components.split(",")
    complete = set(args.components) == {"resid", "mlp", "attn"} and set(args.sets.split(",")) == {"multi", "single"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out / "ckpt"
    t0 = time.perf_counter()
    model = load_model(args.model)
    recall = recalled_facts(model, load_entity_facts())
    multi, single = split_by_subject_length(model, recall.kept)
    noise = rome_noise(model, recall.kept)
    print(f"{len(recall.kept)} of {len(recall.facts)} entity facts recalled top-1: {len(multi)} multi-token "
          f"subjects, {len(single)} single-token; sigma {noise['sigma']:.4f}", flush=True)
    summary: dict = {"model": args.model, "samples": args.samples, "seed": args.seed,
                     "layer_stride": args.layer_stride, "noise": noise, "n_entity_facts": len(recall.facts),
                     "n_recalled": len(recall.kept), "n_recalled_multi": len(multi),
                     "n_recalled_single": len(single), "recall_per_relation": recall.per_relation()}
    rng = random.Random(args.seed)
    sets = {"multi": rng.sample(multi, len(multi) if args.n_multi == 0 else min(args.n_multi, len(multi))),
            "single": rng.sample(single, min(args.n_single, len(single)))}
    name_out = out / ("summary.json" if complete else f"summary.{'-'.join(args.components)}.{args.sets}.json")
    for name, facts in sets.items():
        if facts and name in args.sets.split(","):
            summary[name] = trace_set(model, name, trace_items(model, facts), args, noise, ckpt, out)
            name_out.write_text(json.dumps(summary, indent=1, default=str))
    if "multi" in summary:
        summary["rome_comparison"] = rome_comparison(summary["multi"], int(model.cfg.n_layers))
    if not args.skip_knockout and complete:
        items = trace_items(model, sets["multi"])
        ko = attention_knockout(model, items, window=9, checkpoint_dir=ckpt / "knockout")
        ko.save(out / "knockout")
        rel = ko.effect().values / ko.clean[:, None, None]
        summary["knockout_relative_change"] = {lab: [float(v) for v in rel[:, :, e].mean(0)]
                                               for e, lab in enumerate(ko.labels["edge"])}
        summary["export_knockout"] = export_all(ko.effect().plot(
            title="Attention knockout (window 9), multi-token subjects: change in p(answer)"), out / "knockout").failed
    summary["seconds"] = time.perf_counter() - t0
    name_out.write_text(json.dumps(summary, indent=1, default=str))
    table = markdown_table(summary)
    name_out.with_suffix(".table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
