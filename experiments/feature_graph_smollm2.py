"""Feature-level attribution graphs of two-hop recalls, checked by interventions (issue 17, item 7).

Usage::

    python experiments/feature_graph_smollm2.py --part organism   # route-s0, seconds to minutes
    python experiments/feature_graph_smollm2.py --part smollm2    # needs `recallscope transcoders --model smollm2`

Writes ``figures/features/<part>/``: ``graph.json`` (circuit-tracer schema), ``graph.html`` (interactive
view), ``summary.json`` (fidelity, the graph's reading, the intervention and its verdict).

1. **Organism** (``organism:route-s0``): a base64 decoder trained to decode every chunk through a concept
   (``VA ==`` -> concept ``VAT`` at layer 1, position 1 -> ``T``); for the 16 held-out chunks this two-hop
   route is the only way. Transcoders for every layer are trained here (organism defaults of
   ``recallscope transcoders``), cached. For each held-out chunk: the graph of ``<chunk> ==`` -> its letter;
   *reading*: the features at the chunk's position in layer 0 (before the concept site) that the graph says
   promote the answer most (path effect ``a * d logit / d a`` summed over the graph's paths); *intervention*: ablate those ``n_top`` features in the real model
   (nothing frozen) and, as a control, ``n_top`` other active features at the same place; :func:`verdict` checks the
   answer's logit (as predicted, beyond the control) and its log-probability (beyond the control) separately;
   each check stands when >= 75% of the chunks confirm it.
2. **SmolLM2**: ``The acronym VAT stands for Value Added`` -> `` Tax`` with the cached transcoders.
   *Reading*: the features at the acronym's token (and, second claim, at the last token) that the graph says
   promote `` Tax`` most; *intervention*:
   ablate them (attention free, and attention + norms frozen), control: as many other active features at the
   same positions; also the graph's linear prediction of the effect (path sums through the graph).

Replacement-model fidelity (held-out KL, top-1 agreement) and the error-node share of the graph are reported
beside each verdict.
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from recallscope import load_model
from recallscope.features.export import save_json, to_json
from recallscope.features.graph import attribution_graph, influence, prune
from recallscope.features.interventions import FeatureEdit, run_intervention
from recallscope.features.replacement import error_share
from recallscope.features.view import graph_view


def path_effects(graph: Any) -> torch.Tensor:
    """Each feature's contribution to the target logit through all paths of the graph, ``a_n * d logit / d a_n``
    (the graph's linear prediction of the logit change when the feature is ablated is minus this)."""
    a, nf, adj = graph.activations, graph.n_feat, graph.adjacency
    direct = (adj[graph.logit_slice, :nf] / a[None])[0]
    through = adj[:nf, :nf] / a[None]  # [target, source]: d input_t / d a_s along the direct edge
    total = direct.clone()
    for _ in range(graph.n_layers + 1):  # total = direct + through^T total; the graph is acyclic (layer order)
        total = direct + through.T @ total
    return a * total


def predicted_effect(graph: Any, nodes: list[int]) -> float:
    """The graph's linear prediction of the target-logit change when the features ``nodes`` are ablated."""
    return float(-path_effects(graph)[nodes].sum())


def ablate(model: Any, tset: Any, tokens: torch.Tensor, feats: list[list[int]], target: int,
           freeze: tuple[str, ...] = ()) -> dict[str, float]:
    """Logit and probability change of ``target`` when ``feats`` ([layer, pos, index]) are set to 0."""
    res = run_intervention(model, tset, tokens, [FeatureEdit(lay, f, p, value=0.0) for lay, p, f in feats],
                           freeze=freeze)
    lp0, lp1 = (res.clean_logits[-1].log_softmax(-1)[target], res.logits[-1].log_softmax(-1)[target])
    top = int(res.logits[-1].argmax())
    return {"logit_change": res.logit_change(target), "logprob_change": float(lp1 - lp0),
            "prob_clean": float(lp0.exp()), "prob_edited": float(lp1.exp()), "top_after": model.tokenizer.decode([top])}


def read_off(graph: Any, positions: list[int], layers: list[int] | None, n_top: int, seed: int
             ) -> tuple[list[int], list[int]]:
    """The ``n_top`` features at ``positions`` (and ``layers``) that the graph says promote the target most
    (largest path effect), and as many other active features at the same places drawn at random (control)."""
    effect = path_effects(graph)
    place = torch.isin(graph.features[:, 1], torch.tensor(positions))
    if layers is not None:
        place &= torch.isin(graph.features[:, 0], torch.tensor(layers))
    cand = place.nonzero().squeeze(-1)
    order = cand[effect[cand].argsort(descending=True)]
    top = order[:n_top].tolist()
    rest = order[n_top:]
    gen = torch.Generator().manual_seed(seed)
    control = rest[torch.randperm(rest.shape[0], generator=gen)[:n_top]].tolist()
    return top, control


def verdict(ablated: dict[str, float], control: dict[str, float], predicted: float) -> dict[str, str]:
    """Two checks of the claim "these features promote the answer":

    - ``logit``: ablating them lowers the answer's logit as the graph predicts (same sign, within a factor 2)
      and by more than twice the control's change;
    - ``probability``: ablating them lowers the answer's log-probability by more than twice the control's
      change (the graph's logit node is not demeaned, so a feature can raise every logit alike: the logit
      check passes and this one fails).
    """
    obs, ctl = ablated["logit_change"], control["logit_change"]
    logit_ok = predicted < 0 and obs < 0 and 0.5 <= obs / predicted <= 2 and abs(obs) > 2 * abs(ctl)
    prob_ok = ablated["logprob_change"] < 0 and abs(ablated["logprob_change"]) > 2 * abs(control["logprob_change"])
    return {"logit": "confirmed" if logit_ok else "refuted", "probability": "confirmed" if prob_ok else "refuted"}


def write_graph(model: Any, tset: Any, graph: Any, out: Path, prompt: str, scan: str) -> dict[str, Any]:
    from recallscope.cli.graph import _view_labels

    pruned = prune(graph, node_threshold=0.8, edge_threshold=0.9)  # 0.9: a SmolLM2 graph.json of a few MB
    strs = [model.tokenizer.decode([t]) for t in graph.tokens.tolist()]
    save_json(to_json(graph, pruned, slug=out.name, scan=scan, prompt_tokens=strs, prompt=prompt), out / "graph.json")
    fig = graph_view(graph, labels=_view_labels(model, tset, graph, pruned.node_mask), token_strs=strs, title=prompt)
    fig.write_html(str(out / "graph.html"), include_plotlyjs="cdn")  # small in the repo; the CLI embeds plotly.js
    try:
        from recallscope.plotting import export

        export(fig, out / "graph.png", width=1200, height=900)
    except Exception as exc:  # a PNG needs Chromium; the HTML is the view
        print(f"no PNG: {exc}")
    return {"n_features": graph.n_feat, "kept_features": int(pruned.node_mask[: graph.n_feat].sum()),
            "kept_edges": int(pruned.edge_mask.sum()), "error_share": error_share(graph)}


def organism_with_transcoders(spec: str = "organism:route-s0") -> tuple[Any, Any, Path]:
    """The organism, its transcoder set and the set's directory: the set `recallscope transcoders` caches at its
    defaults (the shipped one, copied into the cache; a rerun only reloads)."""
    from recallscope.cli import main as cli
    from recallscope.features.cache import find_cached_set
    from recallscope.features.formats import load_transcoders

    assert cli(["transcoders", "--model", spec, "--quiet"]) == 0
    tdir = find_cached_set(spec)
    model = load_model(spec)
    return model, load_transcoders(tdir, int(model.cfg.n_layers)), tdir


def organism_part(out: Path, n_top: int) -> dict[str, Any]:
    from recallscope.organisms import ground_truth

    spec = "organism:route-s0"
    model, tset, tdir = organism_with_transcoders(spec)
    truth = ground_truth(model)
    rows, first = [], None
    for chunk in truth.test_chunks:
        prompt = f"{chunk} =="
        tokens = model.to_tokens(prompt)[0]
        answer = int(model.to_tokens(truth.chunk_letter[chunk], prepend_bos=False)[0, 0])
        graph = attribution_graph(model, tset, tokens, targets=[answer])
        if first is None:
            first = (graph, prompt)
        top, control = read_off(graph, [truth.site_pos], list(range(truth.site_layer)), n_top, seed=len(rows))
        feats = graph.features[top].tolist()
        rows.append({"chunk": chunk, "answer": truth.chunk_letter[chunk],
                     "top_answer": model.tokenizer.decode([int(model(tokens[None])[0, -1].argmax())]),
                     "features": feats, "predicted": predicted_effect(graph, top),
                     "ablate": ablate(model, tset, tokens, feats, answer),
                     "control": ablate(model, tset, tokens, graph.features[control].tolist(), answer),
                     "error_share": error_share(graph)})
    graph, prompt = first  # type: ignore[misc]
    drawn = write_graph(model, tset, graph, out, prompt, str(tdir))
    checks = [verdict(r["ablate"], r["control"], r["predicted"]) for r in rows]
    wins = {k: sum(c[k] == "confirmed" for c in checks) for k in ("logit", "probability")}
    flips = sum(r["ablate"]["top_after"] != r["answer"] for r in rows)
    summary = {
        "model": spec, "transcoders": str(tdir), "report": json.loads((tdir / "report.json").read_text()),
        "fidelity": json.loads((tdir / "fidelity.json").read_text())["all"], "graph": drawn, "prompt": prompt,
        "claim": f"the {n_top} layer-0 features at the chunk position that the graph says promote the letter most "
                 "carry the route to it",
        "n_prompts": len(rows), "confirmed_prompts": wins, "answer_changed_by_ablation": flips,
        "mean_logit_change": {"graph_features": _mean(r["ablate"]["logit_change"] for r in rows),
                              "control": _mean(r["control"]["logit_change"] for r in rows),
                              "predicted": _mean(r["predicted"] for r in rows),
                              "graph_features_logprob": _mean(r["ablate"]["logprob_change"] for r in rows),
                              "control_logprob": _mean(r["control"]["logprob_change"] for r in rows)},
        "verdict": {k: "confirmed" if n >= 0.75 * len(rows) else "refuted" for k, n in wins.items()}, "rows": rows}
    return summary


def _mean(xs: Any) -> float:
    xs = list(xs)
    return sum(xs) / max(1, len(xs))


def smollm2_part(out: Path, n_top: int, transcoders: str | None, max_feature_nodes: int) -> dict[str, Any]:
    from recallscope.features.cache import find_cached_set
    from recallscope.features.formats import load_transcoders

    tdir = Path(transcoders) if transcoders else find_cached_set("smollm2")
    model = load_model("smollm2")
    tset = load_transcoders(tdir, int(model.cfg.n_layers))
    prompt, answer_text, acronym = "The acronym VAT stands for Value Added", " Tax", " VAT"
    tokens = model.to_tokens(prompt)[0]
    answer = int(model.to_tokens(answer_text, prepend_bos=False)[0, 0])
    logits = model(tokens[None], return_type="logits")[0, -1]
    strs = [model.tokenizer.decode([t]) for t in tokens.tolist()]
    acr = model.to_tokens(acronym, prepend_bos=False)[0].tolist()
    start = next(i for i in range(len(tokens)) if tokens[i:i + len(acr)].tolist() == acr)
    positions = list(range(start, start + len(acr)))
    t0 = time.perf_counter()
    graph = attribution_graph(model, tset, tokens, targets=[answer], max_feature_nodes=max_feature_nodes)
    seconds = time.perf_counter() - t0
    drawn = write_graph(model, tset, graph, out, prompt, str(tdir))
    result: dict[str, Any] = {
        "model": "smollm2", "transcoders": str(tdir), "prompt": prompt, "tokens": strs, "answer": answer_text,
        "answer_rank": int((logits > logits[answer]).sum()), "answer_prob": float(logits.softmax(-1)[answer]),
        "report": json.loads((tdir / "report.json").read_text()),
        "fidelity": json.loads((tdir / "fidelity.json").read_text())["all"], "graph": drawn,
        "graph_seconds": seconds, "max_feature_nodes": max_feature_nodes, "acronym_positions": positions}
    for name, where in (("acronym", positions), ("last", [len(tokens) - 1])):
        top, control = read_off(graph, where, None, n_top, seed=0)
        feats = graph.features[top].tolist()
        result[name] = {
            "claim": f"the {n_top} features at {[strs[p] for p in where]} that the graph says promote {answer_text!r} "
                     "most do promote it",
            "features": feats, "influence": influence(graph)[top].tolist(), "path_effect": path_effects(graph)[top].tolist(),
            "predicted": predicted_effect(graph, top),
            "ablate_free": ablate(model, tset, tokens, feats, answer),
            "ablate_frozen": ablate(model, tset, tokens, feats, answer, freeze=("attention", "norms")),
            "control_free": ablate(model, tset, tokens, graph.features[control].tolist(), answer),
            "control_frozen": ablate(model, tset, tokens, graph.features[control].tolist(), answer,
                                     freeze=("attention", "norms"))}
        r = result[name]
        r["verdict"] = verdict(r["ablate_free"], r["control_free"], r["predicted"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["organism", "smollm2", "all"], default="all")
    parser.add_argument("--out", default="figures/features", help="output directory")
    parser.add_argument("--n-top", type=int, default=5, help="features ablated per claim")
    parser.add_argument("--transcoders", default=None, help="SmolLM2 set (default: the newest cached one)")
    parser.add_argument("--max-feature-nodes", type=int, default=1024, help="SmolLM2 graph: feature rows computed")
    args = parser.parse_args()
    torch.manual_seed(0)
    parts = ["organism", "smollm2"] if args.part == "all" else [args.part]
    for part in parts:
        out = Path(args.out) / part
        out.mkdir(parents=True, exist_ok=True)
        if part == "organism":
            summary = organism_part(out, args.n_top)
        else:
            summary = smollm2_part(out, args.n_top, args.transcoders, args.max_feature_nodes)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        brief = {k: v for k, v in summary.items() if k not in ("rows", "report")}
        print(json.dumps(brief, indent=1))


if __name__ == "__main__":
    main()
