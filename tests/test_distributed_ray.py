"""Distributed sweeps on a local Ray cluster with 2 CPU workers: results equal a single-process run
bit for bit, finished chunks stream into the same checkpoint store, and runs resume across modes."""

import functools

import pytest
import torch

from recallscope.errors import ConfigError
from recallscope.models import tiny_model
from recallscope.patching import activation_patching, causal_trace, engine
from recallscope.scale.executor import use_executor
from recallscope.tasks.pairs import PromptPair

ray = pytest.importorskip("ray", reason="distributed sweeps need Ray: pip install 'recallscope[distributed]'")

PAIRS = [PromptPair("The capital of France is a city called", "The capital of Spain is a city called", " Paris",
                    " Madrid"),
         PromptPair("The capital of Spain is a city called", "The capital of France is a city called", " Madrid",
                    " Paris")]
ITEMS = [PromptPair("The Eiffel Tower is in", "The Eiffel Tower is in", " Paris", spans={"subject": (1, 4)}),
         PromptPair("Rome is the capital of", "Rome is the capital of", " Italy", spans={"subject": (1, 2)}),
         PromptPair("The city of Rome is in", "The city of Rome is in", " Italy", spans={"subject": (3, 5)})]


def assert_same_bits(a, b) -> None:
    for name in ("values", "clean", "corrupt"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.nan_to_num(-7.0), y.nan_to_num(-7.0)), f"{name} differs"
        assert torch.equal(x.isnan(), y.isnan()), f"{name} NaNs differ"
    assert a.labels == b.labels and a.config == b.config


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def loader(gpt2_tokenizer):
    return functools.partial(tiny_model, "llama", tokenizer=gpt2_tokenizer, seed=0)


@pytest.fixture(scope="module")
def executor(cluster, loader):
    from recallscope.scale.distributed import RayConfig, RaySweepExecutor

    model = loader(device="cpu")
    ex = RaySweepExecutor(model, loader, RayConfig(num_workers=2)).start()
    yield ex
    ex.close()


def test_workers_hold_the_drivers_weights(executor):
    assert len(executor.info) == 2 and len({d["pid"] for d in executor.info}) == 2
    assert all(d["device"] == "cpu" and d["threads"] == torch.get_num_threads() for d in executor.info)


def test_sweeps_on_ray_equal_the_single_process_run_exactly(executor, monkeypatch):
    model = executor.model
    local_patch = activation_patching(model, PAIRS, component="z", memory_budget_mb=0.005, progress=False)
    local_trace = causal_trace(model, ITEMS, component="mlp_out", window=2, n_samples=2, seed=3, progress=False)
    monkeypatch.setattr(engine.SweepJob, "compute", None)  # the driver must not compute any chunk itself
    with use_executor(executor):
        ray_patch = activation_patching(model, PAIRS, component="z", memory_budget_mb=0.005, progress=False)
        ray_trace = causal_trace(model, ITEMS, component="mlp_out", window=2, n_samples=2, seed=3, progress=False)
    assert_same_bits(ray_patch, local_patch)
    assert_same_bits(ray_trace, local_trace)


def test_ray_streams_chunks_into_the_store_and_runs_resume_across_modes(executor, tmp_path, monkeypatch):
    model = executor.model
    options = dict(component="z", memory_budget_mb=0.005, progress=False, checkpoint_dir=tmp_path)
    real = engine.SweepJob.compute
    done = []

    def interrupted(self, stack, j, backoff=None):  # a local run killed after 5 chunks
        if len(done) == 5:
            raise KeyboardInterrupt("simulated interruption")
        done.append(j)
        return real(self, stack, j, backoff)

    monkeypatch.setattr(engine.SweepJob, "compute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        activation_patching(model, PAIRS, **options)
    monkeypatch.setattr(engine.SweepJob, "compute", real)
    with use_executor(executor):  # finish on Ray: the 5 local chunks are loaded, the rest computed by workers
        resumed = activation_patching(model, PAIRS, **options)
    files = sorted(tmp_path.glob("*/*.safetensors"))
    n_chunks = len(files)
    assert n_chunks > 10
    monkeypatch.setattr(engine.SweepJob, "compute", None)  # a local rerun finds every chunk in the store
    rerun = activation_patching(model, PAIRS, **options)
    monkeypatch.setattr(engine.SweepJob, "compute", real)
    fresh = activation_patching(model, PAIRS, component="z", memory_budget_mb=0.005, progress=False)
    assert_same_bits(resumed, fresh)
    assert_same_bits(rerun, fresh)
    assert sorted(tmp_path.glob("*/*.safetensors")) == files


def test_ray_sweeps_refuses_workers_with_other_weights(cluster, gpt2_tokenizer, loader):
    from recallscope.scale.distributed import ray_sweeps

    model = loader(device="cpu")
    other = functools.partial(tiny_model, "llama", tokenizer=gpt2_tokenizer, seed=1)
    with pytest.raises(ConfigError, match="different weights"):  # the fixture's workers hold both CPUs
        with ray_sweeps(model, other, num_workers=1, cpus_per_worker=0.0):
            pass
    with pytest.raises(ConfigError, match="num_workers"):
        with ray_sweeps(model, loader, num_workers=0):
            pass
