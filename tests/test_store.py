"""The checkpoint store: atomic verified chunks, keys that separate computations, clear failures."""

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from recallscope import store as S
from recallscope.errors import CheckpointError, ConfigError
from recallscope.store import ChunkStore, CorruptChunkWarning, fingerprint, open_store
from recallscope.vocab import Component

MANIFEST = {"model": {"spec": "tiny", "weights_sha256": "ab" * 32}, "prompts_sha256": "cd" * 32,
            "config": {"method": "test", "layers": [0, 1]}, "seed": 0, "timings_s": {"total": 1.0}}
TENSORS = {"values": torch.randn(5, 3, generator=torch.Generator().manual_seed(0)),
           "half": torch.tensor([1.5, -2.25, float("nan")], dtype=torch.float16),
           "bf16": torch.tensor([0.1, 3e38], dtype=torch.bfloat16),
           "ids": torch.arange(4)}


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _files(store: ChunkStore) -> list[Path]:
    return sorted(store.path.glob("*.safetensors"))


def test_round_trip_is_bitwise_and_named_by_checksum(tmp_path):
    store = open_store(tmp_path, MANIFEST)
    path = store.put("c00000-x", TENSORS)
    assert path.parent == tmp_path / store.key and len(path.name.split(".")[1]) == 32
    back = store.get("c00000-x")
    assert back.keys() == TENSORS.keys()
    for k, v in TENSORS.items():
        assert back[k].dtype == v.dtype and _bits(back[k]) == _bits(v), k
    assert store.get("c00001-x") is None
    assert store.names() == ["c00000-x"]
    assert not list(store.path.glob(".*.tmp")), "no temporary file is left after a write"


def test_get_or_compute_computes_once(tmp_path):
    calls = []

    def work():
        calls.append(1)
        return {"v": torch.ones(2)}

    for _ in range(3):
        store = open_store(tmp_path, MANIFEST)
        assert torch.equal(store.get_or_compute("a", work)["v"], torch.ones(2))
    assert len(calls) == 1
    disabled = open_store(None, MANIFEST)
    assert not disabled.enabled and disabled.put("a", {"v": torch.ones(1)}) is None
    disabled.get_or_compute("a", work)
    disabled.get_or_compute("a", work)
    assert len(calls) == 3, "a disabled store keeps nothing"


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "foreign"])
def test_damaged_chunk_is_detected_deleted_and_recomputed(tmp_path, damage):
    store = open_store(tmp_path, MANIFEST)
    path = store.put("c", TENSORS)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid chunk of another store, copied in under this chunk's name (its checksum is right)
        other = open_store(tmp_path / "other", {**MANIFEST, "seed": 1})
        path.unlink()
        foreign = other.put("c", TENSORS)
        path = store.path / foreign.name
        path.write_bytes(foreign.read_bytes())
    store = open_store(tmp_path, MANIFEST)  # a later run finds the damage
    with pytest.warns(CorruptChunkWarning, match="corrupt.*recomputed"):
        assert store.get("c") is None
    assert not path.exists() and store.stats["corrupt"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(store.get_or_compute("c", lambda: {"values": TENSORS["values"]})["values"],
                           TENSORS["values"])


def test_a_file_whose_name_lacks_a_valid_checksum_is_never_parsed(tmp_path, monkeypatch):
    store = open_store(tmp_path, MANIFEST)
    good = store.put("c", TENSORS)
    (store.path / "c.notachecksum.safetensors").write_bytes(good.read_bytes())
    good.unlink()
    store = open_store(tmp_path, MANIFEST)
    parsed = []
    monkeypatch.setattr("safetensors.torch.load", lambda data: parsed.append(data))
    with pytest.warns(CorruptChunkWarning):
        assert store.get("c") is None
    assert parsed == []


def test_a_chunk_deleted_behind_the_stores_back_is_just_absent(tmp_path):
    store = open_store(tmp_path, MANIFEST)
    store.put("c", TENSORS).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.get("c") is None and store.names() == []


def test_keys_separate_config_model_prompts_seed_and_inputs(tmp_path):
    base = open_store(tmp_path, MANIFEST, inputs={"answer": torch.tensor([1, 2])})
    variants = [
        ({**MANIFEST, "config": {"method": "test", "layers": [0]}}, {"answer": torch.tensor([1, 2])}),
        ({**MANIFEST, "model": {"spec": "tiny", "weights_sha256": "ef" * 32}}, {"answer": torch.tensor([1, 2])}),
        ({**MANIFEST, "prompts_sha256": "00" * 32}, {"answer": torch.tensor([1, 2])}),
        ({**MANIFEST, "seed": 1}, {"answer": torch.tensor([1, 2])}),
        (MANIFEST, {"answer": torch.tensor([1, 3])}),
    ]
    keys = {base.key} | {open_store(tmp_path, m, inputs=i).key for m, i in variants}
    assert len(keys) == 1 + len(variants)
    same = open_store(tmp_path, {**MANIFEST, "timings_s": {"total": 9.0}, "versions": {"x": "1"}},
                      inputs={"answer": torch.tensor([1, 2])})
    assert same.key == base.key and same.path == base.path, "timings and versions do not change the key"
    assert (base.path / "store.json").is_file()


def test_children_are_separate_namespaces(tmp_path):
    store = open_store(tmp_path, MANIFEST)
    a, b = store.child("len5"), store.child("len6")
    a.put("c0", {"v": torch.zeros(1)})
    b.put("c0", {"v": torch.ones(1)})
    assert torch.equal(a.get("c0")["v"], torch.zeros(1)) and torch.equal(b.get("c0")["v"], torch.ones(1))
    assert a.names() == ["c0"] and store.names() == [] and store.get("c0") is None


@pytest.mark.parametrize("name", ["", "a.b", "a/b", "../x", "a__b", "_a", "a b"])
def test_bad_chunk_names(tmp_path, name):
    with pytest.raises(ConfigError, match="chunk name"):
        open_store(tmp_path, MANIFEST).put(name, {"v": torch.zeros(1)})


def test_unwritable_checkpoint_directory_fails_at_open(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match="cannot use .* as a checkpoint directory.*writable"):
        open_store(blocker / "ckpt", MANIFEST)


def test_failed_write_leaves_no_chunk_and_raises_clearly(tmp_path, monkeypatch):
    store = open_store(tmp_path, MANIFEST)

    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S.os, "replace", no_space)
    with pytest.raises(CheckpointError, match="No space left.*Free disk space"):
        store.put("c", TENSORS)
    assert _files(store) == [] and not list(store.path.glob(".*.tmp"))


def test_temporaries_of_dead_writers_are_removed_and_never_read(tmp_path):
    store = open_store(tmp_path, MANIFEST)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = store.path / f".c.{dead_pid}.0badc0de.tmp"
    live = store.path / f".c.{os.getpid()}.0badc0de.tmp"
    for t in (stale, live):
        t.write_bytes(b"partial")
    assert store.get("c") is None, "a temporary file is never a chunk"
    open_store(tmp_path, MANIFEST)
    assert not stale.exists() and live.exists(), "only the dead writer's file is removed"


@dataclass(frozen=True)
class _Metric:
    answer: torch.Tensor
    name: str = "m"


def test_fingerprint_is_a_value_hash():
    a = {"x": [1, 2.0, "s", None, True], "t": torch.tensor([1, 2]), "c": Component.HEAD_OUT}
    assert fingerprint(a) == fingerprint(dict(reversed(list(a.items()))))
    assert fingerprint(torch.tensor([1, 2])) != fingerprint(torch.tensor([1, 2], dtype=torch.int32))
    assert fingerprint(torch.tensor([1.0])) != fingerprint(torch.tensor([[1.0]]))
    assert len({fingerprint(1), fingerprint(True), fingerprint(1.0), fingerprint("1")}) == 4
    assert fingerprint(Component.HEAD_OUT) != fingerprint(Component.RESID_PRE)
    assert fingerprint((1, 2)) != fingerprint([1, 2])
    assert fingerprint(_Metric(torch.tensor([3]))) == fingerprint(_Metric(torch.tensor([3])))
    assert fingerprint(_Metric(torch.tensor([3]))) != fingerprint(_Metric(torch.tensor([4])))
    # stability across processes is checked by tests/test_resume.py: a killed subprocess's chunks
    # are found by the test process only if both compute the same key.


def test_json_rows_round_trip_and_delete(tmp_path):
    """Non-tensor results travel as JSON bytes (floats exact, key order kept); delete removes a chunk."""
    row = {"term": "venal", "z": 0.1 + 0.2, "nan": float("nan"), "ids": [1, 2], "é": None}
    store = open_store(tmp_path, MANIFEST)
    store.put("row", {"row": S.json_tensor(row)})
    back = S.tensor_json(open_store(tmp_path, MANIFEST).get("row")["row"])
    assert list(back) == list(row) and back["z"] == row["z"] and back["nan"] != back["nan"]
    assert {k: v for k, v in back.items() if k != "nan"} == {k: v for k, v in row.items() if k != "nan"}
    store.delete("row")
    store.delete("row")  # absent: fine
    assert store.get("row") is None and not _files(store)
    assert open_store(tmp_path, MANIFEST).names() == []
