"""Resumable work: a checkpoint store of finished chunks, keyed by what determines them.

A long method (a patching sweep, attribution over a dataset, a route analysis, organism training)
splits its work into named chunks. With a store, every finished chunk is written to disk, and a rerun
of the same command loads it instead of recomputing it, so an interrupted run loses at most the chunk
in flight. How it works:

1. **Key.** :func:`open_store` hashes the manifest core (:func:`recallscope.manifest.manifest_key`:
   model weights, prompts, config, seed) together with a :func:`fingerprint` of any other inputs the
   manifest does not hold (answer ids, spans, a metric object). Each key gets its own directory
   ``<root>/<key>/``, so a changed config, model, prompt or seed never sees another run's chunks.
2. **Atomic writes.** A chunk is serialised (safetensors) in memory, written to a hidden temporary
   file in the same directory, flushed and ``fsync``-ed, then renamed to its final name (and the
   directory ``fsync``-ed). A crash leaves either no file or a complete one under the final name.
3. **Checksums in the name.** The final name is ``<name>.<sha256 of the bytes>.safetensors``, and the
   file's metadata repeats the chunk name and store key. A reader hashes the bytes before parsing;
   a file that fails any check (truncated, bit-flipped, copied from another store) is deleted with a
   :class:`CorruptChunkWarning` and its chunk is recomputed. Nothing unverified is ever parsed.
4. **Temporary files** of writers that died (their process id no longer exists) are removed when the
   store is opened; readers never look at them.

Adopting it in a new method takes three lines::

    store = open_store(checkpoint_dir, manifest, inputs={"answers": answer_ids})  # None -> disabled
    for name, work in chunks:
        tensors = store.get_or_compute(name, work)  # work() -> dict[str, Tensor]

Chunk names must be stable across runs (derive them from the chunk's content or plan index, never
from ids or times). Results are bitwise identical to an uninterrupted run as long as each chunk's
computation is deterministic, which recallscope's methods are on CPU (``tests/test_resume.py``).
"""

import dataclasses
import enum
import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from recallscope.errors import CheckpointError, ConfigError
from recallscope.manifest import atomic_write_text, manifest_key

FORMAT = "recallscope-chunk-1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_TMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]+\.tmp$")
_log = logging.getLogger(__name__)


class CorruptChunkWarning(UserWarning):
    """A checkpoint chunk failed verification; it was deleted and will be recomputed."""


def fingerprint(obj: Any) -> str:
    """A SHA-256 over the *value* of ``obj``: tensors (dtype, shape, bytes), dataclasses, enums,
    mappings, sequences and scalars. Other objects contribute their class name and their attributes.

    Two equal inputs give equal fingerprints in any process (no ids, no addresses), so a fingerprint
    can key checkpoint stores across runs.
    """
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, enum.Enum):
        h.update(f"E{type(obj).__qualname__}.{obj.name}".encode())
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"S{type(obj).__name__}:{obj!r}".encode())
    elif isinstance(obj, bytes):
        h.update(b"B%d:" % len(obj) + obj)
    elif isinstance(obj, Mapping):
        h.update(b"M%d" % len(obj))
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{type(obj).__name__}{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"D{type(obj).__qualname__}".encode())
        _feed(h, {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    else:
        h.update(f"O{type(obj).__module__}.{type(obj).__qualname__}".encode())
        state = getattr(obj, "__dict__", None)
        if state:
            _feed(h, {k: v for k, v in state.items() if not k.startswith("_")})


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open directories (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


class ChunkStore:
    """Finished chunks of one computation, in ``path`` (None: a disabled store that keeps nothing).

    Use :func:`open_store` to make one. ``stats`` counts chunks ``loaded``, ``computed`` and found
    ``corrupt`` in this process (shared with every :meth:`child`). The directory is listed once, on
    the first lookup, so finding a chunk costs O(1) however many there are.
    """

    def __init__(self, path: Path | None, key: str, *, prefix: str = "", shared: dict[str, Any] | None = None):
        self.path = path
        self.key = key
        self.prefix = prefix
        self._shared: dict[str, Any] = shared if shared is not None else {"stats": {"loaded": 0, "computed": 0, "corrupt": 0},
                                                          "index": None}
        self.stats: dict[str, int] = self._shared["stats"]

    @classmethod
    def disabled(cls) -> "ChunkStore":
        """A store that never finds a chunk and writes nothing (the default when no directory is given)."""
        return cls(None, "")

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def __repr__(self) -> str:
        where = self.path if self.enabled else "disabled"
        return f"ChunkStore({where}, prefix={self.prefix!r}, stats={self.stats})"

    def manifest_entry(self) -> dict[str, Any]:
        """``{"checkpoint": {dir, key, loaded, computed, corrupt}}`` for a result's manifest ({} if disabled)."""
        if self.path is None:
            return {}
        return {"checkpoint": {"dir": str(self.path.parent), "key": self.key, **self.stats}}

    def child(self, name: str) -> "ChunkStore":
        """A view whose chunk names are prefixed by ``name`` (for sub-computations: one per length group...)."""
        return ChunkStore(self.path, self.key, prefix=self.prefix + _checked(name) + "__", shared=self._shared)

    def _index(self) -> dict[str, list[Path]]:
        """Chunk files on disk by full chunk name (listed once; kept up to date by this process)."""
        if self._shared["index"] is None:
            index: dict[str, list[Path]] = {}
            assert self.path is not None
            for entry in sorted(os.scandir(self.path), key=lambda e: e.name):
                if entry.name.endswith(".safetensors") and not entry.name.startswith("."):
                    index.setdefault(entry.name.split(".")[0], []).append(Path(entry.path))
            self._shared["index"] = index
        shared: dict[str, list[Path]] = self._shared["index"]
        return shared

    def names(self) -> list[str]:
        """Names (under this view's prefix) of the chunks on disk, sorted; their content is not verified."""
        if self.path is None:
            return []
        found = [n[len(self.prefix):] for n, files in self._index().items() if files and n.startswith(self.prefix)]
        return sorted(n for n in found if "__" not in n)

    def get(self, name: str) -> dict[str, Tensor] | None:
        """The verified tensors of chunk ``name``, or None when it is absent (or was corrupt and deleted)."""
        if self.path is None:
            return None
        full = self.prefix + _checked(name)
        for file in list(self._index().get(full, [])):
            tensors = self._read(file, full)
            if tensors is not None:
                self.stats["loaded"] += 1
                return tensors
        return None

    def _read(self, file: Path, full: str) -> dict[str, Tensor] | None:
        from safetensors.torch import load

        try:
            data = file.read_bytes()
        except FileNotFoundError:  # deleted since the directory was listed: simply absent
            self._index().get(full, []).remove(file)
            return None
        except OSError as exc:
            self._discard(file, f"unreadable ({exc.strerror or exc})")
            return None
        digest = file.name[len(full) + 1:-len(".safetensors")]
        if hashlib.sha256(data).hexdigest()[: len(digest)] != digest or len(digest) != 32:
            self._discard(file, "its checksum does not match its content (truncated or modified)")
            return None
        try:
            meta = _metadata(data)
            tensors = load(data)
        except Exception as exc:  # safetensors raises several types on malformed headers
            self._discard(file, f"it is not a valid safetensors file ({type(exc).__name__})")
            return None
        if meta.get("format") != FORMAT or meta.get("name") != full or meta.get("key") != self.key:
            self._discard(file, "it belongs to another chunk or store")
            return None
        return tensors

    def _discard(self, file: Path, why: str) -> None:
        self.stats["corrupt"] += 1
        files = self._index().get(file.name.split(".")[0], [])
        if file in files:
            files.remove(file)
        warnings.warn(f"checkpoint chunk {file} is corrupt: {why}. Deleting it; the chunk will be "
                      "recomputed.", CorruptChunkWarning, stacklevel=4)
        try:
            file.unlink()
        except OSError:
            pass
        return None

    def put(self, name: str, tensors: Mapping[str, Tensor]) -> Path | None:
        """Write chunk ``name`` atomically (temp file, fsync, rename); returns its path (None if disabled)."""
        if self.path is None:
            return None
        from safetensors.torch import save

        full = self.prefix + _checked(name)
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        data = save(cpu, metadata={"format": FORMAT, "name": full, "key": self.key})
        final = self.path / f"{full}.{hashlib.sha256(data).hexdigest()[:32]}.safetensors"
        tmp = self.path / f".{full}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            raise CheckpointError(f"could not write checkpoint chunk {final.name} to {self.path} "
                                  f"({exc.strerror or exc}). Free disk space or choose another checkpoint "
                                  "directory.") from exc
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(self.path)
        files = self._index().setdefault(full, [])
        if final not in files:
            files.append(final)
        return final

    def delete(self, name: str) -> None:
        """Remove chunk ``name`` from disk (a superseded training checkpoint, say); absent is fine."""
        if self.path is None:
            return
        for file in self._index().pop(self.prefix + _checked(name), []):
            try:
                file.unlink()
            except FileNotFoundError:
                pass
        _fsync_dir(self.path)

    def get_or_compute(self, name: str, compute: Callable[[], Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Chunk ``name`` from disk if finished, else ``compute()`` it, store it, and return it.

        The returned tensors are the stored ones (on CPU), so a fresh and a resumed run return the
        same bits.
        """
        found = self.get(name)
        if found is not None:
            return found
        tensors = dict(compute())
        self.stats["computed"] += 1
        self.put(name, tensors)
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()} if self.enabled else tensors


def json_tensor(obj: Any) -> Tensor:
    """``obj`` as JSON text in a uint8 tensor, so that a chunk can carry small non-tensor results (a table
    row, a skip reason); :func:`tensor_json` reads it back. Floats round-trip exactly."""
    data = json.dumps(obj, allow_nan=True).encode()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def tensor_json(t: Tensor) -> Any:
    """The object :func:`json_tensor` stored in ``t``."""
    return json.loads(bytes(t.to(torch.uint8).numpy().tobytes()).decode())


def _checked(name: str) -> str:
    if not _NAME.match(name) or "__" in name:
        raise ConfigError(f"chunk name {name!r} is not allowed: use letters, digits, '-' and single '_' "
                          "(no dots, no '__'), starting with a letter or digit.")
    return name


def _metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise ValueError("bad safetensors header length")
    return json.loads(data[8:8 + n]).get("__metadata__", {})


def open_store(directory: str | os.PathLike | None, manifest: Mapping[str, Any], *,
               inputs: Mapping[str, Any] | None = None) -> ChunkStore:
    """The checkpoint store under ``directory`` for the computation described by ``manifest``.

    ``inputs``: anything else the chunks depend on that the manifest does not record (answer token
    ids, spans, a metric object); it is hashed with :func:`fingerprint` into the key. Returns a
    disabled store when ``directory`` is None. Raises :class:`CheckpointError` at once (not after
    hours of work) when the directory cannot be created or written.
    """
    if directory is None:
        return ChunkStore.disabled()
    key = hashlib.sha256((manifest_key(dict(manifest)) + fingerprint(dict(inputs or {}))).encode()).hexdigest()
    path = Path(directory).expanduser() / key
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
        if not (path / "store.json").exists():
            model = manifest.get("model", {})
            about = {"key": key, "format": FORMAT, "model": model.get("spec"),
                     "weights_sha256": model.get("weights_sha256"), "prompts_sha256": manifest.get("prompts_sha256"),
                     "config": manifest.get("config"), "seed": manifest.get("seed")}
            atomic_write_text(path / "store.json", json.dumps(about, indent=1, default=str))
    except OSError as exc:
        raise CheckpointError(f"cannot use {Path(directory)} as a checkpoint directory ({exc.strerror or exc}). "
                              "Choose a writable directory (--resume-dir) or fix its permissions.") from exc
    _remove_stale_temporaries(path)
    _log.info("checkpoint store %s", path)
    return ChunkStore(path, key)


def _remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files left by writers that no longer run (killed mid-write)."""
    for tmp in path.glob(".*.tmp"):
        m = _TMP.match(tmp.name)
        if m and not _pid_alive(int(m.group(1))):
            try:
                tmp.unlink()
            except OSError:
                pass
