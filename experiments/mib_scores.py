"""MIB-style scores and readable pictures of recallscope circuits (issue 17, items 4-6).

1. Component circuit: load the SmolLM2 capital-fact edge scores saved by ``find_fact_circuit.py``
   (``figures/circuit/edge_scores``, with its 16 prompt pairs from ``summary.json``), evaluate the
   faithfulness of the top-|score| circuits at MIB's edge budgets (0.1% ... 100% of the 70,651 edges,
   pruned to input-to-logits paths) and report CPR and CMD; export the scores as MIB JSON (not kept in
   the repository: about 8 MB).
2. Draw that circuit (``figures/circuit/circuit_topn``) with the interactive view: pruning slider, site
   labels; and once with heads grouped into one supernode per layer.
3. Feature graph (with ``--transcoders DIR``, a set for ``organism:fact-store`` from ``recallscope
   transcoders``): the attribution graph of one fact prompt, labelled by lens tokens and top-activating
   task prompts, grouped by label; its MIB-style edge curve in the graph's linear model and its node curve in
   the real model (most influential features kept, the other active features ablated).

    python experiments/mib_scores.py --out figures/graph_view [--transcoders out/tc/fact-store]
"""

import argparse
import json
import time
from pathlib import Path

from recallscope import load_model
from recallscope.attribution.edges import Circuit, EdgeScores
from recallscope.attribution.mib import feature_mib_curve, feature_node_curve, mib_curve, write_mib_json
from recallscope.features.view import graph_view
from recallscope.tasks.pairs import PromptPair


def draw_component(out: Path) -> None:
    circuit = Circuit.load("figures/circuit/circuit_topn")
    title = f"SmolLM2 capital-fact circuit (EAP-IG top 200: {circuit.n_edges} edges)"
    graph_view(circuit, title=title).write_image(out / "smollm2_capital_circuit.png", width=1100, height=800)
    graph_view(circuit, group_by="layer", title=title + ", heads grouped by layer").write_image(
        out / "smollm2_capital_circuit_by_layer.png", width=1100, height=800)


def component(out: Path, mib_json: Path | None) -> dict:
    summary = json.loads(Path("figures/circuit/summary.json").read_text())
    pairs = [PromptPair(clean, corrupt, answer, wrong) for clean, answer, corrupt, wrong in summary["pairs"]]
    scores = EdgeScores.load("figures/circuit/edge_scores")
    model = load_model(summary["model"])
    t0 = time.perf_counter()
    curve = mib_curve(model, pairs, "logit_diff", scores)
    seconds = time.perf_counter() - t0
    curve.save(out / "smollm2_capital_mib")
    curve.plot(title=f"SmolLM2 capital facts, EAP-IG edges: CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f}"
               ).write_image(out / "smollm2_capital_mib.png", width=800, height=420)
    if mib_json is not None:
        write_mib_json(scores, mib_json, d_model=int(model.cfg.d_model), circuit=Circuit.load("figures/circuit/circuit_topn"))
    draw_component(out)
    return {"fractions": curve.fractions, "n_edges": curve.n_edges, "faithfulness": curve.faithfulness,
            "cpr": curve.cpr, "cmd": curve.cmd, "n_edges_total": curve.n_edges_total, "seconds": seconds}


def features(out: Path, transcoders: str) -> dict:
    from recallscope.features.data import organism_task_tokens
    from recallscope.features.formats import load_transcoders
    from recallscope.features.graph import attribution_graph
    from recallscope.features.view import feature_labels

    model = load_model("organism:fact-store")
    tset = load_transcoders(transcoders, n_layers=int(model.cfg.n_layers))
    tokens = model.to_tokens("f3 Pia Orr color")[0]
    graph = attribution_graph(model, tset, tokens)
    contexts = organism_task_tokens(model, 200, seed=3)  # [n, pos] task prompts
    labels = feature_labels(model, tset, graph, contexts=contexts)
    strs = [model.tokenizer.decode([int(t)]) for t in tokens]
    title = "fact-store organism, 'f3 Pia Orr color'"
    graph_view(graph, labels=labels, token_strs=strs, title=title).write_image(
        out / "fact_store_graph.png", width=1100, height=700)
    graph_view(graph, labels=labels, token_strs=strs, group_by="label", title=title + ", grouped by lens tokens"
               ).write_image(out / "fact_store_graph_by_label.png", width=1100, height=700)
    curve = feature_mib_curve(graph)
    curve.save(out / "fact_store_feature_mib")
    nodes = feature_node_curve(model, tset, graph)
    nodes.save(out / "fact_store_feature_nodes_mib")
    return {"n_feat": graph.n_feat, "n_edges_total": curve.n_edges_total, "faithfulness": curve.faithfulness,
            "cpr": curve.cpr, "cmd": curve.cmd, "nodes_kept": nodes.n_edges, "nodes_faithfulness": nodes.faithfulness,
            "nodes_cpr": nodes.cpr, "nodes_cmd": nodes.cmd}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="figures/graph_view")
    ap.add_argument("--transcoders", default=None, help="fact-store transcoders (recallscope transcoders --out)")
    ap.add_argument("--mib-json", default=None, help="also write the SmolLM2 edge scores as MIB JSON here")
    ap.add_argument("--skip-component", action="store_true", help="no SmolLM2 curve or figures")
    ap.add_argument("--figures-only", action="store_true", help="only redraw the SmolLM2 circuit (no model run)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    if args.figures_only:
        draw_component(out)
    elif not args.skip_component:
        summary["component"] = component(out, Path(args.mib_json) if args.mib_json else None)
    if args.transcoders:
        summary["feature"] = features(out, args.transcoders)
    if summary:
        old = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        (out / "summary.json").write_text(json.dumps({**old, **summary}, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
