"""Figures of the shipped organisms: ground truth beside what exact patching measures, and the route checks.

    nice -n 10 python experiments/organisms/figures.py       # writes figures/organisms/*.html|png

1. ``b64_truth`` / ``b64_patching``: which input chunk each output byte depends on (9-letter plaintexts),
   and the mean noising effect of patching each chunk's embedding (32 prompts per byte).
2. ``facts_truth`` / ``facts_patching``: residual nodes (layer x position) that carry the subject, and the
   mean noising effect of patching each node with a subject-swapped prompt's (64 pairs).
3. ``mnemonic_checks``: per route / rote organism, the held-out decode accuracy and the two interchange
   checks (concept swap followed; chunk transplant carries the concept's kind), as stored in config.json.
"""

from pathlib import Path

import plotly.graph_objects as go
import torch

from recallscope import load_model
from recallscope.organisms import ground_truth
from recallscope.organisms.b64_decoder import dependency_pairs
from recallscope.organisms.core import deterministic
from recallscope.organisms.fact_store import subject_swap_pairs
from recallscope.organisms.recipes import WEIGHTS_DIR, recipes
from recallscope.organisms.scoring import exact_patching_effects
from recallscope.organisms.store import read_config
from recallscope.plotting import apply_style, export_all, heatmap

OUT = Path(__file__).resolve().parents[2] / "figures" / "organisms"


def b64_figures(n_bytes: int = 9, n: int = 32) -> None:
    model = load_model("organism:b64-decoder")
    truth = ground_truth(model)
    pairs = dependency_pairs(n_bytes, n, seed=1)
    chunk_pos = [1 + i for i in range(truth.n_chunks)]
    effects = torch.stack([exact_patching_effects(model, pairs[j * n:(j + 1) * n], layers=[0], positions=chunk_pos)
                           [:, 0].mean(0) for j in range(n_bytes)])
    cols = [f"chunk {i} (chars {2 * i}-{2 * i + 1})" for i in range(truth.n_chunks)]
    rows = [f"byte {j}" for j in range(n_bytes)]
    export_all(heatmap(truth.dependency(n_bytes).float(), cols, rows, title="b64-decoder ground truth: byte j "
                       "depends on chunk i", colorbar_title="depends"), OUT / "b64_truth")
    export_all(heatmap(effects, cols, rows, title="b64-decoder: exact patching, drop in log p(byte) when the "
                       "chunk is swapped", colorbar_title="nats"), OUT / "b64_patching")


def fact_figures(n: int = 64) -> None:
    model = load_model("organism:fact-store")
    truth = ground_truth(model)
    layers, positions = list(range(truth.n_layers)), [1, 2, 3, 4]
    eff = exact_patching_effects(model, subject_swap_pairs(truth, n=n, seed=1), layers=layers,
                                 positions=positions).mean(0)
    names = {v: k for k, v in truth.positions.items()}
    cols = [f"{names[p]} ({p})" for p in positions]
    rows = [f"resid_pre {layer}" for layer in layers]
    nodes = truth.resid_nodes()
    grid = torch.tensor([[float(nodes[(layer, p)]) if (layer, p) in nodes else float("nan") for p in positions]
                         for layer in layers])
    export_all(heatmap(grid, cols, rows, title="fact-store ground truth: nodes that carry the subject (blank: "
                       "not scored)", colorbar_title="carries"), OUT / "facts_truth")
    export_all(heatmap(eff, cols, rows, title="fact-store: exact patching, drop in log p(attribute) when the "
                       "node comes from a subject-swapped prompt", colorbar_title="nats"), OUT / "facts_patching")


def mnemonic_figure() -> None:
    names = [n for n in recipes() if n.startswith(("route", "rote"))]
    metrics = {n: read_config(WEIGHTS_DIR / n)["metrics"] for n in names}
    fig = go.Figure()
    for key, label in (("decode_test", "decode of the 16 test chunks (never trained directly in route models)"), ("swap_follow", "concept swap followed"),
                       ("kind_transplant", "chunk carries its concept's kind")):
        fig.add_trace(go.Bar(x=names, y=[metrics[n][key] for n in names], name=label))
    apply_style(fig, title="Mnemonic organisms: route models decode through the concept, rote models do not")
    fig.update_yaxes(title="share of prompts", range=[0, 1.05])
    fig.update_layout(barmode="group")
    export_all(fig, OUT / "mnemonic_checks")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with deterministic(0):
        b64_figures()
        fact_figures()
        mnemonic_figure()
    print(f"figures written to {OUT}")


if __name__ == "__main__":
    main()
