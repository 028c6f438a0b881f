"""Feature routes on mnemonic organisms: does a transcoder feature set carry the route? (issue 17, item 3)

    OMP_NUM_THREADS=1 nice -n 5 python experiments/feature_routes_organisms.py [--out figures/features/routes]

Per organism (truth known from its recipe): train a small transcoder set (d_sae 128, k 8, 300 steps; seconds),
build the family (every world chunk -> its linked concept -> its letter), draw 20 selection pairs (seeded) and
test on the other 42 only. Three sets of 24 layer-1 features, each tested with
:func:`recallscope.features.routes.feature_family_report` against 99 matched placebo sets:

- ``planted``: a positive control with known truth: 24 features whose encoders read the concept states' top
  principal directions (fitted on the selection pairs) (:func:`~recallscope.features.routes.planted_route_features`);
- ``attribution``: the 24 learned features with the largest |activation x gradient| of the answer at the chunk
  site on the selection pairs (what an attribution graph would keep);
- ``random``: 24 random learned features.

Each set also gets the causal half (the set's site activations swapped between pairs, against the same placebos).

route-s0, rote-s0 and answer-at-site-s0 were used while building the test; route-s1, route-s2, route-l2-s0,
route-iit-s0, rote-s1 and bypass-s0 were not looked at before this script ran. Writes feature_routes.json
(+ feature_routes.html) with a manifest.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ORGANISMS = {"route-s0": True, "rote-s0": False, "answer-at-site-s0": False, "route-s1": True, "route-s2": True,
             "route-l2-s0": True, "route-iit-s0": True, "rote-s1": False, "bypass-s0": False}
DEVELOPMENT = ("route-s0", "rote-s0", "answer-at-site-s0")
SIZE = 24
LAYER = 1


def run_organism(name: str, tmp: Path, n_placebo: int) -> dict:
    import recallscope
    from recallscope.features.concepts import FeatureSet
    from recallscope.features.data import training_tokens
    from recallscope.features.routes import (FeatureRouteConfig, crossfit_split, feature_family_report,
                                             planted_route_features, select_by_attribution)
    from recallscope.features.train import TranscoderTrainConfig, train_set
    from recallscope.organisms import ground_truth
    from recallscope.routes.family import FamilyConfig
    from recallscope.routes.transplant import TransplantConfig, TransplantPair

    t0 = time.perf_counter()
    model = recallscope.load_model(f"organism:{name}")
    cfg = TranscoderTrainConfig(d_sae=128, k=8, steps=300, batch_size=256, lr=3e-3)
    tset, rep = train_set(model, training_tokens(model, 400, seed=0), cfg, tmp / name, progress=False)
    truth = ground_truth(model)
    pairs = [TransplantPair(f"{c} ==", c, " " + k, " " + truth.chunk_letter[c]) for c, k in truth.chunk_concept.items()]
    sel, test = crossfit_split(len(pairs), 20, 0)
    selection = [pairs[i] for i in sel]
    planted, planted_set = planted_route_features(model, tset, selection, LAYER, SIZE)
    chosen = select_by_attribution(model, planted, selection, LAYER, SIZE)
    rnd = FeatureSet(tuple((LAYER, int(f)) for f in torch.randperm(128, generator=torch.Generator().manual_seed(3))[:SIZE]))
    config = FeatureRouteConfig(family=FamilyConfig(transplant=TransplantConfig(min_layer=1)), n_placebo=n_placebo)
    report = feature_family_report(model, planted, [pairs[i] for i in test],
                                   {"planted": planted_set, "attribution": chosen, "random": rnd}, config=config,
                                   name=name)
    summary = report.summary()
    summary.update(pairs_tested=test, pairs_selected_on=sel, is_route=bool(truth.is_route),
                   development=name in DEVELOPMENT, transcoder_explained_variance=rep.explained_variance,
                   seconds=round(time.perf_counter() - t0, 1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="figures/features/routes")
    parser.add_argument("--n-placebo", type=int, default=99)
    parser.add_argument("--only", nargs="*", default=None, help="organism names (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or list(ORGANISMS):
            s = run_organism(name, Path(tmp), args.n_placebo)
            results.append(s)
            for r in s["rows"]:
                print(f"{name:18s} {r['name']:11s} {r['verdict']:12s} family {r['family_verdict']:12s} "
                      f"H {r['heldout']:.3f} placebo median {r['placebo_median']:.3f} max {r['placebo_max']:.3f} "
                      f"p_placebo {r['p_placebo']:.3f} p_family {r['p_family']:.4f} p_holm {r['p_holm']:.4f} "
                      f"swap {r['swap'].get('score', float('nan')):.3f} (placebo median {r['swap_placebo_median']:.3f})")
    table = [{"organism": s["name"], "is_route": s["is_route"], "development": s["development"], "set": r["name"],
              "verdict": r["verdict"], "family_verdict": r["family_verdict"], "heldout": round(r["heldout"], 4),
              "placebo_median": round(r["placebo_median"], 4), "placebo_max": round(r["placebo_max"], 4),
              "p_placebo": r["p_placebo"], "p_holm": round(r["p_holm"], 4), "swap": round(r["swap"]["score"], 4),
              "swap_placebo_median": round(r["swap_placebo_median"], 4), "swap_p_placebo": r["swap"]["p_placebo"]}
             for s in results for r in s["rows"]]
    from recallscope.manifest import atomic_write_text

    atomic_write_text(out / "feature_routes.json", json.dumps({"table": table, "organisms": results,
                                                               "command": "python experiments/feature_routes_organisms.py",
                                                               "size": SIZE, "layer": LAYER}, indent=1, default=str) + "\n")
    import plotly.graph_objects as go

    fig = go.Figure()
    for kind, colour in (("planted", "#d62728"), ("attribution", "#1f77b4"), ("random", "#7f7f7f")):
        rows = [t for t in table if t["set"] == kind]
        fig.add_trace(go.Scatter(x=[t["organism"] for t in rows], y=[t["heldout"] for t in rows], mode="markers",
                                 marker={"size": 11, "color": colour}, name=kind,
                                 text=[t["verdict"] for t in rows]))
    rows = [t for t in table if t["set"] == "planted"]
    fig.add_trace(go.Scatter(x=[t["organism"] for t in rows], y=[t["placebo_max"] for t in rows], mode="markers",
                             marker={"symbol": "line-ew-open", "size": 18, "color": "black"},
                             name="max of 99 placebo sets (planted)"))
    fig.update_layout(title=f"feature routes: {SIZE} layer-{LAYER} features, held-out transplant score",
                      template="plotly_white", yaxis_title="held-out score (fitted - shuffled)")
    fig.write_html(str(out / "feature_routes.html"), include_plotlyjs="cdn")


if __name__ == "__main__":
    main()
