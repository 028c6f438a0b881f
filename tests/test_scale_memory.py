"""Memory budgets from free device memory, out-of-memory back-off in the sweep engine, and executors."""

import sys
from types import SimpleNamespace

import pytest
import torch

from recallscope.errors import ConfigError
from recallscope.patching import activation_patching, causal_trace, engine
from recallscope.scale import executor as ex
from recallscope.scale import memory
from recallscope.scale.memory import OOMBackoff, auto_memory_budget_mb, free_memory_mb, is_oom, resolve_memory_budget
from recallscope.tasks.pairs import PromptPair

PAIRS = [PromptPair("The capital of France is a city called", "The capital of Spain is a city called", " Paris",
                    " Madrid"),
         PromptPair("The capital of Spain is a city called", "The capital of France is a city called", " Madrid",
                    " Paris")]
ITEMS = [PromptPair("The Eiffel Tower is in", "The Eiffel Tower is in", " Paris", spans={"subject": (1, 4)}),
         PromptPair("Rome is the capital of", "Rome is the capital of", " Italy", spans={"subject": (1, 2)})]


def test_free_memory_on_cpu_is_the_available_ram(monkeypatch):
    fake = SimpleNamespace(virtual_memory=lambda: SimpleNamespace(available=3 * 2**30))
    monkeypatch.setitem(sys.modules, "psutil", fake)
    assert free_memory_mb("cpu") == 3072.0
    monkeypatch.setitem(sys.modules, "psutil", None)  # psutil missing: os.sysconf
    monkeypatch.setattr(memory.os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 1000, "SC_PAGE_SIZE": 4096}[name])
    assert free_memory_mb("cpu") == 1000 * 4096 / 2**20


def test_free_memory_on_cuda_counts_driver_free_plus_allocator_cache(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (5 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 2 * 2**30)
    assert free_memory_mb("cuda:1") == 6 * 1024.0


def test_auto_budget_is_a_clamped_fraction_of_free_memory(monkeypatch):
    monkeypatch.setattr(memory, "free_memory_mb", lambda device: 10_000.0)
    assert auto_memory_budget_mb("cpu") == 5000.0
    assert auto_memory_budget_mb("cpu", fraction=0.25, cap_mb=2000.0) == 2000.0
    monkeypatch.setattr(memory, "free_memory_mb", lambda device: 10.0)
    assert auto_memory_budget_mb("cpu", floor_mb=64.0) == 64.0
    with pytest.raises(ConfigError, match="fraction"):
        auto_memory_budget_mb("cpu", fraction=1.5)


def test_resolve_memory_budget(monkeypatch):
    monkeypatch.setattr(memory, "free_memory_mb", lambda device: 1000.0)
    assert resolve_memory_budget(256.0) == 256.0
    assert resolve_memory_budget("512") == 512.0
    assert resolve_memory_budget("auto") == 500.0
    for bad in ("lots", -1.0):
        with pytest.raises(ConfigError):
            resolve_memory_budget(bad)


def test_is_oom_recognises_every_backend_and_nothing_else():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))


def _fits(limit: int, calls: list[int]):
    def fn(piece):
        calls.append(len(piece))
        if len(piece) > limit:
            raise torch.OutOfMemoryError(f"fake OOM: {len(piece)} items")
        return torch.tensor([[float(i)] for i in piece])
    return fn


def test_backoff_halves_until_a_piece_fits_and_remembers_the_size():
    calls: list[int] = []
    backoff = OOMBackoff()
    out = backoff.run(_fits(3, calls), list(range(10)))
    torch.testing.assert_close(out, torch.arange(10.0)[:, None], rtol=0, atol=0)
    assert calls == [10, 5, 2, 2, 2, 2, 2]  # 10 and 5 fail, then pieces of 2 (halving 5)
    assert backoff.limit == 2 and backoff.events == 2
    calls.clear()
    backoff.run(_fits(3, calls), list(range(5)))  # a later chunk starts at the remembered size
    assert calls == [2, 2, 1]


def test_backoff_passes_other_errors_through_and_gives_up_at_one_item():
    def broken(piece):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes"):
        OOMBackoff().run(broken, [1, 2])
    with pytest.raises(torch.OutOfMemoryError, match="alone does not fit.*bf16.*device_map"):
        OOMBackoff().run(_fits(0, []), [1, 2, 3])


@pytest.mark.parametrize("method", ["patching", "trace"])
def test_engine_backs_off_on_out_of_memory_with_the_same_result(tiny_gpt2, monkeypatch, method):
    def run():
        if method == "patching":
            return activation_patching(tiny_gpt2, PAIRS, component="z", per_position=False, progress=False)  # 8 cells
        return causal_trace(tiny_gpt2, ITEMS, n_samples=2, seed=1, progress=False)

    reference = run()
    real = engine.run_chunk
    sizes: list[int] = []

    def oom_above_one_cell(stack, cells, *args, **kwargs):
        sizes.append(len(cells))
        if len(cells) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(stack, cells, *args, **kwargs)

    monkeypatch.setattr(engine, "run_chunk", oom_above_one_cell)
    backed_off = run()
    assert max(sizes) > 1 and sizes.count(1) > len(sizes) // 2, sizes  # the big chunks failed and were split
    torch.testing.assert_close(backed_off.values, reference.values, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(backed_off.clean, reference.clean, rtol=0, atol=0)


class ReversedExecutor:
    """Evaluates chunks last to first (like workers finishing out of order)."""

    def __init__(self):
        self.chunks = 0

    def run(self, stack, job, store, *, progress, desc):
        for j in reversed(range(len(job.plan))):
            self.chunks += 1
            yield j, job.compute(stack, j)


def test_a_custom_executor_runs_every_chunk_and_the_engine_gathers_them_in_place(tiny_llama):
    reference = activation_patching(tiny_llama, PAIRS, memory_budget_mb=0.001, progress=False)  # a cell a chunk
    custom = ReversedExecutor()
    with ex.use_executor(custom) as active:
        assert ex.current_executor() is active
        result = activation_patching(tiny_llama, PAIRS, memory_budget_mb=0.001, progress=False)
    assert isinstance(ex.current_executor(), ex.LocalExecutor)  # restored on exit
    assert custom.chunks > 1
    assert torch.equal(result.values, reference.values)


def test_without_ray_distributed_sweeps_say_how_to_install_it(monkeypatch, tiny_gpt2):
    from recallscope.scale import distributed

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert not distributed.ray_available()
    with pytest.raises(ConfigError, match=r"recallscope\[distributed\]"):
        with distributed.ray_sweeps(tiny_gpt2, "smollm2"):
            pass
