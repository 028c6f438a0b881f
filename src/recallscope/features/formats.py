"""Loading transcoders saved by circuit-tracer, SAELens and EleutherAI's sparsify.

Each loader maps a format's tensors onto :class:`~recallscope.features.transcoder.Transcoder`'s
conventions (``x @ W_enc``: ``[d_in, d_sae]``; ``W_dec``: ``[n_targets, d_sae, d_out]``; ``x @ W_skip``:
``[d_in, d_out]``) and its hook names onto TransformerBridge hook names. The on-disk layouts were read
from the formats' own loaders (circuit-tracer ``transcoder/single_layer_transcoder.py`` and
``cross_layer_transcoder.py``, SAELens ``saes/transcoder.py`` and ``saes/clt.py``, sparsify
``sparse_coder.py``):

1. **circuit-tracer, per-layer** (``model_kind: transcoder_set``): ``config.yaml`` (``feature_input_hook``,
   ``feature_output_hook``, optional ``activation``/``k``, optional ``transcoders`` list of paths) and
   ``layer_{i}.safetensors`` with ``W_enc [d_sae, d_model]``, ``W_dec [d_sae, d_model]`` (older files:
   ``[d_model, d_sae]``, told apart by shape), ``b_enc``, ``b_dec``, optional ``W_skip [d_model, d_model]``
   (applied as ``x @ W_skip.T``) and ``activation_function.threshold`` (JumpReLU).
2. **circuit-tracer, cross-layer** (``model_kind: cross_layer_transcoder``): ``W_enc_{i}.safetensors``
   holding ``W_enc_{i} [d_sae, d_model]``, ``b_enc_{i}``, ``b_dec_{i}`` (the bias of output layer ``i``),
   optional ``threshold_{i}``; and ``W_dec_{i}.safetensors`` holding ``W_dec_{i} [d_sae, n_layers - i, d_model]``.
3. **SAELens**: per layer a directory with ``cfg.json`` (``architecture`` ``transcoder`` /
   ``skip_transcoder`` / ``jumprelu_transcoder`` / ``topk``..., ``d_in``, ``d_sae``, ``d_out``,
   ``hook_name``, ``hook_name_out``, ``k``) and ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``,
   ``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, optional ``W_skip [d_out, d_in]`` and ``threshold``.
   SAELens CLTs (``architecture: jumprelu_clt``): one directory with ``W_enc [L, d_in, d_sae]``,
   ``W_dec [L, d_sae, L, d_out]``, ``b_enc``, ``b_dec [L, d_out]``, ``b_in [L, d_in]`` (subtracted from the
   input; folded into the encoder bias here), ``threshold [L, d_sae]``, optional ``W_skip [L, d_out, d_in]``.
4. **sparsify**: a directory per hookpoint (``layers.{i}.mlp``) with ``cfg.json`` (``d_in``, ``num_latents``
   or ``expansion_factor``, ``k``, ``activation``, ``skip_connection``, ``transcode``) and
   ``sae.safetensors`` with ``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae, d_in]``,
   ``b_dec``, optional ``W_skip [d_in, d_in]`` (applied as ``x @ W_skip.T``). A hookpoint ``layers.{i}.mlp``
   reads the MLP's input and predicts its output.

Not supported yet: sparsify's cross-layer checkpoints (their layout could not be checked here), Gemma
Scope ``.npz`` files, and lazy (memory-mapped) decoders.
"""

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from recallscope.errors import ConfigError, ResultFileError
from recallscope.features.transcoder import (INPUT_HOOK, OUTPUT_HOOK, Transcoder, TranscoderSet,
                                             TranscoderSetInfo, TranscoderSpec)


def _load(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ResultFileError(f"transcoder weights {path} not found.")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def _bridge_hook(hook: str) -> str:
    """circuit-tracer hook names are relative to a block (``hook_resid_mid``, ``mlp.hook_out``)."""
    if hook.startswith("blocks."):
        return re.sub(r"^blocks\.\d+\.", "blocks.{layer}.", hook)
    return "blocks.{layer}." + hook


def _make(w_enc: Tensor, b_enc: Tensor, w_dec: Tensor, b_dec: Tensor, *, w_skip: Tensor | None = None,
          threshold: Tensor | None = None, activation: str | None = None, k: int | None = None) -> Transcoder:
    """A transcoder from tensors already in recallscope's orientation (``w_dec``: ``[n_targets, d_sae, d_out]``)."""
    if activation is None:
        activation = "jumprelu" if threshold is not None else "relu"
    spec = TranscoderSpec(w_enc.shape[0], w_enc.shape[1], w_dec.shape[-1], activation=activation,  # type: ignore[arg-type]
                          k=k if activation == "topk" else None, n_targets=w_dec.shape[0],
                          skip=w_skip is not None)
    tc = Transcoder(spec)
    state = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}
    if w_skip is not None:
        state["W_skip"] = w_skip
    if activation == "jumprelu":
        if threshold is None:
            raise ConfigError("a JumpReLU transcoder needs a threshold tensor; the file has none.")
        state["threshold"] = threshold.reshape(-1)
    tc.load_state_dict({k_: v.contiguous() for k_, v in state.items()}, strict=True)
    return tc


# ------------------------------------------------------------------------------------- circuit-tracer
def load_circuit_tracer(directory: str | os.PathLike, n_layers: int | None = None) -> TranscoderSet:
    """A circuit-tracer transcoder set (per-layer or cross-layer) from a local directory with config.yaml."""
    import yaml

    directory = Path(directory)
    cfg_path = directory / "config.yaml"
    if not cfg_path.is_file():
        raise ResultFileError(f"{directory} has no config.yaml; a circuit-tracer transcoder directory holds "
                              "config.yaml and layer_{i}.safetensors (or W_enc_{i}/W_dec_{i}.safetensors).")
    cfg = yaml.safe_load(cfg_path.read_text())
    kind = cfg.get("model_kind", "transcoder_set")
    info = TranscoderSetInfo(input_hook=_bridge_hook(cfg.get("feature_input_hook", "hook_resid_mid")),
                             output_hook=_bridge_hook(cfg.get("feature_output_hook", "hook_mlp_out")),
                             source="circuit-tracer", extra={"model_name": cfg.get("model_name"), "kind": kind})
    if kind == "cross_layer_transcoder":
        tcs = _circuit_tracer_clt(directory)
    elif kind == "transcoder_set":
        tcs = _circuit_tracer_plt(directory, cfg)
    else:
        raise ConfigError(f"unknown circuit-tracer model_kind {kind!r}; expected transcoder_set or "
                          "cross_layer_transcoder.")
    return TranscoderSet(tcs, n_layers or max(tcs) + 1, info)


def _circuit_tracer_plt(directory: Path, cfg: dict[str, Any]) -> dict[int, Transcoder]:
    if cfg.get("transcoders"):
        paths = {i: Path(p) if Path(p).is_absolute() else directory / p for i, p in enumerate(cfg["transcoders"])}
    else:
        paths = {int(m.group(1)): p for p in directory.glob("layer_*.safetensors")
                 if (m := re.fullmatch(r"layer_(\d+)\.safetensors", p.name))}
    if not paths:
        raise ResultFileError(f"{directory} holds no layer_{{i}}.safetensors files.")
    tcs = {}
    for layer, path in sorted(paths.items()):
        t = _load(path)
        d_sae, d_model = t["b_enc"].shape[0], t["b_dec"].shape[0]
        w_dec = t["W_dec"] if tuple(t["W_dec"].shape) == (d_sae, d_model) else t["W_dec"].T  # older: [d_model, d_sae]
        w_enc = t["W_enc"].T  # stored [d_sae, d_in] (applied with F.linear)
        w_skip = t["W_skip"].T if "W_skip" in t else None
        tcs[layer] = _make(w_enc, t["b_enc"], w_dec[None], t["b_dec"], w_skip=w_skip,
                           threshold=t.get("activation_function.threshold"), activation=cfg.get("activation"),
                           k=cfg.get("k"))
    return tcs


def _circuit_tracer_clt(directory: Path) -> dict[int, Transcoder]:
    n = len(list(directory.glob("W_enc_*.safetensors")))
    if n == 0:
        raise ResultFileError(f"{directory} holds no W_enc_{{i}}.safetensors files.")
    tcs = {}
    for i in range(n):
        enc, dec = _load(directory / f"W_enc_{i}.safetensors"), _load(directory / f"W_dec_{i}.safetensors")
        w_dec = dec[f"W_dec_{i}"]  # [d_sae, n_layers - i, d_model]
        if w_dec.shape[1] != n - i:
            raise ConfigError(f"W_dec_{i} writes to {w_dec.shape[1]} layers, expected {n - i} (n_layers={n}).")
        tcs[i] = _make(enc[f"W_enc_{i}"].T, enc[f"b_enc_{i}"], w_dec.permute(1, 0, 2), enc[f"b_dec_{i}"],
                       threshold=enc.get(f"threshold_{i}"))
    return tcs


# -------------------------------------------------------------------------------------------- SAELens
def _layer_of(hook: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", hook)
    if not m:
        raise ConfigError(f"cannot read a layer from hook name {hook!r} (expected blocks.<layer>....).")
    return int(m.group(1))


def load_saelens(directories: list[str | os.PathLike], n_layers: int) -> TranscoderSet:
    """SAELens transcoders: one directory per layer (``cfg.json`` + ``sae_weights.safetensors``), or one
    ``jumprelu_clt`` directory."""
    tcs, hooks = {}, set()
    for d in map(Path, directories):
        cfg = json.loads((d / "cfg.json").read_text()) if (d / "cfg.json").is_file() else None
        if cfg is None:
            raise ResultFileError(f"{d} has no cfg.json; a SAELens directory holds cfg.json and "
                                  "sae_weights.safetensors.")
        t = _load(d / "sae_weights.safetensors")
        meta = {**cfg.get("metadata", {}), **cfg}
        hook_in, hook_out = meta.get("hook_name"), meta.get("hook_name_out") or meta.get("hook_name")
        arch = cfg.get("architecture", "transcoder")
        if arch == "jumprelu_clt":
            return TranscoderSet(_saelens_clt(t), n_layers, TranscoderSetInfo(
                input_hook=_bridge_hook(hook_in), output_hook=_bridge_hook(hook_out), source="saelens"))
        if "W_dec" not in t or t["W_dec"].shape[-1] != int(cfg.get("d_out", t["W_dec"].shape[-1])):
            raise ConfigError(f"{d} is not a SAELens transcoder (architecture {arch!r}).")
        activation = "jumprelu" if "threshold" in t else ("topk" if "topk" in arch or cfg.get("k") else "relu")
        w_skip = t["W_skip"].T if "W_skip" in t else None
        tcs[_layer_of(hook_in)] = _make(t["W_enc"], t["b_enc"], t["W_dec"][None], t["b_dec"], w_skip=w_skip,
                                        threshold=t.get("threshold"), activation=activation, k=cfg.get("k"))
        hooks.add((_bridge_hook(hook_in), _bridge_hook(hook_out)))
    if len(hooks) != 1:
        raise ConfigError(f"the SAELens transcoders read/write different hooks {sorted(hooks)}; load one set "
                          "per hook pair.")
    hook_in, hook_out = hooks.pop()
    return TranscoderSet(tcs, n_layers, TranscoderSetInfo(input_hook=hook_in, output_hook=hook_out,
                                                          source="saelens"))


def _saelens_clt(t: dict[str, Tensor]) -> dict[int, Transcoder]:
    n = t["W_enc"].shape[0]
    tcs = {}
    for i in range(n):
        if i and bool(t["W_dec"][i, :, :i].abs().max() > 0):
            raise ConfigError(f"CLT layer {i} writes to earlier layers; recallscope's CLTs write forward only.")
        b_in = t["b_in"][i] if "b_in" in t else torch.zeros(t["W_enc"].shape[1])
        b_enc = t["b_enc"][i] - b_in @ t["W_enc"][i]  # (x - b_in) @ W_enc + b_enc
        w_skip = t["W_skip"][i].T if "W_skip" in t else None
        b_dec = t["b_dec"][i] - (b_in @ w_skip if w_skip is not None else 0.0)
        tcs[i] = _make(t["W_enc"][i], b_enc, t["W_dec"][i, :, i:].permute(1, 0, 2), b_dec, w_skip=w_skip,
                       threshold=t["threshold"][i])
    return tcs


# ------------------------------------------------------------------------------------------- sparsify
def load_sparsify(directory: str | os.PathLike, n_layers: int) -> TranscoderSet:
    """sparsify transcoders saved by ``SparseCoder.save_to_disk``: ``directory/layers.{i}.mlp/``."""
    directory = Path(directory)
    tcs = {}
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        m = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.mlp", sub.name)
        if not m:
            continue
        cfg = json.loads((sub / "cfg.json").read_text())
        if not cfg.get("transcode", False):
            raise ConfigError(f"{sub} is a sparsify SAE (transcode=false), not a transcoder.")
        if cfg.get("activation", "topk") != "topk":
            raise ConfigError(f"{sub} uses activation {cfg.get('activation')!r}; only topk is supported.")
        t = _load(sub / "sae.safetensors")
        w_skip = t["W_skip"].T if "W_skip" in t else None
        tcs[int(m.group(1))] = _make(t["encoder.weight"].T, t["encoder.bias"], t["W_dec"][None], t["b_dec"],
                                     w_skip=w_skip, activation="topk", k=int(cfg["k"]))
    if not tcs:
        raise ResultFileError(f"{directory} holds no sparsify transcoders (subdirectories layers.<i>.mlp with "
                              "cfg.json and sae.safetensors).")
    return TranscoderSet(tcs, n_layers, TranscoderSetInfo(input_hook=INPUT_HOOK, output_hook=OUTPUT_HOOK,
                                                          source="sparsify"))


def load_transcoders(path: str | os.PathLike, n_layers: int) -> TranscoderSet:
    """Load a transcoder set from ``path``, detecting the format (recallscope, circuit-tracer, SAELens
    directory of per-layer subdirectories or a CLT directory, sparsify)."""
    path = Path(path)
    if (path / "transcoders.json").is_file():
        return TranscoderSet.load(path)
    if (path / "config.yaml").is_file():
        return load_circuit_tracer(path, n_layers)
    if (path / "cfg.json").is_file():
        return load_saelens([path], n_layers)
    subs = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    if any((p / "sae.safetensors").is_file() for p in subs):
        return load_sparsify(path, n_layers)
    if any((p / "sae_weights.safetensors").is_file() for p in subs):
        return load_saelens([p for p in subs if (p / "cfg.json").is_file()], n_layers)
    raise ResultFileError(f"cannot tell the transcoder format of {path}: expected transcoders.json "
                          "(recallscope), config.yaml (circuit-tracer), cfg.json + sae_weights.safetensors "
                          "(SAELens) or layers.<i>.mlp/sae.safetensors (sparsify).")
