"""Distributed sweeps on Ray: the chunks of a sweep are evaluated by workers on several GPUs or nodes.

Algorithm:

1. :func:`ray_sweeps` connects to a Ray cluster (``address``, else ``$RAY_ADDRESS``, else a local one)
   and starts ``num_workers`` actors. Each loads its own copy of the model by calling
   ``loader(device=...)`` (a :class:`ModelRecipe`, or any picklable callable), on its GPU when it was
   given one, and reports the SHA-256 of its weights; a worker whose weights differ from the driver's
   model is an error before any work starts.
2. Inside the ``with`` block every sweep-engine method (``activation_patching``, ``causal_trace``, ...)
   runs unchanged on the driver up to the engine: reference runs, cells, the chunk plan, the chunk
   names and the checkpoint store are exactly those of a single-process run.
3. The engine hands its :class:`~recallscope.patching.engine.SweepJob` to :class:`RaySweepExecutor`:
   the job (traces on the CPU) goes into Ray's object store once; chunks already in the checkpoint
   store are loaded; the others are dealt to the workers, at most ``in_flight`` per worker at a time,
   so faster workers take more chunks. A worker moves the job to its own devices once per sweep.
4. Each finished chunk is written by the driver to the checkpoint store (atomic, checksummed) as it
   arrives, then given to the engine. A run interrupted anywhere resumes from the store, locally or
   distributed.
5. A worker evaluates a chunk with the same code as a local run (``SweepJob.compute`` with OOM
   back-off) on identical inputs and with the driver's thread count, so the gathered result is
   bitwise identical to a single-process run on the same kind of hardware.

Ray is imported only when a cluster is used; install it with ``pip install 'recallscope[distributed]'``.
"""

import dataclasses
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from recallscope.errors import ConfigError
from recallscope.scale.executor import use_executor

RAY_INSTALL = "pip install 'recallscope[distributed]'  (or: pip install 'ray>=2.9')"


def ray_available() -> bool:
    """Whether Ray can be imported here."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(f"distributed sweeps need Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


@dataclass(frozen=True)
class ModelRecipe:
    """How a worker loads its copy of the model: the arguments of :func:`recallscope.load_model`."""

    spec: str = "smollm2"
    """A model spec (``"smollm2"``, a hub name, a local directory or .gguf file) present on every node."""
    dtype: str | None = None
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` (default fp32)."""
    device_map: str | None = None
    """``"auto"`` to spread a model bigger than one GPU over the worker's GPUs (``gpus_per_worker`` > 1)."""

    def __call__(self, *, device: str) -> Any:
        from recallscope.models import load_model

        return load_model(self.spec, device=device, dtype=self.dtype, device_map=self.device_map)


@dataclass(frozen=True)
class RayConfig:
    """Where and how the Ray workers run."""

    num_workers: int = 2
    """Actors, each holding one copy of the model."""
    gpus_per_worker: float = 0.0
    """GPUs per actor: 0 for CPU workers, 1 for one GPU each, 2+ with ``device_map="auto"``."""
    cpus_per_worker: float = 1.0
    """CPU cores Ray reserves per actor."""
    torch_threads: int | None = None
    """torch threads in each actor (default: the driver's, so CPU results match a local run bit for bit)."""
    address: str | None = None
    """Cluster address (``"ray://head:10001"``, ``"auto"``); default ``$RAY_ADDRESS``, else a local cluster."""
    in_flight: int = 2
    """Chunks queued per worker, so a worker never waits for the driver."""
    verify_weights: bool = True
    """Check that every worker's weights hash to the driver model's before sweeping."""
    start_timeout_s: float = 1800.0
    """Give up when the workers have not loaded their models by then (the cluster may lack the resources)."""

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.in_flight < 1:
            raise ConfigError(f"num_workers={self.num_workers} and in_flight={self.in_flight} must be at least 1.")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise ConfigError("gpus_per_worker and cpus_per_worker cannot be negative.")


class _SweepWorker:
    """A Ray actor: one copy of the model, evaluating chunks of the jobs it is sent."""

    def __init__(self, loader: Callable[..., Any], threads: int | None) -> None:
        from recallscope.models.stack import build_stack
        from recallscope.scale.memory import OOMBackoff

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"
        self.model = loader(device=self.device)
        self.stack = build_stack(self.model)
        self.backoff = OOMBackoff()
        self.key: str | None = None
        self.job: Any = None

    def describe(self, verify: bool) -> dict[str, Any]:
        from recallscope.manifest import weights_hash

        return {"weights": weights_hash(self.model) if verify else None, "device": self.device,
                "threads": torch.get_num_threads(), "pid": os.getpid()}

    def compute(self, box: list, key: str, j: int) -> Tensor:
        if key != self.key:
            self.job, self.key = _placed(_ray().get(box[0]), self.stack), key
        return self.job.compute(self.stack, j, self.backoff)


def _placed(job: Any, stack: Any) -> Any:
    """``job`` with its traces on the worker model's layer devices and its logits on the output device."""
    from recallscope.scale.devices import output_device, place_trace

    out = output_device(stack) or torch.device("cpu")
    return dataclasses.replace(job, target=place_trace(job.target, stack), source=place_trace(job.source, stack),
                               target_logits=job.target_logits.to(out))


def _on_cpu(obj: Any) -> Any:
    """A copy of a trace, tensor or frozen dataclass (a metric) with every tensor on the CPU."""
    from recallscope.models.forward import Trace

    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Trace):
        return Trace(acts={k: _on_cpu(t) for k, t in obj.acts.items()},
                     kv={k: (_on_cpu(a), _on_cpu(b)) for k, (a, b) in obj.kv.items()})
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _on_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                   if isinstance(getattr(obj, f.name), (Tensor, Trace))}
        return dataclasses.replace(obj, **changes) if changes else obj
    return obj


class RaySweepExecutor:
    """Evaluates sweep chunks on Ray workers and streams each finished chunk into the checkpoint store.

    Use it through :func:`ray_sweeps`; ``start()`` / ``close()`` manage the actors by hand.
    """

    def __init__(self, model: Any, loader: Callable[..., Any], config: RayConfig = RayConfig()) -> None:
        self.model, self.loader, self.config = model, loader, config
        self.workers: list[Any] = []
        self.info: list[dict[str, Any]] = []
        self._started_ray = False

    def start(self) -> "RaySweepExecutor":
        """Connect to (or start) the cluster, start the actors, and check their weights."""
        ray = _ray()
        cfg = self.config
        if not ray.is_initialized():
            ray.init(address=cfg.address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
            self._started_ray = True
        actor = ray.remote(_SweepWorker).options(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
                                                 max_restarts=2, max_task_retries=2)
        threads = cfg.torch_threads or torch.get_num_threads()
        self.workers = [actor.remote(self.loader, threads) for _ in range(cfg.num_workers)]
        try:
            self.info = ray.get([w.describe.remote(cfg.verify_weights) for w in self.workers],
                                timeout=cfg.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            free = ray.available_resources()
            self.close()
            raise ConfigError(f"{cfg.num_workers} Ray workers ({cfg.cpus_per_worker} CPU, {cfg.gpus_per_worker} GPU "
                              f"each) did not start within {cfg.start_timeout_s:.0f} s; the cluster has "
                              f"{free.get('CPU', 0)} CPU and {free.get('GPU', 0)} GPU free. Ask for fewer workers "
                              "or resources, add nodes, or raise start_timeout_s for slow model loads.") from None
        if cfg.verify_weights:
            from recallscope.manifest import weights_hash

            mine = weights_hash(self.model)
            bad = [i for i, d in enumerate(self.info) if d["weights"] != mine]
            if bad:
                self.close()
                raise ConfigError(f"Ray workers {bad} loaded different weights from the driver's model "
                                  f"({self.info[bad[0]]['weights'][:12]} vs {mine[:12]}). Give ray_sweeps the "
                                  "loader that produced the driver's model (same spec, dtype and files on "
                                  "every node).")
        return self

    def close(self) -> None:
        """Stop the actors (and the local cluster, if :meth:`start` started it)."""
        if not self.workers and not self._started_ray:
            return
        ray = _ray()
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def run(self, stack: Any, job: Any, store: Any, *, progress: bool = True, desc: str = "patching"
            ) -> Iterator[tuple[int, Tensor]]:
        """Yield (chunk index, values) as chunks finish; see the module docstring."""
        from recallscope.models.stack import build_stack

        if not self.workers:
            raise ConfigError("the Ray executor has no workers: use it inside `with ray_sweeps(...)`.")
        if stack is not build_stack(self.model):
            raise ConfigError("this sweep runs on a different model from the one given to ray_sweeps(model, ...); "
                              "the workers hold copies of that model only.")
        ray = _ray()
        bar = tqdm(total=len(job.plan), desc=f"{desc} (ray x{len(self.workers)})", disable=not progress, leave=False)
        todo: deque[int] = deque()
        for j in range(len(job.plan)):
            found = store.get(job.name(j))
            if found is None:
                todo.append(j)
                continue
            bar.update()
            yield j, found["values"]
        box = [ray.put(_on_cpu(job))]  # inside a list, so each call passes the reference, not a copy
        key = box[0].hex()
        pending: dict[Any, tuple[int, Any]] = {}

        def submit(worker: Any) -> None:
            j = todo.popleft()
            pending[worker.compute.remote(box, key, j)] = (j, worker)

        try:
            for _ in range(self.config.in_flight):
                for worker in self.workers:
                    if todo:
                        submit(worker)
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                j, worker = pending.pop(ref)
                values = ray.get(ref)
                store.put(job.name(j), {"values": values})
                store.stats["computed"] += 1
                if todo:
                    submit(worker)
                bar.update()
                yield j, values
        finally:
            for ref in pending:
                ray.cancel(ref)
            bar.close()


@contextmanager
def ray_sweeps(model: Any, loader: Callable[..., Any] | str, **config: Any) -> Iterator[RaySweepExecutor]:
    """Run every sweep inside the ``with`` block on Ray workers; see the module docstring.

    ``loader``: a model spec (becomes ``ModelRecipe(spec)``), a :class:`ModelRecipe`, or a picklable
    ``loader(device=...) -> model`` that rebuilds ``model`` on a worker. ``config``: :class:`RayConfig`
    fields (``num_workers``, ``gpus_per_worker``, ``address``...).

        with ray_sweeps(model, ModelRecipe("gpt2-xl", dtype="bf16"), num_workers=8, gpus_per_worker=1):
            result = causal_trace(model, items, checkpoint_dir="ckpt")
    """
    recipe = ModelRecipe(loader) if isinstance(loader, str) else loader
    executor = RaySweepExecutor(model, recipe, RayConfig(**config)).start()
    try:
        with use_executor(executor):
            yield executor
    finally:
        executor.close()
