"""A streaming, resumable activation store: transcoder inputs and MLP outputs of every layer, on disk.

Training transcoders for every layer of a real model needs each layer's activations over the same
tokens; holding all of them in RAM does not fit (SmolLM2, 30 layers x 2 x 576 floats per token). So:

1. :meth:`ActivationStore.create` preallocates, per layer, two ``.npy`` files (``layer{l}.in.npy``,
   ``layer{l}.out.npy``, ``[n_rows, d]``, float16 or float32) and writes ``store.json`` with the
   metadata and ``rows_done = 0``.
2. :func:`collect_to_store` runs the model over the token batches in order; after each chunk it
   writes the chunk's rows of every layer into the memory-mapped files, flushes them, then records the
   new ``rows_done`` in ``store.json`` (atomic rename). An interrupted collection resumes at the first
   chunk not recorded (chunks are deterministic given the tokens and ``batch_size``).
3. :meth:`ActivationStore.layer` reads one layer back as float32 tensors (only that layer is in RAM).
"""

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from recallscope.errors import ConfigError, ResultFileError

_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class StoreMeta:
    """What a store holds; two stores with equal metadata hold the same activations."""

    layers: tuple[int, ...]
    """Layers stored."""
    n_rows: int
    """Activation vectors (tokens) per layer."""
    d_in: int
    """Width of the transcoder input."""
    d_out: int
    """Width of the MLP output."""
    dtype: str = "float32"
    """Storage dtype: ``float16`` halves the disk use (activations are read back as float32)."""
    input_hook: str = "blocks.{layer}.ln2.hook_out"
    """Hook template of the inputs."""
    output_hook: str = "blocks.{layer}.hook_mlp_out"
    """Hook template of the outputs."""
    first_pos: int = 0
    """Positions before this one (e.g. BOS) are left out of every sequence."""
    source: dict[str, Any] = field(default_factory=dict)
    """Provenance of the tokens (model, corpus, seed...): part of the identity of the store."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"store dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}.")
        if self.n_rows < 1 or not self.layers:
            raise ConfigError(f"an activation store needs rows and layers, got n_rows={self.n_rows}, "
                              f"layers={self.layers}.")


class ActivationStore:
    """A directory of per-layer memory-mapped activation files (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        path = self.directory / "store.json"
        if not path.is_file():
            raise ResultFileError(f"{self.directory} holds no activation store (store.json missing); create one "
                                  "with ActivationStore.create.")
        data = json.loads(path.read_text())
        meta = data["meta"]
        meta["layers"] = tuple(meta["layers"])
        self.meta = StoreMeta(**meta)
        self.rows_done = int(data["rows_done"])

    @classmethod
    def create(cls, directory: str | os.PathLike, meta: StoreMeta) -> "ActivationStore":
        """A new empty store (files preallocated), or the existing one at ``directory`` if its metadata
        equals ``meta`` (so a rerun resumes); a store with other metadata is an error."""
        directory = Path(directory)
        if (directory / "store.json").is_file():
            store = cls(directory)
            if asdict(store.meta) != asdict(meta):
                raise ConfigError(f"{directory} holds activations of another configuration ({store.meta}); delete "
                                  "the directory or use another one.")
            return store
        directory.mkdir(parents=True, exist_ok=True)
        for layer in meta.layers:
            for part, width in (("in", meta.d_in), ("out", meta.d_out)):
                arr = np.lib.format.open_memmap(directory / f"layer{layer}.{part}.npy", mode="w+",
                                                dtype=_DTYPES[meta.dtype], shape=(meta.n_rows, width))
                del arr
        _write_manifest(directory, meta, 0)
        return cls(directory)

    @property
    def complete(self) -> bool:
        return self.rows_done >= self.meta.n_rows

    def _array(self, layer: int, part: str, mode: str) -> np.memmap:
        if layer not in self.meta.layers:
            raise ConfigError(f"layer {layer} is not in this store (layers {list(self.meta.layers)}).")
        return np.load(self.directory / f"layer{layer}.{part}.npy", mmap_mode=mode)  # type: ignore[arg-type]

    def write(self, start: int, acts: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Write rows ``start..start + n`` of every layer, flush, then record them as done."""
        n = next(iter(acts.values()))[0].shape[0]
        if start != self.rows_done or start + n > self.meta.n_rows:
            raise ConfigError(f"rows must be appended in order: store has {self.rows_done} of {self.meta.n_rows}, "
                              f"got rows {start}..{start + n}.")
        for layer in self.meta.layers:
            for part, values in zip(("in", "out"), acts[layer]):
                arr = self._array(layer, part, "r+")
                arr[start:start + n] = values.detach().cpu().float().numpy().astype(arr.dtype)
                arr.flush()
                del arr
        self.rows_done = start + n
        _write_manifest(self.directory, self.meta, self.rows_done)

    def layer(self, layer: int, rows: slice | None = None) -> tuple[Float[Tensor, "n d_in"], Float[Tensor, "n d_out"]]:
        """The stored ``(inputs, outputs)`` of ``layer`` as float32 tensors (the rows written so far)."""
        if not self.complete:
            raise ResultFileError(f"the activation store {self.directory} is incomplete ({self.rows_done} of "
                                  f"{self.meta.n_rows} rows); rerun the collection to finish it.")
        rows = rows or slice(0, self.meta.n_rows)
        return tuple(torch.from_numpy(np.array(self._array(layer, part, "r")[rows], dtype=np.float32))
                     for part in ("in", "out"))  # type: ignore[return-value]


def _write_manifest(directory: Path, meta: StoreMeta, rows_done: int) -> None:
    tmp = directory / "store.json.tmp"
    tmp.write_text(json.dumps({"format": "recallscope-activations/1", "meta": asdict(meta), "rows_done": rows_done},
                              indent=1) + "\n")
    os.replace(tmp, directory / "store.json")


def _chunks(tokens: Tensor | list[Tensor], batch_size: int) -> Iterator[Tensor]:
    for batch in (tokens if isinstance(tokens, list) else [tokens]):
        for start in range(0, batch.shape[0], batch_size):
            yield batch[start:start + batch_size]


def n_rows_of(tokens: Tensor | list[Tensor], first_pos: int) -> int:
    """How many activation rows ``tokens`` give when positions before ``first_pos`` are left out."""
    return sum(b.shape[0] * (b.shape[1] - first_pos) for b in (tokens if isinstance(tokens, list) else [tokens]))


@torch.no_grad()
def collect_to_store(model: Any, tokens: Tensor | list[Tensor], store: ActivationStore, *, batch_size: int = 16,
                     progress: bool = True, desc: str = "activations") -> ActivationStore:
    """Fill ``store`` with ``model``'s activations on ``tokens`` (resuming after the rows already done)."""
    meta = store.meta
    if n_rows_of(tokens, meta.first_pos) != meta.n_rows:
        raise ConfigError(f"the tokens give {n_rows_of(tokens, meta.first_pos)} rows, the store expects "
                          f"{meta.n_rows}; these are not the tokens the store was made for.")
    names = {h.format(layer=layer) for layer in meta.layers for h in (meta.input_hook, meta.output_hook)}
    bar = tqdm(total=meta.n_rows, initial=store.rows_done, desc=desc, unit="tok", disable=not progress, leave=False)
    row = 0
    for chunk in _chunks(tokens, batch_size):
        n = chunk.shape[0] * (chunk.shape[1] - meta.first_pos)
        if row + n <= store.rows_done:  # written by an earlier, interrupted run
            row += n
            continue
        _, cache = model.run_with_cache(chunk, names_filter=lambda name: name in names)

        def rows(hook: str, layer: int) -> Tensor:
            acts = cache[hook.format(layer=layer)][:, meta.first_pos:]
            return acts.reshape(-1, acts.shape[-1])

        store.write(row, {layer: (rows(meta.input_hook, layer), rows(meta.output_hook, layer))
                          for layer in meta.layers})
        row += n
        bar.update(n)
    bar.close()
    return store
