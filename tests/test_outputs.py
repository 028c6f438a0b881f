"""Run manifests, CSV tables and loading saved results by type."""

import csv
import json

import pytest
import torch

from recallscope.errors import ResultFileError
from recallscope.outputs import RunRecord, cells_table, load_result, write_csv
from recallscope.patching.activation import PatchingConfig
from recallscope.results import PatchingResult, save_result_dir


def _result():
    values = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 3, 4)
    values[1, 0, 2, 3] = float("nan")  # a cell one prompt lacks
    return PatchingResult(values=values, axes=("layer", "head", "pos"), clean=torch.ones(2), corrupt=torch.zeros(2),
                          labels={"layer": ["0", "1"], "pos": ["a·0", "b·1", "c·2", "d·3"]})


def test_cells_table_matches_per_cell_statistics():
    res = _result()
    rows = cells_table(res)
    assert len(rows) == 2 * 3 * 4
    lo, hi = res.ci()
    for row in rows:  # oracle: index every cell directly
        cell = (row["layer"], row["head"], row["pos"])
        column = res.values[(slice(None), *cell)]
        expected = column[~column.isnan()].mean()
        assert row["mean"] == pytest.approx(float(expected))
        assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((float(lo[cell]), float(hi[cell])))
        assert row["n_prompts"] == int((~column.isnan()).sum())
        assert row["pos_label"] == res.labels["pos"][row["pos"]] and "head_label" not in row
    assert [r["n_prompts"] for r in rows if (r["layer"], r["head"], r["pos"]) == (0, 2, 3)] == [1]


def test_write_csv_round_trips(tmp_path):
    rows = [{"a": 1, "b": "x,y"}, {"a": 2, "c": "z"}]
    path = write_csv(tmp_path / "t" / "rows.csv", rows)
    with open(path) as fh:
        back = list(csv.DictReader(fh))
    assert back == [{"a": "1", "b": "x,y", "c": ""}, {"a": "2", "b": "", "c": "z"}]


def test_run_record(tmp_path):
    out = tmp_path / "run"
    rec = RunRecord(out, "patch", options={"model": "m", "func": print}, config=PatchingConfig(window=3), argv=["x"])
    with rec.timed("step"):
        pass
    with rec.timed("step"):
        pass
    rec.prompts(["a", "b"])
    rec.output(out / "res")
    rec.output(tmp_path / "elsewhere.html")
    data = json.loads(rec.write(extra_field=1).read_text())
    assert data["command"] == "patch" and data["argv"] == ["x"] and data["options"] == {"model": "m"}
    assert data["config_type"] == "PatchingConfig" and data["config"]["window"] == 3
    assert data["n_prompts"] == 2 and len(data["prompts_sha256"]) == 64
    assert data["outputs"] == ["res", str(tmp_path / "elsewhere.html")]
    assert set(data["timings_s"]) == {"step", "total"} and data["extra_field"] == 1


def test_load_result_dispatches_on_type(tmp_path):
    res = _result()
    res.save(tmp_path / "p")
    back = load_result(tmp_path / "p")
    assert isinstance(back, PatchingResult)
    torch.testing.assert_close(back.values, res.values, equal_nan=True)
    save_result_dir(tmp_path / "odd", "MysteryResult", {"x": torch.zeros(1)}, {}, {})
    with pytest.raises(ResultFileError, match="MysteryResult.*known result types"):
        load_result(tmp_path / "odd")
    with pytest.raises(ResultFileError, match="not a saved result"):
        load_result(tmp_path)


def test_every_saved_result_type_is_loadable():
    """Any class that saves itself with save_result_dir must be registered, so `recallscope export` opens it."""
    import importlib
    import re
    from pathlib import Path

    from recallscope.results import discover_results

    RESULT_TYPES = discover_results()  # every module that defines a result registers it on import

    src = Path(__file__).resolve().parents[1] / "src" / "recallscope"
    kinds = set()
    for path in src.rglob("*.py"):
        kinds |= set(re.findall(r'save_result_dir\(\s*\w+,\s*"(\w+)"', path.read_text()))
    kinds -= {"TunedLens"}  # a lens, not a result with a figure
    assert kinds and kinds <= set(RESULT_TYPES), f"unregistered result types: {sorted(kinds - set(RESULT_TYPES))}"
    for kind, target in RESULT_TYPES.items():
        module, cls = target.split(":")
        loaded = getattr(importlib.import_module(module), cls)
        assert callable(getattr(loaded, "load", None)) and callable(getattr(loaded, "plot", None)), kind


def test_results_saved_before_checksums_still_load(tmp_path):
    """result.json without "sha256"/"module" (written before checksums existed) loads, unverified."""
    res = _result()
    path = res.save(tmp_path / "old")
    meta = json.loads((path / "result.json").read_text())
    assert set(meta["sha256"]) == {"values.safetensors", "manifest.json"} and meta["module"] == "recallscope.results"
    del meta["sha256"], meta["module"]
    (path / "result.json").write_text(json.dumps(meta))
    back = load_result(path)
    torch.testing.assert_close(back.values, res.values, equal_nan=True)
