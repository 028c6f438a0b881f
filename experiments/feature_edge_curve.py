"""MIB-style scoring of feature attribution graphs, three ways (issue 17, item 5).

Usage::

    python experiments/feature_edge_curve.py --part organism   # route-s0, every held-out chunk, about a minute
    python experiments/feature_edge_curve.py --part smollm2    # one VAT graph; needs cached SmolLM2 transcoders

Writes ``figures/features/edge_curve/<part>.json``. For each graph (the same graphs as
``experiments/feature_graph_smollm2.py``: ``<chunk> ==`` -> its letter on ``organism:route-s0``; ``The acronym
VAT stands for Value Added`` -> `` Tax`` on SmolLM2) at MIB's edge budgets:

1. ``edges_causal``: :func:`recallscope.attribution.feature_curve.feature_edge_curve`, the top-|weight| edges
   (pruned to input-to-logit paths) evaluated in the real model with frozen attention and norms and live
   transcoder activations;
2. ``edges_linear``: :func:`recallscope.attribution.mib.feature_mib_curve`, the same budgets in the graph's linear
   model (no path pruning, features never switch off); ``edges_causal.linear_same_edges``: the causal curve's
   own kept edges in the linear model (so the difference is only what live activations change);
3. ``nodes_causal``: :func:`recallscope.attribution.mib.feature_node_curve`, the most influential features kept and
   the rest ablated in the real model (budgets are fractions of features; nothing frozen).

Each curve's faithfulness, kept counts, CPR and CMD are written; for the organism also their means over chunks.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from recallscope import load_model
from recallscope.attribution.feature_curve import feature_edge_curve
from recallscope.attribution.mib import MIBCurve, cpr_cmd, feature_mib_curve, feature_node_curve
from recallscope.features.graph import attribution_graph


def curve_dict(curve: MIBCurve) -> dict[str, Any]:
    out = {"fractions": curve.fractions, "kept": curve.n_edges, "faithfulness": curve.faithfulness,
           "total": curve.n_edges_total, "cpr": curve.cpr, "cmd": curve.cmd}
    for key in ("linear_same_edges", "switched_off", "clamped_on", "identity_residual", "logit_all", "logit_none"):
        if key in curve.config:
            out[key] = curve.config[key]
    if "linear_same_edges" in out:  # the same kept edges in the graph's linear model: what live activations change
        out["linear_same_edges_cpr"], out["linear_same_edges_cmd"] = cpr_cmd(curve.fractions, out["linear_same_edges"])
    return out


def score_graph(model: Any, tset: Any, graph: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    causal = feature_edge_curve(model, tset, graph, progress=False)
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # the real model's logit, which the causal curve's all-edges run must reproduce
        real = float(graph.logit_vectors[0] @ model(graph.tokens[None], return_type="logits")[0, -1].float())
    return {"n_features": graph.n_feat, "n_edges": int((graph.adjacency != 0).sum()), "logit_real": real,
            "edges_causal": curve_dict(causal), "edges_causal_seconds": seconds,
            "edges_linear": curve_dict(feature_mib_curve(graph)),
            "nodes_causal": curve_dict(feature_node_curve(model, tset, graph))}


def _mean(rows: list[dict[str, Any]], kind: str, key: str) -> float:
    return sum(r[kind][key] for r in rows) / max(1, len(rows))


def organism_part(limit: int | None) -> dict[str, Any]:
    from feature_graph_smollm2 import organism_with_transcoders  # experiments/ is on sys.path for a script

    from recallscope.organisms import ground_truth

    spec = "organism:route-s0"
    model, tset, tdir = organism_with_transcoders(spec)
    truth = ground_truth(model)
    rows = []
    for chunk in truth.test_chunks[:limit]:
        tokens = model.to_tokens(f"{chunk} ==")[0]
        answer = int(model.to_tokens(truth.chunk_letter[chunk], prepend_bos=False)[0, 0])
        graph = attribution_graph(model, tset, tokens, targets=[answer])
        rows.append({"chunk": chunk, "answer": truth.chunk_letter[chunk], **score_graph(model, tset, graph)})
    kinds = ("edges_causal", "edges_linear", "nodes_causal")
    means = {k: {"cpr": _mean(rows, k, "cpr"), "cmd": _mean(rows, k, "cmd")} for k in kinds}
    means["edges_causal"].update(linear_same_edges_cpr=_mean(rows, "edges_causal", "linear_same_edges_cpr"),
                                 linear_same_edges_cmd=_mean(rows, "edges_causal", "linear_same_edges_cmd"))
    return {"model": spec, "transcoders": str(tdir), "n_prompts": len(rows), "mean": means, "rows": rows}


def smollm2_part(transcoders: str | None, max_feature_nodes: int) -> dict[str, Any]:
    from recallscope.features.cache import find_cached_set
    from recallscope.features.formats import load_transcoders

    tdir = Path(transcoders) if transcoders else find_cached_set("smollm2")
    model = load_model("smollm2")
    tset = load_transcoders(tdir, int(model.cfg.n_layers))
    prompt, answer_text = "The acronym VAT stands for Value Added", " Tax"
    tokens = model.to_tokens(prompt)[0]
    answer = int(model.to_tokens(answer_text, prepend_bos=False)[0, 0])
    t0 = time.perf_counter()
    graph = attribution_graph(model, tset, tokens, targets=[answer], max_feature_nodes=max_feature_nodes)
    seconds = time.perf_counter() - t0
    return {"model": "smollm2", "transcoders": str(tdir), "prompt": prompt, "answer": answer_text,
            "max_feature_nodes": max_feature_nodes, "graph_seconds": seconds, **score_graph(model, tset, graph)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["organism", "smollm2"], default="organism")
    parser.add_argument("--out", default="figures/features/edge_curve", help="output directory")
    parser.add_argument("--limit", type=int, default=None, help="organism: first N held-out chunks only")
    parser.add_argument("--transcoders", default=None, help="SmolLM2 set (default: the newest cached one)")
    parser.add_argument("--max-feature-nodes", type=int, default=1024, help="SmolLM2 graph: feature rows computed")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "organism":
        summary = organism_part(args.limit)
    else:
        summary = smollm2_part(args.transcoders, args.max_feature_nodes)
    (out / f"{args.part}.json").write_text(json.dumps(summary, indent=1) + "\n")
    brief = summary.get("mean") or {k: {"cpr": summary[k]["cpr"], "cmd": summary[k]["cmd"]}
                                    for k in ("edges_causal", "edges_linear", "nodes_causal")}
    print(json.dumps(brief, indent=1))


if __name__ == "__main__":
    main()
