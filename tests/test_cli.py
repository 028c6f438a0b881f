"""The command line: complete help, config files, manifests, CSV tables and figures from real runs.

Runs use the tiny GPT-2-style model (``load_model`` is swapped for the fixture in-process); static export
is disabled through ``BROWSER_PATH`` so the runs are fast and the "how to enable" message is checked.
"""

import argparse
import csv
import json
import subprocess
import sys

import pytest
import torch

from recallscope import cli
from recallscope.manifest import prompts_hash, weights_hash
from recallscope.outputs import load_result
from recallscope.results import PatchingResult

REQUIRED = {"demo", "trace", "attribute", "routes", "compare-human", "export", "models"}

PAIRS = [
    {"clean": "The capital of France is", "corrupt": "The capital of Spain is", "answer": " Paris", "wrong": " Madrid"},
    {"clean": "The capital of Italy is", "corrupt": "The capital of Japan is", "answer": " Rome", "wrong": " Tokyo"},
]


def _subcommands(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


@pytest.fixture()
def tiny_cli(tiny_gpt2, monkeypatch, tmp_path):
    """The CLI with ``--model`` resolving to the tiny model, and no browser for static export."""
    import recallscope.models

    monkeypatch.setattr(recallscope.models, "load_model", lambda spec, **kw: tiny_gpt2)
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-browser"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return tiny_gpt2, pairs


# ----------------------------------------------------------------------------- help


def test_every_required_subcommand_exists():
    missing = REQUIRED - set(_subcommands(cli.build_parser()))
    assert not missing, f"subcommands missing from `recallscope`: {sorted(missing)}"


def test_help_is_complete_for_every_subcommand(capsys):
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    for name, sub in _subcommands(parser).items():
        assert name in top
        undocumented = [a.option_strings or a.dest for a in sub._actions if not a.help]
        assert not undocumented, f"`recallscope {name}` options without help: {undocumented}"
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: recallscope {name}") and len(text.splitlines()) > 3
    trace = _subcommands(parser)["trace"]
    (task,) = [a for a in trace._actions if a.dest == "task"]
    assert set(task.choices) == {"facts", "base64"}


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "recallscope.cli", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("recallscope ")


@pytest.mark.parametrize("text, expected", [("0,2,5", (0, 2, 5)), ("0-3", (0, 1, 2, 3)), ("1,4-5", (1, 4, 5))])
def test_int_list(text, expected):
    assert cli._int_list(text) == expected


def test_int_list_rejects_junk():
    with pytest.raises(argparse.ArgumentTypeError, match="not a list of integers"):
        cli._int_list("a-b")


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("body, message", [
    ('componnt = "z"\n', "unknown key(s) 'componnt' (did you mean 'component'?)"),
    ('component = "mlp"\n', "is not a valid Component; choose one of"),
    ('window = "3"\n', "window = '3' (str) should be int"),
    ("window = \n", "is not valid TOML"),
])
def test_bad_config_is_a_clear_error_before_the_model_loads(tmp_path, capsys, monkeypatch, body, message):
    import recallscope.models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the config was checked")

    monkeypatch.setattr(recallscope.models, "load_model", no_load)
    cfg = tmp_path / "patch.toml"
    cfg.write_text(body)
    code = cli.main(["patch", "--pairs", str(tmp_path / "p.jsonl"), "--config", str(cfg), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("recallscope: error:")


def test_options_of_the_other_trace_task_are_rejected(capsys):
    assert cli.main(["trace", "facts", "--stimuli", "word", "--out", "/nonexistent"]) == 2
    assert "--stimuli only apply to `trace base64`" in capsys.readouterr().err


# ----------------------------------------------------------------------------- runs


def test_patch_run_writes_result_manifest_csv_and_html(tiny_cli, tmp_path, capsys):
    model, pairs = tiny_cli
    cfg = tmp_path / "patch.toml"
    cfg.write_text('component = "attn_out"\nwindow = 2\nlayers = [0, 1]\n')
    out = tmp_path / "out"
    code = cli.main(["patch", "--pairs", str(pairs), "--config", str(cfg), "--component", "mlp_out",
                     "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    n_pos = model.to_tokens(PAIRS[0]["clean"]).shape[1]
    name = f"mlp_out_len{n_pos}"
    res = PatchingResult.load(out / name)
    assert res.config["component"] == "mlp_out" and res.config["window"] == 2  # option beats file; file beats default
    assert res.values.shape == (2, 2, n_pos)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "patch" and manifest["config_type"] == "PatchingConfig"
    assert manifest["config"]["component"] == "mlp_out" and manifest["config"]["layers"] == [0, 1]
    assert manifest["model"]["weights_sha256"] == weights_hash(model)
    assert manifest["model"]["tokenizer"] and manifest["model"]["tokenizer_vocab"] == 50257
    clean, corrupt = [p["clean"] for p in PAIRS], [p["corrupt"] for p in PAIRS]
    assert manifest["prompts_sha256"] == prompts_hash(clean + corrupt) and manifest["n_prompts"] == 4
    assert {"torch", "recallscope", "plotly"} <= set(manifest["versions"])
    assert manifest["timings_s"]["patching"] > 0 and manifest["timings_s"]["total"] >= manifest["timings_s"]["patching"]
    assert all((out / f).exists() for f in manifest["outputs"])
    assert {name, f"{name}.html", f"{name}.csv"} <= set(manifest["outputs"])

    with open(out / f"{name}.csv") as fh:
        rows = list(csv.DictReader(fh))
    norm = res.normalized()
    assert len(rows) == 2 * n_pos
    means = torch.tensor([float(r["mean"]) for r in rows]).reshape(2, n_pos)
    torch.testing.assert_close(means, norm.mean().float(), rtol=1e-5, atol=1e-6)
    assert rows[n_pos + 1]["layer"] == "1" and rows[n_pos + 1]["pos"] == "1" and rows[1]["pos_label"] == "The·1"
    assert all(float(r["ci95_low"]) <= float(r["mean"]) <= float(r["ci95_high"]) for r in rows)

    assert "Plotly.newPlot" in (out / f"{name}.html").read_text()
    assert f"{name}.png not written" in captured.err and "BROWSER_PATH" in captured.err  # says how to enable PNG
    assert not (out / f"{name}.png").exists()


def test_export_subcommand_loads_any_saved_result(tiny_cli, tmp_path, capsys):
    model, pairs = tiny_cli
    out = tmp_path / "out"
    assert cli.main(["patch", "--pairs", str(pairs), "--layers", "0", "--out", str(out), "--quiet"]) == 0
    (result_dir,) = [p for p in out.iterdir() if p.is_dir()]
    capsys.readouterr()
    assert cli.main(["export", str(result_dir), "--to", str(tmp_path / "a.html"), "--to", str(tmp_path / "b.html")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "a.html"), str(tmp_path / "b.html")]
    assert "plotly-graph-div" in (tmp_path / "b.html").read_text()
    assert isinstance(load_result(result_dir), PatchingResult)
    assert cli.main(["export", str(tmp_path), "--to", str(tmp_path / "c.html")]) == 2
    assert "is not a saved result" in capsys.readouterr().err


def test_attribute_eap_ig_writes_mib_circuit_files(tiny_cli, tmp_path, capsys):
    """`attribute --method eap-ig --mib both`: MIB's JSON and .pt of the same scores, in_graph = the circuit."""
    from recallscope.attribution import EdgeScores
    from recallscope.attribution.mib import from_mib_json
    from recallscope.attribution.mib_pt import from_mib_pt

    model, pairs = tiny_cli
    out = tmp_path / "out"
    assert cli.main(["attribute", "--pairs", str(pairs), "--method", "eap-ig", "--top-edges", "12", "--mib", "both",
                     "--out", str(out), "--quiet"]) == 0
    (mib_dir,) = [p for p in out.iterdir() if p.name.endswith("_mib")]
    scores = EdgeScores.load(mib_dir.with_name(mib_dir.name[:-len("_mib")]))
    (js, js_circuit), (pt, pt_circuit) = from_mib_json(mib_dir / "importances.json"), from_mib_pt(mib_dir / "importances.pt")
    torch.testing.assert_close(js.scores, pt.scores)
    torch.testing.assert_close(js.scores.sum(), scores.scores.sum(), rtol=1e-5, atol=1e-6)
    assert 0 < js_circuit.n_edges <= 12 and js_circuit.n_edges == pt_circuit.n_edges
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("importances.pt" in str(o) for o in manifest["outputs"])
    assert cli.main(["attribute", "--pairs", str(pairs), "--method", "atp", "--mib", "pt", "--out", str(out)]) == 2
    assert "--mib writes EAP-IG edge scores" in capsys.readouterr().err


def test_trace_base64_patches_and_draws_the_alignment(tiny_cli, tmp_path, capsys):
    out = tmp_path / "b64"
    code = cli.main(["trace", "base64", "--n", "6", "--max-pairs", "3", "--layers", "0", "--seed", "1",
                     "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "trace base64" and manifest["seed"] == 1
    (result_dir,) = [out / o for o in manifest["outputs"] if o.startswith("b64_resid_pre_len") and "." not in o]
    res = PatchingResult.load(result_dir)
    assert res.n_prompts <= 3 and res.axes == ("layer", "pos")
    positions = res.config["positions"]  # only the query and after: the few-shot prefix is shared by both prompts
    assert positions[0] > 10 and positions == list(range(positions[0], positions[-1] + 1))
    assert res.values.shape[-1] == len(positions) and res.labels["pos"][0].endswith(f"·{positions[0]}")
    assert "b64_alignment.html" in manifest["outputs"]
    with open(result_dir.with_suffix(".csv")) as fh:  # raw logit differences become effects: 0 = no effect
        means = torch.tensor([float(r["mean"]) for r in csv.DictReader(fh)])
    torch.testing.assert_close(means, res.effect().mean().flatten().float(), rtol=1e-5, atol=1e-6)
    assert "6-bit groups" in (out / "b64_alignment.html").read_text()


def test_trace_facts_on_a_model_that_knows_nothing_says_so(tiny_cli, tmp_path, capsys, monkeypatch):
    import recallscope.tasks.facts as facts

    few = facts.load_builtin_facts()[:6]
    monkeypatch.setattr(facts, "load_builtin_facts", lambda *a, **k: few)
    assert cli.main(["trace", "facts", "--n-facts", "2", "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert "recalls none of the" in capsys.readouterr().err


def test_trace_base64_on_the_organism_recovers_its_dependency_map(tmp_path, monkeypatch, capsys):
    from recallscope.organisms import shipped

    if "b64-decoder" not in shipped():
        pytest.skip("the b64-decoder organism's weights are not installed")
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-browser"))
    out = tmp_path / "org"
    code = cli.main(["trace", "base64", "--model", "organism:b64-decoder", "--n", "4", "--layers", "0",
                     "--positions", "1-6", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["direction"] == "noising" and manifest["model"]["spec"] == "organism:b64-decoder"
    summary = manifest["summary"]
    assert len(summary["groups"]) == 9  # one patching result per output byte
    assert summary["mean_drop_dependent"] > 1.0 > 100 * abs(summary["mean_drop_independent"])
    assert {"b64_dependency.html", "b64_truth.html"} <= set(manifest["outputs"])
