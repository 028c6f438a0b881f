"""Activation patching over layers, positions and heads (Meng et al. 2022; Wang et al. 2022).

1. Tokenise clean/corrupt pairs (equal lengths checked) and bind the metric to their answers.
2. Pick the target run (patched into) and the source run (patched from): denoising patches clean
   activations into the corrupted run, noising corrupted (or zero / mean) activations into the clean run.
3. Build one cell per (layer [window], head, position) and evaluate all cells with the sweep engine
   (:mod:`recallscope.patching.engine`), which is exact but skips the work a cell cannot change, or,
   on models whose fast adapter fails its self-check (:mod:`recallscope.models.selfcheck`) or with
   ``engine="hooks"``, with the hook engine (:mod:`recallscope.patching.hook_engine`).
4. Return a :class:`~recallscope.results.PatchingResult` with per-prompt values and both baselines.

With ``checkpoint_dir``, finished engine chunks are checkpointed there (:mod:`recallscope.store`), keyed
by the manifest (model weights, prompts, config) and the answers; rerunning resumes.
"""

import os
import time
from dataclasses import asdict, dataclass
from collections.abc import Sequence
from typing import Any

from jaxtyping import Int
from torch import Tensor

from recallscope import metrics as M
from recallscope.errors import ConfigError, LengthMismatchError
from recallscope.manifest import build_manifest
from recallscope.models.selfcheck import Engine, manifest_entry, resolve_engine
from recallscope.models.stack import build_stack
from recallscope.patching import hook_engine as H
from recallscope.patching.engine import Cell, sweep
from recallscope.patching.traces import constant_trace, reference_run
from recallscope.results import PatchingResult
from recallscope.sites import Site, layer_window, n_heads_for
from recallscope.store import ChunkStore, open_store
from recallscope.tasks.pairs import PromptPair, TokenizedPairs, check_counterfactual, tokenize_pairs
from recallscope.vocab import Component, Corruption, Direction


@dataclass(frozen=True)
class PatchingConfig:
    """Configuration of an activation-patching sweep."""

    component: Component = Component.RESID_PRE
    """What to patch."""
    per_position: bool = True
    """One cell per position (True) or one cell covering every position (False)."""
    per_head: bool = True
    """For per-head components (z, q, k, v, pattern): one cell per head; ignored otherwise."""
    window: int = 1
    """Patch this many consecutive layers around each layer together (ROME uses 10)."""
    direction: Direction = Direction.DENOISING
    """Denoising (clean into corrupt) or noising (corrupt into clean)."""
    corruption: Corruption = Corruption.RESAMPLE
    """Where the patched-in values come from when noising: the corrupt prompt, zeros or the mean."""
    layers: tuple[int, ...] | None = None
    """Layers to sweep (default: all)."""
    positions: tuple[int, ...] | None = None
    """Positions to sweep (default: all)."""
    memory_budget_mb: float = 1024.0
    """Activation memory per engine chunk."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("component", "direction", "corruption"):
            d[k] = d[k].value
        return d


def make_cells(cfg: PatchingConfig, model_cfg: Any, n_pos: int) -> tuple[list[Cell], tuple[str, ...], tuple[int, ...]]:
    """The cells of a sweep, the axis names and the axis sizes (cells in row-major order)."""
    comp = cfg.component
    n_layers = int(model_cfg.n_layers)
    layers = list(cfg.layers) if cfg.layers is not None else list(range(n_layers))
    positions: list[int | None] = list(cfg.positions) if cfg.positions is not None else list(range(n_pos))
    if not cfg.per_position:
        positions = [None]
    heads: list[int | None] = [None]
    if comp.per_head and cfg.per_head:
        heads = list(range(n_heads_for(comp, model_cfg)))
    for layer in layers:
        for pos in positions:
            Site(comp, layer, pos).validate(model_cfg, n_pos)
    cells = []
    for layer in layers:
        for head in heads:
            for pos in positions:
                window = layer_window(comp, layer, cfg.window, n_layers, pos=pos)
                cells.append(Cell(tuple(Site(comp, s.layer, pos, head) for s in window)))
    axes = ("layer",) + (("head",) if heads != [None] else ()) + (("pos",) if positions != [None] else ())
    sizes = (len(layers),) + ((len(heads),) if heads != [None] else ()) + ((len(positions),) if positions != [None] else ())
    return cells, axes, sizes


def _check_sources(config: PatchingConfig) -> None:
    if config.direction == Direction.DENOISING and config.corruption != Corruption.RESAMPLE:
        raise ConfigError("denoising patches clean activations into a corrupted run, which needs "
                          "corruption=RESAMPLE (a counterfactual prompt); use direction=NOISING for "
                          "zero or mean ablation.")
    if config.corruption not in (Corruption.RESAMPLE, Corruption.ZERO, Corruption.MEAN):
        raise ConfigError("Gaussian-noise corruption is ROME's causal trace: use "
                          "recallscope.patching.causal_trace.")


def _patch_tokens_hooks(model: Any, clean: Tensor, corrupt: Tensor, metric: Any, config: PatchingConfig, *,
                        progress: bool, store: ChunkStore | None) -> tuple[Tensor, Tensor, Tensor, tuple[str, ...]]:
    """:func:`patch_tokens` on the hook engine (:mod:`recallscope.patching.hook_engine`)."""
    n_pos = clean.shape[1]
    read = metric.read_positions(n_pos)
    cells, axes, sizes = make_cells(config, model.cfg, n_pos)
    names = {s.hook_name for c in cells for s in c.sites}
    clean_logits, clean_acts = H.record(model, clean, names, read)
    corrupt_logits, corrupt_acts = H.record(model, corrupt, names, read)
    if config.direction == Direction.DENOISING:
        tokens, source = corrupt, clean_acts
    elif config.corruption == Corruption.RESAMPLE:
        tokens, source = clean, corrupt_acts
    else:
        tokens, source = clean, H.constant_acts(clean_acts, config.corruption.value)
    values = H.hook_sweep(model, cells, tokens, source, metric, read_pos=read,
                          memory_budget_mb=config.memory_budget_mb, progress=progress,
                          desc=f"patching {config.component.value} (hooks)", store=store)
    values = values.T.reshape(clean.shape[0], *sizes)
    return values, metric(clean_logits), metric(corrupt_logits), axes


def patch_tokens(
    model: Any,
    clean: Int[Tensor, "batch pos"],
    corrupt: Int[Tensor, "batch pos"],
    metric: Any,
    config: PatchingConfig = PatchingConfig(),
    *,
    progress: bool = True,
    store: ChunkStore | None = None,
    engine: Engine = "auto",
) -> tuple[Tensor, Tensor, Tensor, tuple[str, ...]]:
    """Token-level sweep. Returns (values [batch, *axes], clean metric [batch], corrupt metric [batch], axes).

    ``store``: checkpoint engine chunks there (see :func:`recallscope.store.open_store`). ``engine``:
    ``"auto"`` (fast when the model passes its self-check, else hooks), ``"fast"`` or ``"hooks"``.
    """
    if clean.shape != corrupt.shape:
        raise LengthMismatchError(f"clean tokens {tuple(clean.shape)} and corrupt tokens {tuple(corrupt.shape)} "
                                  "differ in shape; position-wise patching needs equal lengths.")
    _check_sources(config)
    if resolve_engine(model, engine) == "hooks":
        return _patch_tokens_hooks(model, clean, corrupt, metric, config, progress=progress, store=store)
    stack = build_stack(model)
    n_pos = clean.shape[1]
    read = metric.read_positions(n_pos)
    point = config.component.value
    clean_logits, clean_trace = reference_run(stack, clean, [point], read)
    corrupt_logits, corrupt_trace = reference_run(stack, corrupt, [point], read)
    if config.direction == Direction.DENOISING:
        target, target_logits, source = corrupt_trace, corrupt_logits, clean_trace
    else:
        target, target_logits = clean_trace, clean_logits
        if config.corruption == Corruption.RESAMPLE:
            source = corrupt_trace
        else:
            source = constant_trace(clean_trace, [point], config.corruption.value)
    cells, axes, sizes = make_cells(config, model.cfg, n_pos)
    values = sweep(stack, cells, target, source, metric, target_logits=target_logits, read_pos=read,
                   memory_budget_mb=config.memory_budget_mb, progress=progress,
                   desc=f"patching {point}", store=store)
    values = values.T.reshape(clean.shape[0], *sizes)
    return values, metric(clean_logits), metric(corrupt_logits), axes


def activation_patching(
    model: Any,
    pairs: Sequence[PromptPair] | TokenizedPairs,
    metric: Any = "logit_diff",
    *,
    component: Component | str = Component.RESID_PRE,
    per_position: bool = True,
    per_head: bool = True,
    window: int = 1,
    direction: Direction | str = Direction.DENOISING,
    corruption: Corruption | str = Corruption.RESAMPLE,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    memory_budget_mb: float = 1024.0,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    engine: Engine = "auto",
) -> PatchingResult:
    """Patch ``component`` at every (layer, [head], position) cell and measure ``metric``.

    ``metric`` is a name (``"logit_diff"``, ``"logprob"``, ``"prob"``, ``"rank"``) bound to the pairs'
    answers, or a metric object from :mod:`recallscope.metrics`. All pairs must share one token length
    (use :func:`recallscope.tasks.pairs.group_by_length` for mixed datasets). ``checkpoint_dir``:
    checkpoint finished chunks there; the same call resumes from them after an interruption.
    ``engine``: ``"auto"`` runs the fast engine when the model passes its self-check
    (:mod:`recallscope.models.selfcheck`) and the hook engine otherwise (with a warning); ``"fast"`` or
    ``"hooks"`` force one. The engine that ran is ``result.config["engine"]``.
    """
    t0 = time.perf_counter()
    ran = resolve_engine(model, engine)
    tp = pairs if isinstance(pairs, TokenizedPairs) else tokenize_pairs(model, pairs)
    metric_obj = M.resolve(metric, tp, method="activation_patching")
    if Corruption(corruption) == Corruption.RESAMPLE:
        check_counterfactual(tp)
    if positions is not None:  # negative positions count from the end, as in Python
        positions = [int(p) + tp.n_pos if int(p) < 0 else int(p) for p in positions]
    config = PatchingConfig(Component(component), per_position, per_head, window, Direction(direction),
                            Corruption(corruption), tuple(layers) if layers is not None else None,
                            tuple(positions) if positions is not None else None, memory_budget_mb)
    cfg_dict = {**config.to_dict(), "metric": getattr(metric_obj, "name", str(metric)), "method": "activation_patching",
                "engine": ran}
    manifest = build_manifest(model, [p.clean for p in tp.pairs] + [p.corrupt for p in tp.pairs], cfg_dict)
    store = open_store(checkpoint_dir, manifest, inputs={"answer": tp.answer, "wrong": tp.wrong, "metric": metric_obj})
    values, clean_m, corrupt_m, axes = patch_tokens(model, tp.clean, tp.corrupt, metric_obj, config,
                                                    progress=progress, store=store, engine=ran)
    labels = {"layer": [str(layer) for layer in (config.layers or range(model.cfg.n_layers))]}
    if "pos" in axes:
        toks = model.tokenizer.convert_ids_to_tokens(tp.clean[0].tolist())
        pos_list = config.positions or range(tp.n_pos)
        labels["pos"] = [f"{toks[p]}·{p}" for p in pos_list]
    if "head" in axes:
        labels["head"] = [str(h) for h in range(values.shape[1 + axes.index("head")])]
    manifest.update(timings_s={"total": time.perf_counter() - t0}, **store.manifest_entry(),
                    **manifest_entry(model))
    return PatchingResult(values=values, axes=axes, clean=clean_m.float(), corrupt=corrupt_m.float(),
                          labels=labels, config=cfg_dict, manifest=manifest)
