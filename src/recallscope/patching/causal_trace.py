"""ROME-style causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

1. Corrupt the subject: add Gaussian noise to the embeddings of the subject tokens, scaled to
   ``noise_scale`` times the standard deviation of the model's token-embedding matrix (ROME: 3 sigma),
   drawing ``n_samples`` noise samples per prompt from an explicitly seeded generator.
2. Restore one clean state per (layer, token): the residual stream (``resid_post``), or the MLP /
   attention output over a window of ``window`` layers around the layer (ROME: 10).
3. Measure p(answer) in the restored run; average over noise samples. The indirect effect of a state
   is p(restored) - p(corrupted); the total effect is p(clean) - p(corrupted).
4. Over a dataset, positions are mapped to ROME's token categories (first / middle / last subject
   token, first subsequent token, further tokens, last token) and averaged per prompt, so prompts
   of different lengths can be pooled with bootstrap confidence intervals.

Every restoration is evaluated by the exact sweep engine (:mod:`recallscope.patching.engine`), or by
the hook engine (:mod:`recallscope.patching.hook_engine`: noise added at ``hook_embed``) on models whose
fast adapter fails its self-check or with ``engine="hooks"``; with ``checkpoint_dir`` finished chunks
are checkpointed (:mod:`recallscope.store`) and a rerun resumes.
"""

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope import metrics as M
from recallscope.errors import ConfigError, EmptyDatasetError
from recallscope.manifest import build_manifest
from recallscope.models.selfcheck import Engine, manifest_entry, resolve_engine
from recallscope.models.stack import build_stack, embedding_output_scale
from recallscope.patching import hook_engine as H
from recallscope.patching.engine import Cell, sweep
from recallscope.patching.traces import reference_run
from recallscope.results import PatchingResult
from recallscope.sites import Site, layer_window
from recallscope.store import ChunkStore, open_store
from recallscope.tasks.pairs import PromptPair, group_by_length, single_token_id, to_tokens
from recallscope.vocab import Component

CATEGORIES = ("subject_first", "subject_middle", "subject_last", "after_subject_first", "after_subject_rest",
              "last")


TRACE_METRICS = ("prob", "logprob")
"""The metric names :func:`causal_trace` takes."""


@dataclass(frozen=True)
class TraceConfig:
    """Configuration of a causal trace."""

    component: Component = Component.RESID_POST
    """State restored: resid_post (ROME's hidden state), mlp_out or attn_out."""
    window: int = 1
    """Layers restored together around each layer (ROME uses 10 for MLP and attention)."""
    noise_scale: float = 3.0
    """Noise std in units of the token-embedding std."""
    n_samples: int = 10
    """Noise samples per prompt."""
    seed: int = 0
    """Seed of the noise generator."""
    layers: tuple[int, ...] | None = None
    """Layers to restore (default: all)."""
    memory_budget_mb: float = 1024.0
    metric: str = "prob"
    """What restoration restores: 'prob' (ROME's p(answer)) or 'logprob' (names from recallscope.metrics)."""

    def __post_init__(self) -> None:
        if not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise ConfigError(f"causal_trace needs n_samples >= 1 noise samples per prompt, got {self.n_samples!r}; "
                              "ROME uses 10.")
        if not isinstance(self.metric, str):
            raise ConfigError(f"causal_trace takes a metric name ({', '.join(map(repr, TRACE_METRICS))}), not "
                              f"{type(self.metric).__name__}: it binds each prompt length's answers itself.")
        M.resolve(self.metric, torch.zeros(0, dtype=torch.long), allowed=TRACE_METRICS, method="causal_trace")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["component"] = self.component.value
        return d


def embedding_std(model: Any, engine: Engine = "fast") -> float:
    """Standard deviation of the token embeddings as the residual stream receives them (the noise unit):
    the matrix's std times the embedding module's output scale (Gemma multiplies by sqrt(d_model))."""
    if engine == "hooks":
        embed = _hf_embedding(model)
        weight = getattr(embed, "weight", None) if embed is not None else getattr(model, "W_E", None)
        scale = embedding_output_scale(embed) if embed is not None else 1.0
    else:
        embed = build_stack(model).embed_tokens
        weight, scale = getattr(embed, "weight", None), embedding_output_scale(embed)
    if weight is None:
        raise ConfigError("cannot find the token-embedding matrix to scale the noise; pass noise_std.")
    return float(weight.detach().float().std()) * scale


def _hf_embedding(model: Any) -> Any:
    """The underlying model's input-embedding module (what ``hook_embed`` wraps), or None."""
    getter = getattr(getattr(model, "original_model", None), "get_input_embeddings", None)
    return getter() if callable(getter) else None


def _noise(spans: Sequence[tuple[int, int]], n_pos: int, d_model: int, n_samples: int, std: float,
           gen: torch.Generator) -> Float[Tensor, "rows pos d_model"]:
    rows = []
    for start, stop in spans:
        block = torch.zeros(n_samples, n_pos, d_model)
        block[:, start:stop] = torch.randn(n_samples, stop - start, d_model, generator=gen) * std
        rows.append(block)
    return torch.cat(rows)


def trace_tokens(model: Any, tokens: Int[Tensor, "batch pos"], answers: Int[Tensor, " batch"],
                 spans: Sequence[tuple[int, int]], config: TraceConfig, *, gen: torch.Generator,
                 noise_std: float, progress: bool = True, store: ChunkStore | None = None,
                 engine: Engine = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """One equal-length batch. Returns (restored p [batch, layer, pos], clean p [batch], noised p [batch]).

    ``store``: checkpoint the engine's chunks there (see :func:`recallscope.store.open_store`).
    ``engine``: "auto", "fast" or "hooks" (:func:`recallscope.models.selfcheck.resolve_engine`).
    """
    b, n_pos = tokens.shape
    n, n_layers = config.n_samples, int(model.cfg.n_layers)
    rep = tokens.repeat_interleave(n, 0)
    noise = _noise(spans, n_pos, int(model.cfg.d_model), n, config.noise_scale * noise_std, gen).to(tokens.device)
    metric = M.resolve(config.metric, answers.repeat_interleave(n, 0), allowed=TRACE_METRICS, method="causal_trace")
    read = metric.read_positions(n_pos)
    point = config.component.value
    layers = list(config.layers) if config.layers is not None else list(range(n_layers))
    cells = [Cell(tuple(Site(config.component, s.layer, pos) for s in
                        layer_window(config.component, layer, config.window, n_layers)))
             for layer in layers for pos in range(n_pos)]
    if resolve_engine(model, engine) == "hooks":
        names = {s.hook_name for c in cells for s in c.sites}
        clean_logits, clean_acts = H.record(model, rep, names, read)
        noised_logits, _ = H.record(model, rep, (), read, noise=noise)
        values = H.hook_sweep(model, cells, rep, clean_acts, metric, read_pos=read, noise=noise,
                              memory_budget_mb=config.memory_budget_mb, progress=progress,
                              desc=f"tracing {point} (hooks)", store=store)
    else:
        stack = build_stack(model)
        clean_logits, clean_trace = reference_run(stack, rep, [point], read)
        noised_logits, noised_trace = reference_run(stack, rep, [point], read, embed_edit=lambda x: x + noise)
        values = sweep(stack, cells, noised_trace, clean_trace, metric, target_logits=noised_logits,
                       read_pos=read, memory_budget_mb=config.memory_budget_mb, progress=progress,
                       desc=f"tracing {point}", store=store)
    restored = values.view(len(layers), n_pos, b, n).mean(-1).permute(2, 0, 1)
    return restored, metric(clean_logits).view(b, n)[:, 0], metric(noised_logits).view(b, n).mean(-1)


def categorize(values: Float[Tensor, "layer pos"], span: tuple[int, int]) -> Float[Tensor, "layer category"]:
    """Average a prompt's [layer, pos] grid into ROME's token categories (NaN where a category is empty)."""
    start, stop = span
    n_pos = values.shape[-1]
    groups = [[start], list(range(start + 1, stop - 1)), [stop - 1], [stop] if stop < n_pos - 1 else [],
              list(range(stop + 1, n_pos - 1)), [n_pos - 1]]
    cols = [values[:, g].mean(-1) if g else torch.full(values.shape[:1], float("nan")) for g in groups]
    return torch.stack(cols, dim=-1)


def causal_trace(
    model: Any,
    items: Sequence[PromptPair],
    *,
    component: Component | str = Component.RESID_POST,
    window: int = 1,
    noise_scale: float = 3.0,
    n_samples: int = 10,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    by: str = "category",
    memory_budget_mb: float = 1024.0,
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    engine: Engine = "auto",
    metric: str = "prob",
) -> PatchingResult:
    """ROME's causal trace over prompts with a ``spans["subject"]`` (see the module docstring).

    ``by="category"`` pools prompts of any length into ROME's token categories (axes layer x token);
    ``by="pos"`` keeps raw positions and needs prompts of one token length. Values are ``metric`` after
    restoration (``"prob"``: p(answer), ROME's; or ``"logprob"``); ``result.effect()`` gives indirect
    effects. ``checkpoint_dir``: checkpoint finished chunks there; the same call resumes from them after an interruption. ``engine``: ``"auto"`` (the
    fast engine when the model passes its self-check, else hooks), ``"fast"`` or ``"hooks"``; the
    engine that ran is ``result.config["engine"]``.
    """
    if not items:
        raise EmptyDatasetError("causal_trace got no prompts; pass at least one PromptPair with a subject span.")
    missing = [i for i, it in enumerate(items) if "subject" not in it.spans]
    if missing:
        raise ConfigError(f"items {missing[:5]} have no spans['subject']; build them with "
                          "recallscope.tasks.facts (fact_spans / trace_items) or set the span yourself.")
    t0 = time.perf_counter()
    config = TraceConfig(Component(component), window, noise_scale, n_samples, seed,
                         tuple(layers) if layers is not None else None, memory_budget_mb, metric)
    gen = torch.Generator().manual_seed(seed)
    ran = resolve_engine(model, engine)
    std = embedding_std(model, ran)
    groups = group_by_length(model, items)
    if by == "pos" and len(groups) > 1:
        raise ConfigError(f"by='pos' needs prompts of one token length, got lengths {sorted(groups)}; use "
                          "by='category' to pool prompts of different lengths.")
    cfg = {**config.to_dict(), "method": "causal_trace", "by": by, "noise_std_unit": std,
           "engine": ran}
    manifest = build_manifest(model, [it.clean for it in items], cfg, seed=seed)
    store = open_store(checkpoint_dir, manifest, inputs={"answers": [it.answer for it in items],
                                                         "spans": [it.spans["subject"] for it in items]})
    rows, cleans, noiseds, order = [], [], [], []
    for n_pos, group in groups.items():
        tokens = torch.stack(to_tokens(model, [g.clean for g in group]))
        answers = torch.tensor([single_token_id(model, g.answer) for g in group])
        spans = [g.spans["subject"] for g in group]
        restored, clean_p, noised_p = trace_tokens(model, tokens, answers, spans, config, gen=gen,
                                                   noise_std=std, progress=progress,
                                                   store=store.child(f"len{n_pos}"), engine=ran)
        for i in range(len(group)):
            rows.append(categorize(restored[i], spans[i]) if by == "category" else restored[i])
        cleans.append(clean_p)
        noiseds.append(noised_p)
        order += [items.index(g) for g in group]
    layer_labels = [str(x) for x in (config.layers or range(int(model.cfg.n_layers)))]
    if by == "category":
        labels = {"layer": layer_labels, "token": list(CATEGORIES)}
        axes = ("layer", "token")
    else:
        toks = model.tokenizer.convert_ids_to_tokens(to_tokens(model, [items[0].clean])[0].tolist())
        labels = {"layer": layer_labels, "pos": [f"{t}·{i}" for i, t in enumerate(toks)]}
        axes = ("layer", "pos")
    manifest.update(timings_s={"total": time.perf_counter() - t0}, **store.manifest_entry(), **manifest_entry(model))
    inv = torch.tensor(order).argsort()
    return PatchingResult(values=torch.stack(rows)[inv], axes=axes, clean=torch.cat(cleans)[inv],
                          corrupt=torch.cat(noiseds)[inv], labels=labels, config=cfg, manifest=manifest)
