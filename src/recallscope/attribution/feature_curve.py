"""Causal, edge-level MIB faithfulness for attribution graphs over transcoder features.

:func:`~recallscope.attribution.mib.feature_mib_curve` scores a graph's edges in the graph's own linear model
(every feature's on/off state frozen); :func:`~recallscope.attribution.mib.feature_node_curve` is causal but
keeps or ablates whole features. :func:`feature_edge_curve` is MIB's edge-budget curve (Mueller et al. 2025)
evaluated in the real model, edge by edge:

1. **Budgets.** The graph's edges are its non-zero adjacency entries. For each fraction ``k``
   (:data:`~recallscope.attribution.mib.MIB_FRACTIONS`) keep the ``int(k * n_edges)`` edges of largest
   ``|weight|``, then drop edges on no input-to-logit path (:func:`prune_to_paths`, MIB's pruning;
   embeddings, error nodes and features whose input edges were not computed count as inputs).
2. **The run** (:func:`edge_circuit_run`): the real model with attention patterns and norm denominators
   frozen to the clean run's values (the graph's own assumption: with them frozen, a source's direct effect on
   a target is linear in the source, so "remove this edge" means one well-defined number), each MLP output
   replaced by its transcoders' output plus the graph's error node (a constant), and the transcoders'
   activation functions *live*: at each transcoded layer the pre-activations are computed from the current
   input, every removed edge's direct contribution ``A[t, s] * a_s' / a_s`` (source ``s``'s current activation
   ``a_s'`` over its clean one ``a_s``; 1 for embeddings and errors) is subtracted from its target's
   pre-activation, and TopK / ReLU / JumpReLU is applied to the result, so features can switch off.
   Features that are not nodes of the graph (inactive in the clean run) stay at 0: an edge out of them is
   not among the kept edges. Features whose input edges the graph did not compute (``max_feature_nodes``)
   keep their clean activation. The logit is read from the real downstream computation (frozen patterns,
   transcoders, unembedding) less its removed input edges.
3. **Faithfulness** ``(L(kept) - L(none)) / (L(all) - L(none))`` for logit node ``logit``: with every edge kept
   the run is the real model's forward pass (``L(all)`` = the real logit, to float precision); with none,
   every target is reduced to its bias, so ``L(none)`` = the graph's bias of the logit. CPR and CMD as in MIB.
4. **Check.** In every run each target's live input before the subtraction must equal
   ``bias[t] + sum_s A[t, s] * a_s' / a_s`` (the graph's decomposition evaluated at the current activations);
   the largest deviation is returned (``EdgeRun.identity_residual``) and recorded in the curve's config.
   When no feature changes its on/off state the run equals the graph's linear model
   (:func:`~recallscope.attribution.mib.linear_circuit_logits`) for the same edges.
"""

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from recallscope.attribution.mib import MIB_FRACTIONS, MIBCurve, _check_fractions, linear_circuit_logits
from recallscope.errors import ConfigError


@dataclass(frozen=True)
class EdgeRun:
    """One evaluation of a set of kept edges (see the module docstring, item 2)."""

    logits: Float[Tensor, " n_logit"]
    """Each logit node's value (``logits[-1] @ logit_vector`` less removed logit edges)."""
    activations: Float[Tensor, " n_feat"]
    """Each feature node's activation in this run (clean activation where its inputs were not computed)."""
    switched_off: int
    """Feature nodes active in the clean run and 0 here."""
    clamped_on: int
    """(layer, position, feature) triples outside the graph that the live activation function would have
    switched on, held at 0."""
    identity_residual: float
    """Largest ``|live input - (bias + sum_s A[t, s] a_s' / a_s)|`` over targets (0 up to float error)."""


def prune_to_paths(graph: Any, keep: Bool[Tensor, "n_node n_node"]) -> Bool[Tensor, "n_node n_node"]:
    """The ``keep`` edges (``[target, source]``) on some input-to-logit path: the source is reached from an
    input (embedding, error node, feature without computed input edges) through kept edges and the target
    reaches a logit node through kept edges."""
    n_node = keep.shape[0]
    rows = _rows(graph)
    is_input = torch.ones(n_node, dtype=torch.bool)
    is_input[: graph.n_feat] = ~rows[: graph.n_feat]
    is_input[graph.logit_slice] = False
    k = keep.float()
    reached = is_input.clone()
    for _ in range(graph.n_layers + 2):  # features read earlier layers only: paths are at most this long
        new = is_input | ((k @ reached.float()) > 0)
        if torch.equal(new, reached):
            break
        reached = new
    useful = torch.zeros(n_node, dtype=torch.bool)
    useful[graph.logit_slice] = True
    for _ in range(graph.n_layers + 2):
        new = useful | ((useful.float() @ k) > 0)
        if torch.equal(new, useful):
            break
        useful = new
    return keep & useful[:, None] & reached[None, :]


def _rows(graph: Any) -> Tensor:
    n_node = graph.adjacency.shape[0]
    return graph.rows_computed if graph.rows_computed is not None else torch.ones(n_node, dtype=torch.bool)


@dataclass
class _Plan:
    """What one run needs: removed-edge weights and the graph's features grouped by layer."""

    removed: Tensor  # [n_node, n_node] float64: weights of removed edges (0 elsewhere)
    adjacency: Tensor  # float64
    by_layer: dict[int, tuple[Tensor, Tensor, Tensor]]  # layer -> (node ids, positions, feature ids)
    computed: Tensor  # [n_feat] bool: rows computed


def _plan(graph: Any, keep: Tensor) -> _Plan:
    adjacency = graph.adjacency.double()
    removed = adjacency * (~keep).double()
    feats = graph.features
    by_layer = {}
    for layer in feats[:, 0].unique().tolist():
        ids = (feats[:, 0] == layer).nonzero().squeeze(-1)
        by_layer[int(layer)] = (ids, feats[ids, 1], feats[ids, 2])
    return _Plan(removed, adjacency, by_layer, _rows(graph)[: graph.n_feat])


@contextlib.contextmanager
def _edge_hooks(model: Any, tset: Any, graph: Any, fz: Any, plan: _Plan, state: dict[str, Any]) -> Iterator[None]:
    """Hooks of one run (module docstring, item 2); ``state`` collects ratios, activations and checks."""
    from recallscope.features.graph import _reconstruction

    clean = graph.activations.double()
    ratio = torch.ones(graph.adjacency.shape[0], dtype=torch.float64)  # current / clean value of every source
    bias = graph.bias.double()
    state.update(ratio=ratio, x={}, acts={}, residual=0.0, off=0, on=0)

    def frozen(t: Tensor, hook: Any) -> Tensor:
        return fz.hooks[hook.name].expand_as(t).to(t.dtype)

    def read(layer: int):
        def hook(x: Tensor, hook: Any) -> None:
            x = x[0].float()
            state["x"][layer] = x
            pre = tset[layer].pre_acts(x)
            ids, pos, fid = plan.by_layer.get(layer, (torch.zeros(0, dtype=torch.long),) * 3)
            live = pre[pos, fid].double()
            comp = plan.computed[ids]
            expected = bias[ids] + plan.adjacency[ids] @ ratio
            if comp.any():
                state["residual"] = max(state["residual"], float((live - expected)[comp].abs().max()))
            sub = (plan.removed[ids] @ ratio) * comp.double()
            pre = pre.clone()
            pre[pos, fid] = (live - sub).to(pre.dtype)
            acts = tset[layer].activate(pre)
            if tset.info.first_pos > 0:
                acts[: tset.info.first_pos] = 0.0
            out = torch.zeros_like(acts)
            out[pos, fid] = torch.where(comp, acts[pos, fid].double(), clean[ids]).to(out.dtype)
            state["on"] += int((acts > 0).sum()) - int((acts[pos, fid] > 0).sum())
            state["off"] += int(((out[pos, fid] == 0) & (clean[ids] > 0)).sum())
            ratio[ids] = out[pos, fid].double() / clean[ids].clamp_min(1e-30)
            state["acts"][layer] = out
        return hook

    def write(layer: int):
        def hook(y: Tensor, hook: Any) -> Tensor:
            recon = _reconstruction(tset, layer, state["x"].get(layer), state["acts"])
            out = fz.errors[layer] if recon is None else fz.errors[layer] + recon
            return out[None].to(y.dtype).expand_as(y)
        return hook

    fwd = [(name, frozen) for name in fz.hooks]
    fwd += [(tset.input_hook(layer), read(layer)) for layer in tset.layers]
    fwd += [(tset.output_hook(layer), write(layer)) for layer in range(int(model.cfg.n_layers))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bridge warns that edited norm scales leave its native path
        with model.hooks(fwd_hooks=fwd):
            yield


def freeze_for(model: Any, tset: Any, graph: Any) -> Any:
    """The clean run's frozen values for ``graph`` (patterns, norm scales, errors), checked against the graph."""
    from recallscope.features.graph import _freeze

    tset.check_model(model)
    fz = _freeze(model, tset, graph.tokens)
    feats = graph.features
    if graph.n_feat:
        acts = torch.stack([fz.acts[int(lay)][int(p), int(f)] for lay, p, f in feats.tolist()])
        if not torch.allclose(acts, graph.activations.float(), rtol=1e-3, atol=1e-4):
            raise ConfigError("the graph's feature activations differ from these transcoders' activations on its "
                              "prompt; pass the model and transcoder set the graph was built with.")
    return fz


@torch.no_grad()
def edge_circuit_run(model: Any, tset: Any, graph: Any, keep: Bool[Tensor, "n_node n_node"], *,
                     frozen: Any = None) -> EdgeRun:
    """Run the real model keeping only the ``keep`` edges (``[target, source]``) of ``graph`` (module docstring,
    item 2). ``frozen``: :func:`freeze_for`'s result, to share between runs."""
    if keep.shape != graph.adjacency.shape:
        raise ConfigError(f"keep is {tuple(keep.shape)}, the graph's adjacency {tuple(graph.adjacency.shape)}.")
    fz = frozen if frozen is not None else freeze_for(model, tset, graph)
    plan = _plan(graph, keep.bool())
    state: dict[str, Any] = {}
    with _edge_hooks(model, tset, graph, fz, plan, state):
        logits = model(graph.tokens[None], return_type="logits")[0, -1].double()
    ratio = state["ratio"]
    sl = graph.logit_slice
    live = graph.logit_vectors.double() @ logits
    expected = graph.bias.double()[sl] + plan.adjacency[sl] @ ratio
    residual = max(state["residual"], float((live - expected).abs().max()))
    values = live - plan.removed[sl] @ ratio
    acts = ratio[: graph.n_feat] * graph.activations.double()
    return EdgeRun(values.float(), acts.float(), state["off"], state["on"], residual)


def feature_edge_curve(model: Any, tset: Any, graph: Any, *, fractions: Sequence[float] = MIB_FRACTIONS,
                       logit: int = 0, progress: bool = True) -> MIBCurve:
    """MIB's faithfulness curve of a feature attribution graph at fixed edge budgets, evaluated causally in the
    real model with live transcoder activations (see the module docstring). ``n_edges`` of the result counts
    the edges kept after pruning; ``config`` records per budget the features switched off, the inactive
    features held off and the faithfulness of the same kept edges in the graph's linear model
    (``linear_same_edges``), and the largest decomposition residual."""
    fractions = _check_fractions(fractions)
    nonzero = graph.adjacency != 0
    total = int(nonzero.sum())
    if total == 0:
        raise ConfigError("the attribution graph has no non-zero edges to keep.")
    fz = freeze_for(model, tset, graph)
    full = edge_circuit_run(model, tset, graph, nonzero, frozen=fz)
    none = edge_circuit_run(model, tset, graph, torch.zeros_like(nonzero), frozen=fz)
    lo, hi = float(none.logits[logit]), float(full.logits[logit])
    if abs(hi - lo) < 1e-9:
        raise ConfigError("the logit equals its bias in this graph (no edge moves it); faithfulness is undefined.")
    flat = graph.adjacency.abs().flatten()
    nz = nonzero.flatten().nonzero().squeeze(-1)
    order = nz[flat[nz].argsort(descending=True)]
    kept, faith, linear, off, on = [], [], [], [], []
    resid = [full.identity_residual, none.identity_residual]
    for k in tqdm(fractions, desc="feature edge budgets", disable=not progress, leave=False):
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[order[: int(k * total)]] = True
        keep = prune_to_paths(graph, keep.view_as(nonzero))
        run = full if bool(keep.eq(nonzero).all()) else edge_circuit_run(model, tset, graph, keep, frozen=fz)
        kept.append(int(keep.sum()))
        faith.append((float(run.logits[logit]) - lo) / (hi - lo))
        linear.append((float(linear_circuit_logits(graph, keep)[logit]) - lo) / (hi - lo))
        off.append(run.switched_off)
        on.append(run.clamped_on)
        resid.append(run.identity_residual)
    config = {"logit": graph.logit_labels[logit], "logit_all": hi, "logit_none": lo, "switched_off": off,
              "clamped_on": on, "linear_same_edges": linear, "identity_residual": max(resid),
              "evaluation": "real model, frozen attention/norms, live transcoder activations"}
    return MIBCurve(fractions, kept, faith, total, "feature-edges", config)
