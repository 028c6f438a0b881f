"""The catalogue of bad inputs: each kind raises a recallscope error whose message names the problem and
the fix. Plus fuzzing of the task loaders and base64 utilities: any input either works or raises a
:class:`RecallscopeError`, never a bare Python exception.

Each row of ``CATALOGUE`` is one kind of bad input: how to provoke it, the error class, and two
regular expressions the message must match, one naming the problem and one naming the fix. Kinds
with exhaustive tests elsewhere (``test_tasks_loaders.py``, ``test_tasks_b64.py``, ``test_models.py``)
appear here once, as the representative of the contract; their detailed variants stay there.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recallscope import errors as E
from recallscope.metrics import LogitDiff
from recallscope.models import load_model, tiny_model
from recallscope.patching import activation_patching, attention_knockout, causal_trace
from recallscope.patching.activation import PatchingConfig, patch_tokens
from recallscope.results import PatchingResult
from recallscope.sites import Site, layer_window
from recallscope.tasks.b64 import FewShotTemplate, align_tokens, decode, decode_text, encode, make_stimulus
from recallscope.tasks.loaders import load_facts, load_prompt_pairs
from recallscope.tasks.pairs import PromptPair, single_token_id, to_tokens, tokenize_pairs
from recallscope.vocab import Component

PAIR = PromptPair("The capital of France is", "The capital of Spain is", " Paris", " Madrid")


@dataclass(frozen=True)
class Env:
    """What a case may use: the tiny GPT-2 model, a temporary directory, and monkeypatch."""

    model: Any
    tmp: Path
    monkeypatch: Any


@dataclass(frozen=True)
class Case:
    kind: str
    trigger: Callable[[Env], Any]
    error: type[E.RecallscopeError]
    problem: str
    fix: str


def _write(env: Env, name: str, text: str | bytes) -> Path:
    path = env.tmp / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


@dataclass(frozen=True)
class _Broken:
    """A metric that returns NaN (log of a negative logit difference) or inf for some cells."""

    inner: LogitDiff
    mode: str
    name: str = "broken"

    def read_positions(self, n_pos: int) -> list[int]:
        return self.inner.read_positions(n_pos)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        v = self.inner(logits)
        return v - v.detach().amax() - 1 if self.mode == "never" else (
            torch.full_like(v, float("inf")) if self.mode == "inf" else (v - v.amin()).log().log())


def _nan_metric(env: Env, mode: str) -> Any:
    ids = [single_token_id(env.model, w) for w in (" Paris", " Madrid")]
    metric = _Broken(LogitDiff(torch.tensor(ids[:1]), torch.tensor(ids[1:])), mode)
    return activation_patching(env.model, [PAIR], metric, progress=False)


def _fp16_overflow(env: Env) -> Any:
    model = tiny_model("gpt2", tokenizer=env.model.tokenizer, seed=0, dtype=torch.float16)
    params = dict(model.named_parameters())
    mlp = "layers.0._original_component.mlp._original_component.{}._original_component.{}"
    with torch.no_grad():  # every hidden unit ~ gelu(10) = 10, so mlp_out ~ 128 * 10 * 100 > 65504: inf
        params[mlp.format("fc_in", "bias")].fill_(10.0)
        params[mlp.format("fc_out", "weight")].fill_(100.0)
    return activation_patching(model, [PAIR], progress=False)


def _corrupt_result(env: Env) -> Any:
    res = PatchingResult(values=torch.zeros(1, 2), axes=("layer",), clean=torch.ones(1), corrupt=torch.zeros(1))
    path = res.save(env.tmp / "result")
    values = path / "values.safetensors"
    values.write_bytes(values.read_bytes()[:40])
    return PatchingResult.load(path)


def _offline(env: Env) -> None:
    """HF_HUB_OFFLINE as if set before start-up (huggingface_hub reads it once, at import)."""
    import huggingface_hub.constants

    env.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _blocked_dir(env: Env) -> Path:
    """A directory path that cannot be created, even by root: its parent is a regular file."""
    return _write(env, "a_file", "not a directory") / "out"


def _cli(env: Env, *argv: str) -> Any:
    """The CLI turns a RecallscopeError into exit status 2 and a one-line message; re-raise it for the check."""
    from recallscope.cli import main

    captured = []
    env.monkeypatch.setattr("sys.stderr", type("W", (), {"write": lambda self, s: captured.append(s),
                                                          "flush": lambda self: None})())
    status = main(list(argv))
    assert status == 2, "a bad input must end the command with exit status 2"
    raise E.ConfigError("".join(captured))


CATALOGUE = [
    Case("invalid base64", lambda env: decode("QQ!="), E.InvalidBase64Error, r"'!'.*index 2", r"alphabet"),
    Case("base64 of non-UTF-8 bytes", lambda env: decode_text("/w=="), E.InvalidBase64Error, r"not UTF-8",
         r"decode\(\)"),
    Case("unencodable text (lone surrogate)", lambda env: encode("a\ud800"), E.ConfigError,
         r"unpaired surrogate.*index 1", r"encoding"),
    Case("length-mismatched pair",
         lambda env: tokenize_pairs(env.model, [PromptPair("The capital of France is", "The big old capital of "
                                                           "Spain is", " Paris")]),
         E.LengthMismatchError, r"pair 0.*tokens but corrupt prompt", r"counterfactual_pairs|pad"),
    Case("pairs of different lengths in one batch",
         lambda env: tokenize_pairs(env.model, [PAIR, PromptPair("Paris is in", "Paris is in", " France")]),
         E.LengthMismatchError, r"one batch needs one length", r"group_by_length"),
    Case("prompt text with a lone surrogate",
         lambda env: tokenize_pairs(env.model, [PromptPair("The capital \udc80 is", "x", " a")]), E.ConfigError,
         r"prompt 'The capital \\udc80 is' holds an unpaired surrogate", r"encoding"),
    Case("multi-token answer", lambda env: single_token_id(env.model, " Parisienne"), E.MultiTokenAnswerError,
         r"' Parisienne' is \d tokens", r"SequenceLogProb|first token"),
    Case("logit_diff without wrong answers",
         lambda env: activation_patching(env.model, [PromptPair(PAIR.clean, PAIR.corrupt, " Paris")], "logit_diff",
                                         progress=False), E.ConfigError, r"needs a wrong answer", r"logprob"),
    Case("layer out of range", lambda env: activation_patching(env.model, [PAIR], layers=[5], progress=False),
         E.SiteOutOfRangeError, r"layer 5 is out of range", r"0\.\.1"),
    Case("head out of range", lambda env: Site(Component.HEAD_OUT, 0, head=7).validate(env.model.cfg),
         E.SiteOutOfRangeError, r"head 7 is out of range", r"0\.\.3"),
    Case("head on a component without heads", lambda env: Site(Component.RESID_PRE, 0, head=1),
         E.SiteOutOfRangeError, r"resid_pre has no head axis", r"drop head=1|per-head component"),
    Case("position out of range", lambda env: activation_patching(env.model, [PAIR], positions=[9], progress=False),
         E.SiteOutOfRangeError, r"position 9 is out of range for prompts of 6 tokens", r"0\.\.5"),
    Case("empty layer window", lambda env: layer_window(Component.MLP_OUT, 0, 0, 2), E.SiteOutOfRangeError,
         r"window width", r">= 1"),
    Case("prompt over the context length", lambda env: to_tokens(env.model, ["word " * 200]), E.PromptTooLongError,
         r"20\d tokens exceeds the model's context of 128", r"[Ss]horten"),
    Case("unknown model", lambda env: load_model("./no/such/model"), E.UnknownModelError, r"unknown model spec",
         r"'smollm2'.*local model directory"),
    Case("unknown dtype", lambda env: load_model("smollm2", dtype="fp8"), E.UnknownModelError, r"unknown dtype 'fp8'",
         r"bf16"),
    Case("missing offline weights (hub)",
         lambda env: (_offline(env), load_model("someone/not-cached-model-xyz")),
         E.WeightsUnavailableError, r"could not load 'someone/not-cached-model-xyz'", r"HF_HUB_OFFLINE.*\.gguf"),
    Case("missing offline weights (GGUF file)", lambda env: load_model(str(env.tmp / "m.gguf")),
         E.WeightsUnavailableError, r"m\.gguf does not exist", r"check the path"),
    Case("empty dataset (no pairs)", lambda env: tokenize_pairs(env.model, []), E.EmptyDatasetError,
         r"no prompt pairs", r"at least one"),
    Case("empty dataset (file)", lambda env: load_prompt_pairs(_write(env, "e.jsonl", "\n\n")), E.EmptyDatasetError,
         r"holds no prompt pairs", r"add at least one"),
    Case("empty dataset (causal trace)", lambda env: causal_trace(env.model, [], progress=False), E.EmptyDatasetError,
         r"no prompts", r"at least one"),
    Case("duplicated dataset item",
         lambda env: load_prompt_pairs(_write(env, "d.jsonl", '{"clean": "a b", "corrupt": "a c", "answer": " d"}\n'
                                              * 2)), E.DuplicateItemError, r"line 2: duplicates.*line 1",
         r"delete one"),
    Case("malformed JSONL", lambda env: load_facts(_write(env, "f.jsonl", '{"subject": "France",\n')),
         E.DatasetFormatError, r"f\.jsonl, line 1: not valid JSON", r"one JSON object"),
    Case("malformed CSV", lambda env: load_prompt_pairs(_write(env, "p.csv", "clean,corrupt,answer\na,b\n")),
         E.DatasetFormatError, r"line 2: row has 2 fields but the header has 3", r"quote fields"),
    Case("malformed TSV", lambda env: load_facts(_write(env, "f.tsv", "subject\ttemplate\tattribute\nFrance\t{} is\n")),
         E.DatasetFormatError, r"f\.tsv, line 2: row has 2 fields", r"give every column a value"),
    Case("data file not UTF-8", lambda env: load_facts(_write(env, "f.csv", b"subject\n\xff\n")),
         E.DatasetFormatError, r"line 2: byte 0xff is not valid UTF-8", r"save the file as UTF-8"),
    Case("missing field", lambda env: load_prompt_pairs(_write(env, "m.jsonl", '{"clean": "a b", "answer": " c"}')),
         E.DatasetFormatError, r"line 1, field 'corrupt': missing", r"add it"),
    Case("causal trace without a subject span",
         lambda env: causal_trace(env.model, [PromptPair("a b", "a b", " c")], progress=False), E.ConfigError,
         r"no spans\['subject'\]", r"fact_spans|trace_items"),
    Case("knockout of an unknown span",
         lambda env: attention_knockout(env.model, [PromptPair("a b c", "a b c", " d", spans={"subject": (1, 2)})],
                                        edges=["object"], progress=False),
         E.ConfigError, r"no span 'object'", r"'subject', 'relation', 'last'"),
    Case("unknown metric", lambda env: activation_patching(env.model, [PAIR], "accuracy", progress=False),
         E.ConfigError, r"unknown metric 'accuracy'", r"logit_diff"),
    Case("NaN metric", lambda env: _nan_metric(env, "nan"), E.NonFiniteMetricError,
         r"metric is nan for prompt 0 at cell resid_pre L\d @\d", r"finite values"),
    Case("inf metric", lambda env: _nan_metric(env, "inf"), E.NonFiniteMetricError,
         r"metric is inf for prompt 0 at cell resid_pre L0 @0", r"bf16"),
    Case("float16 overflow", _fp16_overflow, E.NonFiniteActivationError,
         r"inf/NaN in the residual stream entering layer 1 \(the output of layer 0\).*float16",
         r"dtype='bf16'.*'fp32'"),
    Case("device that is not available", lambda env: load_model("smollm2", device="cuda:99"), E.DeviceError,
         r"'cuda:99'", r"device='cpu'|cuda:0\.\."),
    Case("device string that is no device", lambda env: tiny_model("gpt2", device="gpu"), E.DeviceError,
         r"'gpu' is not a torch device", r"'cpu', 'cuda'"),
    Case("tokens on another device than the model",
         lambda env: patch_tokens(env.model, torch.zeros(1, 5, dtype=torch.long, device="meta"),
                                  torch.zeros(1, 5, dtype=torch.long, device="meta"),
                                  LogitDiff(torch.tensor([1]), torch.tensor([2])), PatchingConfig()),
         E.DeviceError, r"tokens are on meta but the model is on cpu", r"tokens\.to\('cpu'\)"),
    Case("corrupted result file", _corrupt_result, E.ResultFileError,  # a truncated file fails its checksum
         r"values\.safetensors does not match the checksum", r"re-run the method that produced it"),
    Case("incomplete result directory",
         lambda env: PatchingResult.load(_write(env, "x", "").parent), E.ResultFileError,
         r"not a complete result: missing", r"[Rr]e-run"),
    Case("unwritable output directory",
         lambda env: PatchingResult(values=torch.zeros(1, 1), axes=("layer",), clean=torch.ones(1),
                                    corrupt=torch.zeros(1)).save(_blocked_dir(env)),
         E.ResultFileError, r"cannot write a result to .*out", r"writable output directory"),
    Case("unwritable checkpoint directory",
         lambda env: activation_patching(env.model, [PAIR], progress=False, checkpoint_dir=_blocked_dir(env)),
         E.CheckpointError, r"cannot use .*out as a checkpoint directory", r"writable directory"),
    Case("bad input on the command line",
         lambda env: _cli(env, "patch", "--model", "./no/such/model", "--pairs", "x.jsonl", "--out", str(env.tmp)),
         E.ConfigError, r"^recallscope: error: unknown model spec", r"'smollm2'"),
]


SAME = PromptPair(PAIR.clean, PAIR.clean, " Paris", " Madrid")


def _flipped_result(env: Env) -> Any:
    res = PatchingResult(values=torch.arange(8.0).reshape(2, 4), axes=("layer",), clean=torch.ones(2),
                         corrupt=torch.zeros(2))
    values = res.save(env.tmp / "result") / "values.safetensors"
    data = bytearray(values.read_bytes())
    data[-3] ^= 0x01  # one bit of the last value
    values.write_bytes(bytes(data))
    return PatchingResult.load(values.parent)


def _config_only_dir(env: Env) -> Any:
    (env.tmp / "m").mkdir()
    _write(env, "m/config.json", '{"model_type": "gpt2"}')
    return load_model(str(env.tmp / "m"))


def _cli_usage(env: Env, *argv: str) -> Any:
    """An argparse usage error: exit status 2 and a message on stderr; re-raised for the check."""
    from recallscope.cli import main

    captured: list[str] = []
    env.monkeypatch.setattr("sys.stderr", type("W", (), {"write": lambda self, s: captured.append(s),
                                                          "flush": lambda self: None})())
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2, "a bad option must end the command with exit status 2"
    raise E.ConfigError("".join(captured))


def _no_usable_card(env: Env) -> Any:
    from recallscope.routes.human import compare_human
    from recallscope.routes.mnemonics import load_cards

    cards = load_cards(_write(env, "c.tsv", "#separator:tab\nvenal\tqqq zzz\tbribable\n"))
    return compare_human(env.model, cards, progress=False)


def _atp(env: Env, pairs: list) -> Any:
    from recallscope.attribution.atp import atp

    return atp(env.model, pairs, "logit_diff", progress=False)


CATALOGUE += [  # issue 15: inputs a red-team pass found unhandled
    Case("clean equals corrupt (patching)", lambda env: activation_patching(env.model, [SAME], progress=False),
         E.ConfigError, r"pairs \[0\] have identical clean and corrupt prompts", r"counterfactual_pairs"),
    Case("clean equals corrupt (AtP)", lambda env: _atp(env, [SAME]), E.ConfigError,
         r"identical clean and corrupt", r"corruption='zero' or 'mean'"),
    Case("text file named .gguf", lambda env: load_model(str(_write(env, "x.gguf", "hello"))), E.UnknownModelError,
         r"x\.gguf is not a GGUF file \(it starts with b'hell'", r"real \.gguf model file"),
    Case("model directory without weights", _config_only_dir, E.WeightsUnavailableError,
         r"holds config\.json but no weights", r"model\.safetensors or pytorch_model\.bin"),
    Case("causal trace with zero samples",
         lambda env: causal_trace(env.model, [PromptPair("a b c", "a b c", " d", spans={"subject": (1, 2)})],
                                  n_samples=0, progress=False), E.ConfigError, r"n_samples >= 1.*got 0",
         r"ROME uses 10"),
    Case("causal trace with negative samples",
         lambda env: causal_trace(env.model, [PromptPair("a b c", "a b c", " d", spans={"subject": (1, 2)})],
                                  n_samples=-1, progress=False), E.ConfigError, r"got -1", r"ROME uses 10"),
    Case("trace facts --samples 0", lambda env: _cli_usage(env, "trace", "facts", "--samples", "0"),
         E.ConfigError, r"--samples: '0' must be at least 1", r"at least 1"),
    Case("bit-flipped result values", _flipped_result, E.ResultFileError,
         r"values\.safetensors does not match the checksum recorded when it was saved", r"re-run the method"),
    Case("backwards layer range", lambda env: _cli_usage(env, "patch", "--layers", "3-1"), E.ConfigError,
         r"the range '3-1' in '3-1' runs backwards", r"write it low-high, e\.g\. 1-3"),
    Case("zero memory budget (command line)", lambda env: _cli_usage(env, "patch", "--memory-budget-mb", "0"),
         E.ConfigError, r"--memory-budget-mb: '0' must be a positive number", r"e\.g\. 1024"),
    Case("negative memory budget (command line)",
         lambda env: _cli_usage(env, "patch", "--memory-budget-mb", "-5"), E.ConfigError,
         r"'-5' must be a positive number", r"e\.g\. 1024"),
    Case("zero memory budget (library)",
         lambda env: activation_patching(env.model, [PAIR], memory_budget_mb=0.0, progress=False), E.ConfigError,
         r"memory_budget_mb must be a positive number of megabytes, got 0\.0", r"default is 1024"),
    Case("attribute --n-pairs 0", lambda env: _cli_usage(env, "attribute", "--n-pairs", "0"), E.ConfigError,
         r"--n-pairs: '0' must be at least 1", r"at least 1"),
    Case("no usable mnemonic card", _no_usable_card, E.EmptyDatasetError,
         r"no card could be scored; skipped: 'venal' \(line 2\): ", r"[Ff]ix those cards"),
    Case("unknown metric lists the names", lambda env: activation_patching(env.model, [PAIR], "acc", progress=False),
         E.ConfigError, r"unknown metric 'acc' for activation_patching; use one of 'logit_diff', 'logit', 'logprob'",
         r"metric object from recallscope\.metrics"),
]
REQUIRED_15 = {  # the inputs issue 15 lists -> catalogue rows (others have their own tests below)
    "clean == corrupt in patch/atp": ["clean equals corrupt (patching)", "clean equals corrupt (AtP)"],
    "a text file named x.gguf": ["text file named .gguf"],
    "config.json but no weights": ["model directory without weights"],
    "--samples 0, n_samples=0/-1": ["trace facts --samples 0", "causal trace with zero samples",
                                     "causal trace with negative samples"],
    "bit-flipped values.safetensors": ["bit-flipped result values"],
    "--layers 3-1": ["backwards layer range"],
    "--memory-budget-mb 0 and -5": ["zero memory budget (command line)", "negative memory budget (command line)",
                                    "zero memory budget (library)"],
    "attribute --n-pairs 0": ["attribute --n-pairs 0"],
    "compare-human's skipped reasons": ["no usable mnemonic card"],
    "metric list printed as *[...]": ["unknown metric lists the names"],
}


def _cards_case() -> list[Case]:
    """The mnemonic-cards format (routes module), when present."""
    try:
        from recallscope.routes.mnemonics import load_cards
    except ImportError:
        return []
    return [Case("malformed mnemonic cards", lambda env: load_cards(_write(env, "c.tsv", "term\tmnemonic\n")),
                 E.DatasetFormatError, r"c\.tsv:1: a card needs 3 to 5 tab-separated fields", r"Export from Anki|fix")]


CATALOGUE += _cards_case()
REQUIRED = {  # the kinds issue 9 asks for -> the catalogue rows covering them
    "invalid base64": ["invalid base64"],
    "length-mismatched pairs": ["length-mismatched pair", "pairs of different lengths in one batch"],
    "multi-token answers": ["multi-token answer"],
    "layer/head/position out of range": ["layer out of range", "head out of range", "position out of range"],
    "prompt over the context length": ["prompt over the context length"],
    "unknown model": ["unknown model"],
    "missing offline weights": ["missing offline weights (hub)", "missing offline weights (GGUF file)"],
    "empty or duplicated dataset": ["empty dataset (file)", "duplicated dataset item"],
    "malformed JSONL/CSV/TSV": ["malformed JSONL", "malformed CSV", "malformed TSV"],
    "NaN or inf metric naming the site": ["NaN metric", "inf metric"],
    "fp16 overflow": ["float16 overflow"],
    "wrong device": ["device that is not available", "tokens on another device than the model"],
    "corrupted result file": ["corrupted result file"],
    "unwritable output directory": ["unwritable output directory"],
}


@pytest.fixture
def env(tiny_gpt2, tmp_path, monkeypatch) -> Env:
    return Env(tiny_gpt2, tmp_path, monkeypatch)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.kind for c in CATALOGUE])
def test_bad_input_raises_a_clear_error(env, case):
    with pytest.raises(E.RecallscopeError) as info:
        case.trigger(env)
    message = str(info.value)
    assert type(info.value) is case.error or isinstance(info.value, case.error), (type(info.value), message)
    assert re.search(case.problem, message, re.S), f"the message does not name the problem: {message}"
    assert re.search(case.fix, message, re.S), f"the message does not name the fix: {message}"


def test_catalogue_covers_the_issue():
    kinds = [c.kind for c in CATALOGUE]
    assert len(set(kinds)) == len(kinds) >= 15
    missing = {need: rows for need, rows in {**REQUIRED, **REQUIRED_15}.items() if not set(rows) <= set(kinds)}
    assert not missing, missing


def test_unknown_metric_message_has_no_starred_list(env):
    with pytest.raises(E.ConfigError) as info:
        activation_patching(env.model, [PAIR], "acc", progress=False)
    assert "*[" not in str(info.value)


def test_negative_positions_count_from_the_end(env):
    """positions=[-1] is the last position (the error text for bad positions promises negative indices)."""
    n = len(to_tokens(env.model, [PAIR.clean])[0])
    last = activation_patching(env.model, [PAIR], positions=[-1, -2], progress=False)
    same = activation_patching(env.model, [PAIR], positions=[n - 1, n - 2], progress=False)
    torch.testing.assert_close(last.values, same.values)
    assert list(last.config["positions"]) == [n - 1, n - 2]


def test_organism_rejects_text_outside_its_vocabulary(b64_organism):
    """English pairs on the base64 organism used to become <pad> tokens (mean NaN), and `facts` on it reported
    "0 / 356" recalled as if it were a measurement."""
    from recallscope.tasks.facts import load_builtin_facts, recalled_facts

    with pytest.raises(E.ConfigError, match=r"prompt 'The capital of France is': 5 of its 5 tokens are unknown "
                                            r"to this model's tokenizer \(they become '<pad>'\).*own vocabulary"):
        activation_patching(b64_organism, [PAIR], "logprob", progress=False)
    with pytest.raises(E.ConfigError, match="unknown to this model's tokenizer"):
        recalled_facts(b64_organism, load_builtin_facts()[:3])


def test_facts_command_on_the_base64_organism_is_an_error(capsys):
    from recallscope.cli import main

    assert main(["facts", "--model", "organism:b64-decoder"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recallscope: error: prompt ") and "unknown to this model's tokenizer" in err


def test_ctrl_c_ends_with_one_line_and_status_130(monkeypatch, capsys):
    import recallscope.cli.models as models_cmd
    from recallscope.cli import main

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(models_cmd, "_cmd_models", interrupted)
    assert main(["models"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("recallscope: interrupted (Ctrl-C)") and "Traceback" not in err and "resume" in err


def test_wrong_python_types_without_the_type_checker(tmp_path):
    """A tuple instead of a PromptPair, answer=5 and b64_codec.encode(5), as a user meets them: without the test
    suite's beartype hook (which would reject them first), in a fresh interpreter."""
    import json
    import subprocess
    import sys

    script = (
        "import json\n"
        "from recallscope.tasks.b64_codec import encode\n"
        "from recallscope.tasks.pairs import PromptPair, check_pairs\n"
        "out = {}\n"
        "for name, make in [('tuple', lambda: check_pairs([('a b', 'a c', ' d')])),\n"
        "                   ('answer', lambda: PromptPair('a b', 'a c', 5)), ('encode', lambda: encode(5))]:\n"
        "    try:\n"
        "        make(); out[name] = None\n"
        "    except Exception as e:\n"
        "        out[name] = [type(e).__name__, str(e)]\n"
        "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["tuple"][0] == "ConfigError" and re.search(r"pairs\[0\] is a tuple .*PromptPair\(clean, corrupt",
                                                           out["tuple"][1])
    assert out["answer"][0] == "ConfigError" and "PromptPair.answer must be a string, got int 5" in out["answer"][1]
    assert out["encode"][0] == "ConfigError" and re.search(r"not int '5'.*str\(value\)", out["encode"][1])


def test_a_sweep_without_nonfinite_values_is_not_flagged(env):
    """The NaN guard must not fire on legitimate (finite, even very negative) metric values."""
    res = _nan_metric(env, "never")
    assert torch.isfinite(res.values).all() and (res.values < 0).all()


# ----------------------------------------------------------------------------------------------- fuzz
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
B64ISH = st.one_of(st.text(alphabet="ABCQRSVWXYZabgw0189+/=", min_size=1, max_size=12),
                   st.binary(min_size=1, max_size=9).map(encode))


@FUZZ
@given(b64=B64ISH, before=st.text(max_size=12), after=st.text(max_size=12))
def test_fuzz_align_tokens_tiles_or_raises(gpt2_tokenizer, b64, before, after):
    """Any base64-ish string inside any text: an alignment whose tokens tile it, or a RecallscopeError."""
    try:
        al = align_tokens(gpt2_tokenizer, b64, prompt=before + b64 + after, offset=len(before))
    except E.RecallscopeError:
        return
    spans = [t.char_span for t in al.tokens]
    assert spans[0][0] == 0 and spans[-1][1] == len(b64)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(0 <= j < al.n_bytes for t in al.tokens for j in t.byte_indices)


@FUZZ
@given(text=st.text(max_size=20))
def test_fuzz_stimulus_round_trips_or_raises(text):
    """make_stimulus encodes any text (lone surrogates and '' are clear errors) and decodes back to it."""
    try:
        stim = make_stimulus(text)
    except E.ConfigError:
        assert text == "" or any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return
    assert decode_text(stim.b64) == text


@FUZZ
@given(fmt=st.text(alphabet="{}b64 ->:=Q", max_size=14))
def test_fuzz_few_shot_template(fmt):
    try:
        template = FewShotTemplate(query_format=fmt)
    except E.ConfigError:
        assert fmt.count("{b64}") != 1
        return
    text, offset = template.render([make_stimulus("Hi")], "VA==")
    assert text[offset:offset + 4] == "VA=="


WORDS = st.sampled_from(["The", " capital", " of", " France", " is", " Paris", " Madrid", "", " ", "\n", "é",
                         " Parisienne", "\ud800"])


@FUZZ
@given(parts=st.lists(st.lists(WORDS, max_size=5).map("".join), min_size=4, max_size=4), n=st.integers(0, 2),
       wrong=st.booleans())
def test_fuzz_tokenize_pairs(tiny_gpt2, parts, n, wrong):
    """Any prompt pairs either tokenise to equal-length single-answer batches or raise a RecallscopeError."""
    clean, corrupt, answer, wrong_answer = parts
    pairs = [PromptPair(clean, corrupt, answer, wrong_answer if wrong else None)] * n
    try:
        tp = tokenize_pairs(tiny_gpt2, pairs)
    except E.RecallscopeError:
        return
    assert tp.clean.shape == tp.corrupt.shape and tp.answer.shape == (n,)


@FUZZ
@given(lines=st.lists(st.lists(st.text(alphabet=st.characters(blacklist_characters="\n\r"), max_size=8),
                               max_size=6).map("\t".join), max_size=5),
       header=st.sampled_from(["", "#separator:tab\n", "#separator:comma\n", "#html:false\n"]))
def test_fuzz_mnemonic_cards(tmp_path_factory, lines, header):
    mnemonics = pytest.importorskip("recallscope.routes.mnemonics")
    path = tmp_path_factory.mktemp("cards") / "cards.tsv"
    path.write_text(header + "\n".join(lines), encoding="utf-8", errors="surrogatepass")
    try:
        cards = mnemonics.load_cards(path)
    except E.RecallscopeError:
        return
    assert cards and all(c.term and c.mnemonic for c in cards)
