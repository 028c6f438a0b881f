"""The hook engine: exact patching through TransformerLens hooks, many cells per forward.

The reference and the fallback of the fast sweep engine (:mod:`recallscope.patching.engine`): it runs
the model's own forward (a ``TransformerBridge``), so it is right for every architecture
TransformerLens loads. Hook names come only from :attr:`recallscope.sites.Site.hook_name`.

Algorithm (for a list of cells, each a tuple of sites patched together):

1. Run the source prompts once with hooks that record every hook point the cells patch.
2. A chunk of ``n`` cells is one forward of the target prompts repeated ``n`` times along the batch
   axis (rows cell-major: cell ``i`` owns rows ``i * batch .. (i + 1) * batch``). One hook per hook
   point writes each cell's sites, from the source, into that cell's rows only. (Attention knockout
   instead zeroes the blocked entries of ``hook_pattern`` in the cell's rows and renormalises each
   query's attention over the keys left, which equals a softmax with the blocked scores at -inf.)
3. A hook on ``unembed.hook_in`` keeps only the positions the metric reads, so the unembedding runs
   on those alone.
4. Chunks are cut so activations fit ``memory_budget_mb``; with a
   :class:`~recallscope.store.ChunkStore` each finished chunk is checkpointed under a name derived
   from its content, and a rerun loads it. A chunk that runs out of memory is retried in halves
   (:class:`~recallscope.scale.memory.OOMBackoff`), and a NaN/inf metric value raises
   :class:`~recallscope.errors.NonFiniteMetricError` naming the cell.

The result equals TransformerLens's per-cell loop (``transformer_lens.patching``); the tests check it.
"""

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError
from recallscope.models.forward import Trace
from recallscope.patching.engine import Cell, _index, check_budget, check_finite
from recallscope.patching.traces import check_finite_run
from recallscope.scale.executor import LocalExecutor, current_executor
from recallscope.scale.memory import OOMBackoff
from recallscope.sites import Site
from recallscope.store import ChunkStore, fingerprint
from recallscope.vocab import Component

Hook = Callable[[Tensor, Any], Tensor]
UNEMBED_IN = "unembed.hook_in"
EMBED_HOOK = "hook_embed"  # the token embeddings (ROME adds its noise here)


def _read_hook(read_pos: Sequence[int]) -> tuple[str, Hook]:
    idx = list(read_pos)

    def keep(t: Tensor, hook: Any) -> Tensor:
        return t[:, idx]

    return UNEMBED_IN, keep


def _noise_hook(noise: Tensor, repeat: int) -> tuple[str, Hook]:
    def add(t: Tensor, hook: Any) -> Tensor:
        return t + noise.to(t).repeat(repeat, 1, 1)

    return EMBED_HOOK, add


class ReadOnlyHookError(ConfigError):
    """A hook edit would be discarded: on this model the hook point is fired after the fact."""


def logits_at(model: Any, tokens: Int[Tensor, "rows pos"], read_pos: Sequence[int],
              hooks: Sequence[tuple[str, Hook]] = ()) -> Float[Tensor, "rows read vocab"]:
    """The model's logits at ``read_pos`` with ``hooks`` attached (the unembedding sees those positions only).

    Where TransformerBridge fires a hook after the wrapped module has consumed the tensor (e.g.
    ``hook_pattern`` on GPT-J and OPT, ``hook_attn_scores`` on native models), an edit would be silently
    discarded; TransformerLens warns, and this raises :class:`ReadOnlyHookError` instead.
    """
    fwd = [*hooks, _read_hook(read_pos)] if UNEMBED_IN in model.hook_dict else list(hooks)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*edit is discarded", category=UserWarning)
        try:
            out = model.run_with_hooks(tokens, fwd_hooks=fwd)
        except UserWarning as exc:
            if "edit is discarded" not in str(exc):
                raise
            raise ReadOnlyHookError(
                f"the hook engine cannot edit this model here: {str(exc).split(' returned')[0].replace('A hook on ', '')} "
                "is read-only in TransformerBridge (the attention runs inside the wrapped Hugging Face module). "
                "Use engine='fast' (on a model that passes the self-check), or patch z / q / k / v instead."
            ) from None
    return out if out.shape[1] == len(read_pos) else out[:, list(read_pos)]


def check_hook_names(model: Any, names: Iterable[str]) -> None:
    """Raise :class:`ConfigError` if the model has no hook point of one of ``names``."""
    absent = sorted(set(names) - set(model.hook_dict))
    if absent:
        raise ConfigError(f"this model has no hook {absent[0]!r} (a model with parallel attention and MLP has no "
                          "resid_mid); patch resid_pre, attn_out, mlp_out or resid_post instead.")


def record(model: Any, tokens: Int[Tensor, "batch pos"], hook_names: Iterable[str], read_pos: Sequence[int], *,
           noise: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``tokens`` once (plus ``noise`` on the token embeddings), keeping ``hook_names``.

    Returns the logits at ``read_pos`` and {hook name: activation}. Raises
    :class:`~recallscope.errors.NonFiniteActivationError` naming the first layer whose input holds
    inf/NaN when the logits are not finite (a float16 overflow, say).
    """
    logits, acts = _record(model, tokens, hook_names, read_pos, noise=noise)
    if not torch.isfinite(logits).all():
        names = {Site(Component.RESID_PRE, layer).hook_name: layer for layer in range(int(model.cfg.n_layers))}
        _, resid = _record(model, tokens, names, read_pos, noise=noise)
        trace = Trace(acts={("resid_pre", layer): resid[name] for name, layer in names.items()})
        check_finite_run(logits, trace, getattr(model.cfg, "dtype", None) or logits.dtype)
    return logits, acts


def _record(model: Any, tokens: Tensor, hook_names: Iterable[str], read_pos: Sequence[int], *,
            noise: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    names = sorted(set(hook_names))
    check_hook_names(model, names)
    acts: dict[str, Tensor] = {}

    def keep(t: Tensor, hook: Any, name: str = "") -> Tensor:
        acts[name] = t.detach().clone()
        return t

    hooks: list[tuple[str, Hook]] = [(n, lambda t, hook, n=n: keep(t, hook, n)) for n in names]
    if noise is not None:
        hooks.insert(0, _noise_hook(noise, 1))
    with torch.no_grad():
        logits = logits_at(model, tokens, read_pos, hooks)
    return logits, acts


def constant_acts(acts: dict[str, Tensor], how: str) -> dict[str, Tensor]:
    """Zeros (``how="zero"``) or the batch mean (``how="mean"``) in place of each activation."""
    if how == "zero":
        return {k: torch.zeros_like(t) for k, t in acts.items()}
    if how == "mean":
        return {k: t.mean(0, keepdim=True).expand_as(t).clone() for k, t in acts.items()}
    raise ValueError(f"unknown constant activation {how!r}")


def patch_hooks(cells: Sequence[Cell], source: dict[str, Tensor], batch: int) -> list[tuple[str, Hook]]:
    """One hook per hook point: copy each cell's sites from ``source`` into the cell's rows.

    ``hook_resid_mid`` is the input of the second norm in a TransformerBridge, not the residual stream
    carried on, so a ``resid_mid`` site also adds (patched - original) to that layer's ``resid_post``
    (the block output is resid_mid plus a function of it): the residual stream itself is patched, as in
    the fast engine.
    """
    by_name: dict[str, list[tuple[int, Site]]] = {}
    post_layer: dict[str, int] = {}  # resid_post hook name -> layer, where a resid_mid change is carried on
    for i, cell in enumerate(cells):
        for site in cell.sites:
            by_name.setdefault(site.hook_name, []).append((i, site))
            if site.component == Component.RESID_MID:
                post = Site(Component.RESID_POST, site.layer).hook_name
                post_layer[post] = site.layer
                by_name.setdefault(post, [])
    pending: dict[int, list[tuple[tuple, Tensor]]] = {}  # layer -> (index, patched - original) at resid_mid

    def make(name: str, todo: list[tuple[int, Site]]) -> Hook:
        src = source.get(name)

        def hook(t: Tensor, hook: Any) -> Tensor:
            t = t.clone()  # out of place: the tensor a hook sees may also be carried on elsewhere
            if name in post_layer:
                for idx, delta in pending.pop(post_layer[name], []):
                    t[idx] = t[idx] + delta
            for i, site in todo:
                idx = (slice(i * batch, (i + 1) * batch), *_index(site, 0))
                new = src[(slice(None), *_index(site, 0))].to(t)
                if site.component == Component.RESID_MID:
                    pending.setdefault(site.layer, []).append((idx, new - t[idx]))
                t[idx] = new
            return t

        return hook

    return [(name, make(name, todo)) for name, todo in by_name.items()]


def knockout_hooks(cells: Sequence[Cell], masks: Tensor, batch: int) -> list[tuple[str, Hook]]:
    """Per layer, zero the blocked (query, key) entries of each cell's rows of ``hook_pattern`` and
    renormalise: the softmax over the keys left (``masks[batch, query, key]``, True = blocked)."""
    by_name: dict[str, list[int]] = {}
    for i, cell in enumerate(cells):
        for site in cell.sites:
            by_name.setdefault(Site(Component.PATTERN, site.layer).hook_name, []).append(i)

    def make(rows_of: list[int]) -> Hook:
        def hook(t: Tensor, hook: Any) -> Tensor:
            t = t.clone()
            blocked = masks[:, None].to(t.device)  # [batch, 1 (heads), query, key]
            for i in rows_of:
                rows = slice(i * batch, (i + 1) * batch)
                kept = t[rows].masked_fill(blocked, 0.0)
                t[rows] = kept / kept.sum(-1, keepdim=True)
            return t

        return hook

    return [(name, make(rows)) for name, rows in by_name.items()]


def bytes_per_row_position(model: Any, n_pos: int, n_read: int) -> int:
    """Rough activation bytes of one batch row at one position in a full forward (one layer live)."""
    cfg = model.cfg
    d, d_mlp = int(cfg.d_model), int(getattr(cfg, "d_mlp", None) or 4 * cfg.d_model)
    floats = 16 * d + 3 * d_mlp + 3 * int(cfg.n_heads) * n_pos + int(cfg.d_vocab) * n_read // max(1, n_pos)
    return 4 * floats


def plan(model: Any, n_cells: int, batch: int, n_pos: int, n_read: int, memory_budget_mb: float
         ) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """(0, cell indices) per chunk, each chunk's activations under ``memory_budget_mb``."""
    check_budget(memory_budget_mb)
    per_cell = max(1, batch * n_pos * bytes_per_row_position(model, n_pos, n_read))
    size = max(1, int(memory_budget_mb * 2**20) // per_cell)
    return tuple((0, tuple(range(j, min(j + size, n_cells)))) for j in range(0, n_cells, size))


@dataclass(frozen=True)
class HookSweepJob:
    """A hook-engine sweep: target prompts, what each cell does, and the chunk plan.

    Exactly one of ``source`` (activation patching: {hook name: source activation}) and ``masks``
    (attention knockout: [batch, query, key], True = blocked) is set. ``noise`` is added to the target's
    token embeddings (ROME's corrupted run).
    """

    cells: tuple[Cell, ...]
    plan: tuple[tuple[int, tuple[int, ...]], ...]
    tokens: Int[Tensor, "batch pos"]
    metric: Callable[[Tensor], Tensor]
    read_pos: tuple[int, ...]
    source: dict[str, Tensor] | None = None
    masks: Tensor | None = None
    noise: Tensor | None = None

    @property
    def batch(self) -> int:
        return int(self.tokens.shape[0])

    def name(self, j: int) -> str:
        """The checkpoint name of chunk ``j`` (``h`` + plan index + a digest of what it computes)."""
        cells = [self.cells[i].sites for i in self.plan[j][1]]
        extra = self.masks if self.masks is not None else None
        digest = fingerprint((cells, list(self.read_pos), self.batch, int(self.tokens.shape[1]), extra))[:16]
        return f"h{j:05d}-{digest}"

    def hooks(self, cells: Sequence[Cell]) -> list[tuple[str, Hook]]:
        if self.masks is not None:
            hooks = knockout_hooks(cells, self.masks, self.batch)
        else:
            assert self.source is not None
            hooks = patch_hooks(cells, self.source, self.batch)
        if self.noise is not None:
            hooks.insert(0, _noise_hook(self.noise, len(cells)))
        return hooks

    def compute(self, model: Any, j: int, backoff: OOMBackoff | None = None) -> Float[Tensor, "cell batch"]:
        """Metric values of chunk ``j`` on the CPU; on out-of-memory the chunk runs in smaller pieces."""
        chunk = [self.cells[i] for i in self.plan[j][1]]
        batch, n_read = self.batch, len(self.read_pos)

        def values(part: Sequence[Cell]) -> Tensor:
            tokens = self.tokens.repeat(len(part), 1)
            logits = logits_at(model, tokens, self.read_pos, self.hooks(part))
            return self.metric(logits.view(len(part), batch, n_read, -1)).float().cpu()

        with torch.no_grad():
            out = (backoff or OOMBackoff()).run(values, chunk)
        what = (lambda r: "the layer window at layers " + ",".join(str(s.layer) for s in chunk[r].sites)
                ) if self.masks is not None else (lambda r: "cell " + " + ".join(s.label for s in chunk[r].sites))
        hint = ("Softmax over no keys is NaN: the knockout may block every key a query can attend to; block "
                "fewer keys." if self.masks is not None else "")
        check_finite(out, what, hint=hint)
        return out


def run_job(model: Any, job: HookSweepJob, *, store: ChunkStore | None = None, progress: bool = True,
            desc: str = "patching (hooks)") -> Float[Tensor, "cell batch"]:
    """Evaluate every chunk of ``job`` in this process (checkpointed in ``store``); values [cell, batch]."""
    if not isinstance(current_executor(), LocalExecutor):
        raise ConfigError("the hook engine runs in this process only; inside ray_sweeps(...) use engine='fast' "
                          "(on a model that passes the self-check), or leave the ray_sweeps block.")
    out = torch.empty(len(job.cells), job.batch)
    for j, values in LocalExecutor().run(model, job, store or ChunkStore.disabled(), progress=progress, desc=desc):
        out[list(job.plan[j][1])] = values
    return out


def hook_sweep(model: Any, cells: Sequence[Cell], tokens: Int[Tensor, "batch pos"], source: dict[str, Tensor],
               metric: Callable[[Tensor], Tensor], *, read_pos: Sequence[int], noise: Tensor | None = None,
               memory_budget_mb: float = 1024.0, progress: bool = True, desc: str = "patching (hooks)",
               store: ChunkStore | None = None) -> Float[Tensor, "cell batch"]:
    """Metric value per (cell, prompt): each cell's sites copied from ``source`` into the run of ``tokens``
    (with ``noise`` on the token embeddings); see the module docstring."""
    check_hook_names(model, {s.hook_name for c in cells for s in c.sites})
    missing = sorted({s.hook_name for c in cells for s in c.sites} - set(source))
    if missing:
        raise ConfigError(f"the source run recorded no activation at {missing[:3]}; record every site's hook.")
    batch, n_pos = tokens.shape
    job = HookSweepJob(tuple(cells), plan(model, len(cells), batch, n_pos, len(read_pos), memory_budget_mb),
                       tokens, metric, tuple(read_pos), source=source, noise=noise)
    return run_job(model, job, store=store, progress=progress, desc=desc)


def hook_knockout(model: Any, cells: Sequence[Cell], tokens: Int[Tensor, "batch pos"], masks: Tensor,
                  metric: Callable[[Tensor], Tensor], *, read_pos: Sequence[int], memory_budget_mb: float = 1024.0
                  ) -> Float[Tensor, "cell batch"]:
    """Metric per (cell, prompt) with attention ``masks`` applied at every layer of each cell."""
    batch, n_pos = tokens.shape
    job = HookSweepJob(tuple(cells), plan(model, len(cells), batch, n_pos, len(read_pos), memory_budget_mb),
                       tokens, metric, tuple(read_pos), masks=masks)
    return run_job(model, job, progress=False)
