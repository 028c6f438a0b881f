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

import torch

from recallscope import load_model
from recallscope.organisms import ground_truth
from recallscope.organisms.core import deterministic
from recallscope.organisms.fact_store import subject_swap_pairs
from recallscope.bench.organism_figures import b64_dependency_map, mnemonic_checks_figure
from recallscope.bench.scoring import exact_patching_effects
from recallscope.plotting import export_all, heatmap

OUT = Path(__file__).resolve().parents[2] / "figures" / "organisms"


def b64_figures(n_bytes: int = 9, n: int = 32) -> None:
    result = b64_dependency_map(load_model("organism:b64-decoder"), n_bytes, n, seed=1)
    export_all(result.plot_truth(), OUT / "b64_truth")
    export_all(result.plot(), OUT / "b64_patching")


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
    export_all(mnemonic_checks_figure(), OUT / "mnemonic_checks")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with deterministic(0):
        b64_figures()
        fact_figures()
        mnemonic_figure()
    print(f"figures written to {OUT}")


if __name__ == "__main__":
    main()
