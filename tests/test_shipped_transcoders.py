"""The transcoder sets shipped with recallscope: present for every organism, small, bound to the organism's
weights by hash, and as good on freshly drawn text as their records say."""

import json
import shutil

import pytest
import torch

from recallscope.errors import ResultFileError, UnknownModelError
from recallscope.features import shipped as sh
from recallscope.features.data import training_tokens
from recallscope.features.replacement import fidelity

EV_TOL = 0.01
"""Fresh tokens (another seed: new self-generated text, task prompts redrawn from the organism's finite pool)
vs the recorded held-out tokens differ by sampling noise only. Measured over 5 seeds x 400 sequences on
route-s0, fact-store and b64-decoder: at most 0.0039 per layer (route-s0 layer 2; notes/g2-shiptc.md).
2.5x that; the same set with its features removed (skip + bias only) falls far outside it (checked below)."""
TOP1_TOL = 0.05
"""Same for top-1 agreement (800-3500 positions per record): measured spread at most 0.025 (route-s0)."""
FRESH = ["route-s0", "fact-store", "b64-decoder"]


def _names() -> list[str]:
    from recallscope.organisms import shipped

    return shipped()


def test_every_shipped_organism_has_a_set_that_loads():
    assert sh.shipped_transcoder_names() == _names() and len(_names()) >= 19
    for name in _names():
        rec = sh.shipped_record(name)
        tset = sh.load_shipped_transcoders(name)
        assert rec["organism"] == name and rec["format"] == sh.FORMAT
        assert tset.layers == list(range(rec["n_layers"])) and tset.n_layers == rec["n_layers"]
        assert set(rec["explained_variance"]) == {str(layer) for layer in tset.layers}
        assert rec["config"]["train"]["d_sae"] == tset[0].spec.d_sae
        assert rec["dtype"] in ("float16", "float32") and rec["fp16_max_ev_change"] >= 0
        if rec["dtype"] == "float16":
            assert rec["fp16_max_ev_change"] <= sh.FP16_EV_TOLERANCE
        from safetensors.torch import load_file

        weights = load_file(str(sh.shipped_dir(name) / "transcoders.safetensors"))
        assert {str(t.dtype) for t in weights.values()} == {f"torch.{rec['dtype']}"}


def test_shipped_sets_are_under_20_mb():
    files = [f for f in sh.SHIPPED_DIR.rglob("*") if f.is_file()]
    assert len(files) >= 3 * len(_names())
    assert sum(f.stat().st_size for f in files) < 20 * 1024 * 1024


@pytest.mark.parametrize("name", _names())
def test_recorded_hash_is_the_shipped_organism(name):
    from recallscope.organisms.recipes import WEIGHTS_DIR

    rec = sh.shipped_record(name)
    config = json.loads((WEIGHTS_DIR / name / "config.json").read_text())
    assert rec["organism_weights_sha256"] == sh.organism_file_sha256(name) == config["weights_sha256"]


@pytest.mark.parametrize("name", FRESH)
def test_shipped_set_reproduces_its_record_on_fresh_tokens(name):
    from recallscope import load_model

    model = load_model(f"organism:{name}")
    tset = sh.load_shipped_transcoders(model)  # also checks the loaded weights' hash
    rec = sh.shipped_record(name)
    fresh = training_tokens(model, 400, seed=1234)
    ev = sh.layer_explained_variance(model, tset, fresh)
    for layer, value in ev.items():
        assert value == pytest.approx(rec["explained_variance"][str(layer)], abs=EV_TOL), (layer, ev, rec)
    fid = fidelity(model, tset, fresh)
    assert fid.top1_agreement == pytest.approx(rec["fidelity"]["all"]["top1_agreement"], abs=TOP1_TOL)
    with torch.no_grad():  # the tolerance can fail: without its features the set misses it by far
        for layer in tset.layers:
            tset[layer].W_dec.zero_()
    worse = sh.layer_explained_variance(model, tset, fresh)
    assert all(worse[layer] < rec["explained_variance"][str(layer)] - 3 * EV_TOL for layer in worse), worse


def test_unknown_name_lists_the_shipped_sets():
    with pytest.raises(UnknownModelError, match="route-s0"):
        sh.load_shipped_transcoders("no-such-organism")


def test_tampered_hash_is_a_clear_error(tmp_path, monkeypatch):
    shutil.copytree(sh.SHIPPED_DIR / "route-s0", tmp_path / "route-s0")
    path = tmp_path / "route-s0" / "shipped.json"
    rec = json.loads(path.read_text())
    rec["organism_weights_sha256"] = "0" * 64
    path.write_text(json.dumps(rec))
    monkeypatch.setattr(sh, "SHIPPED_DIR", tmp_path)
    with pytest.raises(ResultFileError, match=r"0000000000000000.*ship_organism_transcoders.py --only route-s0"):
        sh.load_shipped_transcoders("route-s0")
    assert sh.matching_shipped("organism:route-s0", rec["config"]) is None  # the CLI trains instead
    assert sh.load_shipped_transcoders("route-s0", verify=False).n_layers == rec["n_layers"]


def test_changed_organism_weights_are_a_clear_error():
    from recallscope import load_model

    model = load_model("organism:route-s0")
    with torch.no_grad():
        next(iter(model.parameters())).add_(1e-3)
    with pytest.raises(ResultFileError, match="loaded model's weights"):
        sh.load_shipped_transcoders(model)


def test_cli_uses_the_shipped_set_at_the_defaults_and_trains_otherwise(tmp_path, capsys):
    from recallscope.cli import main

    assert main(["transcoders", "--model", "organism:route-s0", "--out", str(tmp_path / "a")]) == 0
    assert "shipped set" in capsys.readouterr().out
    src = sh.shipped_dir("route-s0")
    assert (tmp_path / "a" / "transcoders.safetensors").read_bytes() == (src / "transcoders.safetensors").read_bytes()
    assert not (tmp_path / "a" / "checkpoints").exists()
    for fname in ("report.json", "fidelity.json", "config.json"):
        assert json.loads((tmp_path / "a" / fname).read_text())
    assert main(["transcoders", "--model", "organism:route-s0", "--n-seqs", "40", "--steps", "3", "--quiet",
                 "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "checkpoints").is_dir()


def test_retraining_reproduces_the_shipped_weights(tmp_path):
    """The ship command's training step, rerun for one organism (about 20 s): the same weights to float16
    precision (float32 training is deterministic on CPU; rounding to float16 is the only difference)."""
    from recallscope.cli import main
    from recallscope.features.transcoder import TranscoderSet

    assert main(["transcoders", "--model", "organism:route-s0", "--no-shipped", "--out", str(tmp_path),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "config.json").read_text()) == sh.shipped_record("route-s0")["config"]
    fresh, shipped = TranscoderSet.load(tmp_path), sh.load_shipped_transcoders("route-s0")
    for layer in shipped.layers:
        for (key, p), q in zip(fresh[layer].named_parameters(), shipped[layer].parameters()):
            torch.testing.assert_close(p.detach().half().float(), q.detach(), rtol=2e-3, atol=2e-3, msg=key)


def test_every_shipped_set_matches_the_cli_defaults(tmp_path, monkeypatch, capsys):
    """If the CLI's default organism settings change, the shipped sets are stale: rerun the ship command."""
    import recallscope.features.train as train
    from recallscope.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError(f"the CLI would train: its defaults no longer match the shipped set; rerun "
                             f"`{sh.SHIP_COMMAND}`.")

    monkeypatch.setattr(train, "train_set", refuse)
    for name in _names():
        assert main(["transcoders", "--model", f"organism:{name}", "--out", str(tmp_path / name)]) == 0
        assert "shipped set" in capsys.readouterr().out
