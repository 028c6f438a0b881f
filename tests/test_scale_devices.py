"""Device maps and precision: load_model's device_map plumbing, and placing traces by layer device."""

import pytest
import torch

from recallscope.errors import ConfigError
from recallscope.models import loading
from recallscope.models.loading import load_model, placement
from recallscope.models.stack import build_stack
from recallscope.patching import activation_patching
from recallscope.scale.devices import layer_device, module_device, place_trace
from recallscope.tasks.pairs import PromptPair

PAIRS = [PromptPair("The capital of France is a city called", "The capital of Spain is a city called", " Paris",
                    " Madrid")]


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory, gpt2_tokenizer):
    """A tiny random Hugging Face Llama saved as a local model directory (config.json + safetensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(gpt2_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=gpt2_tokenizer.bos_token_id, eos_token_id=gpt2_tokenizer.eos_token_id)
    out = tmp_path_factory.mktemp("hf_llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    gpt2_tokenizer.save_pretrained(out)
    return out


def test_placement_keywords():
    assert placement("cpu", None) == {}
    assert placement("cuda:1", None) == {"device_map": {"": "cuda:1"}}  # straight onto the GPU
    assert placement("cuda", "auto") == {"device_map": "auto"}
    assert placement("cpu", {"model.layers.0": 0}) == {"device_map": {"model.layers.0": 0}}


def test_device_map_reaches_from_pretrained_and_patches_the_same(hf_llama_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained.__func__
    calls = []

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    plain = load_model(hf_llama_dir)
    mapped = load_model(hf_llama_dir, device_map="auto")  # accelerate dispatch (all on the CPU here)
    assert "device_map" not in calls[0] and calls[1]["device_map"] == "auto"
    stack = build_stack(mapped)
    assert all(layer_device(stack, i) == torch.device("cpu") for i in range(stack.n_layers))
    a = activation_patching(plain, PAIRS, component="resid_pre", progress=False)
    b = activation_patching(mapped, PAIRS, component="resid_pre", progress=False)
    assert torch.equal(a.values, b.values) and torch.equal(a.clean, b.clean)


def test_hub_loads_pass_device_map_instead_of_device(monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    seen = {}

    class Booted:
        def eval(self):
            return self

    def boot(name, **kwargs):
        seen.update(kwargs, name=name)
        return Booted()

    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(boot))
    load_model("meta-llama/Llama-3.1-70B", device_map="auto", dtype="bf16")
    assert seen == {"name": "meta-llama/Llama-3.1-70B", "device_map": "auto", "dtype": torch.bfloat16}
    seen.clear()
    load_model("gpt2-xl", dtype="fp16")
    assert seen == {"name": "gpt2-xl", "device": "cpu", "dtype": torch.float16}


def test_device_map_is_refused_for_organisms():
    with pytest.raises(ConfigError, match="device_map applies to Hugging Face models"):
        load_model("organism:anything", device_map="auto")


def test_dtype_names_resolve_and_bad_ones_are_refused():
    assert loading._resolve_dtype("bf16") is torch.bfloat16
    assert loading._resolve_dtype("fp16") is torch.float16
    assert loading._resolve_dtype("fp32") is torch.float32
    with pytest.raises(Exception, match="unknown dtype"):
        loading._resolve_dtype("fp8")


class _Hooked(torch.nn.Linear):
    """A module with an accelerate-style hook whose execution device differs from its weights."""

    def __init__(self):
        super().__init__(2, 2)
        self._hf_hook = type("Hook", (), {"execution_device": 1})()


def test_module_device_prefers_the_accelerate_execution_device():
    assert module_device(_Hooked()) == torch.device("cuda:1")
    assert module_device(torch.nn.LayerNorm(4)) == torch.device("cpu")
    assert module_device(lambda x: x) is None


def test_place_trace_moves_each_layer_to_its_device(tiny_gpt2):
    from recallscope.models.forward import run

    stack = build_stack(tiny_gpt2)
    tokens = tiny_gpt2.to_tokens("The cat sat")
    _, trace = run(stack, tokens, record={"resid_pre", "z"})
    placed = place_trace(trace, stack)
    assert placed.acts.keys() == trace.acts.keys() and placed.kv.keys() == trace.kv.keys()
    for key, t in trace.acts.items():
        assert placed.acts[key].device == layer_device(stack, key[1])
        assert torch.equal(placed.acts[key], t)


def test_cli_passes_dtype_and_device_map_to_load_model(monkeypatch):
    from recallscope import cli

    args = cli.build_parser().parse_args(["facts", "--dtype", "bf16", "--device-map", "auto"])
    assert cli._placement(args) == {"device": "cpu", "dtype": "bf16", "device_map": "auto"}
    args = cli.build_parser().parse_args(["routes", "--prompt", "p", "--input", " A", "--output", " B"])
    assert cli._placement(args) == {"device": "cpu", "dtype": None, "device_map": None}
    seen = {}

    def fake_load(spec, **kwargs):
        seen.update(kwargs, spec=spec)
        raise ConfigError("stop here")

    monkeypatch.setattr(loading, "load_model", fake_load)
    monkeypatch.setattr("recallscope.models.load_model", fake_load)
    assert cli.main(["facts", "--model", "gpt2-xl", "--dtype", "fp16", "--device-map", "auto"]) == 2
    assert seen == {"spec": "gpt2-xl", "device": "cpu", "dtype": "fp16", "device_map": "auto"}


def test_forward_and_engine_follow_layers_across_devices(hf_llama_dir):
    """Layer 1, the final norm and the unembedding on a second device (``meta``, the only other device
    a CPU machine has; mixing devices in an addition or concatenation raises): the functional forward
    and the engine move activations to each layer's device, so nothing raises and every recorded
    activation sits on its layer's device."""
    from recallscope.lens import hidden_states
    from recallscope.models.forward import run
    from recallscope.models.stack import unwrap
    from recallscope.patching.engine import Cell, run_chunk
    from recallscope.sites import Site
    from recallscope.vocab import Component

    model = load_model(hf_llama_dir)
    hf = unwrap(model.original_model)
    for module in (hf.model.layers[1], hf.model.norm, hf.lm_head):
        module.to("meta")
    stack = build_stack(model)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert [layer_device(stack, i) for i in range(2)] == [cpu, meta]
    tokens = model.to_tokens("The cat sat on the")
    with torch.no_grad():
        logits, trace = run(stack, tokens, record={"resid_pre", "z"}, read_pos=torch.tensor([tokens.shape[1] - 1]))
        assert logits.device == meta and logits.shape == (1, 1, stack.d_vocab)
        assert trace.acts[("resid_pre", 0)].device == cpu and trace.acts[("z", 1)].device == meta
        assert trace.kv[0][0].device == cpu and trace.kv[1][0].device == meta
        cells = [Cell((Site(Component.RESID_PRE, layer, 2),)) for layer in (0, 1)]
        out = run_chunk(stack, cells, trace, trace, batch=1, n_pos=tokens.shape[1], pos0=2,
                        read_pos=torch.tensor([tokens.shape[1] - 1]))
    assert out.device == meta and out.shape == (2, 1, stack.d_vocab)
    with torch.no_grad():
        states = hidden_states(stack, tokens)  # the lenses stack every layer's state on the output device
    assert states.device == meta and states.shape == (3, 1, tokens.shape[1], stack.d_model)
