"""Sweep executors: who evaluates the chunks of a sweep-engine plan.

The sweep engine (:mod:`recallscope.patching.engine`) turns a sweep into a
:class:`~recallscope.patching.engine.SweepJob`: the cells, the reference traces, the metric and a
plan of chunks. An executor evaluates the chunks and yields ``(chunk index, values[cell, prompt])``
in any order:

1. :class:`LocalExecutor` (the default): this process, chunk by chunk, with a progress bar, the
   checkpoint store (a finished chunk is loaded instead of recomputed) and :class:`OOMBackoff`.
2. :class:`~recallscope.scale.distributed.RaySweepExecutor`: Ray workers, each with its own copy of
   the model, while this process writes every finished chunk to the same checkpoint store.

:func:`use_executor` makes an executor current for a ``with`` block, so every sweep-engine method
inside it (activation patching, causal tracing, ...) uses it without a new argument.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol, runtime_checkable

from torch import Tensor
from tqdm.auto import tqdm

from recallscope.scale.memory import OOMBackoff

_CURRENT: ContextVar[Any] = ContextVar("recallscope_sweep_executor", default=None)


@runtime_checkable
class SweepExecutor(Protocol):
    """Evaluates the chunks of a sweep job; yields (chunk index, metric values [cell, prompt] on the CPU)."""

    def run(self, stack: Any, job: Any, store: Any, *, progress: bool, desc: str) -> Iterator[tuple[int, Tensor]]:
        ...


class LocalExecutor:
    """Evaluate chunks in this process, in plan order, with checkpointing and out-of-memory back-off."""

    def run(self, stack: Any, job: Any, store: Any, *, progress: bool = True, desc: str = "patching"
            ) -> Iterator[tuple[int, Tensor]]:
        backoff = OOMBackoff()
        for j in tqdm(range(len(job.plan)), desc=desc, disable=not progress, leave=False):
            tensors = store.get_or_compute(job.name(j), lambda j=j: {"values": job.compute(stack, j, backoff)})
            yield j, tensors["values"]


def current_executor() -> SweepExecutor:
    """The executor of the innermost :func:`use_executor` block, else a :class:`LocalExecutor`."""
    return _CURRENT.get() or LocalExecutor()


@contextmanager
def use_executor(executor: SweepExecutor) -> Iterator[SweepExecutor]:
    """Run every sweep inside the ``with`` block on ``executor``."""
    token = _CURRENT.set(executor)
    try:
        yield executor
    finally:
        _CURRENT.reset(token)
