"""Training TopK skip-transcoders on CPU, resumably, from text available offline.

1. Text: :func:`sample_tokens` draws sequences the model generates itself (ancestral sampling from BOS
   with a seeded generator), or the caller passes token ids (e.g. an organism's task prompts).
2. Activations: the model runs once over the text and each layer's transcoder input (``ln2.hook_out``)
   and MLP output (``hook_mlp_out``) are streamed to an on-disk :class:`~.store.ActivationStore`, chunk
   by chunk (resumable); :func:`collect_activations` is the in-memory version for small models.
3. Per layer, :func:`train_transcoder` fits a TopK skip-transcoder (Paulo, Shabalin & Belrose 2025,
   "Transcoders beat sparse autoencoders for interpretability") with Adam on the normalised MSE
   ``|y - y_hat|^2 / |y - mean(y)|^2`` (fraction of variance unexplained). Initialisation: encoder
   Gaussian, decoder 0 (as sparsify does for transcoders), ``b_dec`` = mean output, skip = 0. Mini-batches
   are drawn from a private ``torch.Generator`` seeded by the config.
4. Every ``checkpoint_every`` steps the weights, optimiser, generator state, step and loss history are
   written atomically; a rerun with the same arguments resumes from the checkpoint and ends with the same
   bits as an uninterrupted run (tested).
5. :func:`train_set` does this for every layer (one layer's activations in RAM at a time), saves a
   :class:`TranscoderSet`, and reports explained variance per layer on held-out activations
   (:func:`explained_variance`) and the fraction of dead features.
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from recallscope.errors import ConfigError
from recallscope.features.store import ActivationStore, StoreMeta, collect_to_store, n_rows_of
from recallscope.features.transcoder import (INPUT_HOOK, OUTPUT_HOOK, Transcoder, TranscoderSet,
                                             TranscoderSetInfo, TranscoderSpec)


@dataclass(frozen=True)
class TranscoderTrainConfig:
    """How to train one layer's TopK skip-transcoder."""

    d_sae: int = 256
    """Number of features."""
    k: int = 16
    """Active features per token."""
    skip: bool = True
    """Train a linear skip connection alongside the features."""
    steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 512
    """Activation vectors (tokens) per step."""
    lr: float = 2e-3
    """Adam learning rate (constant after a 5% linear warm-up)."""
    seed: int = 0
    """Seeds the initialisation and the order of mini-batches."""
    checkpoint_every: int = 200
    """Steps between checkpoints (when a checkpoint directory is given)."""

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.d_sae:
            raise ConfigError(f"need 0 < k <= d_sae, got k={self.k}, d_sae={self.d_sae}.")
        if min(self.steps, self.batch_size, self.checkpoint_every) < 1:
            raise ConfigError(f"steps, batch_size and checkpoint_every must be >= 1, got {self}.")


@torch.no_grad()
def sample_tokens(model: Any, n_seqs: int, seq_len: int, *, seed: int = 0, bos_id: int | None = None,
                  temperature: float = 1.0) -> Int[Tensor, "n_seqs seq_len"]:
    """``n_seqs`` sequences of ``seq_len`` tokens that ``model`` samples itself, starting from BOS."""
    if bos_id is None:
        tok = getattr(model, "tokenizer", None)
        bos_id = getattr(tok, "bos_token_id", None) if tok is not None else None
        bos_id = 0 if bos_id is None else int(bos_id)
    n_ctx = int(model.cfg.n_ctx)
    if not 1 < seq_len <= n_ctx:
        raise ConfigError(f"seq_len must be in 2..n_ctx={n_ctx}, got {seq_len}.")
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.full((n_seqs, 1), bos_id, dtype=torch.long)
    for _ in range(seq_len - 1):
        logits = model(seqs, return_type="logits")[:, -1].float()
        probs = (logits / temperature).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        seqs = torch.cat([seqs, nxt], dim=1)
    return seqs


@torch.no_grad()
def collect_activations(model: Any, tokens: Tensor | list[Tensor], layers: list[int], *,
                        input_hook: str = INPUT_HOOK, output_hook: str = OUTPUT_HOOK,
                        batch_size: int = 32, first_pos: int = 0) -> dict[int, tuple[Tensor, Tensor]]:
    """``{layer: (inputs [n_tokens, d_in], outputs [n_tokens, d_out])}`` over positions ``first_pos..`` of
    ``tokens`` (a ``[batch, pos]`` tensor, or a list of them with different lengths). ``first_pos=1`` leaves
    out the BOS position, whose activations are outliers in many models (circuit-tracer's "nobos" sets)."""
    names = {input_hook.format(layer=layer) for layer in layers} | {output_hook.format(layer=layer) for layer in layers}
    chunks: dict[str, list[Tensor]] = {name: [] for name in names}
    for batch in (tokens if isinstance(tokens, list) else [tokens]):
        for start in range(0, batch.shape[0], batch_size):
            _, cache = model.run_with_cache(batch[start:start + batch_size], names_filter=lambda n: n in names)
            for name in names:
                acts = cache[name][:, first_pos:].float()
                chunks[name].append(acts.reshape(-1, acts.shape[-1]).clone())
    return {layer: (torch.cat(chunks[input_hook.format(layer=layer)]),
                    torch.cat(chunks[output_hook.format(layer=layer)])) for layer in layers}


def explained_variance(tc: Transcoder, x: Float[Tensor, "n d_in"], y: Float[Tensor, "n d_out"]) -> float:
    """``1 - |y - tc(x)|^2 / |y - mean(y)|^2`` over all tokens."""
    with torch.no_grad():
        err = (y - tc(x)).pow(2).sum()
        var = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
    return float(1 - err / var)


def _init(tc: Transcoder, y: Tensor, gen: torch.Generator) -> None:
    d_in, d_sae = tc.W_enc.shape
    with torch.no_grad():
        tc.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in ** 0.5)
        tc.W_dec.zero_()  # as sparsify's transcoders: the first steps fit the decoder to the encoder
        tc.b_dec.copy_(y.mean(0))


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_transcoder(x: Float[Tensor, "n d_in"], y: Float[Tensor, "n d_out"], cfg: TranscoderTrainConfig, *,
                     checkpoint: str | os.PathLike | None = None, stop_after: int | None = None,
                     progress: bool = True, desc: str = "transcoder") -> tuple[Transcoder, list[float]]:
    """Fit a TopK (skip-)transcoder mapping ``x`` to ``y``; returns it and the loss (FVU) per step.

    ``checkpoint``: a file to checkpoint to and resume from. ``stop_after``: return after this many steps
    of this call (the checkpoint stays, so a later call resumes): a time box for long runs.
    """
    spec = TranscoderSpec(x.shape[1], cfg.d_sae, y.shape[1], activation="topk", k=cfg.k, skip=cfg.skip)
    gen = torch.Generator().manual_seed(cfg.seed)
    tc = Transcoder(spec)
    _init(tc, y.cpu(), gen)
    tc = tc.to(x.device)
    opt = torch.optim.Adam(tc.parameters(), lr=cfg.lr, foreach=False)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    step, history = 0, []
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != asdict(cfg):
            raise ConfigError(f"checkpoint {ckpt} was written with a different config {state['config']}; "
                              "delete it or train with the same settings.")
        tc.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        step, history = state["step"], state["history"]
    var = (y - y.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    start = step
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=not progress, leave=False)
    while step < cfg.steps and (stop_after is None or step - start < stop_after):
        idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=gen).to(x.device)
        loss = (y[idx] - tc(x[idx])).pow(2).sum(-1).mean() / var
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        history.append(float(loss.detach()))
        bar.update(1)
        if ckpt is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            _save_checkpoint(ckpt, {"config": asdict(cfg), "model": tc.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "generator": gen.get_state(),
                                    "step": step, "history": history})
    bar.close()
    return tc, history


@dataclass(frozen=True)
class SetReport:
    """What :func:`train_set` measured: explained variance and dead features per layer (held out)."""

    explained_variance: dict[int, float]
    dead_fraction: dict[int, float]
    n_train_tokens: int
    n_eval_tokens: int


def split_heldout(tokens: Tensor | list[Tensor], eval_fraction: float) -> tuple[list[Tensor], list[Tensor]]:
    """(train, held-out) parts: the first ``eval_fraction`` of the rows of each token batch is held out."""
    train, held = [], []
    for batch in (tokens if isinstance(tokens, list) else [tokens]):
        n_eval = max(1, int(round(batch.shape[0] * eval_fraction)))
        if n_eval >= batch.shape[0]:
            raise ConfigError(f"need more than {n_eval} sequences to hold {eval_fraction:.0%} out for evaluation.")
        held.append(batch[:n_eval])
        train.append(batch[n_eval:])
    return train, held


def dead_fraction(tc: Transcoder, x: Float[Tensor, "n d_in"], *, chunk: int = 4096) -> float:
    """Fraction of features that never fire on ``x``."""
    fired = torch.zeros(tc.spec.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            fired |= (tc.encode(x[start:start + chunk]) > 0).any(0).cpu()
    return float((~fired).float().mean())


def _store_meta(model: Any, tokens: Tensor | list[Tensor], layers: list[int], first_pos: int, dtype: str,
                source: dict[str, Any]) -> StoreMeta:
    d_model = int(model.cfg.d_model)
    return StoreMeta(tuple(layers), n_rows_of(tokens, first_pos), d_model, d_model, dtype=dtype,
                     first_pos=first_pos, source=source)


def _train_layer(layer: int, stores: tuple[ActivationStore, ...] | None, cfg: TranscoderTrainConfig,
                 ckpt_dir: Path, progress: bool) -> tuple[Transcoder, dict[str, float]]:
    """Train (or resume, or reload when finished) one layer; its metrics are saved beside the checkpoint."""
    metrics_path = ckpt_dir / f"layer{layer}.json"
    ckpt = ckpt_dir / f"layer{layer}.pt"
    if metrics_path.is_file() and ckpt.is_file():  # finished in an earlier run: no activations needed
        tc = _load_finished(ckpt, cfg)
        return tc, json.loads(metrics_path.read_text())
    if stores is None:
        raise ConfigError(f"layer {layer} has metrics but no checkpoint in {ckpt_dir}; delete {metrics_path}.")
    train_store, held_store = stores
    x, y = train_store.layer(layer)
    tc, _ = train_transcoder(x, y, cfg, checkpoint=ckpt, progress=progress, desc=f"layer {layer}")
    hx, hy = held_store.layer(layer)
    metrics = {"explained_variance": explained_variance(tc, hx, hy),
               "dead_fraction": dead_fraction(tc, x[: 1 << 15])}
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics) + "\n")
    os.replace(tmp, metrics_path)
    return tc, metrics


def _load_finished(ckpt: Path, cfg: TranscoderTrainConfig) -> Transcoder:
    state = torch.load(ckpt, weights_only=False)
    if state["config"] != asdict(cfg) or state["step"] != cfg.steps:
        raise ConfigError(f"checkpoint {ckpt} was written with another config or is unfinished; delete it or "
                          "train with the same settings.")
    w = state["model"]
    spec = TranscoderSpec(w["W_enc"].shape[0], cfg.d_sae, w["b_dec"].shape[0], activation="topk", k=cfg.k,
                          skip=cfg.skip)
    tc = Transcoder(spec)
    tc.load_state_dict(w)
    return tc


def train_set(model: Any, tokens: Tensor | list[Tensor], cfg: TranscoderTrainConfig,
              out_dir: str | os.PathLike, *, layers: list[int] | None = None, eval_fraction: float = 0.1,
              held_tokens: Tensor | list[Tensor] | None = None, first_pos: int = 0, progress: bool = True,
              store_dir: str | os.PathLike | None = None, store_dtype: str = "float32",
              source: dict[str, Any] | None = None, collect_batch_size: int = 32,
              keep_activations: bool = False) -> tuple[TranscoderSet, SetReport]:
    """Train one transcoder per layer, resumably, streaming activations through an on-disk store.

    1. Held-out text: ``held_tokens``, else the first ``eval_fraction`` of the rows of each batch.
    2. Activations of every layer are collected once into two :class:`ActivationStore` s
       (``store_dir/train`` and ``store_dir/heldout``; default ``out_dir/activations``), chunk by chunk.
    3. Layers are trained one at a time (only that layer's activations in RAM); checkpoints and per-layer
       metrics live in ``out_dir/checkpoints/``. A rerun resumes: finished chunks, layers and steps are
       not redone, and the weights are those of an uninterrupted run (tested).
    4. The set is saved to ``out_dir`` with ``report.json``; the stores are deleted unless
       ``keep_activations``. ``first_pos=1`` trains and evaluates without the BOS position (graphs and
       the replacement model then leave that position to the real MLP / error nodes).
    """
    import shutil

    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers)) if layers is None else layers
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise ConfigError(f"layers {bad or layers} do not exist in a {n_layers}-layer model; use 0..{n_layers - 1}.")
    train_parts, eval_parts = (tokens, held_tokens) if held_tokens is not None else split_heldout(tokens, eval_fraction)
    out = Path(out_dir)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    sdir = Path(store_dir) if store_dir is not None else out / "activations"
    source = {"model": str(getattr(model.cfg, "model_name", "")), **(source or {})}
    stores: tuple[ActivationStore, ...] | None = None
    if not all((ckpt_dir / f"layer{layer}.json").is_file() for layer in layers):  # else: every layer is done
        stores = tuple(ActivationStore.create(sdir / part, _store_meta(model, toks, layers, first_pos, store_dtype,
                                                                       {**source, "part": part}))
                       for part, toks in (("train", train_parts), ("heldout", eval_parts)))
        for store, toks in zip(stores, (train_parts, eval_parts)):
            collect_to_store(model, toks, store, batch_size=collect_batch_size, progress=progress,
                             desc=f"activations ({store.directory.name})")
    tcs, ev, dead = {}, {}, {}
    for layer in tqdm(layers, desc="layers", disable=not progress):
        tcs[layer], metrics = _train_layer(layer, stores, cfg, ckpt_dir, progress)
        ev[layer], dead[layer] = metrics["explained_variance"], metrics["dead_fraction"]
    info = TranscoderSetInfo(source="recallscope", first_pos=first_pos,
                             extra={"train": asdict(cfg), "first_pos": first_pos, "data": source})
    tset = TranscoderSet(tcs, n_layers, info)
    tset.save(out)
    report = SetReport(ev, dead, n_rows_of(train_parts, first_pos), n_rows_of(eval_parts, first_pos))
    (out / "report.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
    if not keep_activations:
        shutil.rmtree(sdir, ignore_errors=True)
    return tset, report
