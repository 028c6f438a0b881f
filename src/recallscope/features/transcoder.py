"""Transcoders: sparse, wide replacements for a model's MLPs, one per layer (PLT) or cross-layer (CLT).

A transcoder at layer ``l`` reads the MLP's input ``x`` and predicts the MLP's output ``y``:

1. pre-activations ``pre = x @ W_enc + b_enc`` (``W_enc``: ``[d_in, d_sae]``);
2. activations ``a = act(pre)``: TopK (keep the ``k`` largest, then ReLU), ReLU, or JumpReLU
   (``pre * (pre > threshold)``);
3. output at each target layer ``l + j``: ``a @ W_dec[j] + b_dec`` (plus ``x @ W_skip`` for a skip
   transcoder, Gao et al. / Paulo et al. 2025 "Transcoders beat sparse autoencoders"). A per-layer
   transcoder (PLT) has one target (``W_dec``: ``[1, d_sae, d_out]``); a cross-layer transcoder (CLT,
   Ameisen et al. 2025 "Circuit tracing") writes from layer ``l`` to layers ``l .. l + n_targets - 1``,
   and the MLP output at layer ``m`` is the sum over all source layers that reach ``m``.

Input convention (recallscope's own transcoders): ``x`` is the MLP's own input, i.e. the output of the
second LayerNorm (hook ``blocks.{l}.ln2.hook_out``), so a ReLU MLP is exactly a transcoder with
``W_enc = W_in``, ``W_dec = W_out`` (see :func:`mlp_as_transcoder`). Loaded transcoders keep the hooks
of their format (circuit-tracer's Llama set reads ``hook_resid_mid``, Gemma Scope ``ln2.hook_normalized``).
The output is always written at the MLP output (``blocks.{l}.hook_mlp_out``).

:class:`TranscoderSet` holds the transcoders of a model by layer; layers without one are allowed (they
become error nodes in an attribution graph). ``save``/``load`` use recallscope's own format: one
``transcoders.safetensors`` (keys ``layer{l}.W_enc`` ...) and ``transcoders.json``.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn

from recallscope.errors import ConfigError, ResultFileError

Activation = Literal["topk", "relu", "jumprelu"]
INPUT_HOOK = "blocks.{layer}.ln2.hook_out"
OUTPUT_HOOK = "blocks.{layer}.hook_mlp_out"


@dataclass(frozen=True)
class TranscoderSpec:
    """Shape and activation of one layer's transcoder."""

    d_in: int
    """Width of the input (the residual width for MLP transcoders)."""
    d_sae: int
    """Number of features."""
    d_out: int
    """Width of the output (the residual width)."""
    activation: Activation = "topk"
    """``topk`` (TopK then ReLU), ``relu`` or ``jumprelu`` (per-feature threshold)."""
    k: int | None = None
    """Active features per token for ``topk`` (required there, unused otherwise)."""
    n_targets: int = 1
    """Layers written to: 1 for a per-layer transcoder, more for a cross-layer one."""
    skip: bool = False
    """Whether the transcoder has a linear skip connection ``x @ W_skip``."""

    def __post_init__(self) -> None:
        if self.activation not in ("topk", "relu", "jumprelu"):
            raise ConfigError(f"unknown transcoder activation {self.activation!r}; use topk, relu or jumprelu.")
        if self.activation == "topk" and not (self.k and 0 < self.k <= self.d_sae):
            raise ConfigError(f"a topk transcoder needs 0 < k <= d_sae={self.d_sae}, got k={self.k}.")
        if min(self.d_in, self.d_sae, self.d_out, self.n_targets) < 1:
            raise ConfigError(f"transcoder sizes must be positive, got {self}.")


class Transcoder(nn.Module):
    """One source layer's transcoder (see the module docstring for the maths)."""

    def __init__(self, spec: TranscoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.W_enc = nn.Parameter(torch.zeros(spec.d_in, spec.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(spec.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(spec.n_targets, spec.d_sae, spec.d_out))
        self.b_dec = nn.Parameter(torch.zeros(spec.d_out))
        self.W_skip = nn.Parameter(torch.zeros(spec.d_in, spec.d_out)) if spec.skip else None
        self.threshold = nn.Parameter(torch.zeros(spec.d_sae)) if spec.activation == "jumprelu" else None

    def pre_acts(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """Encoder pre-activations ``x @ W_enc + b_enc``."""
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_sae"]:
        """Feature activations from pre-activations."""
        if self.spec.activation == "relu":
            return torch.relu(pre)
        if self.spec.activation == "jumprelu":
            return pre * (pre > self.threshold)
        values, idx = pre.topk(int(self.spec.k), dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        return self.activate(self.pre_acts(x))

    def decode(self, acts: Float[Tensor, "*batch d_sae"], target: int = 0) -> Float[Tensor, "*batch d_out"]:
        """The features' contribution to target layer ``layer + target`` (no bias, no skip)."""
        return acts @ self.W_dec[target]

    def skip_out(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        """The skip connection plus the decoder bias (the part of the output that is not features)."""
        out = x @ self.W_skip if self.W_skip is not None else torch.zeros(
            *x.shape[:-1], self.spec.d_out, dtype=x.dtype, device=x.device)
        return out + self.b_dec

    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
        """Per-layer reconstruction of this layer's MLP output (target 0 only)."""
        return self.decode(self.encode(x)) + self.skip_out(x)


@dataclass(frozen=True)
class TranscoderSetInfo:
    """Where a set's transcoders read and write, and where they came from."""

    input_hook: str = INPUT_HOOK
    """Hook name template (``{layer}``) of the transcoder input."""
    output_hook: str = OUTPUT_HOOK
    """Hook name template of the MLP output the transcoders replace."""
    source: str = "recallscope"
    """Format or origin: ``recallscope``, ``circuit-tracer``, ``saelens``, ``sparsify``, ``mlp-exact``."""
    first_pos: int = 0
    """Positions before this one (the BOS position, for sets trained without it) have no features: their
    MLP output stays the real one (an error node in attribution graphs)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (training config, metrics, model name)."""


class TranscoderSet(nn.Module):
    """Transcoders by source layer for a model with ``n_layers`` layers (missing layers allowed)."""

    def __init__(self, transcoders: dict[int, Transcoder], n_layers: int,
                 info: TranscoderSetInfo | None = None) -> None:
        super().__init__()
        bad = [layer for layer in transcoders if not 0 <= layer < n_layers]
        if bad:
            raise ConfigError(f"transcoders for layers {bad} do not exist in a {n_layers}-layer model.")
        for layer, tc in transcoders.items():
            if layer + tc.spec.n_targets > n_layers:
                raise ConfigError(f"the layer-{layer} transcoder writes to {tc.spec.n_targets} layers, past the "
                                  f"last layer {n_layers - 1}.")
        self.n_layers = n_layers
        self.info = info or TranscoderSetInfo()
        self.by_layer = nn.ModuleDict({str(k): v for k, v in sorted(transcoders.items())})

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.by_layer)

    def __getitem__(self, layer: int) -> Transcoder:
        return self.by_layer[str(layer)]

    def __contains__(self, layer: int) -> bool:
        return str(layer) in self.by_layer

    def input_hook(self, layer: int) -> str:
        return self.info.input_hook.format(layer=layer)

    def output_hook(self, layer: int) -> str:
        return self.info.output_hook.format(layer=layer)

    def check_model(self, model: Any) -> None:
        """Raise a clear error when this set cannot run on ``model`` (layer count, hook names, widths)."""
        n_layers, hooks = int(model.cfg.n_layers), getattr(model, "hook_dict", {})
        if self.n_layers != n_layers:
            raise ConfigError(f"the transcoder set is for a {self.n_layers}-layer model, this model has {n_layers} "
                              "layers; load the transcoders trained for this model.")
        for layer in self.layers:
            for hook in (self.input_hook(layer), self.output_hook(layer)):
                if hooks and hook not in hooks:
                    raise ConfigError(f"the model has no hook {hook!r} (from the transcoder set's "
                                      f"{self.info.source} hook names); pass a TranscoderSetInfo with this "
                                      "model's hook names.")
            d_model = int(model.cfg.d_model)
            spec = self[layer].spec
            if spec.d_in != d_model or spec.d_out != d_model:
                raise ConfigError(f"the layer-{layer} transcoder maps {spec.d_in} -> {spec.d_out} dimensions, the "
                                  f"model's residual stream has {d_model}; these transcoders are for another model.")

    def activations(self, layer: int, x: Float[Tensor, "*batch pos d_in"]) -> Float[Tensor, "*batch pos d_sae"]:
        """Feature activations of the layer-``layer`` transcoder, zero at positions before ``first_pos``."""
        acts = self[layer].encode(x)
        if self.info.first_pos > 0:
            acts = acts.clone()
            acts[..., : self.info.first_pos, :] = 0.0
        return acts

    def writers(self, layer: int) -> list[tuple[int, int]]:
        """``(source_layer, target_index)`` pairs of the transcoders that write to ``layer``."""
        return [(src, layer - src) for src in self.layers if 0 <= layer - src < self[src].spec.n_targets]

    def output(self, layer: int, inputs: dict[int, Tensor], acts: dict[int, Tensor]) -> Tensor:
        """Reconstructed MLP output at ``layer`` from the inputs and activations of earlier layers."""
        out = self[layer].skip_out(inputs[layer])
        for src, j in self.writers(layer):
            out = out + self[src].decode(acts[src], j)
        return out

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``transcoders.safetensors`` + ``transcoders.json`` into ``directory``."""
        from safetensors.torch import save_file

        from recallscope.manifest import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"layer{layer}.{name}": p.detach().contiguous().cpu()
                   for layer in self.layers for name, p in self[layer].named_parameters()}
        save_file(tensors, str(directory / "transcoders.safetensors"))
        meta = {"format": "recallscope-transcoders/1", "n_layers": self.n_layers, "info": asdict(self.info),
                "specs": {str(layer): asdict(self[layer].spec) for layer in self.layers}}
        atomic_write_text(directory / "transcoders.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TranscoderSet":
        """Read a set written by :meth:`save`."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path, weights = directory / "transcoders.json", directory / "transcoders.safetensors"
        if not (meta_path.is_file() and weights.is_file()):
            raise ResultFileError(f"{directory} holds no recallscope transcoder set (transcoders.json and "
                                  "transcoders.safetensors); train one with recallscope.features.train, or "
                                  "load another format with recallscope.features.formats.load_transcoders.")
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(weights))
        tcs = {}
        for key, spec in meta["specs"].items():
            tc = Transcoder(TranscoderSpec(**spec))
            state = {name: tensors[f"layer{key}.{name}"] for name, _ in tc.named_parameters()}
            tc.load_state_dict(state, strict=True)
            tcs[int(key)] = tc
        return cls(tcs, int(meta["n_layers"]), TranscoderSetInfo(**meta["info"]))


def mlp_as_transcoder(model: Any, layer: int) -> Transcoder:
    """The exact transcoder of a ReLU MLP: one feature per neuron (``W_enc = W_in``, ``W_dec = W_out``).

    Its output equals the MLP's output exactly (TopK with ``k = d_mlp`` is ReLU), so a replacement model
    built from these equals the real model: the oracle for the replacement and attribution-graph code.
    """
    if str(getattr(model.cfg, "act_fn", "")) != "relu" or getattr(model.cfg, "gated_mlp", False):
        raise ConfigError(f"mlp_as_transcoder needs a non-gated ReLU MLP, the model has act_fn="
                          f"{getattr(model.cfg, 'act_fn', None)!r}; train a transcoder instead.")
    mlp = model.blocks[layer].mlp
    w_in, w_out = mlp.W_in.detach(), mlp.W_out.detach()  # [d_model, d_mlp], [d_mlp, d_model]
    d_model, d_mlp = w_in.shape
    tc = Transcoder(TranscoderSpec(d_model, d_mlp, d_model, activation="topk", k=d_mlp))
    with torch.no_grad():
        tc.W_enc.copy_(w_in)
        tc.b_enc.copy_(mlp.b_in.detach())
        tc.W_dec.copy_(w_out[None])
        tc.b_dec.copy_(mlp.b_out.detach())
    return tc


def exact_mlp_transcoders(model: Any) -> TranscoderSet:
    """:func:`mlp_as_transcoder` for every layer of a ReLU-MLP model."""
    n = int(model.cfg.n_layers)
    return TranscoderSet({layer: mlp_as_transcoder(model, layer) for layer in range(n)}, n,
                         TranscoderSetInfo(source="mlp-exact"))


def feature_activations(model: Any, tset: TranscoderSet, tokens: Tensor, layers: Any) -> dict[int, Tensor]:
    """Feature activations ``[batch, pos, d_sae]`` of each of ``layers`` on ``tokens`` (``[batch, pos]``), read
    from one cached forward through :meth:`TranscoderSet.activations` (so none before the set's ``first_pos``)."""
    hooks = {tset.input_hook(layer): layer for layer in layers}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks)
    return {layer: tset.activations(layer, cache[name].float()) for name, layer in hooks.items()}
