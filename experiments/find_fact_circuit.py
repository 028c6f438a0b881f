"""Find and draw a fact-recall circuit in SmolLM2, with its faithfulness.

1. Keep the built-in facts of one relation (default: capitals) that SmolLM2 recalls top-1 and pair
   them with counterfactual subjects of the same token length (``attribution.fact_pairs``).
2. Score every edge of the model's graph (embeddings, 270 heads with q/k/v inputs, 30 MLPs, logits)
   with EAP-IG on the inputs (noising: edges are corrupted inside the clean run), logit difference.
3. Evaluate the top-n circuits for growing n (faithfulness: share of the clean-corrupt logit-difference
   gap recovered with every other edge corrupted; completeness: 1 - the share the rest recovers without
   the circuit) and take the smallest one reaching ``--target`` faithfulness.
4. Prune it ACDC-style (``--acdc-threshold``, a fraction of the gap; 0 skips) and evaluate it again.
5. Direct logit attribution of the same prompts, split by source tokens (subject vs relation heads).

Writes to ``--out`` (default ``figures/circuit``): the edge scores, the circuit(s) and DLA as saved
results (with manifests), figures as HTML + PNG, and ``summary.json``. Circuits are drawn in the graph
view (``Circuit.plot``: site labels such as ``z L23.H4``, a slider over cumulative influence, 0.8 shown in
the PNG); ``--redraw`` redraws the figures of a finished run from its saved results (no model, seconds).

    python experiments/find_fact_circuit.py                      # ~10-15 min on 2 busy cores
    python experiments/find_fact_circuit.py --relation capital --n-pairs 12 --acdc-threshold 0
    python experiments/find_fact_circuit.py --redraw             # figures of figures/circuit from its results
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from recallscope import load_model
from recallscope.attribution import acdc, direct_logit_attribution, eap_ig, evaluate_circuit, fact_pairs, faithfulness_curve
from recallscope.attribution.circuits import CircuitRunner
from recallscope.attribution.dla import DLAResult
from recallscope.attribution.edges import Circuit, EdgeScores, edge_display_label
from recallscope.manifest import atomic_write_text
from recallscope.plotting import export_all
from recallscope.sites import site_label
from recallscope.tasks.facts import load_builtin_facts, recalled_facts
from recallscope.vocab import Component

SIZES = (10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000)


def draw_circuit(circuit: Circuit, relation: str, stem: Path) -> None:
    """The circuit in the graph view, as HTML (with the pruning slider) and PNG (at 0.8 of the influence)."""
    selection = str(circuit.info.get("selection", ""))
    how = (f"ACDC pruning (threshold {circuit.info['threshold']:g}) of {circuit.info['candidates']} edges"
           if selection == "acdc" else f"EAP-IG {selection}, pruned")
    export_all(circuit.plot(title=f"SmolLM2 {relation} circuit ({how}): {circuit.n_edges} edges, "
                                  f"faithfulness {circuit.info['faithfulness']:.2f}"), stem, width=1100, height=1000,
               scale=1.5)  # one row per layer would make the picture ~3000 px tall


def circuit_lists(circuit: Circuit) -> dict:
    """The circuit's node and edge ids (EAP-IG / MIB names, for ``Circuit.from_edges``) and their labels."""
    edges = circuit.edge_labels()
    return {"circuit_nodes": circuit.nodes(), "circuit_node_labels": [circuit.graph.node_label(n) for n in circuit.nodes()],
            "circuit_edges": edges, "circuit_edge_labels": [edge_display_label(circuit.graph, e) for e in edges]}


def dla_top_heads(dla: DLAResult, k: int = 8) -> dict:
    """The ``k`` heads with the largest mean |DLA| (site labels), split by source tokens."""
    split, groups = dla.by_span()
    n_heads = dla.heads.shape[2]
    top = dla.heads.mean(0).flatten().abs().argsort(descending=True)[:k].tolist()
    return {site_label(Component.HEAD_OUT, i // n_heads, head=i % n_heads): dict(zip(groups, [
        round(float(x), 3) for x in split.mean(0)[i // n_heads, i % n_heads]])) for i in top}


def redraw(out: Path) -> None:
    """Redraw the circuit and edge figures of a finished run from its saved results; relabel the summary."""
    summary = json.loads((out / "summary.json").read_text())
    relation = summary["relation"]
    export_all(EdgeScores.load(out / "edge_scores").plot(top=30), out / "top_edges")
    final = circuit = Circuit.load(out / "circuit_topn")
    draw_circuit(circuit, relation, out / "circuit_topn")
    if (out / "circuit_acdc").is_dir():
        final = Circuit.load(out / "circuit_acdc")
        draw_circuit(final, relation, out / "circuit_acdc")
    summary |= circuit_lists(final)
    summary["dla_top_heads"] = dla_top_heads(DLAResult.load(out / "dla"))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    print(f"redrew top_edges, circuit_topn{', circuit_acdc' if final is not circuit else ''} -> {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--relation", default="capital", help="built-in relation (or 'all')")
    ap.add_argument("--n-pairs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    ap.add_argument("--target", type=float, default=0.8, help="faithfulness the top-n circuit must reach")
    ap.add_argument("--acdc-threshold", type=float, default=0.005, help="ACDC pruning threshold (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="figures/circuit")
    ap.add_argument("--redraw", action="store_true", help="only redraw the figures of a finished run in --out")
    args = ap.parse_args()
    out = Path(args.out)
    if args.redraw:
        redraw(out)
        return
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = load_model(args.model)
    facts = load_builtin_facts(None if args.relation == "all" else [args.relation])
    known = recalled_facts(model, facts).kept
    pairs = fact_pairs(model, known, n_pairs=args.n_pairs, seed=args.seed)
    print(f"{len(known)}/{len(facts)} {args.relation} facts recalled; {len(pairs)} pairs, e.g. "
          f"{pairs[0].clean!r} -> {pairs[0].answer!r} vs {pairs[0].corrupt!r} -> {pairs[0].wrong!r}")
    summary: dict = {"model": args.model, "relation": args.relation, "n_pairs": len(pairs), "seed": args.seed,
                     "pairs": [[p.clean, p.answer, p.corrupt, p.wrong] for p in pairs]}

    scores = eap_ig(model, pairs, "logit_diff", steps=args.steps)
    scores.save(out / "edge_scores")
    export_all(scores.plot(top=30), out / "top_edges")
    n_total = int(scores.graph.valid.sum())
    summary["edge_scores_s"] = scores.manifest["timings_s"]["total"]
    print(f"EAP-IG over {n_total} edges: {summary['edge_scores_s']:.0f} s; top edges: "
          f"{[(edge_display_label(scores.graph, e), round(v, 3)) for e, v in scores.ranked(5)]}")

    runner = CircuitRunner(model, pairs, "logit_diff")
    sizes = [n for n in SIZES if n < n_total] + [n_total]
    curve = faithfulness_curve(model, pairs, "logit_diff", scores, sizes)
    export_all(curve.plot(title=f"SmolLM2 {args.relation} facts: top-n EAP-IG circuits"), out / "faithfulness_curve")
    summary["curve"] = {"sizes": curve.sizes, "faithfulness": curve.faithfulness, "completeness": curve.completeness}
    print("faithfulness by size:", dict(zip(curve.sizes, [round(f, 3) for f in curve.faithfulness])))
    n = next((s for s, f in zip(curve.sizes, curve.faithfulness) if f >= args.target), curve.sizes[-1])
    circuit = scores.top(n).pruned()
    ev = evaluate_circuit(model, pairs, "logit_diff", circuit, runner=runner)
    circuit = replace(circuit, info={**circuit.info, **ev.to_dict(), "manifest": scores.manifest})
    circuit.save(out / "circuit_topn")
    draw_circuit(circuit, args.relation, out / "circuit_topn")
    summary["topn"] = {"n": n, "edges": circuit.n_edges, "nodes": len(circuit.nodes()), **ev.to_dict()}
    print(f"top-{n} circuit (pruned): {circuit.n_edges} edges, {len(circuit.nodes())} nodes, "
          f"faithfulness {ev.faithfulness:.3f}, completeness {ev.completeness:.3f}")

    final = circuit
    if args.acdc_threshold > 0:
        final = acdc(model, pairs, "logit_diff", threshold=args.acdc_threshold, candidates=circuit)
        final = replace(final, info={**final.info, "manifest": scores.manifest})
        final.save(out / "circuit_acdc")
        draw_circuit(final, args.relation, out / "circuit_acdc")
        summary["acdc"] = {k: final.info[k] for k in ("threshold", "n_trials", "faithfulness", "completeness",
                                                      "seconds")} | {"edges": final.n_edges,
                                                                       "nodes": len(final.nodes())}
        print(f"ACDC: {final.n_edges} edges, {len(final.nodes())} nodes, faithfulness {final.info['faithfulness']:.3f}, "
              f"completeness {final.info['completeness']:.3f} ({final.info['n_trials']} trials)")
    summary |= circuit_lists(final)

    dla = direct_logit_attribution(model, pairs)
    dla.save(out / "dla")
    export_all(dla.plot(top=20), out / "dla_components")
    export_all(dla.plot_sources(top=12), out / "dla_head_sources")
    summary["dla_top_heads"] = dla_top_heads(dla)
    summary["dla_mlp_total"] = float(dla.mlp.sum(1).mean())
    summary["dla_heads_total"] = float(dla.heads.sum((1, 2)).mean())
    summary["seconds"] = time.perf_counter() - t0
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: summary[k] for k in ("topn", "acdc", "dla_top_heads") if k in summary}, indent=1))
    print(f"total {summary['seconds']:.0f} s -> {out}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
