"""Benchmark: how the cost of an activation-patching sweep grows with layers, positions and batch size,
recallscope's engine vs TransformerLens's per-cell loop (``transformer_lens.patching.get_act_patch_resid_pre``).

Each point is a random GPT-2-style model (``tiny_model``; d_model, vocabulary and the held-fixed sizes
set by the options) and a resid_pre sweep over every (layer, position) cell. Both methods run in this
process on the same model, tokens and metric, alternating (TransformerLens, then recallscope) for
``--repeats`` rounds; the table reports median seconds, the speedup (the median over rounds of each
round's TransformerLens / recallscope time ratio: the two runs of a round share the machine's load), and
the ratio of token-layer block evaluations (the FLOP ratio, which does not depend on hardware):

- the per-cell loop runs a full forward per cell: ``L * P`` cells x ``L * P`` token-layers x ``B``;
- the engine starts a cell at layer ``l``, position ``p`` from cached prefixes: ``(L - l) * (P - p)``
  token-layers x ``B`` per cell, about a quarter of the loop's work, and batches cells.

GPU projection (stated, not measured here: there is no GPU on these machines): for large models a
sweep is compute-bound, so the expected GPU speedup is about the FLOP ratio; for small models on a GPU
both methods are bound by kernel launches and the engine's batching of cells (one launch per layer
for many cells instead of one forward per cell) gives it a larger advantage than the FLOP ratio.

CPU timings on a shared machine are noisy: medians of alternating rounds and in-process ratios only.

    python experiments/benchmarks/sweep_scaling.py                      # default grid, ~3-5 min on 2 cores
    python experiments/benchmarks/sweep_scaling.py --repeats 5 --d-model 256
"""

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patching_speed import bench  # noqa: E402

from recallscope.models import tiny_model  # noqa: E402


def token_layers(n_layers: int, n_pos: int) -> tuple[int, int]:
    """Block evaluations (token-layers per prompt) of the per-cell loop and of the engine, for resid_pre."""
    cells = n_layers * n_pos
    loop = cells * n_layers * n_pos
    engine = sum((n_layers - layer) * (n_pos - pos) for layer in range(n_layers) for pos in range(n_pos))
    return loop, engine


def point(axis: str, value: int, *, layers: int, pos: int, batch: int, args: argparse.Namespace,
          cache: dict) -> dict:
    """Benchmark one (layers, positions, batch) point (cached: the grids share their centre)."""
    key = (layers, pos, batch)
    if key not in cache:
        model = tiny_model("gpt2", n_layers=layers, d_model=args.d_model, n_heads=4, d_vocab=args.vocab,
                           n_ctx=max(128, pos), seed=0)
        row = bench(f"L{layers}-P{pos}-B{batch}", model, batch=batch, seq=pos, repeats=args.repeats)
        loop, engine = token_layers(layers, pos)
        paired = statistics.median(t / r for t, r in zip(row["tl_times"], row["rs_times"]))
        cache[key] = {"layers": layers, "positions": pos, "batch": batch, "cells": row["cells"],
                      "tl_s": row["tl_s"], "rs_s": row["rs_s"], "speedup": paired,
                      "flop_ratio": loop / engine, "max_abs_diff": row["max_abs_diff"]}
    return {"axis": axis, "value": value, **cache[key]}


def figure(rows: list[dict], args: argparse.Namespace):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from recallscope.plotting import apply_style

    axes = [("layers", "layers"), ("positions", "positions"), ("batch", "batch size")]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[f"vs {t}" for _, t in axes], horizontal_spacing=0.07)
    for col, (axis, title) in enumerate(axes, start=1):
        sel = sorted((r for r in rows if r["axis"] == axis), key=lambda r: r["value"])
        x = [r["value"] for r in sel]
        for key, name, color in (("tl_s", "TransformerLens per-cell loop", "#d62728"),
                                 ("rs_s", "recallscope engine (label: speedup)", "#1f77b4")):
            labels = [f"{r['speedup']:.1f}x" for r in sel] if key == "rs_s" else None
            fig.add_trace(go.Scatter(x=x, y=[r[key] for r in sel], mode="lines+markers+text" if labels else
                                     "lines+markers", name=name, line={"color": color}, showlegend=col == 1,
                                     legendgroup=name, text=labels, textposition="bottom center",
                                     hovertext=[f"{r['speedup']:.1f}x faster (FLOP ratio {r['flop_ratio']:.1f})"
                                                for r in sel]), row=1, col=col)
        fig.update_xaxes(title_text=title, type="log", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col, title_text="median seconds per sweep" if col == 1 else None)
    apply_style(fig, title=f"Activation-patching sweep cost (resid_pre, every layer x position), CPU, "
                           f"d_model {args.d_model}, vocab {args.vocab}")
    fig.update_layout(width=1200, height=450)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,4,8", help="layer counts (positions, batch held at the centre)")
    ap.add_argument("--positions", default="6,12,24", help="prompt lengths")
    ap.add_argument("--batch", default="1,4,16", help="prompts per sweep")
    ap.add_argument("--centre", default="4,12,4", help="layers,positions,batch held fixed on the other axes")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fair and less noisy when shared)")
    ap.add_argument("--out", default="figures/scaling")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    c_layers, c_pos, c_batch = ints(args.centre)
    cache: dict = {}
    rows = [point("layers", v, layers=v, pos=c_pos, batch=c_batch, args=args, cache=cache) for v in ints(args.layers)]
    rows += [point("positions", v, layers=c_layers, pos=v, batch=c_batch, args=args, cache=cache)
             for v in ints(args.positions)]
    rows += [point("batch", v, layers=c_layers, pos=c_pos, batch=v, args=args, cache=cache) for v in ints(args.batch)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sweep_scaling.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    from recallscope.plotting import export_all

    report = export_all(figure(rows, args), out / "sweep_scaling")
    header = "| axis | L | P | B | cells | TL per-cell loop (s) | recallscope (s) | speedup | FLOP ratio |"
    lines = [header, "|" + "---|" * 9]
    lines += [f"| {r['axis']} | {r['layers']} | {r['positions']} | {r['batch']} | {r['cells']} | {r['tl_s']:.2f} | "
              f"{r['rs_s']:.2f} | {r['speedup']:.1f}x | {r['flop_ratio']:.1f}x |" for r in rows]
    (out / "sweep_scaling.md").write_text("\n".join(lines) + "\n")
    (out / "sweep_scaling.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                        "export_failed": report.failed}, indent=1))
    print("\n".join(lines))
    print(json.dumps({"max_abs_diff": max(r["max_abs_diff"] for r in rows),
                      "speedup_range": [round(min(r["speedup"] for r in rows), 2),
                                        round(max(r["speedup"] for r in rows), 2)]}))


if __name__ == "__main__":
    main()
