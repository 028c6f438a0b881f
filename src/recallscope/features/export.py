"""Attribution graphs as the JSON that circuit-tracer's frontend and Neuronpedia read, and back.

The schema (circuit-tracer ``frontend/graph_models.py`` and ``utils/create_graph_files.py``):

- ``metadata``: ``slug``, ``scan``, ``transcoder_list``, ``prompt_tokens``, ``prompt``, ``node_threshold``,
  ``schema_version`` (1). recallscope adds ``metadata.recallscope`` (vocabulary size, logit vectors,
  each node's bias and input) so its own import is lossless; other readers ignore it.
- ``qParams``: ``pinnedIds``, ``supernodes`` (``[[name, node_id, ...], ...]``, as Neuronpedia's graph URLs
  carry them), ``linkType``, ``clickedId``, ``sg_pos``.
- ``nodes``: ``node_id``, ``feature``, ``layer`` (a string), ``ctx_idx``, ``feature_type``, ``token_prob``,
  ``is_target_logit``, ``run_idx``, ``reverse_ctx_idx``, ``jsNodeId``, ``clerp``, ``influence``,
  ``activation``. Ids: feature ``{layer}_{feature}_{pos}`` (``feature`` = Cantor pairing of layer and
  index), error ``0_{layer}_{pos}``, embedding ``E_{token}_{pos}``, logit ``{n_layers + 1}_{token}_{pos}``
  (a logit difference gets the virtual token ``d_vocab + i``, as circuit-tracer does for non-token targets).
- ``links``: ``{"source", "target", "weight"}`` over the kept edges.

circuit-tracer's error ids can collide with layer-0 feature ids (``0_{layer}_{pos}``); when that happens
the error node's id gets a ``_err`` suffix so every id stays unique (a documented deviation).
"""

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recallscope.errors import ConfigError, ResultFileError
from recallscope.features.graph import AttributionGraph, PrunedGraph

SCHEMA_VERSION = 1


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, pos: int, kind: str, js: str, **extra: Any) -> dict[str, Any]:
    base = {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": kind,
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js,
            "clerp": "", "influence": None, "activation": None}
    base.update(extra)
    return base


def _nodes(graph: AttributionGraph, influence: list[float | None], probs: list[float]) -> list[dict]:
    nodes = []
    for n, (layer, pos, idx) in enumerate(graph.features.tolist()):
        nodes.append(_node(f"{layer}_{idx}_{pos}", _cantor(layer, idx), str(layer), pos, "cross layer transcoder",
                           f"{layer}_{idx}-0", influence=influence[n], activation=float(graph.activations[n])))
    feature_ids = {nd["node_id"] for nd in nodes}
    for layer in range(graph.n_layers):
        for pos in range(graph.n_pos):
            nid = f"0_{layer}_{pos}"
            nodes.append(_node(nid if nid not in feature_ids else nid + "_err", -1, str(layer), pos,
                               "mlp reconstruction error", f"{layer}_{pos}-0",
                               influence=influence[graph.error_index(layer, pos)]))
    for pos, tok in enumerate(graph.tokens.tolist()):
        nodes.append(_node(f"E_{tok}_{pos}", pos, "E", pos, "embedding", f"E_{tok}-{pos}",
                           influence=influence[graph.embed_slice.start + pos]))
    d_vocab = graph.logit_vectors.shape[1]
    for i, label in enumerate(graph.logit_labels):
        vocab = int(label) if label.isdigit() else d_vocab + i
        layer, pos = str(graph.n_layers + 1), graph.n_pos - 1
        nodes.append(_node(f"{layer}_{vocab}_{pos}", vocab, layer, pos, "logit", f"L_{vocab}-{pos}",
                           token_prob=probs[i], is_target_logit=i == 0,
                           clerp=f'Output "{label}" (p={probs[i]:.3f})'))
    return nodes


def node_ids(graph: AttributionGraph) -> list[str]:
    """The circuit-tracer node id of every node of ``graph``, in the graph's node order."""
    n = graph.adjacency.shape[0]
    return [nd["node_id"] for nd in _nodes(graph, [None] * n, [0.0] * len(graph.logit_labels))]


def to_json(graph: AttributionGraph, pruned: PrunedGraph | None = None, *, slug: str = "graph", scan: str = "",
            prompt_tokens: list[str] | None = None, prompt: str = "",
            token_probs: list[float] | None = None, labels: Sequence[str] | None = None,
            supernodes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """The circuit-tracer / Neuronpedia JSON of ``graph`` (all nodes and non-zero edges unless ``pruned``).

    ``labels`` (one per node, e.g. :func:`recallscope.features.view.feature_labels`) fill the nodes'
    ``clerp`` (logit nodes keep their ``Output "..."`` text); ``supernodes`` (name -> node indices) become
    ``qParams.supernodes`` (``[name, node_id, ...]`` lists, the frontend's grouping) and their members
    ``qParams.pinnedIds``."""
    n = graph.adjacency.shape[0]
    node_mask = pruned.node_mask if pruned is not None else torch.ones(n, dtype=torch.bool)
    edge_mask = pruned.edge_mask if pruned is not None else graph.adjacency != 0
    influence = pruned.influence.tolist() if pruned is not None else [None] * n
    tokens = prompt_tokens or [str(t) for t in graph.tokens.tolist()]
    probs = token_probs or [0.0] * len(graph.logit_labels)
    all_nodes = _nodes(graph, influence, probs)
    if labels is not None:
        if len(labels) != n:
            raise ConfigError(f"labels has {len(labels)} entries for a graph of {n} nodes.")
        for nd, label in zip(all_nodes, labels):
            if nd["feature_type"] != "logit":
                nd["clerp"] = str(label)
    kept = {i for i in range(n) if bool(node_mask[i])}
    groups = []
    for name, members in (supernodes or {}).items():
        missing = [int(i) for i in members if int(i) not in kept]
        if missing or not members:
            raise ConfigError(f"supernode {name!r}: nodes {missing or list(members)} are not in the exported graph "
                              "(pruned away, out of range, or none given).")
        groups.append([str(name), *(all_nodes[int(i)]["node_id"] for i in members)])
    pinned = list(dict.fromkeys(node_id for group in groups for node_id in group[1:]))
    dst, src = (edge_mask & node_mask[:, None] & node_mask[None, :]).nonzero(as_tuple=True)
    links = [{"source": all_nodes[s]["node_id"], "target": all_nodes[t]["node_id"],
              "weight": float(graph.adjacency[t, s])} for t, s in zip(dst.tolist(), src.tolist())]
    meta = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": tokens, "prompt": prompt,
            "node_threshold": pruned.node_threshold if pruned is not None else None,
            "schema_version": SCHEMA_VERSION,
            "recallscope": {"d_vocab": int(graph.logit_vectors.shape[1]), "n_layers": graph.n_layers,
                            "logit_labels": list(graph.logit_labels),
                            "logit_vectors": graph.logit_vectors.nonzero().T.tolist(),
                            "logit_values": graph.logit_vectors[graph.logit_vectors != 0].tolist(),
                            "bias": graph.bias.tolist(), "node_input": graph.node_input.tolist(),
                            "rows_computed": graph.rows_computed.tolist() if graph.rows_computed is not None else None,
                            "config": graph.config}}
    return {"metadata": meta, "qParams": {"pinnedIds": pinned, "supernodes": groups, "linkType": "both",
                                          "clickedId": "", "sg_pos": ""},
            "nodes": [all_nodes[i] for i in sorted(kept)], "links": links}


def save_json(data: dict[str, Any], path: str | os.PathLike) -> Path:
    from recallscope.manifest import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return path


def _logit_vectors(meta: dict[str, Any], logit_nodes: list[dict], d_vocab: int) -> torch.Tensor:
    if "logit_vectors" in meta:
        idx = torch.tensor(meta["logit_vectors"], dtype=torch.long).reshape(2, -1)
        vecs = torch.zeros(len(logit_nodes), d_vocab)
        vecs[idx[0], idx[1]] = torch.tensor(meta["logit_values"], dtype=torch.float32)
        return vecs
    vecs = torch.zeros(len(logit_nodes), d_vocab)
    for i, nd in enumerate(logit_nodes):
        if nd["feature"] < d_vocab:
            vecs[i, nd["feature"]] = 1.0
    return vecs


def from_json(data: dict[str, Any] | str | os.PathLike) -> AttributionGraph:
    """An :class:`AttributionGraph` from circuit-tracer / Neuronpedia JSON (a dict, or a file path).

    Nodes missing from a pruned file keep zero edges; bias and node inputs come back only from
    recallscope's own files (``metadata.recallscope``), else they are zero.
    """
    if not isinstance(data, dict):
        path = Path(data)
        if not path.is_file():
            raise ResultFileError(f"graph JSON {path} not found.")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ResultFileError(f"cannot read graph JSON {path}: {exc}") from exc
    if not isinstance(data, dict) or not {"metadata", "nodes", "links"} <= set(data):
        raise ResultFileError("not a circuit-tracer graph JSON: expected keys metadata, nodes and links.")
    meta = data["metadata"].get("recallscope", {})
    by_kind: dict[str, list[dict]] = {}
    for nd in data["nodes"]:
        by_kind.setdefault(nd["feature_type"], []).append(nd)
    logit_nodes = by_kind.get("logit", [])
    embeds = sorted(by_kind.get("embedding", []), key=lambda nd: nd["ctx_idx"])
    n_layers = meta.get("n_layers") or (int(logit_nodes[0]["layer"]) - 1 if logit_nodes else 0)
    feats = [nd for kind, nds in by_kind.items() if kind not in ("logit", "embedding", "mlp reconstruction error")
             for nd in nds]
    feat_rows = [[int(nd["layer"]), int(nd["ctx_idx"]), int(nd["node_id"].split("_")[1])] for nd in feats]
    n_feat, n_pos = len(feats), len(embeds)
    tokens = torch.tensor([int(nd["node_id"].split("_")[1]) for nd in embeds], dtype=torch.long)
    d_vocab = meta.get("d_vocab") or max([int(t) for t in tokens.tolist()] + [nd["feature"] for nd in logit_nodes]) + 1
    index = {nd["node_id"]: i for i, nd in enumerate(feats)}
    for nd in by_kind.get("mlp reconstruction error", []):
        index[nd["node_id"]] = n_feat + int(nd["layer"]) * n_pos + int(nd["ctx_idx"])
    for nd in embeds:
        index[nd["node_id"]] = n_feat + n_layers * n_pos + int(nd["ctx_idx"])
    for i, nd in enumerate(logit_nodes):
        index[nd["node_id"]] = n_feat + (n_layers + 1) * n_pos + i
    n = n_feat + (n_layers + 1) * n_pos + len(logit_nodes)
    adjacency = torch.zeros(n, n)
    for link in data["links"]:
        adjacency[index[link["target"]], index[link["source"]]] = float(link["weight"])
    full = len(meta.get("bias", [])) == n
    return AttributionGraph(
        tokens=tokens, features=torch.tensor(feat_rows, dtype=torch.long).reshape(-1, 3),
        activations=torch.tensor([float(nd.get("activation") or 0.0) for nd in feats]).reshape(-1),
        logit_vectors=_logit_vectors(meta, logit_nodes, d_vocab),
        logit_labels=tuple(meta.get("logit_labels") or [str(nd["feature"]) for nd in logit_nodes]),
        n_layers=int(n_layers), adjacency=adjacency,
        bias=torch.tensor(meta["bias"]) if full else torch.zeros(n),
        node_input=torch.tensor(meta["node_input"]) if full else torch.zeros(n),
        config=dict(meta.get("config", {})),
        rows_computed=torch.tensor(meta["rows_computed"]) if full and meta.get("rows_computed") is not None else None)


def supernodes_from_json(data: dict[str, Any], graph: AttributionGraph) -> dict[str, list[int]]:
    """``qParams.supernodes`` of circuit-tracer JSON as name -> node indices of ``graph`` (the graph
    :func:`from_json` read from the same file)."""
    index = {node_id: i for i, node_id in enumerate(node_ids(graph))}
    out = {}
    for group in data.get("qParams", {}).get("supernodes", []):
        name, *members = group
        unknown = [m for m in members if m not in index]
        if unknown:
            raise ResultFileError(f"supernode {name!r} names nodes {unknown[:3]} that the graph does not have.")
        out[str(name)] = [index[m] for m in members]
    return out
