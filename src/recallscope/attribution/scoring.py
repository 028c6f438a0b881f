"""Scoring circuit discovery against a known circuit, as InterpBench does (Gupta et al. 2024).

1. **Edges**: a found circuit's true/false positive rates against the true edge set; ROC curve and area
   of the edge scores (``|score|``, positions summed) over every threshold, among the graph's edges.
2. **Nodes**: a node is in a circuit when an edge of it is; a node's score is the largest ``|score|`` of
   its edges; TPR/FPR and ROC AUC as for edges, among the graph's nodes (``input`` and ``logits``, in
   every circuit, are left out).
3. The AUC is the Mann-Whitney statistic (ties count one half), which equals the trapezoid area under
   the ROC curve.
"""

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import plotly.graph_objects as go
import torch
from torch import Tensor

from recallscope.attribution.edges import Circuit, EdgeScores
from recallscope.attribution.graph import Graph
from recallscope.errors import ConfigError
from recallscope.results import load_result_dir, register_result, save_result_dir


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney, ties = 1/2)."""
    labels = labels.bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ConfigError("ROC AUC needs both positives and negatives: the true circuit must be a non-empty, "
                          "proper subset of the graph.")
    s = scores.double()
    greater = (s[labels][:, None] > s[~labels][None, :]).double().sum()
    ties = (s[labels][:, None] == s[~labels][None, :]).double().sum()
    return float((greater + 0.5 * ties) / (n_pos * n_neg))


def roc_curve(scores: Tensor, labels: Tensor) -> tuple[list[float], list[float]]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1)."""
    labels = labels.bool()
    order = scores.double().argsort(descending=True)
    s, y = scores.double()[order], labels[order]
    tp, fp = torch.cumsum(y, 0).double(), torch.cumsum(~y, 0).double()
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # one point per distinct threshold
    fpr = [0.0] + (fp[last] / max(1, int((~labels).sum()))).tolist()
    tpr = [0.0] + (tp[last] / max(1, int(labels.sum()))).tolist()
    return fpr, tpr


def _node_sets(graph: Graph, edges: Tensor, values: Tensor) -> tuple[list[str], Tensor, Tensor]:
    """Nodes (without input/logits), whether each has an edge, and its largest edge value."""
    names = [n for n in graph.nodes if n not in ("input", "logits")]
    index = {n: i for i, n in enumerate(names)}
    valid = graph.valid
    edges, values = edges & valid, values.double().masked_fill(~valid, 0.0)
    of_sender = torch.tensor([index.get(n, -1) for n in graph.senders])
    of_receiver = torch.tensor([index.get(graph.receiver_node(v), -1) for v in range(graph.n_receivers)])
    has = torch.zeros(len(names) + 1, dtype=torch.long)  # the last slot collects input / logits
    best = torch.zeros(len(names) + 1, dtype=torch.float64)
    for node, hit, top in ((of_sender, edges.any(1), values.amax(1)), (of_receiver, edges.any(0), values.amax(0))):
        slot = node.where(node >= 0, torch.tensor(len(names)))
        has.index_put_((slot,), hit.long(), accumulate=True)
        best.index_reduce_(0, slot, top, "amax")
    return names, has[:-1] > 0, best[:-1]


@register_result
@dataclass(frozen=True)
class RecoveryScore:
    """How well discovery recovered a known circuit (edges and nodes)."""

    edge_auc: float
    node_auc: float
    edge_tpr: float | None
    edge_fpr: float | None
    node_tpr: float | None
    node_fpr: float | None
    edge_roc: tuple[list[float], list[float]]
    node_roc: tuple[list[float], list[float]]

    def to_dict(self) -> dict:
        return asdict(self)

    def plot(self, *, title: str | None = None) -> go.Figure:
        """ROC curves of edge and node scores, with the found circuit's (FPR, TPR) marked."""
        from recallscope.plotting import apply_style

        fig = go.Figure()
        for name, (fpr, tpr), auc, point in (("edges", self.edge_roc, self.edge_auc, (self.edge_fpr, self.edge_tpr)),
                                             ("nodes", self.node_roc, self.node_auc, (self.node_fpr, self.node_tpr))):
            fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=f"{name} (AUC {auc:.3f})", line_shape="hv"))
            if point[0] is not None:
                fig.add_trace(go.Scatter(x=[point[0]], y=[point[1]], mode="markers", marker=dict(size=10),
                                         name=f"found circuit ({name})"))
        apply_style(fig, title=title or "Recovery of the known circuit")
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#888888"),
                                 showlegend=False, hoverinfo="skip"))
        fig.update_xaxes(title_text="false positive rate", range=[-0.02, 1.02])
        fig.update_yaxes(title_text="true positive rate", range=[-0.02, 1.02])
        fig.update_layout(height=460, width=560)
        return fig

    def save(self, directory: str | os.PathLike) -> Path:
        tensors = {f"{k}_roc": torch.tensor(getattr(self, f"{k}_roc"), dtype=torch.float64) for k in ("edge", "node")}
        meta = {k: v for k, v in asdict(self).items() if not k.endswith("_roc")}
        return save_result_dir(directory, "RecoveryScore", tensors, meta, {})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "RecoveryScore":
        t, meta, _ = load_result_dir(directory, "RecoveryScore")
        rocs = {f"{k}_roc": tuple(t[f"{k}_roc"].tolist()) for k in ("edge", "node")}
        return cls(**{k: meta[k] for k in ("edge_auc", "node_auc", "edge_tpr", "edge_fpr", "node_tpr", "node_fpr")},
                   **rocs)


def score_recovery(truth: Circuit, *, scores: EdgeScores | None = None, found: Circuit | None = None) -> RecoveryScore:
    """Score ``scores`` (ROC over thresholds) and/or a ``found`` circuit (TPR/FPR) against ``truth``."""
    if scores is None and found is None:
        raise ConfigError("give edge scores (for ROC AUC), a found circuit (for TPR/FPR), or both.")
    g = truth.graph
    for other in (scores, found):
        if other is not None and other.graph != g:
            raise ConfigError("the true circuit and the scored one belong to different graphs.")
    valid = g.valid
    true_e = truth.edge_matrix()
    if scores is not None:
        values = scores.edge_matrix().abs() if not scores.per_position else scores.scores.abs().sum(-1)
    else:
        values = found.edge_matrix().double()
    edge_auc = roc_auc(values[valid], true_e[valid])
    _, true_n, node_vals = _node_sets(g, true_e, values)
    node_auc = roc_auc(node_vals, true_n)
    rates: dict[str, float | None] = dict.fromkeys(("edge_tpr", "edge_fpr", "node_tpr", "node_fpr"))
    if found is not None:
        fe = found.edge_matrix()
        _, found_n, _ = _node_sets(g, fe, values)
        for kind, f, t in (("edge", fe[valid], true_e[valid]), ("node", found_n, true_n)):
            rates[f"{kind}_tpr"] = float((f & t).sum()) / max(1, int(t.sum()))
            rates[f"{kind}_fpr"] = float((f & ~t).sum()) / max(1, int((~t).sum()))
    return RecoveryScore(edge_auc, node_auc, rates["edge_tpr"], rates["edge_fpr"], rates["node_tpr"],
                         rates["node_fpr"], roc_curve(values[valid], true_e[valid]), roc_curve(node_vals, true_n))
