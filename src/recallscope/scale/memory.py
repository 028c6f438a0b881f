"""Memory-aware execution: how much memory a device has free, sweep budgets from it, and OOM back-off.

1. :func:`free_memory_mb` asks the device: on CUDA the driver's free memory
   (``torch.cuda.mem_get_info``) plus what torch's caching allocator reserved but does not use; on
   Apple MPS the recommended working-set size minus what the driver allocated; on the CPU the RAM the
   operating system reports available (``psutil``, else ``os.sysconf``).
2. :func:`auto_memory_budget_mb` turns that into an engine chunk budget (``memory_budget_mb`` of the
   sweep engine): a fraction of the free memory, clamped to ``[floor_mb, cap_mb]``.
3. :class:`OOMBackoff` runs a function over a list of work items (the cells of an engine chunk). When
   the device runs out of memory it frees the allocator's cache, halves the piece size and retries
   the same items in smaller pieces, remembering the size that fitted so later chunks start there.
   Outputs of the pieces are concatenated along their first axis, so the caller sees one result. A
   single item that still does not fit raises ``torch.OutOfMemoryError`` with a message naming the fixes.

Pieces run the same arithmetic on fewer rows, so values after a back-off equal an unsplit run up to
floating-point rounding of batched matrix products (on the CPU they are usually bitwise equal).
"""

import gc
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from recallscope.errors import ConfigError

T = TypeVar("T")
_log = logging.getLogger(__name__)
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")


def free_memory_mb(device: str | torch.device = "cpu") -> float:
    """Memory (MiB) that new tensors on ``device`` can use now; see the module docstring for the source."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
        return (free + max(0, cached)) / 2**20
    if dev.type == "mps":
        mps = torch.mps
        return max(0, mps.recommended_max_memory() - mps.driver_allocated_memory()) / 2**20
    return _available_ram_bytes() / 2**20


def _available_ram_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return 4 * 2**30


def auto_memory_budget_mb(device: str | torch.device = "cpu", *, fraction: float = 0.5, floor_mb: float = 64.0,
                          cap_mb: float | None = None) -> float:
    """An engine chunk budget: ``fraction`` of :func:`free_memory_mb`, clamped to ``[floor_mb, cap_mb]``.

    The engine's estimate counts activations only (not the logits or allocator fragmentation), so the
    default keeps half of the free memory in reserve; :class:`OOMBackoff` covers what the estimate misses.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction={fraction} must be in (0, 1]: it is the share of free memory one chunk may use.")
    budget = max(floor_mb, fraction * free_memory_mb(device))
    return min(budget, cap_mb) if cap_mb is not None else budget


def resolve_memory_budget(budget: float | str, device: str | torch.device = "cpu") -> float:
    """``budget`` in MiB: a number is returned as is, ``"auto"`` becomes :func:`auto_memory_budget_mb`."""
    if isinstance(budget, str):
        if budget.strip().lower() != "auto":
            try:
                return float(budget)
            except ValueError:
                raise ConfigError(f"memory budget {budget!r} is neither a number of MiB nor 'auto'.") from None
        return auto_memory_budget_mb(device)
    if budget <= 0:
        raise ConfigError(f"memory budget {budget} MiB must be positive (or 'auto').")
    return float(budget)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory failure of any torch backend (CUDA, MPS, CPU allocator)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


def release_cached_memory() -> None:
    """Return memory held by dead tensors and the CUDA / MPS caching allocators to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


class OOMBackoff:
    """Run ``fn`` over items in pieces that fit in memory, halving the piece size on out-of-memory.

    One instance serves a whole sweep: ``limit`` (None until the first OOM) is the largest piece size
    known to fit, and later calls start from it. ``events`` counts the back-offs.
    """

    def __init__(self, *, what: str = "cells") -> None:
        self.limit: int | None = None
        self.events = 0
        self.what = what

    def __repr__(self) -> str:
        return f"OOMBackoff(limit={self.limit}, events={self.events})"

    def run(self, fn: Callable[[Sequence[T]], Tensor], items: Sequence[T]) -> Tensor:
        """``fn`` over ``items`` in pieces, outputs concatenated along dim 0 (in item order)."""
        if not items:
            raise ConfigError(f"OOMBackoff.run got no {self.what}.")
        size = len(items) if self.limit is None else min(self.limit, len(items))
        outputs: list[Tensor] = []
        start = 0
        while start < len(items):
            piece = items[start:start + size]
            out, failure = _attempt(fn, piece)
            if failure is None:
                outputs.append(out)
                start += len(piece)
                continue
            if len(piece) == 1:
                raise torch.OutOfMemoryError(
                    f"one of the {self.what} alone does not fit in memory ({failure}). Fixes: pass fewer "
                    "prompts per call (the batch is part of every row), load the model in bf16 "
                    "(dtype='bf16', half the memory of fp32), spread it over several GPUs with "
                    "device_map='auto', or free memory other processes hold.")
            size = max(1, len(piece) // 2)
            self.limit = size
            self.events += 1
            _log.warning("out of memory on %d %s; retrying in pieces of %d", len(piece), self.what, size)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)


def _attempt(fn: Callable[[Sequence[Any]], Tensor], piece: Sequence[Any]) -> tuple[Any, str | None]:
    """``(fn(piece), None)``, or ``(None, message)`` after an OOM, with the failed frame's memory freed."""
    try:
        return fn(piece), None
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        message = str(exc).splitlines()[0][:200]
    release_cached_memory()  # outside the except block, so the traceback's tensors are already gone
    return None, message
