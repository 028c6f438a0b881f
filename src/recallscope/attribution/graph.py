"""The computational graph of edge attribution and circuits, and a forward pass over it.

**Nodes and edges.** Senders write to the residual stream: the embeddings (``input``), every attention
head (``a{layer}.h{head}``, its share ``z_h W_O[h]`` of the attention output) and every MLP
(``m{layer}``). Receivers read it: every head's query input (``a{l}.h{h}.q``), every key/value head's key
and value inputs (``a{l}.h{g}.k`` / ``.v``; ``a{l}.kv{g}.k`` under grouped-query attention), every
MLP's input (``m{l}``) and the unembedding (``logits``). An edge joins a sender to a receiver that
reads the residual after the sender wrote it; with per-position edges it also names a position (the
residual stream is per position, so an edge never crosses positions; heads move information between
positions inside a node).

**The forward pass** (:func:`run_graph`) computes each receiver's input separately, so that

1. gradients with respect to each receiver's own input are available (edge attribution), and
2. edges can be ablated one by one (circuits): a receiver ``v`` reads ``x - sum_{u ablated} (a_u -
   a_u^corrupt)``, i.e. ablated senders are seen through their corrupt-run outputs (ACDC, EAP-IG's
   evaluation). The equivalent ``x^corrupt + sum_{u kept} (a_u - a_u^corrupt)`` is used when fewer
   edges are kept than ablated, so a small circuit costs little.

Keeping every edge reproduces the model's forward exactly; ablating every edge reproduces the corrupt
run. The q/k/v/o projections are read as per-head weight tensors (:mod:`.weights`); attention itself is
:func:`recallscope.models.forward.attend`, norms and MLPs are the model's own modules.
"""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from recallscope.attribution.weights import AttnWeights
from recallscope.errors import ConfigError
from recallscope.models.forward import attend
from recallscope.models.stack import Stack


@dataclass(frozen=True)
class Graph:
    """Sender and receiver indices of a model with ``n_layers`` blocks (see the module docstring).

    Senders: ``input``, then per layer its heads and its MLP. Receivers: per layer the q inputs of
    every head, the k and the v inputs of every key/value head and the MLP input, then ``logits``.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool = False

    @classmethod
    def of(cls, stack: Stack) -> "Graph":
        if any(lp.mlp is None for lp in stack.layers):
            raise ConfigError("edge attribution's graph needs an MLP in every layer; this model has "
                              "attention-only layers. Use node attribution (attribution.atp) instead.")
        stack.require("edge attribution's graph", post_norms=True)  # senders are z_h W_O and raw MLP outputs
        return cls(stack.n_layers, stack.n_heads, stack.n_kv_heads, stack.parallel_attn_mlp)

    # --- senders -------------------------------------------------------------------------------------
    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    def head(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def before_attn(self, layer: int) -> int:
        """Number of senders a layer's attention can read (all senders of earlier layers)."""
        return 1 + layer * (self.n_heads + 1)

    def before_mlp(self, layer: int) -> int:
        """Number of senders a layer's MLP can read (its own heads too, unless attention is parallel)."""
        return self.before_attn(layer) + (0 if self.parallel else self.n_heads)

    # --- receivers -----------------------------------------------------------------------------------
    @property
    def per_layer(self) -> int:
        return self.n_heads + 2 * self.n_kv_heads + 1

    @property
    def n_receivers(self) -> int:
        return self.n_layers * self.per_layer + 1

    def attn_inputs(self, layer: int) -> slice:
        """Receivers of a layer's attention: q of each head, then k, then v of each key/value head."""
        start = layer * self.per_layer
        return slice(start, start + self.n_heads + 2 * self.n_kv_heads)

    def q(self, layer: int, head: int) -> int:
        return layer * self.per_layer + head

    def k(self, layer: int, kv_head: int) -> int:
        return layer * self.per_layer + self.n_heads + kv_head

    def v(self, layer: int, kv_head: int) -> int:
        return layer * self.per_layer + self.n_heads + self.n_kv_heads + kv_head

    def mlp_input(self, layer: int) -> int:
        return layer * self.per_layer + self.per_layer - 1

    @property
    def logits(self) -> int:
        return self.n_layers * self.per_layer

    # --- names ---------------------------------------------------------------------------------------
    @cached_property
    def senders(self) -> tuple[str, ...]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return tuple(names)

    def _kv_node(self, layer: int, g: int) -> str:
        return f"a{layer}.h{g}" if self.n_kv_heads == self.n_heads else f"a{layer}.kv{g}"

    @cached_property
    def receivers(self) -> tuple[str, ...]:
        names = []
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}.q" for h in range(self.n_heads)]
            names += [f"{self._kv_node(layer, g)}.k" for g in range(self.n_kv_heads)]
            names += [f"{self._kv_node(layer, g)}.v" for g in range(self.n_kv_heads)]
            names.append(f"m{layer}")
        return tuple(names + ["logits"])

    def receiver_node(self, v: int) -> str:
        """The node a receiver belongs to: ``a0.h1.q`` -> ``a0.h1``, ``m3`` -> ``m3``."""
        name = self.receivers[v]
        return name.rsplit(".", 1)[0] if name.endswith((".q", ".k", ".v")) else name

    @cached_property
    def nodes(self) -> tuple[str, ...]:
        """Every node: senders, key/value nodes of grouped-query attention, and ``logits``."""
        extra = [self.receiver_node(v) for v in range(self.n_receivers)]
        return tuple(dict.fromkeys([*self.senders, *extra]))

    def node_label(self, name: str) -> str:
        """The display label of node ``name`` in the one site vocabulary (:func:`recallscope.sites.site_label`):
        ``a3.h4`` -> ``z L3.H4`` (head 4's output), ``m3`` -> ``mlp_out L3``, ``a3.kv1`` -> ``k/v L3.H1``
        (key/value head 1), ``input`` -> ``embed``, ``logits`` -> ``logits``. Node ids stay ``a3.h4`` / ``m3``:
        they are the names MIB / EAP-IG circuit files use (:mod:`recallscope.attribution.mib`) and the names
        saved circuits and edge labels (``"a0.h1 -> m1"``) carry."""
        from recallscope.sites import site_label
        from recallscope.vocab import Component

        if name in ("input", "logits"):
            return "embed" if name == "input" else "logits"
        if name.startswith("m") and name[1:].isdigit():
            return site_label(Component.MLP_OUT, int(name[1:]))
        layer, _, part = name[1:].partition(".")
        if name.startswith("a") and layer.isdigit() and part.startswith("kv") and part[2:].isdigit():
            return site_label(Component.V, int(layer), head=int(part[2:])).replace("v L", "k/v L", 1)
        if name.startswith("a") and layer.isdigit() and part.startswith("h") and part[1:].isdigit():
            return site_label(Component.HEAD_OUT, int(layer), head=int(part[1:]))
        raise ConfigError(f"no node {name!r} in an edge-attribution graph; nodes are named 'input', 'a3.h4', "
                          "'a3.kv1', 'm3', 'logits'.")

    def edge_label(self, u: int, v: int, pos: int | None = None) -> str:
        return f"{self.senders[u]} -> {self.receivers[v]}" + (f" @{pos}" if pos is not None else "")

    def edge(self, label: str) -> tuple[int, int]:
        """Indices of an edge named ``"sender -> receiver"``."""
        try:
            a, b = (s.strip() for s in label.split("->"))
            u, v = self.senders.index(a), self.receivers.index(b)
        except ValueError as exc:
            raise ConfigError(f"no edge {label!r} in this graph; edges are named like 'a0.h1 -> m1' or "
                              "'input -> a1.h0.q'.") from exc
        if not self.valid[u, v]:
            raise ConfigError(f"no edge {label!r} in this graph: {b} reads the residual before {a} writes it.")
        return u, v

    def sender_layer(self, u: int) -> int:
        """Layer of a sender (-1 for the input)."""
        return -1 if u == 0 else (u - 1) // (self.n_heads + 1)

    @cached_property
    def valid(self) -> Bool[Tensor, "sender receiver"]:
        """Which (sender, receiver) pairs are edges: the receiver reads after the sender wrote."""
        out = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool)
        for layer in range(self.n_layers):
            out[: self.before_attn(layer), self.attn_inputs(layer)] = True
            out[: self.before_mlp(layer), self.mlp_input(layer)] = True
        out[:, self.logits] = True
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GraphRun:
    """What :func:`run_graph` returns: logits at the read positions and, when recorded, every sender's
    output ``[batch, pos, sender, d_model]`` (``delta``: output minus the corrupt run's, for an ablated
    run) and the residual read by each receiver block (keys ``attn{layer}``, ``mlp{layer}``, ``final``)."""

    logits: Tensor
    outputs: Tensor | None = None
    delta: Tensor | None = None
    resid: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Ablation:
    """Edges to keep (1) or ablate (0), ``[sender, receiver]`` or ``[sender, receiver, pos]``, and the
    corrupt run (recorded) whose sender outputs replace the ablated edges."""

    keep: Float[Tensor, "sender receiver *pos"]
    corrupt: GraphRun


Hook = Callable[[int, Tensor], Tensor | None]


def _contract(delta: Tensor, weights: Tensor) -> Tensor:
    """``sum_u delta[b, p, u] * weights[u, r(, p)]`` over the senders that have a non-zero weight."""
    rows = weights.reshape(weights.shape[0], -1).any(-1).nonzero().squeeze(-1)
    if len(rows) == 0:
        return delta.new_zeros(*delta.shape[:2], weights.shape[1], delta.shape[-1])
    d, w = delta[:, :, rows], weights[rows].to(delta.dtype)
    if w.ndim == 3:  # per-position edges
        return torch.einsum("bpud,urp->bprd", d, w)
    return torch.einsum("bpud,ur->bprd", d, w)


class _Readers:
    """Builds receivers' inputs (with ablation) and records what later runs need."""

    def __init__(self, graph: Graph, x0: Tensor, ablation: Ablation | None, record: bool, hook: Hook | None,
                 resume: GraphRun | None = None):
        b, p, d = x0.shape
        self.graph, self.ablation, self.hook, self.record = graph, ablation, hook, record
        need = record or ablation is not None
        self.buffer = x0.new_zeros(b, p, graph.n_senders, d) if need else None  # outputs, or output - corrupt
        if resume is not None and self.buffer is not None:
            self.buffer.copy_(resume.delta if ablation is not None else resume.outputs)
        self.resid: dict[str, Tensor] = dict(resume.resid) if resume is not None else {}

    def write(self, first: int, out: Tensor) -> None:
        if self.buffer is None:
            return
        value = out.detach()
        if self.ablation is not None:
            value = value - self.ablation.corrupt.outputs[:, :, first:first + out.shape[2]]
        self.buffer[:, :, first:first + out.shape[2]] = value

    def read(self, key: str, x: Tensor, receivers: slice, n_senders: int) -> Tensor:
        if self.record:
            self.resid[key] = x.detach()
        n = receivers.stop - receivers.start
        if self.ablation is None:
            xs = x.unsqueeze(2).expand(-1, -1, n, -1)
        else:
            keep = self.ablation.keep[:n_senders, receivers]
            delta = self.buffer[:, :, :n_senders]
            if keep.sum() * 2 <= keep.numel():
                xs = self.ablation.corrupt.resid[key].unsqueeze(2) + _contract(delta, keep)
            else:
                xs = x.unsqueeze(2) - _contract(delta, 1 - keep)
        if self.hook is not None:
            replaced = self.hook(receivers.start, xs)
            xs = xs if replaced is None else replaced
        return xs


def _layer(stack: Stack, graph: Graph, layer: int, w: AttnWeights, x: Tensor, readers: _Readers,
           sender_hook: Hook | None) -> Tensor:
    """One block over the graph: receivers read (with ablation), senders write; returns the residual."""
    g, lp = graph, stack.layers[layer]
    positions = torch.arange(x.shape[1], device=x.device)
    h = lp.ln1(readers.read(f"attn{layer}", x, g.attn_inputs(layer), g.before_attn(layer)))
    nh, nkv = g.n_heads, g.n_kv_heads
    q = torch.einsum("bphd,dhe->bphe", h[:, :, :nh], w.W_Q) + w.b_Q
    k = torch.einsum("bphd,dhe->bphe", h[:, :, nh:nh + nkv], w.W_K) + w.b_K
    v = torch.einsum("bphd,dhe->bphe", h[:, :, nh + nkv:], w.W_V) + w.b_V
    z, _, _ = attend(stack, layer, q, k, v, positions, None, lambda p, i, t: t, lambda p, t: None)
    heads = torch.einsum("bphe,hed->bphd", z, w.W_O)
    if sender_hook is not None:
        heads = sender_hook(g.head(layer, 0), heads)
    readers.write(g.head(layer, 0), heads)
    resid_mid = x + heads.sum(2) + w.b_O
    mlp_recv = slice(g.mlp_input(layer), g.mlp_input(layer) + 1)
    m = lp.mlp(lp.ln2(readers.read(f"mlp{layer}", x if g.parallel else resid_mid, mlp_recv, g.before_mlp(layer))[:, :, 0]))
    m = m.unsqueeze(2)
    if sender_hook is not None:
        m = sender_hook(g.mlp(layer), m)
    readers.write(g.mlp(layer), m)
    return resid_mid + m[:, :, 0]


def run_graph(
    stack: Stack,
    graph: Graph,
    weights: tuple[AttnWeights, ...],
    x0: Float[Tensor, "batch pos d_model"],
    *,
    read: Tensor,
    ablation: Ablation | None = None,
    record: bool = False,
    receiver_hook: Hook | None = None,
    sender_hook: Hook | None = None,
    start_layer: int = 0,
    resume: GraphRun | None = None,
) -> GraphRun:
    """Run the model on embeddings ``x0`` over the graph (see the module docstring).

    ``ablation`` replaces ablated edges by the corrupt run's sender outputs (no gradients then).
    ``receiver_hook(first_receiver, inputs[batch, pos, n, d_model])`` sees each block of receiver inputs
    and may return a replacement; ``sender_hook(first_sender, outputs[batch, pos, n, d_model])`` likewise
    for sender outputs. ``record`` keeps sender outputs and residuals (for use as a corrupt run, or to
    ``resume`` from). ``start_layer`` with ``resume`` (a recorded run that agrees with this one below
    that layer) skips the blocks below ``start_layer``; ``start_layer = n_layers`` only reads the logits.
    """
    if ablation is not None and torch.is_grad_enabled():
        raise ConfigError("run_graph with an ablation computes no gradients; call it under torch.no_grad().")
    if start_layer and (resume is None or not resume.resid):
        raise ConfigError("start_layer > 0 needs `resume`, a run recorded with record=True.")
    readers = _Readers(graph, x0, ablation, record, receiver_hook, resume)
    if start_layer == 0:
        out0 = x0.unsqueeze(2)
        out0 = sender_hook(0, out0) if sender_hook is not None else out0
        readers.write(0, out0)
        x = out0[:, :, 0]
    else:
        x = resume.resid[f"attn{start_layer}" if start_layer < graph.n_layers else "final"]
    for layer in range(start_layer, graph.n_layers):
        x = _layer(stack, graph, layer, weights[layer], x, readers, sender_hook)
    final = readers.read("final", x, slice(graph.logits, graph.logits + 1), graph.n_senders)[:, :, 0]
    logits = stack.unembed(stack.final_norm(final[:, read]))
    if not record:
        return GraphRun(logits=logits)
    if ablation is None:
        return GraphRun(logits=logits, outputs=readers.buffer, resid=readers.resid)
    return GraphRun(logits=logits, delta=readers.buffer, resid=readers.resid)
