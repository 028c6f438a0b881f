"""Resumable sweeps: SIGKILL at a random point, resume, and get the uninterrupted result bit for bit.

Also: a rerun recomputes nothing, damaged chunks are recomputed with a warning, and a changed
config, model or answer never reuses another run's chunks. Covers activation patching, the ROME
causal trace, attention knockout, attribution over a dataset (AtP, EAP-IG; a chunk per group of pairs),
route analyses (a chunk per prompt of a route report, per card of the human comparison) and organism
training (model, optimiser and RNG state every N steps).
"""

import hashlib
import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from recallscope.patching import activation_patching, attention_knockout, causal_trace
from recallscope.patching import engine
from recallscope.results import PatchingResult
from recallscope.store import CorruptChunkWarning
from recallscope.tasks.pairs import PromptPair
from test_determinism import ROUTE_QUERY_PROMPTS, Trained, assert_bitwise_equal, route_case, tiny_recipe

PAIRS = [PromptPair("The capital of France is a city called", "The capital of Spain is a city called", " Paris",
                    " Madrid"),
         PromptPair("The capital of Spain is a city called", "The capital of France is a city called", " Madrid",
                    " Paris")]
SWEEP = dict(component="resid_pre", memory_budget_mb=1e-4)  # one cell per chunk: 2 layers x 9 positions
ITEMS = [PromptPair("The Eiffel Tower is in", "The Eiffel Tower is in", " Paris", spans={"subject": (1, 4)}),
         PromptPair("Rome is the capital of", "Rome is the capital of", " Italy", spans={"subject": (1, 2)}),
         PromptPair("The city of Rome is in", "The city of Rome is in", " Italy", spans={"subject": (3, 5)})]

KILLED_RUN = """
import json, sys
import torch
torch.set_num_threads(int(sys.argv[5]))  # the test process's: CPU results are bitwise equal at equal thread counts
from transformers import AutoTokenizer
from recallscope.models import tiny_model
from recallscope.patching import activation_patching
from recallscope.tasks.pairs import PromptPair
tokenizer_dir, checkpoint_dir, pairs, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
model = tiny_model("gpt2", tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), seed=0)
pairs = [PromptPair(*p) for p in pairs]
activation_patching(model, pairs, progress=False, checkpoint_dir=checkpoint_dir, **options)
print("finished")
"""


def assert_same_bits(a: PatchingResult, b: PatchingResult) -> None:
    for name in ("values", "clean", "corrupt"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.numpy().tobytes() == y.numpy().tobytes(), f"{name} differs"
    assert a.labels == b.labels and a.config == b.config


class Counter:
    """Wraps a function and counts its calls; ``fail_after`` raises to simulate an interruption."""

    def __init__(self, fn, fail_after: int | None = None):
        self.fn, self.calls, self.fail_after = fn, 0, fail_after

    def __call__(self, *args, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return self.fn(*args, **kwargs)


def _chunk_files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*.safetensors"))


def _verified(file: Path) -> bool:
    digest = file.name.split(".")[1]
    return hashlib.sha256(file.read_bytes()).hexdigest()[:32] == digest


def test_sigkill_at_a_random_point_then_resume_is_bitwise_identical(tiny_gpt2, gpt2_tokenizer_dir, tmp_path,
                                                                     monkeypatch):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    fresh = activation_patching(tiny_gpt2, PAIRS, progress=False, **SWEEP)
    n_chunks = fresh.values[0].numel()
    kill_at = rng.randint(1, n_chunks // 2)
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(gpt2_tokenizer_dir), str(ckpt),
                             json.dumps([[p.clean, p.corrupt, p.answer, p.wrong] for p in PAIRS]), json.dumps(SWEEP),
                             str(torch.get_num_threads())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and len(_chunk_files(ckpt)) < kill_at:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        out, err = proc.communicate(timeout=60)
    info = f"seed {seed}, kill after {kill_at} of {n_chunks} chunks; child stderr: {err[-2000:]}"
    assert proc.returncode == -signal.SIGKILL, info
    done = _chunk_files(ckpt)
    assert 0 < len(done) < n_chunks, info
    assert all(_verified(f) for f in done), f"a chunk under its final name is incomplete ({info})"

    counter = Counter(engine.run_chunk)
    monkeypatch.setattr(engine, "run_chunk", counter)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptChunkWarning)  # nothing damaged may be found, let alone read
        resumed = activation_patching(tiny_gpt2, PAIRS, progress=False, checkpoint_dir=ckpt, **SWEEP)
    assert counter.calls == n_chunks - len(done), f"finished chunks were recomputed ({info})"
    assert_same_bits(resumed, fresh)
    assert not list(ckpt.glob("*/.*.tmp")), "the killed writer's temporary file was not cleaned up"


CAPITALS = [(" France", " Paris"), (" Spain", " Madrid"), (" Italy", " Rome"), (" Germany", " Berlin")]
DATASET = [PromptPair(f"The capital of{a} is a city called", f"The capital of{b} is a city called", x, y)
           for (a, x), (b, y) in zip(CAPITALS, CAPITALS[1:] + CAPITALS[:1])]
"""Four equal-length pairs: attribution runs them one pair per chunk."""
CARDS = "\n".join(["#separator:tab", "capricious\tCar prices are unpredictable\tgiven to sudden changes of mood",
                   "venal\tLooks like venue. A corrupt venue\tshowing a willingness to be bribed",
                   "tractable\tTractor makes it easy to manage the field\teasy to control or influence",
                   "edify\tEdit it to improve it\tinstruct or improve someone morally"])


def _compare_human(model, cards_dir: Path, **kw):
    from recallscope.routes.human import HumanConfig, compare_human
    from recallscope.routes.mnemonics import load_cards

    path = cards_dir / "cards.tsv"
    path.write_text(CARDS)
    config = HumanConfig(n_controls=2, own_vocabulary=10, n_perm=100, definition_tokens=2, own_top=1)
    return compare_human(model, load_cards(path), config=config, progress=False, **kw)


def _run(method: str, model, tmp: Path | None = None, **kw):
    if method == "patching":
        return activation_patching(model, PAIRS, progress=False, **SWEEP, **kw)
    if method == "trace":
        return causal_trace(model, ITEMS, n_samples=2, window=2, component="mlp_out", memory_budget_mb=1e-4,
                            progress=False, **kw)
    if method == "knockout":
        return attention_knockout(model, ITEMS, window=1, progress=False, **kw)
    if method == "atp":
        from recallscope.attribution import atp

        return atp(model, DATASET, components=("resid_pre", "z"), prompts_per_chunk=1, progress=False, **kw)
    if method == "eap_ig":
        from recallscope.attribution import eap_ig

        return eap_ig(model, DATASET, steps=2, prompts_per_chunk=1, progress=False, **kw)
    if method == "routes":
        return route_case(model, **kw)
    return _compare_human(model, tmp, **kw)


WORK = {"patching": ("recallscope.patching.engine", "run_chunk"), "trace": ("recallscope.patching.engine", "run_chunk"),
        "knockout": ("recallscope.patching.knockout", "_knockout_edge"),
        "atp": ("recallscope.attribution.atp", "_atp_chunk"), "eap_ig": ("recallscope.attribution.eap", "_eap_chunk"),
        "routes": ("recallscope.routes.analysis", "score_prompt"),
        "compare_human": ("recallscope.routes.human", "_card_scores")}
"""method -> (module, function) called once per chunk of work."""


def _work_counter(monkeypatch, method: str, fail_after: int | None = None) -> Counter:
    module_name, name = WORK[method]
    module = importlib.import_module(module_name)  # not attribute access: attribution.atp is also a function
    counter = Counter(getattr(module, name), fail_after)
    monkeypatch.setattr(module, name, counter)
    return counter


@pytest.mark.parametrize("method", sorted(WORK))
def test_interrupted_twice_then_resumed_equals_uninterrupted(tiny_gpt2, tmp_path, monkeypatch, method):
    tiny = tiny_gpt2
    with monkeypatch.context() as m:
        total = _work_counter(m, method)
        fresh = _run(method, tiny, tmp_path)
    assert total.calls >= 3
    ckpt = tmp_path / method
    for fail_after in (1, total.calls // 2):  # interrupted after 1 chunk, then again half-way
        with monkeypatch.context() as m:
            _work_counter(m, method, fail_after)
            with pytest.raises(KeyboardInterrupt):
                _run(method, tiny, tmp_path, checkpoint_dir=ckpt)
    with monkeypatch.context() as m:
        counter = _work_counter(m, method)
        resumed = _run(method, tiny, tmp_path, checkpoint_dir=ckpt)
    assert counter.calls == total.calls - 1 - total.calls // 2, "finished chunks were recomputed"
    assert_bitwise_equal(resumed, fresh)
    with monkeypatch.context() as m:
        counter = _work_counter(m, method)
        again = _run(method, tiny, tmp_path, checkpoint_dir=ckpt)
    assert counter.calls == 0, "a finished run is not recomputed"
    assert_bitwise_equal(again, fresh)
    assert again.manifest["checkpoint"]["computed"] == 0 < again.manifest["checkpoint"]["loaded"]


class StepCounter(Counter):
    """Counts optimiser steps through ``lr_at`` (called once per parameter group and step); ``fail_after``
    raises when step ``fail_after + 1`` begins."""

    def __init__(self, fn, fail_after: int | None = None):
        super().__init__(fn, fail_after)
        self.seen: set[int] = set()

    def __call__(self, step, cfg):
        if step not in self.seen:
            if self.fail_after is not None and len(self.seen) >= self.fail_after:
                raise KeyboardInterrupt("simulated interruption")
            self.seen.add(step)
            self.calls += 1
        return self.fn(step, cfg)


def test_organism_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Interrupted before its first checkpoint, then after its second: the resumed training runs only the
    steps after the last checkpoint and ends with the uninterrupted run's weights and losses, bit for bit."""
    from recallscope.organisms import core
    from recallscope.organisms.recipes import train_recipe

    recipe = tiny_recipe(steps=7)
    fresh, fresh_record = train_recipe(recipe, evaluate=False)
    ckpt = tmp_path / "train"

    def train(fail_after: int | None = None, r=recipe) -> tuple[Counter, Any]:
        with monkeypatch.context() as m:
            steps = StepCounter(core.lr_at, fail_after)
            m.setattr(core, "lr_at", steps)
            if fail_after is not None:
                with pytest.raises(KeyboardInterrupt):
                    train_recipe(r, evaluate=False, checkpoint_dir=ckpt, checkpoint_every=2)
                return steps, None
            return steps, train_recipe(r, evaluate=False, checkpoint_dir=ckpt, checkpoint_every=2)

    train(fail_after=1)  # killed in step 1: no checkpoint yet
    train(fail_after=5)  # starts afresh, checkpoints after steps 2 and 4, killed in step 5
    steps, (net, record) = train()
    assert steps.calls == 7 - 4, "steps before the last checkpoint were recomputed"
    assert_bitwise_equal(Trained(dict(net.state_dict()), record["loss_history"]),
                         Trained(dict(fresh.state_dict()), fresh_record["loss_history"]))
    (store,) = [d for d in ckpt.iterdir() if d.is_dir()]
    assert sorted(f.name.split(".")[0] for f in store.glob("*.safetensors")) == ["step00000006", "step00000007"]
    steps, (again, _) = train()
    assert steps.calls == 0, "a finished training is not rerun"
    assert_bitwise_equal(Trained(dict(again.state_dict()), []), Trained(dict(fresh.state_dict()), []))
    steps, _ = train(r=tiny_recipe(steps=7, seed=1))
    assert steps.calls == 7, "a changed recipe reused another training's checkpoints"


def test_damaged_chunks_are_recomputed_with_a_warning(tiny_gpt2, tmp_path, monkeypatch):
    fresh = _run("patching", tiny_gpt2, checkpoint_dir=tmp_path)
    files = _chunk_files(tmp_path)
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    files[5].write_bytes(os.urandom(files[5].stat().st_size))  # same size, wrong content
    counter = _work_counter(monkeypatch, "patching")
    with pytest.warns(CorruptChunkWarning) as record:
        again = _run("patching", tiny_gpt2, checkpoint_dir=tmp_path)
    assert len([w for w in record if w.category is CorruptChunkWarning]) == 2
    assert counter.calls == 2
    assert_same_bits(again, fresh)
    assert all(_verified(f) for f in _chunk_files(tmp_path))


def test_changed_config_model_or_answers_never_reuse_chunks(tiny_gpt2, tiny_llama, tmp_path, monkeypatch):
    from recallscope.models.selfcheck import self_check

    self_check(tiny_llama)  # the engine's one-time probe of a new model runs cells of its own: not counted here
    _run("patching", tiny_gpt2, checkpoint_dir=tmp_path)
    changes = {
        "config": (tiny_gpt2, PAIRS, {"component": "resid_post"}),
        "model": (tiny_llama, PAIRS, {}),
        "answers": (tiny_gpt2, [PromptPair(p.clean, p.corrupt, p.wrong, p.answer) for p in PAIRS], {}),
        "budget": (tiny_gpt2, PAIRS, {"memory_budget_mb": 1.0}),
    }
    for what, (model, pairs, options) in changes.items():
        before = {d for d in tmp_path.iterdir() if d.is_dir()}
        with monkeypatch.context() as m:
            counter = _work_counter(m, "patching")
            activation_patching(model, pairs, progress=False, checkpoint_dir=tmp_path, **{**SWEEP, **options})
        (new,) = {d for d in tmp_path.iterdir() if d.is_dir()} - before
        assert counter.calls == len(list(new.glob("*.safetensors"))) > 0, f"a changed {what} reused stale chunks"


def test_cli_resume_dir_resumes_without_recomputing(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """`recallscope patch ... --resume-dir DIR` twice: the second run loads every chunk, same bits."""
    from types import SimpleNamespace

    from recallscope.cli import main

    monkeypatch.setattr("recallscope.models.load_model", lambda spec, device="cpu", **kw: tiny_gpt2)
    monkeypatch.setattr("recallscope.plotting.export_all",  # figures are not what this test is about
                        lambda fig, stem, **kw: SimpleNamespace(written={}, failed={}))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"clean": p.clean, "corrupt": p.corrupt, "answer": p.answer,
                                           "wrong": p.wrong}) for p in PAIRS))
    argv = ["patch", "--model", "tiny", "--pairs", str(pairs), "--component", "resid_pre",
            "--resume-dir", str(tmp_path / "ckpt")]
    assert main(argv + ["--out", str(tmp_path / "first")]) == 0
    assert re.search(r"checkpoint .*: 0 chunks loaded, [1-9]\d* computed", capsys.readouterr().err)
    assert main(argv + ["--out", str(tmp_path / "second")]) == 0
    assert re.search(r"checkpoint .*: [1-9]\d* chunks loaded, 0 computed", capsys.readouterr().err)
    first, second = (PatchingResult.load(tmp_path / run / "resid_pre_len9") for run in ("first", "second"))
    assert_same_bits(first, second)


@pytest.mark.parametrize("command", ["attribute", "routes"])
def test_cli_resume_dir_of_attribute_and_routes(tiny_gpt2, tmp_path, monkeypatch, capsys, command):
    """`recallscope attribute|routes ... --resume-dir DIR` twice: the second run loads every chunk, same bits."""
    from types import SimpleNamespace

    from recallscope.attribution import AttributionResult
    from recallscope.cli import main
    from recallscope.routes import RouteReport

    monkeypatch.setattr("recallscope.models.load_model", lambda spec, device="cpu", **kw: tiny_gpt2)
    monkeypatch.setattr("recallscope.plotting.export_all",
                        lambda fig, stem, **kw: SimpleNamespace(written={}, failed={}))
    if command == "attribute":
        pairs = tmp_path / "pairs.jsonl"
        pairs.write_text("\n".join(json.dumps({"clean": p.clean, "corrupt": p.corrupt, "answer": p.answer,
                                               "wrong": p.wrong}) for p in DATASET))
        argv = ["attribute", "--pairs", str(pairs), "--method", "atp", "--components", "resid_pre",
                "--prompts-per-chunk", "2"]
    else:
        argv = ["routes", "--input", " VAT", "--output", " Value", "--concept", " tax", "--n-controls", "3",
                "--no-mediation"] + [a for p in ROUTE_QUERY_PROMPTS for a in ("--prompt", p)]
    argv += ["--model", "tiny", "--quiet", "--resume-dir", str(tmp_path / "ckpt")]
    assert main(argv + ["--out", str(tmp_path / "first")]) == 0
    assert re.search(r"checkpoint .*: 0 chunks loaded, [1-9]\d* computed", capsys.readouterr().err)
    assert main(argv + ["--out", str(tmp_path / "second")]) == 0
    assert re.search(r"checkpoint .*: [1-9]\d* chunks loaded, 0 computed", capsys.readouterr().err)
    if command == "attribute":
        (stem,) = {f.name.split(".")[0] for f in (tmp_path / "first").iterdir() if f.name.startswith("atp_len")}
        first, second = (AttributionResult.load(tmp_path / run / stem) for run in ("first", "second"))
    else:
        first, second = (RouteReport.load(tmp_path / run / "report") for run in ("first", "second"))
    assert_bitwise_equal(first, second)


def test_chunks_of_pairs_give_the_one_batch_results(tiny_gpt2):
    """Splitting a dataset into chunks of pairs (the unit of checkpointing) changes only float rounding:
    AtP per prompt and EAP-IG's mean edge scores agree with one batch over all pairs."""
    from recallscope.attribution import atp, eap_ig

    whole, parts = (atp(tiny_gpt2, DATASET, components=("resid_pre", "z"), prompts_per_chunk=k, progress=False)
                    for k in (None, 3))
    for c in whole.components:
        torch.testing.assert_close(parts.values[c], whole.values[c], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(parts.clean, whole.clean, atol=1e-6, rtol=1e-6)  # batch size changes rounding
    torch.testing.assert_close(parts.corrupt, whole.corrupt, atol=1e-6, rtol=1e-6)
    whole, parts = (eap_ig(tiny_gpt2, DATASET, steps=2, prompts_per_chunk=k, progress=False) for k in (None, 1))
    torch.testing.assert_close(parts.scores, whole.scores, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(parts.clean, whole.clean, atol=1e-6, rtol=1e-6)


def test_resumable_options_are_validated(tiny_gpt2):
    from recallscope.attribution import atp
    from recallscope.errors import ConfigError
    from recallscope.organisms.recipes import train_recipe

    with pytest.raises(ConfigError, match="prompts_per_chunk must be >= 1"):
        atp(tiny_gpt2, DATASET, components=("resid_pre",), prompts_per_chunk=0, progress=False)
    with pytest.raises(ConfigError, match="mean ablation averages over all pairs"):
        atp(tiny_gpt2, DATASET, components=("resid_pre",), direction="noising", corruption="mean",
            prompts_per_chunk=2, progress=False)
    with pytest.raises(ConfigError, match="checkpoint_every must be >= 1"):
        train_recipe(tiny_recipe(steps=1), evaluate=False, checkpoint_every=0)
