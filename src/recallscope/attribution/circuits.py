"""Circuit evaluation and discovery: faithfulness, completeness, faithfulness curves, ACDC pruning.

A circuit (:class:`~recallscope.attribution.edges.Circuit`) is evaluated on the clean prompts with every
edge outside it ablated: the receiver reads the sender's corrupt-run output instead (the edge-level
ablation of ACDC, Conmy et al. 2023, and EAP-IG, Hanna et al. 2024; see
:mod:`recallscope.attribution.graph`).

1. **Faithfulness** = ``(m(circuit) - m(corrupt)) / (m(clean) - m(corrupt))`` with means over prompts: the
   fraction of the clean-corrupt metric gap the circuit alone recovers (1 = all of it).
2. **Completeness** = ``1 - (m(complement) - m(corrupt)) / (m(clean) - m(corrupt))`` where the complement
   keeps every edge except the circuit's: 1 when the rest of the model recovers nothing without the
   circuit, lower when the circuit misses part of the mechanism (the complement's faithfulness, Marks et
   al. 2024, turned so that higher is better).
3. **Faithfulness curves** evaluate the top-n circuits of an :class:`EdgeScores` for several n.
4. **ACDC** (Conmy et al. 2023, "Towards Automated Circuit Discovery"): start from all edges (or from
   candidate edges, e.g. an EAP-IG top-n), visit receivers from the logits backwards and, for each,
   its incoming edges from the latest sender to the earliest; ablate the edge for good if the mean
   metric moves by less than ``threshold`` times the clean-corrupt gap, else restore it. A receiver
   whose node no longer reaches the logits loses its incoming edges without trials. With per-position
   candidates each (edge, position) is a trial (positions last to first within an edge).
"""

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch
from torch import Tensor
from tqdm.auto import tqdm

from recallscope.attribution.common import Prepared, prepare
from recallscope.attribution.edges import Circuit, EdgeScores, _dependents
from recallscope.attribution.graph import Ablation, Graph, GraphRun, run_graph
from recallscope.attribution.weights import AttnWeights, attn_weights
from recallscope.errors import ConfigError
from recallscope.results import load_result_dir, register_result, save_result_dir
from recallscope.tasks.pairs import PromptPair, TokenizedPairs


class CircuitRunner:
    """Runs the clean prompts with a set of edges kept and the rest ablated (corrupt run recorded once)."""

    def __init__(self, model: Any, pairs: Sequence[PromptPair] | TokenizedPairs, metric: Any) -> None:
        self.prep: Prepared = prepare(model, pairs, metric)
        stack = self.prep.stack
        self.graph = Graph.of(stack)
        positions = torch.arange(self.prep.tp.n_pos)
        with torch.no_grad():
            self.x_clean = stack.embed(self.prep.tp.clean, positions)
            x_corrupt = stack.embed(self.prep.tp.corrupt, positions)
            self.weights: tuple[AttnWeights, ...] = attn_weights(stack, like=self.x_clean)
            clean = run_graph(stack, self.graph, self.weights, self.x_clean, read=self.prep.read)
            self.corrupt_run: GraphRun = run_graph(stack, self.graph, self.weights, x_corrupt, read=self.prep.read,
                                                   record=True)
            self.clean = self.prep.metric(clean.logits).float()
            self.corrupt = self.prep.metric(self.corrupt_run.logits).float()
        self.n_runs = 0

    @property
    def gap(self) -> float:
        return float(self.clean.mean() - self.corrupt.mean())

    def run(self, keep: Tensor, *, record: bool = False, start_layer: int = 0, resume: GraphRun | None = None
            ) -> GraphRun:
        """The clean prompts with ``keep`` (1 = kept edge) and the other edges ablated; ``start_layer`` /
        ``resume`` skip the blocks below a layer whose receivers' edges agree with ``resume``'s."""
        self.n_runs += 1
        with torch.no_grad():
            return run_graph(self.prep.stack, self.graph, self.weights, self.x_clean, read=self.prep.read,
                             ablation=Ablation(keep, self.corrupt_run), record=record, start_layer=start_layer,
                             resume=resume)

    def metric(self, keep: Tensor, **kwargs: Any) -> Tensor:
        """``[prompt]`` metric of :meth:`run`."""
        with torch.no_grad():
            return self.prep.metric(self.run(keep, **kwargs).logits).float()

    def recovered(self, values: Tensor) -> float:
        """Fraction of the clean-corrupt gap that ``values`` recover (ratio of means)."""
        if abs(self.gap) < 1e-8:
            raise ConfigError("the clean and corrupt runs give the same mean metric, so no fraction of the gap "
                              "can be measured; choose pairs whose corruption changes the answer.")
        return float(values.mean() - self.corrupt.mean()) / self.gap


@register_result
@dataclass(frozen=True)
class CircuitEval:
    """What evaluating a circuit measured (``[prompt]`` metrics and the two summary fractions)."""

    circuit_metric: Tensor
    complement_metric: Tensor
    clean: Tensor
    corrupt: Tensor
    faithfulness: float
    completeness: float

    def to_dict(self) -> dict[str, float]:
        return {"faithfulness": self.faithfulness, "completeness": self.completeness,
                "metric_circuit": float(self.circuit_metric.mean()),
                "metric_complement": float(self.complement_metric.mean()),
                "metric_clean": float(self.clean.mean()), "metric_corrupt": float(self.corrupt.mean())}

    def plot(self, *, title: str | None = None) -> go.Figure:
        """The mean metric of the clean run, the circuit alone, its complement alone and the corrupt run."""
        from recallscope.plotting import apply_style

        names = ["clean", "circuit", "complement", "corrupt"]
        parts = [self.clean, self.circuit_metric, self.complement_metric, self.corrupt]
        fig = go.Figure(go.Bar(x=names, y=[float(p.float().mean()) for p in parts],
                               marker_color=["#2ca02c", "#1f77b4", "#ff7f0e", "#d62728"]))
        apply_style(fig, title=title or f"Circuit: faithfulness {self.faithfulness:.2f}, completeness "
                                        f"{self.completeness:.2f}")
        fig.update_yaxes(title_text="metric (mean over prompts)")
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        tensors = {"circuit_metric": self.circuit_metric, "complement_metric": self.complement_metric,
                   "clean": self.clean, "corrupt": self.corrupt}
        meta = {"faithfulness": self.faithfulness, "completeness": self.completeness}
        return save_result_dir(directory, "CircuitEval", tensors, meta, {})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CircuitEval":
        t, meta, _ = load_result_dir(directory, "CircuitEval")
        return cls(t["circuit_metric"], t["complement_metric"], t["clean"], t["corrupt"], float(meta["faithfulness"]),
                   float(meta["completeness"]))


def evaluate_circuit(model: Any, pairs: Sequence[PromptPair] | TokenizedPairs, metric: Any, circuit: Circuit, *,
                     runner: CircuitRunner | None = None) -> CircuitEval:
    """Faithfulness and completeness of ``circuit`` on ``pairs`` (see the module docstring)."""
    runner = runner or CircuitRunner(model, pairs, metric)
    if circuit.graph != runner.graph:
        raise ConfigError("the circuit was built for a different model graph than this model's.")
    keep = circuit.keep_mask()
    valid = (circuit.graph.valid[..., None] if keep.ndim == 3 else circuit.graph.valid).float()
    inside, outside = runner.metric(keep), runner.metric(valid - keep)
    return CircuitEval(inside, outside, runner.clean, runner.corrupt, runner.recovered(inside),
                       1.0 - runner.recovered(outside))


@register_result
@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness (and completeness) of the top-n circuits of one set of edge scores."""

    sizes: list[int]
    faithfulness: list[float]
    completeness: list[float]
    n_edges_total: int
    config: dict[str, Any]

    def plot(self, *, title: str | None = None) -> go.Figure:
        from recallscope.plotting import apply_style

        fig = go.Figure()
        fig.add_trace(go.Scatter(x=self.sizes, y=self.faithfulness, mode="lines+markers", name="faithfulness"))
        fig.add_trace(go.Scatter(x=self.sizes, y=self.completeness, mode="lines+markers", name="completeness",
                                 line=dict(dash="dash")))
        apply_style(fig, title=title or f"Top-n circuits of {self.config.get('method', 'edge scores')}")
        fig.add_hline(y=1.0, line=dict(color="#888888", width=1, dash="dot"))
        fig.update_xaxes(type="log", title_text=f"edges kept (of {self.n_edges_total})")
        fig.update_yaxes(title_text="fraction of the clean−corrupt gap")
        fig.update_layout(height=420)
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        tensors = {"sizes": torch.tensor(self.sizes, dtype=torch.long),
                   "faithfulness": torch.tensor(self.faithfulness, dtype=torch.float64),
                   "completeness": torch.tensor(self.completeness, dtype=torch.float64)}
        return save_result_dir(directory, "FaithfulnessCurve", tensors,
                               {"n_edges_total": self.n_edges_total, "config": self.config}, {})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "FaithfulnessCurve":
        t, meta, _ = load_result_dir(directory, "FaithfulnessCurve")
        return cls(t["sizes"].tolist(), t["faithfulness"].tolist(), t["completeness"].tolist(),
                   int(meta["n_edges_total"]), meta.get("config", {}))


def faithfulness_curve(model: Any, pairs: Sequence[PromptPair] | TokenizedPairs, metric: Any,
                       scores: EdgeScores, sizes: Sequence[int], *, progress: bool = True) -> FaithfulnessCurve:
    """Evaluate ``scores.top(n)`` for each ``n`` in ``sizes``."""
    runner = CircuitRunner(model, pairs, metric)
    faith, comp = [], []
    for n in tqdm(list(sizes), desc="faithfulness", disable=not progress, leave=False):
        ev = evaluate_circuit(model, pairs, metric, scores.top(n), runner=runner)
        faith.append(ev.faithfulness)
        comp.append(ev.completeness)
    total = int(scores.graph.valid.sum()) * (scores.scores.shape[-1] if scores.per_position else 1)
    return FaithfulnessCurve(list(sizes), faith, comp, total, dict(scores.config))


def _receiver_order(graph: Graph) -> list[int]:
    """Receivers from the logits backwards: per layer (last first) the MLP, then v, k, q inputs."""
    order = [graph.logits]
    for layer in reversed(range(graph.n_layers)):
        order.append(graph.mlp_input(layer))
        order += list(reversed(range(graph.attn_inputs(layer).start, graph.attn_inputs(layer).stop)))
    return order


def acdc(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    metric: Any = "logit_diff",
    *,
    threshold: float = 0.01,
    candidates: Circuit | None = None,
    progress: bool = True,
) -> Circuit:
    """ACDC-style greedy pruning (see the module docstring); one forward pass per trial.

    ``threshold`` is a fraction of the clean-corrupt gap of the mean metric. ``candidates`` restricts
    the search to those edges (everything else is ablated from the start); the full graph of a real
    model has tens of thousands of edges, so pass e.g. ``eap_ig(...).top(500)``. Per-position candidates
    (``eap_ig(..., per_position=True).top(n)``, or ``Circuit(graph, graph.valid[..., None].expand(-1, -1, n_pos))``
    for every edge at every position) prune per (edge, position).
    """
    t0 = time.perf_counter()
    runner = CircuitRunner(model, pairs, metric)
    g = runner.graph
    keep = (candidates.edges if candidates is not None else g.valid).float().clone()
    positions = [()] if keep.ndim == 2 else [(p,) for p in reversed(range(keep.shape[2]))]
    # Receivers are visited from the last layer down, so below a receiver's layer the edges are still
    # the initial ones: every trial resumes from one recorded run of the initial circuit.
    initial = runner.run(keep, record=True)
    current = float(runner.prep.metric(initial.logits).float().mean())
    tol = threshold * abs(runner.gap)
    trials = [(u, v, *p) for v in _receiver_order(g) for u in reversed(range(g.n_senders)) for p in positions
              if keep[(u, v, *p)] > 0]
    for site in tqdm(trials, desc="ACDC", disable=not progress, leave=False):
        v = site[1]
        if keep[site] == 0:
            continue
        deps = _dependents(g, v)
        if deps and not keep[deps].any():  # the receiver's node no longer feeds anything
            keep[:, v] = 0
            continue
        keep[site] = 0
        trial = float(runner.metric(keep, start_layer=min(v // g.per_layer, g.n_layers), resume=initial).mean())
        if abs(trial - current) < tol:
            current = trial
        else:
            keep[site] = 1
    info = {"selection": "acdc", "threshold": threshold, "n_trials": runner.n_runs,
            "candidates": candidates.n_edges if candidates is not None else int(g.valid.sum()),
            "seconds": time.perf_counter() - t0}
    weights = candidates.weights if candidates is not None else None
    circuit = Circuit(g, keep.bool() & (g.valid if keep.ndim == 2 else g.valid[..., None]), weights, info).pruned()
    ev = evaluate_circuit(model, pairs, metric, circuit, runner=runner)
    return replace(circuit, info={**circuit.info, **ev.to_dict()})
