"""Attribution graphs over transcoder features (Ameisen et al. 2025, "Circuit tracing"; circuit-tracer).

For one prompt and target logits (or a logit difference):

1. Run the real model once, caching every attention pattern and every normalisation denominator
   (``*.hook_scale``), each transcoded layer's input and feature activations, and each MLP output.
   Error node ``(layer, pos)`` = MLP output - transcoder reconstruction (for a layer without a
   transcoder: the whole MLP output), so the decomposition is exact for partial sets too.
2. The *local replacement model*: the real model with patterns and denominators frozen to the cached
   values, every MLP output replaced by ``sum(frozen activation x decoder) + skip(x) + b_dec + frozen
   error``, and the residual stream at layer 0 (token + position embedding) as a source. It is affine in
   its sources: embeddings, feature activations, errors.
3. Nodes: active features (targets and sources), errors and embeddings (sources), logits (targets).
   The edge ``source -> target`` is the source's direct contribution to the target's input: for a
   feature source ``a_s * (W_dec[s] . d input_t / d mlp_out)``; for an embedding or error vector ``v``,
   ``v . d input_t / d v``. A target's input is its encoder pre-activation (features) or its logit value.
4. Gradients for many targets come from one backward pass over a batch of copies of the prompt (one
   copy per target, ``batch_size`` at a time): ``d input_t / d (residual at every layer and position)``.
   A batch of feature targets stops its forward pass at its last target layer (features are ordered by
   layer, so later layers and the unembedding are skipped for most batches).
5. The constant part of each input (biases of LayerNorm, attention, transcoders and unembedding) is
   the target's value with every source set to 0, read for all targets from one more forward pass; then
   ``sum(edges into t) + bias[t] = input[t]`` exactly (tested).
6. :func:`prune` keeps the features that carry a cumulative fraction of the logits' influence and the
   edges that carry a cumulative fraction of edge influence (circuit-tracer's pruning).
"""

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from recallscope.errors import ConfigError, ResultFileError
from recallscope.features.transcoder import TranscoderSet
from recallscope.results import load_result_dir, register_result, save_result_dir

RESID0 = "blocks.0.hook_resid_pre"


def _is_frozen_hook(name: str) -> bool:
    return name.endswith("hook_scale") or name.endswith("hook_pattern")


@dataclass
class _Frozen:
    """Values cached from the real forward pass (batch axis of size 1 kept on the hook tensors)."""

    hooks: dict[str, Tensor]
    resid0: Tensor  # [pos, d_model]
    inputs: dict[int, Tensor]  # [pos, d_in] per transcoded layer
    acts: dict[int, Tensor]  # [pos, d_sae]
    errors: dict[int, Tensor]  # [pos, d_model] per layer
    logits: Tensor  # [pos, d_vocab]


def _reconstruction(tset: TranscoderSet, layer: int, x: Tensor | None, acts: dict[int, Tensor]) -> Tensor | None:
    out = tset[layer].skip_out(x) if layer in tset else None
    for src, j in tset.writers(layer):
        part = tset[src].decode(acts[src], j)
        out = part if out is None else out + part
    return out


@torch.no_grad()
def _freeze(model: Any, tset: TranscoderSet, tokens: Tensor) -> _Frozen:
    n_layers = int(model.cfg.n_layers)
    names = {RESID0} | {tset.input_hook(layer) for layer in tset.layers}
    names |= {tset.output_hook(layer) for layer in range(n_layers)}
    logits, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names or _is_frozen_hook(n))
    inputs = {layer: cache[tset.input_hook(layer)][0].float() for layer in tset.layers}
    acts = {layer: tset.activations(layer, inputs[layer]) for layer in tset.layers}
    errors = {}
    for layer in range(n_layers):
        recon = _reconstruction(tset, layer, inputs.get(layer), acts)
        mlp = cache[tset.output_hook(layer)][0].float()
        errors[layer] = mlp - recon if recon is not None else mlp
    hooks = {n: v.detach() for n, v in cache.items() if _is_frozen_hook(n)}
    return _Frozen(hooks, cache[RESID0][0].float(), inputs, acts, errors, logits[0].float())


class _StopForward(Exception):
    """Raised by the input hook of the last layer a batch of feature targets needs (the rest is not run)."""


@contextlib.contextmanager
def _linearised(model: Any, tset: TranscoderSet, fz: _Frozen, batch: int, zero_sources: bool,
                store: dict[str, Any], stop_layer: int | None = None) -> Iterator[None]:
    """Hooks that turn ``model`` into the local replacement model for ``batch`` copies of the prompt;
    with ``stop_layer`` the forward pass ends (``_StopForward``) once that layer's features are computed."""
    n_layers = int(model.cfg.n_layers)
    scale = 0.0 if zero_sources else 1.0
    src_acts = {layer: a * scale for layer, a in fz.acts.items()}
    store.update(x={}, pre={}, out={})

    def frozen(t: Tensor, hook: Any) -> Tensor:
        return fz.hooks[hook.name].expand_as(t).to(t.dtype)

    def resid0(t: Tensor, hook: Any) -> Tensor:
        leaf = (fz.resid0 * scale).expand(batch, -1, -1).clone().requires_grad_(True)
        store["resid0"] = leaf
        return leaf.to(t.dtype)

    def read(layer: int):
        def hook(x: Tensor, hook: Any) -> None:
            store["x"][layer] = x.float()
            store["pre"][layer] = tset[layer].pre_acts(x.float())
            if layer == stop_layer:
                raise _StopForward
        return hook

    def write(layer: int):
        def hook(y: Tensor, hook: Any) -> Tensor:
            out = fz.errors[layer] * scale
            recon = _reconstruction(tset, layer, store["x"].get(layer), src_acts)
            out = out + recon if recon is not None else out
            probe = torch.zeros(batch, *out.shape[-2:], requires_grad=True)  # d target / d probe = d / d out
            store["out"][layer] = probe
            return (out + probe).to(y.dtype)
        return hook

    fwd = [(name, frozen) for name in fz.hooks] + [(RESID0, resid0)]
    fwd += [(tset.input_hook(layer), read(layer)) for layer in tset.layers]
    fwd += [(tset.output_hook(layer), write(layer)) for layer in range(n_layers)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bridge warns that edited norm scales leave its native path
        with model.hooks(fwd_hooks=fwd):
            yield


@register_result
@dataclass(frozen=True)
class AttributionGraph:
    """A direct-effect graph. Nodes: features, then errors (layer-major), embeddings, logits.

    ``adjacency[t, s]`` is source ``s``'s direct contribution to target ``t``'s input; ``bias[t]`` the
    constant part, so ``adjacency.sum(1) + bias == node_input`` on target rows (features, logits).
    A registered result: ``plot()`` is the interactive view (:func:`recallscope.features.view.graph_view`),
    ``save`` / ``load`` a checksummed directory (the circuit-tracer JSON is :mod:`recallscope.features.export`).
    """

    tokens: Int[Tensor, " n_pos"]
    features: Int[Tensor, "n_feat 3"]
    """(layer, position, feature index) of each active feature node."""
    activations: Float[Tensor, " n_feat"]
    logit_vectors: Float[Tensor, "n_logit d_vocab"]
    """Each logit node's input is ``logits[-1] @ vector`` (one-hot for a token, +1/-1 for a difference)."""
    logit_labels: tuple[str, ...]
    n_layers: int
    adjacency: Float[Tensor, "n_node n_node"]
    bias: Float[Tensor, " n_node"]
    node_input: Float[Tensor, " n_node"]
    config: dict[str, Any] = field(default_factory=dict)
    rows_computed: Bool[Tensor, " n_node"] | None = None
    """Target rows whose input edges were computed (all of them unless ``max_feature_nodes`` was set)."""

    def __post_init__(self) -> None:
        n = self.n_feat + self.n_layers * self.n_pos + self.n_pos + self.logit_vectors.shape[0]
        if self.adjacency.shape != (n, n):
            raise ConfigError(f"adjacency is {tuple(self.adjacency.shape)}, expected ({n}, {n}).")

    @property
    def n_feat(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def error_slice(self) -> slice:
        return slice(self.n_feat, self.n_feat + self.n_layers * self.n_pos)

    @property
    def embed_slice(self) -> slice:
        start = self.error_slice.stop
        return slice(start, start + self.n_pos)

    @property
    def logit_slice(self) -> slice:
        return slice(self.embed_slice.stop, self.adjacency.shape[0])

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_feat + layer * self.n_pos + pos

    def node_labels(self) -> list[str]:
        feats = [f"F L{layer} @{pos} #{idx}" for layer, pos, idx in self.features.tolist()]
        errs = [f"err L{layer} @{pos}" for layer in range(self.n_layers) for pos in range(self.n_pos)]
        embs = [f"emb @{pos} ({tok})" for pos, tok in enumerate(self.tokens.tolist())]
        return feats + errs + embs + [f"logit {label}" for label in self.logit_labels]

    def summary_extra(self) -> list[tuple[str, str]]:
        return [("nodes", f"{self.n_feat} features, {self.n_layers} x {self.n_pos} errors, {self.n_pos} embeddings, "
                          f"{len(self.logit_labels)} logits"),
                ("edges", str(int((self.adjacency != 0).sum()))), ("logits", ", ".join(self.logit_labels))]

    def plot(self, **kwargs: Any) -> Any:
        """The interactive graph view (supernodes, pruning slider); see :func:`recallscope.features.view.graph_view`."""
        from recallscope.features.view import graph_view

        return graph_view(self, **kwargs)

    def save(self, directory: str | os.PathLike) -> Path:
        tensors = {"tokens": self.tokens, "features": self.features, "activations": self.activations,
                   "logit_vectors": self.logit_vectors, "adjacency": self.adjacency, "bias": self.bias,
                   "node_input": self.node_input}
        if self.rows_computed is not None:
            tensors["rows_computed"] = self.rows_computed.to(torch.uint8)
        meta = {"logit_labels": list(self.logit_labels), "n_layers": self.n_layers, "config": self.config}
        return save_result_dir(directory, "AttributionGraph", tensors, meta, {})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "AttributionGraph":
        t, meta, _ = load_result_dir(directory, "AttributionGraph")
        try:
            rows = t["rows_computed"].bool() if "rows_computed" in t else None
            return cls(tokens=t["tokens"], features=t["features"], activations=t["activations"],
                       logit_vectors=t["logit_vectors"], logit_labels=tuple(meta["logit_labels"]),
                       n_layers=int(meta["n_layers"]), adjacency=t["adjacency"], bias=t["bias"],
                       node_input=t["node_input"], config=meta.get("config", {}), rows_computed=rows)
        except KeyError as exc:
            raise ResultFileError(f"{directory} lacks {exc} of an AttributionGraph; re-run attribution_graph.") from exc


def _logit_targets(logits: Tensor, targets: Any, d_vocab: int) -> tuple[Tensor, tuple[str, ...]]:
    """``targets``: None (the top token), a token id, a list of ids, or a pair ``(good, bad)`` tuple for a
    logit difference."""
    if targets is None:
        targets = [int(logits[-1].argmax())]
    if isinstance(targets, int):
        targets = [targets]
    if isinstance(targets, tuple):
        if len(targets) != 2:
            raise ConfigError(f"a logit difference is a pair (good, bad) of token ids, got {targets}.")
        vec = torch.zeros(1, d_vocab)
        vec[0, targets[0]], vec[0, targets[1]] = 1.0, -1.0
        return vec, (f"{targets[0]}-{targets[1]}",)
    bad = [t for t in targets if not 0 <= int(t) < d_vocab]
    if bad:
        raise ConfigError(f"target token ids {bad} are outside the vocabulary (0..{d_vocab - 1}).")
    vecs = torch.zeros(len(targets), d_vocab)
    vecs[torch.arange(len(targets)), torch.tensor([int(t) for t in targets])] = 1.0
    return vecs, tuple(str(int(t)) for t in targets)


def _edge_rows(tset: TranscoderSet, fz: _Frozen, feats: Tensor, act_vals: Tensor, g0: Tensor,
               g_out: dict[int, Tensor]) -> Tensor:
    """Direct contributions of every source (features, errors, embeddings) for a batch of targets."""
    batch = g0.shape[0]
    n_layers = len(fz.errors)
    emb = (g0 * fz.resid0).sum(-1)  # [batch, pos]
    err = torch.stack([(g_out[layer] * fz.errors[layer]).sum(-1) for layer in range(n_layers)], 1)
    feat = torch.zeros(batch, feats.shape[0])
    for src in tset.layers:
        sel = (feats[:, 0] == src).nonzero().squeeze(-1)
        if sel.numel() == 0:
            continue
        pos, idx = feats[sel, 1], feats[sel, 2]
        for j in range(tset[src].spec.n_targets):
            dec = tset[src].W_dec[j][idx].detach() * act_vals[sel, None]  # [n, d_model]
            feat[:, sel] += torch.einsum("bnd,nd->bn", g_out[src + j][:, pos], dec)
    return torch.cat([feat, err.reshape(batch, -1), emb], dim=1)


def _target_values(store: dict[str, Any], logits: Tensor | None, rows: list[tuple[str, int, int, int]],
                   logit_vecs: Tensor, *, one_copy: bool = False) -> Tensor:
    """Row ``b``'s target read from copy ``b`` of the prompt (or from copy 0 for all, ``one_copy``)."""
    vals = []
    for b, (kind, layer, pos, idx) in enumerate(rows):
        b = 0 if one_copy else b
        if kind == "feature":
            vals.append(store["pre"][layer][b, pos, idx])
        else:
            vals.append(logits[b, -1].float() @ logit_vecs[idx])
    return torch.stack(vals)


def _run_rows(model: Any, tset: TranscoderSet, fz: _Frozen, tokens: Tensor, rows: list, feats: Tensor,
              act_vals: Tensor, logit_vecs: Tensor) -> tuple[Tensor, Tensor]:
    """(edge rows, target values) for one batch of target rows."""
    batch, n_layers = len(rows), len(fz.errors)
    store: dict[str, Any] = {}
    features_only = all(kind == "feature" for kind, *_ in rows)
    stop = max(layer for _, layer, _, _ in rows) if features_only else None
    logits = None
    try:
        with _linearised(model, tset, fz, batch, False, store, stop_layer=stop):
            logits = model(tokens.expand(batch, -1), return_type="logits")
    except _StopForward:  # feature targets only: layers after the last target layer are not needed
        pass
    values = _target_values(store, logits, rows, logit_vecs)
    shape = (batch, *fz.resid0.shape)  # layers the stopped pass never reached get zero gradients
    outs = [store["out"][layer] if layer in store["out"] else torch.zeros(shape, requires_grad=True)
            for layer in range(n_layers)]
    grads = torch.autograd.grad(values.sum(), [store["resid0"], *outs], allow_unused=True, materialize_grads=True)
    edges = _edge_rows(tset, fz, feats, act_vals, grads[0], dict(enumerate(grads[1:])))
    return edges.detach(), values.detach()


@torch.no_grad()
def _bias_values(model: Any, tset: TranscoderSet, fz: _Frozen, tokens: Tensor, rows: list,
                 logit_vecs: Tensor) -> Tensor:
    """Every target's value with all sources at 0: one forward pass of the local replacement model."""
    zero: dict[str, Any] = {}
    with _linearised(model, tset, fz, 1, True, zero):
        logits = model(tokens[None], return_type="logits")
    return _target_values(zero, logits, rows, logit_vecs, one_copy=True)


def attribution_graph(model: Any, tset: TranscoderSet, tokens: Int[Tensor, " n_pos"], *, targets: Any = None,
                      batch_size: int = 32, max_feature_nodes: int | None = None) -> AttributionGraph:
    """The direct-effect attribution graph of ``tokens`` for ``targets`` (see the module docstring).

    ``targets``: None (the model's top next token after the prompt), a token id, a list of ids, or a
    ``(good, bad)`` tuple for the logit difference ``logit[good] - logit[bad]``. ``max_feature_nodes``:
    compute the input edges of at most this many features, the most influential on the logits first
    (influence re-estimated on the partial graph after every batch, as circuit-tracer does); the other
    features stay as sources (``rows_computed`` marks which rows are complete).
    """
    if tokens.ndim != 1:
        raise ConfigError(f"attribution_graph takes one prompt (1-D token ids), got shape {tuple(tokens.shape)}.")
    n_layers, n_pos = int(model.cfg.n_layers), int(tokens.shape[0])
    tset.check_model(model)
    fz = _freeze(model, tset, tokens)
    logit_vecs, labels = _logit_targets(fz.logits, targets, int(fz.logits.shape[-1]))
    feat_list = [(layer, int(p), int(f)) for layer in tset.layers for p, f in fz.acts[layer].nonzero().tolist()]
    feats = torch.tensor(feat_list, dtype=torch.long).reshape(-1, 3)
    act_vals = torch.stack([fz.acts[lay][p, f] for lay, p, f in feat_list]) if feat_list else torch.zeros(0)
    rows = [("feature", lay, p, f) for lay, p, f in feat_list] + [("logit", -1, -1, i) for i in range(len(labels))]
    n_feat, n_src = len(feat_list), len(feat_list) + n_layers * n_pos + n_pos
    n_node = n_src + len(labels)
    adjacency, node_input = torch.zeros(n_node, n_node), torch.zeros(n_node)
    computed = torch.zeros(n_node, dtype=torch.bool)
    target_index = list(range(n_feat)) + list(range(n_src, n_node))

    def run(chosen: list[int]) -> None:
        for start in range(0, len(chosen), batch_size):
            part = chosen[start:start + batch_size]
            idx = torch.tensor([target_index[r] for r in part])
            edges, values = _run_rows(model, tset, fz, tokens, [rows[r] for r in part], feats, act_vals, logit_vecs)
            adjacency[idx, :n_src], node_input[idx], computed[idx] = edges, values, True

    run(list(range(n_feat, len(rows))) + (list(range(n_feat)) if max_feature_nodes is None else []))
    budget = min(max_feature_nodes or 0, n_feat)
    while int(computed[:n_feat].sum()) < budget:
        w = torch.zeros(n_node)
        w[n_src:] = 1.0 / len(labels)
        infl = path_influence(adjacency, w)[:n_feat].masked_fill(computed[:n_feat], -1.0)
        run(infl.argsort(descending=True)[: min(batch_size, budget - int(computed[:n_feat].sum()))].tolist())
    for n in (~computed[:n_feat]).nonzero().squeeze(-1).tolist():  # inputs of features without rows
        layer, pos, f = feat_list[n]
        node_input[n] = tset[layer].pre_acts(fz.inputs[layer][pos])[f].detach()
    bias = torch.zeros(n_node)
    bias[torch.tensor(target_index, dtype=torch.long)] = _bias_values(model, tset, fz, tokens, rows, logit_vecs)
    return AttributionGraph(tokens=tokens.detach().cpu(), features=feats, activations=act_vals, logit_vectors=logit_vecs,
                            logit_labels=labels, n_layers=n_layers, adjacency=adjacency, bias=bias,
                            node_input=node_input, config={"targets": repr(targets), "source": tset.info.source,
                                                           "max_feature_nodes": max_feature_nodes},
                            rows_computed=computed)


@dataclass(frozen=True)
class PrunedGraph:
    """Which nodes and edges of a graph survive pruning, and each node's influence on the logits."""

    node_mask: Bool[Tensor, " n_node"]
    edge_mask: Bool[Tensor, "n_node n_node"]
    influence: Float[Tensor, " n_node"]
    node_threshold: float
    edge_threshold: float


def influence(graph: AttributionGraph, logit_weights: Tensor | None = None) -> Float[Tensor, " n_node"]:
    """Each node's total influence on the logit nodes through the graph's absolute, row-normalised
    edges (sum over all paths; the graph is acyclic so the power series ends)."""
    w = torch.zeros(graph.adjacency.shape[0])
    n_logit = graph.logit_vectors.shape[0]
    w[graph.logit_slice] = logit_weights if logit_weights is not None else torch.full((n_logit,), 1.0 / n_logit)
    return path_influence(graph.adjacency, w)


def path_influence(adjacency: Tensor, w: Tensor) -> Tensor:
    """Influence of every node on the weighted outputs ``w``: sum over paths of absolute, row-normalised edge
    weights (``adjacency[i, j]``: edge from j into i)."""
    a = adjacency.abs()
    a = a / a.sum(1, keepdim=True).clamp_min(1e-12)
    total, x = torch.zeros_like(w), w
    for _ in range(a.shape[0]):
        x = x @ a
        if not bool(x.abs().sum() > 0):
            break
        total = total + x
    return total


def _cumulative_keep(scores: Tensor, threshold: float) -> Tensor:
    """Mask of the highest scores whose cumulative share (before each is added) stays below ``threshold``."""
    order = scores.argsort(descending=True)
    share = scores[order].cumsum(0) / scores.sum().clamp_min(1e-12)
    before = torch.cat([torch.zeros(1), share[:-1]])
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[before < threshold]] = True
    return keep & (scores > 0)


def prune(graph: AttributionGraph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98,
          logit_weights: Tensor | None = None) -> PrunedGraph:
    """Keep the feature and error nodes carrying ``node_threshold`` of the total influence on the logits
    (embeddings and logits always stay), then the edges among kept nodes carrying ``edge_threshold`` of
    the edge influence (edge score = normalised |edge| x influence of its target, logits weighted 1)."""
    if not (0 < node_threshold <= 1 and 0 < edge_threshold <= 1):
        raise ConfigError(f"thresholds must lie in (0, 1], got node {node_threshold}, edge {edge_threshold}.")
    infl = influence(graph, logit_weights)
    prunable = torch.zeros(infl.shape[0], dtype=torch.bool)
    prunable[: graph.error_slice.stop] = True
    node_mask = ~prunable
    node_mask[prunable] = _cumulative_keep(infl[prunable], node_threshold)
    a = graph.adjacency.abs()
    a = a / a.sum(1, keepdim=True).clamp_min(1e-12)
    target_weight = infl.clone()
    target_weight[graph.logit_slice] = 1.0
    scores = a * target_weight[:, None] * (node_mask[:, None] & node_mask[None, :])
    edge_mask = _cumulative_keep(scores.flatten(), edge_threshold).reshape(scores.shape)
    return PrunedGraph(node_mask, edge_mask, infl, node_threshold, edge_threshold)
