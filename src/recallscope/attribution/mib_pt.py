"""MIB / EAP-IG circuit files in the PyTorch (``.pt``) format, beside the JSON of :mod:`.mib`.

MIB's circuit-localisation track (``run_evaluation.py``) loads a circuit with EAP-IG's ``Graph.from_json``
or, for a path ending in ``.pt``, ``Graph.from_pt``; ``Graph.to_pt`` writes it. The layout below was read
from EAP-IG's ``src/eap/graph.py`` (github.com/hannamw/EAP-IG at commit
795f5607b25638935aec89aee3c1cb4bd9ed72f1: ``to_pt``, ``from_pt``, ``from_model``, ``_forward_index``,
``_backward_index``, ``get_dst_nodes``) and MIB-circuit-track's ``run_evaluation.py`` and
``MIB_circuit_track/circuit_loading.py`` (github.com/hannamw/MIB-circuit-track at commit
b759df34433c9e31043ba9e02908ce0bf20e894f).

1. **The file** is ``torch.save`` of a dict with

   - ``cfg``: ``{"n_layers", "n_heads", "parallel_attn_mlp", "d_model"}`` (as in the JSON; recallscope adds
     ``n_key_value_heads`` under grouped-query attention, as its JSON does);
   - ``src_nodes``: the ``n_forward = 1 + L (H + 1)`` sender names in forward order: ``input``, then per
     layer ``a{l}.h0 .. a{l}.h{H-1}``, ``m{l}`` (forward index of ``a{l}.h{h}`` = ``1 + l (H + 1) + h``, of
     ``m{l}`` = ``1 + l (H + 1) + H``);
   - ``dst_nodes``: the ``n_backward = L (3H + 1) + 1`` receiver names: per layer ``a{l}.h{h}<q>`` for every
     head, then ``<k>``, then ``<v>``, then ``m{l}``; ``logits`` last (backward index of ``a{l}.h{h}<x>`` =
     ``l (3H + 1) + "qkv".index(x) H + h``, of ``m{l}`` = ``l (3H + 1) + 3H``, of ``logits`` = ``-1``);
   - ``edges_scores``: float ``[n_forward, n_backward]``, ``edges_in_graph``: bool, same shape (zero /
     ``False`` where no edge exists, e.g. ``m3 -> m1``); ``nodes_in_graph``: bool ``[n_forward]``;
   - optional ``nodes_scores`` / ``neurons_in_graph`` / ``neurons_scores`` (node- and neuron-level circuits;
     recallscope neither writes nor reads them).

2. **Export** (:func:`to_mib_pt`) builds the JSON dict of :func:`~recallscope.attribution.mib.to_mib_json`
   (same edge names, the same grouped-query rule: each query head of a group gets ``score /
   heads_per_group``) and lays it out as above (:func:`mib_json_to_pt`), so the two formats agree edge by
   edge. **Import** (:func:`from_mib_pt`) checks the file (keys, cfg, node lists, shapes, nothing off the
   graph's edges), turns it back into the JSON dict (:func:`mib_pt_to_json`) and reads that with
   :func:`~recallscope.attribution.mib.from_mib_json` (grouped-query scores summed back).
"""

import os
from pathlib import Path
from typing import Any

import torch

from recallscope.attribution.edges import Circuit, EdgeScores
from recallscope.attribution.mib import from_mib_json, to_mib_json
from recallscope.errors import ResultFileError

PT_KEYS = ("cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph")
"""Keys every MIB / EAP-IG ``.pt`` circuit file has (``Graph.from_pt`` asserts them)."""


# --- layout --------------------------------------------------------------------------------------------
def mib_src_nodes(n_layers: int, n_heads: int) -> list[str]:
    """Sender names in EAP-IG's forward order (``src_nodes`` of a ``.pt`` file)."""
    names = ["input"]
    for layer in range(n_layers):
        names += [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
    return names


def mib_dst_nodes(n_layers: int, n_heads: int) -> list[str]:
    """Receiver names in EAP-IG's backward order (``dst_nodes`` of a ``.pt`` file)."""
    names = []
    for layer in range(n_layers):
        names += [f"a{layer}.h{h}<{x}>" for x in "qkv" for h in range(n_heads)] + [f"m{layer}"]
    return names + ["logits"]


def mib_forward_index(name: str, n_layers: int, n_heads: int) -> int:
    """Row of sender ``name`` (``input``, ``a{l}.h{h}``, ``m{l}``) in a ``.pt`` file's edge tensors."""
    if name == "input":
        return 0
    if name.startswith("m") and name[1:].isdigit() and int(name[1:]) < n_layers:
        return 1 + int(name[1:]) * (n_heads + 1) + n_heads
    layer, _, head = name[1:].partition(".h")
    if (name.startswith("a") and layer.isdigit() and head.isdigit() and int(layer) < n_layers
            and int(head) < n_heads):
        return 1 + int(layer) * (n_heads + 1) + int(head)
    raise ResultFileError(f"no MIB sender {name!r}; senders are named 'input', 'a3.h4', 'm3'.")


def mib_backward_index(name: str, n_layers: int, n_heads: int) -> int:
    """Column of receiver ``name`` (``a{l}.h{h}<q|k|v>``, ``m{l}``, ``logits``) in a ``.pt`` file's edge
    tensors (``logits`` is the last column: EAP-IG's index ``-1``)."""
    if name == "logits":
        return n_layers * (3 * n_heads + 1)
    if name.startswith("m") and name[1:].isdigit() and int(name[1:]) < n_layers:
        return int(name[1:]) * (3 * n_heads + 1) + 3 * n_heads
    node, _, kind = name.partition("<")
    layer, _, head = node[1:].partition(".h")
    if (name.startswith("a") and kind[:-1] in ("q", "k", "v") and kind.endswith(">") and layer.isdigit()
            and head.isdigit() and int(layer) < n_layers and int(head) < n_heads):
        return int(layer) * (3 * n_heads + 1) + "qkv".index(kind[0]) * n_heads + int(head)
    raise ResultFileError(f"no MIB receiver {name!r}; receivers are named 'a3.h4<q>', 'm3', 'logits'.")


def _edge_indices(edge: str, n_layers: int, n_heads: int) -> tuple[int, int]:
    sender, _, receiver = edge.partition("->")
    return mib_forward_index(sender, n_layers, n_heads), mib_backward_index(receiver, n_layers, n_heads)


def _real_edges(n_layers: int, n_heads: int, parallel: bool) -> torch.Tensor:
    """EAP-IG's ``real_edge_mask``: a receiver reads every sender written before it."""
    n_fwd, n_bwd = 1 + n_layers * (n_heads + 1), n_layers * (3 * n_heads + 1) + 1
    real = torch.zeros(n_fwd, n_bwd, dtype=torch.bool)
    for layer in range(n_layers):
        before_attn = 1 + layer * (n_heads + 1)
        start = layer * (3 * n_heads + 1)
        real[:before_attn, start: start + 3 * n_heads] = True
        real[: before_attn + (0 if parallel else n_heads), start + 3 * n_heads] = True
    real[:, -1] = True
    return real


# --- JSON <-> .pt --------------------------------------------------------------------------------------
def mib_json_to_pt(data: dict[str, Any]) -> dict[str, Any]:
    """The ``.pt`` dict (see the module docstring) holding the same circuit as MIB / EAP-IG JSON ``data``."""
    cfg = dict(data["cfg"])
    n_layers, n_heads = int(cfg["n_layers"]), int(cfg["n_heads"])
    src, dst = mib_src_nodes(n_layers, n_heads), mib_dst_nodes(n_layers, n_heads)
    scores = torch.zeros(len(src), len(dst), dtype=torch.float32)
    inside = torch.zeros(len(src), len(dst), dtype=torch.bool)
    for edge, info in data["edges"].items():
        u, v = _edge_indices(edge, n_layers, n_heads)
        scores[u, v] = float(info.get("score", 0.0) or 0.0)
        inside[u, v] = bool(info.get("in_graph", False))
    nodes = torch.tensor([bool(data["nodes"].get(name, {}).get("in_graph", False)) for name in src])
    return {"cfg": cfg, "src_nodes": src, "dst_nodes": dst, "edges_scores": scores, "edges_in_graph": inside,
            "nodes_in_graph": nodes}


def _check_pt(d: Any) -> tuple[int, int, bool]:
    if not isinstance(d, dict):
        raise ResultFileError(f"an MIB .pt circuit file holds a dict, this one a {type(d).__name__}.")
    missing = [k for k in PT_KEYS if k not in d]
    if missing:
        raise ResultFileError(f"not an MIB .pt circuit file: it lacks {missing} (expected {list(PT_KEYS)}).")
    cfg = d["cfg"]
    try:
        n_layers, n_heads, parallel = int(cfg["n_layers"]), int(cfg["n_heads"]), bool(cfg["parallel_attn_mlp"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ResultFileError(f"the file's cfg {cfg!r} lacks an integer n_layers / n_heads or "
                              f"parallel_attn_mlp: {exc}") from exc
    src, dst = mib_src_nodes(n_layers, n_heads), mib_dst_nodes(n_layers, n_heads)
    for key, expected in (("src_nodes", src), ("dst_nodes", dst)):
        if list(d[key]) != expected:
            raise ResultFileError(f"{key} of the file is not EAP-IG's order for a {n_layers}-layer, {n_heads}-head "
                                  f"model (expected {expected[:4]} ... {expected[-2:]}); check cfg.")
    shape = (len(src), len(dst))
    for key in ("edges_scores", "edges_in_graph"):
        if not isinstance(d[key], torch.Tensor) or tuple(d[key].shape) != shape:
            got = tuple(d[key].shape) if isinstance(d[key], torch.Tensor) else type(d[key]).__name__
            raise ResultFileError(f"{key} is {got}; expected a tensor [{shape[0]} src_nodes, {shape[1]} dst_nodes].")
    if not isinstance(d["nodes_in_graph"], torch.Tensor) or tuple(d["nodes_in_graph"].shape) != (len(src),):
        raise ResultFileError(f"nodes_in_graph must be a bool tensor [{len(src)} src_nodes].")
    return n_layers, n_heads, parallel


def mib_pt_to_json(d: Any) -> dict[str, Any]:
    """The MIB / EAP-IG JSON dict holding the same circuit as a checked ``.pt`` dict ``d``."""
    n_layers, n_heads, parallel = _check_pt(d)
    real = _real_edges(n_layers, n_heads, parallel)
    scores, inside = d["edges_scores"].detach().cpu().double(), d["edges_in_graph"].detach().cpu().bool()
    off = ((scores != 0) & ~real) | (inside & ~real)
    if off.any():
        u, v = off.nonzero()[0].tolist()
        raise ResultFileError(f"{int(off.sum())} non-zero entries lie off the graph's edges, e.g. "
                              f"{d['src_nodes'][u]}->{d['dst_nodes'][v]}; check cfg (parallel_attn_mlp).")
    src, dst = d["src_nodes"], d["dst_nodes"]
    edges = {f"{src[u]}->{dst[v]}": {"score": float(scores[u, v]), "in_graph": bool(inside[u, v])}
             for u, v in real.nonzero().tolist()}
    nodes = {name: {"in_graph": bool(flag)} for name, flag in zip(src, d["nodes_in_graph"].tolist())}
    nodes["logits"] = {"in_graph": True}
    return {"cfg": dict(d["cfg"]), "nodes": nodes, "edges": edges}


# --- recallscope scores <-> .pt ------------------------------------------------------------------------
def to_mib_pt(scores: EdgeScores, *, d_model: int, circuit: Circuit | None = None) -> dict[str, Any]:
    """The MIB / EAP-IG ``.pt`` dict of ``scores`` (``in_graph`` from ``circuit``; see the module docstring)."""
    return mib_json_to_pt(to_mib_json(scores, d_model=d_model, circuit=circuit))


def write_mib_pt(scores: EdgeScores, path: str | os.PathLike, *, d_model: int,
                 circuit: Circuit | None = None) -> Path:
    """``torch.save`` :func:`to_mib_pt` to ``path`` (e.g. ``<dir>/ioi_gpt2/importances.pt``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_mib_pt(scores, d_model=d_model, circuit=circuit), path)
    return path


def from_mib_pt(data: dict[str, Any] | str | os.PathLike) -> tuple[EdgeScores, Circuit]:
    """Edge scores and the ``in_graph`` circuit from an MIB / EAP-IG ``.pt`` file (or its loaded dict)."""
    if not isinstance(data, dict):
        try:
            data = torch.load(Path(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a missing, truncated or non-torch file
            raise ResultFileError(f"cannot read an MIB .pt circuit file from {data}: {exc}") from exc
    return from_mib_json(mib_pt_to_json(data))
