"""The worked VAT example: does SmolLM2 route "VA==" -> T or "VAT" -> " Value" through a concept?

The human mnemonic: VA== decodes to T because "VA" looks like "VAT", "value added tax", which starts with
T. This script runs recallscope's route analysis on SmolLM2 end to end and writes everything to
``--out`` (default ``figures/vat``):

1. Behaviour: the model's top continuations of "The acronym VAT stands for" and of two base64 few-shot
   prompts ending in "VA==" (it cannot decode base64).
2. Lens trajectories: logit lens at the last position of "The acronym VAT stands for" (" Value", " tax",
   " VAT"...), and logit lens and Patchscope at the "VA" chunk of a base64 prompt ("T", " VAT"...).
3. Route reports (interchange along each concept against its competitors: the input itself, the output in
   every casing, its unembedding neighbours, cosine- and norm-matched random directions; 8 templates):
   " VAT" -> " Value" through " value added tax", " tax", " value", " added"; and "VA" -> " T" through
   the acronyms and expansions "VA" begins (VAT, Virginia, Veterans Affairs...).
4. The acronym sweep: every lexicon acronym the model expands (first word in its top 3), route verdicts
   of the expansion's concepts.
5. The chunk sweep: base64-like two-letter chunks ("VA", "NA", "TA", ...) in "XY==" decoding prompts,
   route verdicts of the acronyms they begin (NATO, NASA, RAM...) and their expansions.

``summary.json`` is rewritten after every stage, so an interrupted run keeps what it finished.

    python experiments/vat_route.py                 # full run
    python experiments/vat_route.py --stride 5      # faster, coarser layers
"""

import argparse
import json
import time
from pathlib import Path

import torch

from recallscope import load_model
from recallscope.lens import Patchscope, lens_trajectory
from recallscope.manifest import atomic_write_text
from recallscope.plotting import export_all
from recallscope.routes import RouteConfig, route_report
from recallscope.routes.acronyms import acronym_query, chunk_query, known_acronyms
from recallscope.routes.concepts import Concept, ConceptSource, model_candidates
from recallscope.routes.scores import input_span


def top_tokens(model, prompt: str, k: int = 8) -> list[tuple[str, float]]:
    with torch.no_grad():
        logits = model(model.to_tokens(prompt), return_type="logits")[0, -1]
    probs = logits.softmax(-1)
    top = probs.topk(k)
    return [(model.tokenizer.decode([int(i)]), round(float(p), 4)) for p, i in zip(top.values, top.indices)]


def save(result, out: Path, name: str, notes: dict) -> None:
    result.save(out / "results" / name)
    report = export_all(result.plot(), out / name)
    notes.setdefault("figures", []).extend(str(p) for p in report.written.values())


def route_rows(report) -> list[dict]:
    """Candidates (verdicts under the competitor standard) and then every competitor (verdict "competitor")."""
    return [{"concept": r.name, "role": r.role, "verdict": r.verdict, "score": round(r.score, 3),
             "ci95": [round(r.ci[0], 3), round(r.ci[1], 3)], "p": round(r.p_value, 4), "p_holm": round(r.p_holm, 4),
             "peak_layer": r.peak_layer, "layers": list(r.layers), "margins": {k: round(v, 3) for k, v in r.margins.items()},
             "strongest_competitor": r.strongest_competitor, "mediated_share": round(r.mediation, 3),
             "interchange_nats": round(r.interchange, 3), "effect_per_norm": round(r.effect_per_norm, 4),
             "ablation_nats": round(r.ablation, 3), "best_readout_rank": r.best_rank}
            for r in report.routes() + report.competitor_rows()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="figures/vat")
    ap.add_argument("--stride", type=int, default=2, help="layer spacing of the intervention windows")
    ap.add_argument("--n-controls", type=int, default=8)
    ap.add_argument("--max-acronyms", type=int, default=8, help="acronyms in the sweep (0 = skip it)")
    ap.add_argument("--chunks", default="VA,NA,TA,RA,SA,MA", help="chunks of the chunk sweep ('' = skip it)")
    ap.add_argument("--sweep-stride", type=int, default=4, help="layer spacing in the two sweeps")
    ap.add_argument("--sweep-alternatives", type=int, default=4, help="alternative inputs per prompt in the sweeps")
    ap.add_argument("--only-sweep", action="store_true", help="run only the acronym sweep (the route standard check)")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.perf_counter()
    model = load_model("smollm2")
    notes: dict = {"model": "smollm2", "stride": args.stride, "n_controls": args.n_controls}

    if args.only_sweep:
        acronym_sweep(model, args, out, notes, t0)
        return
    vat_q, vat_c = acronym_query(next(k for k in known_acronyms(model, {"VAT": ("value added tax",)})))
    chunk_q, chunk_c = chunk_query("VA")
    notes["behaviour"] = {p: top_tokens(model, p) for p in [*vat_q.prompts, *chunk_q.prompts]}
    notes["model_says"] = [c.name for c in model_candidates(model, "VAT", templates=("The acronym {} stands for",))]

    acronym_targets = [" Value", " value", " tax", " Tax", " VAT", " added"]
    save(lens_trajectory(model, vat_q.prompts[0], acronym_targets), out, "lens_vat_last", notes)
    vat_pos = input_span(model, vat_q.prompts[0], vat_q.input)[1][1] - 1
    save(lens_trajectory(model, vat_q.prompts[0], acronym_targets, position=vat_pos), out, "lens_vat_token", notes)
    save(lens_trajectory(model, vat_q.prompts[0], acronym_targets, position=vat_pos, lens=Patchscope(model)), out,
         "patchscope_vat_token", notes)
    chunk_targets = ["T", " T", " VAT", " Virginia", " value", " tax"]
    va_pos = input_span(model, chunk_q.prompts[0], chunk_q.input)[1][1] - 1
    save(lens_trajectory(model, chunk_q.prompts[0], chunk_targets, position=va_pos), out, "lens_va_chunk", notes)
    save(lens_trajectory(model, chunk_q.prompts[0], chunk_targets, position=va_pos, lens=Patchscope(model)), out,
         "patchscope_va_chunk", notes)

    config = RouteConfig(n_controls=args.n_controls, stride=args.stride)
    own = [Concept(c.text, ConceptSource.MODEL, label=c.name) for c in model_candidates(model, "VAT")]
    vat = route_report(model, vat_q, vat_c + own, config=config)
    save(vat, out, "routes_vat_value", notes)
    notes["routes_vat_value"] = {"total_effect": vat.total_effect.tolist(), "routes": route_rows(vat)}
    chunk = route_report(model, chunk_q, chunk_c[:6], config=RouteConfig(n_controls=args.n_controls,
                                                                          stride=args.stride))
    save(chunk, out, "routes_va_chunk", notes)
    notes["routes_va_chunk"] = {"clean_logprob": chunk.clean.tolist(), "total_effect": chunk.total_effect.tolist(),
                                "routes": route_rows(chunk)}
    write(out, notes, t0)

    sweep_config = acronym_sweep(model, args, out, notes, t0)
    notes["chunk_sweep"] = []
    for name in filter(None, args.chunks.split(",")):
        q, c = chunk_query(name)
        if not c:
            continue
        rep = route_report(model, q, c[:6], config=sweep_config)
        rep.save(out / "results" / f"chunk_{name}")
        notes["chunk_sweep"].append({"chunk": name, "output": q.output, **sweep_row(rep)})
        write(out, notes, t0)
    print(json.dumps({k: notes[k] for k in ("model_says", "seconds")}, default=str))


def acronym_sweep(model, args, out: Path, notes: dict, t0: float) -> RouteConfig:
    """Every lexicon acronym the model expands: its expansion's concepts (and the acronym and the output
    word themselves, which must come back as competitors) under the competitor standard."""
    sweep_config = RouteConfig(n_controls=args.n_controls, stride=args.sweep_stride, ablation=False,
                               n_alternatives=args.sweep_alternatives)
    notes["acronym_sweep"] = []
    for known in known_acronyms(model)[: args.max_acronyms]:
        q, c = acronym_query(known)
        extra = [Concept(q.input, ConceptSource.USER), Concept(known.output, ConceptSource.USER)]
        rep = route_report(model, q, c + extra, config=sweep_config)
        rep.save(out / "results" / f"acronym_{known.acronym}")
        notes["acronym_sweep"].append({"acronym": known.acronym, "expansion": known.expansion, "output": known.output,
                                       "output_rank": known.rank, **sweep_row(rep)})
        write(out, notes, t0)
    return sweep_config


def sweep_row(rep) -> dict:
    return {"clean_logprob": [round(float(v), 3) for v in rep.clean],
            "total_effect": round(float(rep.total_effect.nanmean()), 3), "verdict": rep.verdict(),
            "routes": route_rows(rep)}


def write(out: Path, notes: dict, t0: float) -> None:
    notes["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "summary.json", json.dumps(notes, indent=1, default=str))


if __name__ == "__main__":
    main()
