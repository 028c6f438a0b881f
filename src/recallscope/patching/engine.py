"""The sweep engine: exact activation patching without one full forward per cell.

Algorithm (for a list of cells, each a tuple of sites whose activations are copied from a *source*
run into a *target* run; denoising: source = clean, target = corrupt):

1. Run the target once, keeping ``resid_pre`` of every layer and the keys/values of every layer,
   and the source once, keeping the patched components.
2. A cell that touches layers >= L and positions >= p leaves everything below layer L and every
   position before p exactly as in the target run (the model is causal). So the cell starts from the
   target's ``resid_pre[L]`` at positions ``p..`` and reuses the target's keys/values for positions
   ``< p`` at every layer.
3. Cells with the same first position are batched: their rows join the batch at their first layer
   (staggered), so one layer's matmuls serve many cells at once.
4. Only the positions the metric reads are unembedded.
5. Batches are chunked so activations stay under a memory budget; a progress bar tracks chunks.
6. With a :class:`~recallscope.store.ChunkStore`, each finished chunk is checkpointed under a name
   derived from its plan index and content, and a rerun loads it instead of recomputing it.
   Chunks run on the current executor (this process by default; Ray workers inside
   :func:`recallscope.scale.ray_sweeps`), and a chunk that runs out of memory is retried in halves
   (:class:`~recallscope.scale.memory.OOMBackoff`).
7. Every metric value is checked: a NaN or inf raises :class:`NonFiniteMetricError` naming the cell.

The result equals running every cell as a separate full forward (TransformerLens's loop); the tests
check that against ``transformer_lens.patching`` and against a per-cell loop.
"""

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from recallscope.errors import ConfigError, NonFiniteMetricError
from recallscope.models.forward import Trace, block
from recallscope.models.stack import Stack
from recallscope.scale.executor import current_executor
from recallscope.scale.memory import OOMBackoff
from recallscope.sites import Site
from recallscope.store import ChunkStore, fingerprint
from recallscope.vocab import Component

POS_DIM = {"pattern": 2}  # the position (dest) axis; every other component has it at dim 1
HEAD_DIM = {"pattern": 1, "q": 2, "k": 2, "v": 2, "z": 2}


@dataclass(frozen=True)
class Cell:
    """One intervention of a sweep: every site in it is patched together (a ROME window, say)."""

    sites: tuple[Site, ...]

    @property
    def start_layer(self) -> int:
        return min(s.layer for s in self.sites)

    @property
    def pos0(self) -> int:
        """First position the cell can change (0 when a site covers all positions)."""
        positions = [s.pos for s in self.sites]
        return 0 if any(p is None for p in positions) else min(p for p in positions if p is not None)


def _index(site: Site, pos0: int) -> tuple:
    """Index into a TransformerLens-layout activation (without the batch axis) for ``site``."""
    point = site.component.value
    ndim = 3 if point == "pattern" else (3 if point in HEAD_DIM else 2)
    idx: list = [slice(None)] * ndim
    pos_dim = POS_DIM.get(point, 1) - 1
    if site.pos is not None:
        idx[pos_dim] = site.pos - pos0
    else:
        idx[pos_dim] = slice(pos0, None) if pos0 else slice(None)
    if site.head is not None:
        idx[HEAD_DIM[point] - 1] = site.head
    return tuple(idx)


def _source_index(site: Site, pos0: int) -> tuple:
    """The same index, in absolute positions of the (full) source activation."""
    point = site.component.value
    idx = list(_index(site, 0))
    pos_dim = POS_DIM.get(point, 1) - 1
    if site.pos is None:
        idx[pos_dim] = slice(pos0, None)
    return tuple(idx)


def make_edit(active: Sequence[Cell], source: Trace, batch: int, pos0: int
              ) -> Callable[[str, int, Tensor], Tensor]:
    """An edit function copying each active cell's sites from ``source`` into its rows."""
    by_point: dict[tuple[str, int], list[tuple[int, Site]]] = {}
    for i, cell in enumerate(active):
        for site in cell.sites:
            by_point.setdefault((site.component.value, site.layer), []).append((i, site))

    def edit(point: str, layer: int, t: Tensor) -> Tensor:
        todo = by_point.get((point, layer))
        if not todo:
            return t
        src = source.acts[(point, layer)]
        for i, site in todo:
            rows = slice(i * batch, (i + 1) * batch)
            t[(rows, *_index(site, pos0))] = src[(slice(None), *_source_index(site, pos0))]
        return t

    return edit


def _bytes_per_row_position(stack: Stack, n_pos: int) -> int:
    d = stack.d_model
    floats = 14 * d + 3 * 4 * d + 3 * stack.n_heads * n_pos
    return 4 * floats


def run_chunk(stack: Stack, cells: list[Cell], target: Trace, source: Trace, *, batch: int, n_pos: int,
              pos0: int, read_pos: Int[Tensor, " read"],
              edit_for: Callable[[Sequence[Cell]], Callable[[str, int, Tensor], Tensor]] | None = None
              ) -> Float[Tensor, "rows read vocab"]:
    """Run cells sharing ``pos0`` (sorted by start layer); rows are cell-major, in ``cells`` order.

    ``read_pos`` must all be >= ``pos0``. ``edit_for(active_cells)`` gives the edit applied to the rows of
    the cells active so far (default: copy each cell's sites from ``source``; attention knockout masks
    attention scores instead).
    """
    first = cells[0].start_layer
    positions = torch.arange(pos0, n_pos, device=target.acts[("resid_pre", first)].device)
    x: Tensor | None = None
    n_active = 0
    for layer in range(first, stack.n_layers):
        joining = sum(1 for c in cells if c.start_layer == layer)
        if joining:
            fresh = target.acts[("resid_pre", layer)][:, pos0:].repeat(joining, 1, 1)
            x = fresh if x is None else torch.cat([x.to(fresh.device), fresh], dim=0)
            n_active += joining
        k, v = target.kv[layer]
        past = (k[:, :, :pos0].repeat(n_active, 1, 1, 1),
                v[:, :, :pos0].repeat(n_active, 1, 1, 1)) if pos0 else None
        edit = edit_for(cells[:n_active]) if edit_for else make_edit(cells[:n_active], source, batch, pos0)
        x, _, _ = block(stack, layer, x, positions, past, edit, lambda p, t: None)
    assert x is not None
    return stack.unembed(stack.final_norm(x[:, read_pos - pos0]))


def check_finite(values: Float[Tensor, "row batch"], where: Callable[[int], str], *, hint: str = "") -> None:
    """Raise :class:`NonFiniteMetricError` naming ``where(row)`` if any metric value is NaN or inf."""
    bad = ~torch.isfinite(values)
    if not bad.any():
        return
    row, prompt = (int(i) for i in bad.nonzero()[0])
    hint = hint or ("If the model runs in float16, its activations may overflow: load it with dtype='bf16' "
                    "or 'fp32'. A custom metric must return finite values (clamp probabilities before a log).")
    raise NonFiniteMetricError(f"the metric is {float(values[row, prompt])} for prompt {prompt} at {where(row)} "
                               f"({int(bad.sum())} non-finite values in this chunk). {hint}")


def chunk_name(index: int, pos0: int, cells: Sequence[Cell], read_pos: Sequence[int], batch: int,
               n_pos: int) -> str:
    """A checkpoint name that changes whenever what the chunk computes changes."""
    digest = fingerprint((pos0, [c.sites for c in cells], list(read_pos), batch, n_pos))[:16]
    return f"c{index:05d}-{digest}"


def check_budget(memory_budget_mb: float) -> None:
    """Raise :class:`ConfigError` unless ``memory_budget_mb`` is a positive number."""
    if not memory_budget_mb > 0:
        raise ConfigError(f"memory_budget_mb must be a positive number of megabytes, got {memory_budget_mb!r}; "
                          "the default is 1024 (a smaller budget runs fewer cells per chunk, down to one).")


def plan_chunks(stack: Stack, cells: Sequence[Cell], batch: int, n_pos: int, memory_budget_mb: float
                ) -> list[tuple[int, list[int]]]:
    """(pos0, cell indices) per chunk: cells grouped by first position, sorted by start layer, and cut
    so one chunk's activations fit in ``memory_budget_mb`` (down to one cell per chunk)."""
    check_budget(memory_budget_mb)
    groups: dict[int, list[int]] = {}
    for i, cell in enumerate(cells):
        groups.setdefault(cell.pos0, []).append(i)
    plan = []
    for pos0, idxs in sorted(groups.items()):
        idxs = sorted(idxs, key=lambda i: cells[i].start_layer)
        per_cell = batch * (n_pos - pos0) * _bytes_per_row_position(stack, n_pos)
        size = max(1, int(memory_budget_mb * 2**20) // max(1, per_cell))
        plan += [(pos0, idxs[j:j + size]) for j in range(0, len(idxs), size)]
    return plan


@dataclass(frozen=True)
class SweepJob:
    """A sweep's inputs (all but the model) and its chunk plan: what an executor evaluates.

    Picklable (cells, traces, tensors and a metric object), so a worker holding its own copy of the
    model can evaluate any chunk (:mod:`recallscope.scale.executor`).
    """

    cells: tuple[Cell, ...]
    plan: tuple[tuple[int, tuple[int, ...]], ...]
    target: Trace
    source: Trace
    metric: Callable[[Tensor], Tensor]
    target_logits: Float[Tensor, "batch read vocab"]
    read_pos: tuple[int, ...]

    @property
    def batch(self) -> int:
        return int(self.target_logits.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.target.acts[("resid_pre", 0)].shape[1])

    def name(self, j: int) -> str:
        """The checkpoint name of chunk ``j``."""
        pos0, idxs = self.plan[j]
        return chunk_name(j, pos0, [self.cells[i] for i in idxs], self.read_pos, self.batch, self.n_pos)

    def compute(self, stack: Stack, j: int, backoff: OOMBackoff | None = None) -> Float[Tensor, "cell batch"]:
        """Metric values of chunk ``j`` on the CPU; on out-of-memory the chunk runs in smaller pieces."""
        pos0, idxs = self.plan[j]
        chunk = [self.cells[i] for i in idxs]
        read = torch.tensor(self.read_pos)
        live = read >= pos0
        batch, n_read = self.batch, len(self.read_pos)

        def values(part: Sequence[Cell]) -> Tensor:
            logits = self.target_logits.repeat(len(part), 1, 1)
            if live.any():
                logits[:, live] = run_chunk(stack, list(part), self.target, self.source, batch=batch,
                                            n_pos=self.n_pos, pos0=pos0, read_pos=read[live]).to(logits)
            return self.metric(logits.view(len(part), batch, n_read, -1)).float().cpu()

        with torch.no_grad():
            out = (backoff or OOMBackoff()).run(values, chunk)
        check_finite(out, lambda r: "cell " + " + ".join(s.label for s in chunk[r].sites))
        return out


def sweep(
    stack: Stack,
    cells: Sequence[Cell],
    target: Trace,
    source: Trace,
    metric: Callable[[Tensor], Tensor],
    *,
    target_logits: Float[Tensor, "batch read vocab"],
    read_pos: Sequence[int],
    memory_budget_mb: float = 1024.0,
    progress: bool = True,
    desc: str = "patching",
    store: ChunkStore | None = None,
) -> Float[Tensor, "cell batch"]:
    """Metric value per (cell, prompt) for every cell; see the module docstring for the algorithm.

    ``target_logits`` are the unpatched target run's logits at ``read_pos`` (sorted ascending); read
    positions before a cell's first position keep them, since the patch cannot reach them. With a
    ``store``, finished chunks are checkpointed and reloaded (see :mod:`recallscope.store`). The chunks
    run on the current executor (:func:`recallscope.scale.executor.use_executor`; default: this process).
    """
    if stack.parallel_attn_mlp and any(s.component == Component.RESID_MID for c in cells for s in c.sites):
        raise ConfigError("this model runs attention and MLP in parallel (GPT-NeoX, GPT-J): it has no resid_mid "
                          "to patch; patch resid_pre, attn_out, mlp_out or resid_post instead.")
    batch = target_logits.shape[0]
    n_pos = target.acts[("resid_pre", 0)].shape[1]
    plan = plan_chunks(stack, cells, batch, n_pos, memory_budget_mb)
    job = SweepJob(tuple(cells), tuple((pos0, tuple(idxs)) for pos0, idxs in plan), target, source, metric,
                   target_logits, tuple(read_pos))
    out = torch.empty(len(cells), batch)
    for j, values in current_executor().run(stack, job, store or ChunkStore.disabled(), progress=progress,
                                            desc=desc):
        out[list(job.plan[j][1])] = values
    return out
