"""The GPU experiment scripts (experiments/gpu/) run end to end on CPU in their small mode, and their
numbers agree with the saved results and with direct recomputation."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

GPU = Path(__file__).resolve().parents[1] / "experiments" / "gpu"


def script(name: str):
    """Import ``experiments/gpu/<name>.py`` as a module (its directory on the path for ``_common``)."""
    if str(GPU) not in sys.path:
        sys.path.insert(0, str(GPU))
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small(out: Path, *extra: str) -> list[str]:
    return ["--model", "smollm2", "--small", "--out", str(out), *extra]


def test_config_precedence_defaults_small_file_command_line(tmp_path):
    rome = script("rome_causal_trace")
    cfg = rome._common.parse_config(rome.RomeConfig, [], small=rome.SMALL, description="")
    assert cfg.model == "gpt2-xl" and cfg.samples == 10 and cfg.device == "cuda" and not cfg.small
    cfg = rome._common.parse_config(rome.RomeConfig, ["--small"], small=rome.SMALL, description="")
    assert cfg.model == "smollm2" and cfg.samples == 2 and cfg.layers == (0, 8, 16, 24) and cfg.small
    (tmp_path / "c.toml").write_text('samples = 7\ndtype = "bf16"\nlayers = [1, 2]\n')
    cfg = rome._common.parse_config(rome.RomeConfig, ["--small", "--config", str(tmp_path / "c.toml"),
                                                      "--samples", "3", "--device-map", "auto"],
                                    small=rome.SMALL, description="")
    assert (cfg.samples, cfg.dtype, cfg.layers, cfg.device_map, cfg.n_facts) == (3, "bf16", (1, 2), "auto", 2)
    (tmp_path / "bad.json").write_text(json.dumps({"sample": 3}))
    with pytest.raises(Exception, match="sample"):
        rome._common.parse_config(rome.RomeConfig, ["--config", str(tmp_path / "bad.json")], small={}, description="")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.smollm2
def test_rome_causal_trace_small(smollm2, tmp_path):
    from recallscope.results import PatchingResult

    rome = script("rome_causal_trace")
    summary = rome.main(small(tmp_path), model=smollm2)
    assert summary["n_facts"] == 2
    assert all(_finite(v) for v in summary["measured"].values())
    assert {r["quantity"] for r in summary["comparison"]} == set(rome.PUBLISHED)
    mlp = PatchingResult.load(tmp_path / "trace_mlp")
    assert mlp.values.shape == (2, 4, 6)  # facts x layers x ROME token categories
    assert mlp.labels["layer"] == ["0", "8", "16", "24"] and mlp.config["window"] == 4
    peak = rome.category_peak(mlp, "subject_last")  # the summary is what the saved result says
    assert peak["aie"] == pytest.approx(summary["measured"]["aie_mlp_window10_last_subject_peak"], abs=1e-7)
    assert summary["measured"]["total_effect"] == pytest.approx(float((mlp.clean - mlp.corrupt).mean()), abs=1e-7)
    assert (tmp_path / "trace_hidden.html").exists() and (tmp_path / "summary.json").exists()


@pytest.mark.smollm2
def test_geva_knockout_small(smollm2, tmp_path):
    from recallscope.results import PatchingResult

    geva = script("geva_knockout")
    summary = geva.main(small(tmp_path), model=smollm2)
    res = PatchingResult.load(tmp_path / "knockout")
    assert res.values.shape == (summary["n_facts"], 30, 3)
    relative = (res.effect().values / res.clean[:, None, None]).mean(0)
    for e, edge in enumerate(geva.EDGES):
        got = summary["strongest_drop"][edge]
        assert got["layer"] == int(relative[:, e].argmin())
        assert got["relative_change"] == pytest.approx(float(relative[:, e].min()), abs=1e-6)
        assert got["relative_change"] >= -1.0 - 1e-6  # a probability cannot drop below zero
    assert summary["measured"]["relation_drop_before_subject_drop"] == (
        summary["strongest_drop"]["relation"]["layer"] < summary["strongest_drop"]["subject"]["layer"])


@pytest.mark.smollm2
def test_two_hop_bridge_small(smollm2, tmp_path):
    from recallscope.lens import LogitLens, hidden_states, first_token_id

    two = script("two_hop_bridge")
    summary = two.main(small(tmp_path), model=smollm2)
    assert 1 <= summary["n_prompts"] <= 4 and 0.0 <= summary["two_hop_accuracy"] <= 1.0
    hop = summary["first_hop"]
    assert len(hop["entrec_own_mean"]) == 31 and 0.0 <= hop["overall"]["share"] <= 1.0
    assert summary["backpatch"]["n"] <= 2
    cfg = two._common.parse_config(two.TwoHopConfig, small(tmp_path), small=two.SMALL, description="")
    p = two.compose(smollm2, cfg)[0]
    pos = two.mention_last_token(smollm2, p["fact"])
    tokens = smollm2.to_tokens(p["fact"].prompt)
    capital = p["fact"].subject
    assert capital.endswith(smollm2.tokenizer.decode(tokens[0, pos]).strip())
    assert smollm2.tokenizer.decode(tokens[0, pos + 1]).startswith(" ")  # the next token starts a new word
    lens = LogitLens(smollm2)  # EntRec oracle: the logit lens by hand at that position
    with torch.no_grad():
        own = lens.all_layers(hidden_states(lens.stack, tokens)[:, 0, pos])[:, first_token_id(smollm2, p["bridge"])]
    torch.testing.assert_close(two.entrec_at_mention(smollm2, p["fact"], p["bridge"]), own)


@pytest.mark.smollm2
def test_b64_route_probe_small(smollm2, tmp_path):
    probe = script("b64_route_probe")
    cfg = probe._common.parse_config(probe.B64ProbeConfig, small(tmp_path), small=probe.SMALL, description="")
    rows = probe.variants(smollm2, cfg)
    decode = smollm2.tokenizer.decode
    by_group = {g: [r for r in rows if r["group"] == g] for g in probe.GROUPS}
    assert all(len(v) == 2 for v in by_group.values())
    for natural, split in zip(by_group["hook"], by_group["hook_split"]):
        assert natural["b64"] == split["b64"]
        assert decode(natural["tokens"][natural["route_pos"]]) == natural["b64"][:2]  # the hook token
        assert decode(split["tokens"][split["route_pos"] - 1: split["route_pos"] + 1]) == split["b64"][:2]
        assert decode(natural["tokens"]) == decode(split["tokens"])  # same text, other tokenization
    row = dict(by_group["control_split"][0])
    tokens = torch.tensor([row["tokens"]])
    probe.measure(smollm2, [row])
    with torch.no_grad():  # oracle: the bridge's own forward
        p = torch.softmax(smollm2(tokens)[0, -1].float(), -1)[row["answer"]]
    assert row["p_answer"] == pytest.approx(float(p), rel=1e-4)
    summary = probe.main(small(tmp_path), model=smollm2)
    assert set(summary["groups"]) == set(probe.GROUPS)
    assert all(_finite(g["route"]["mean"]) and 0 <= g["p_answer"]["mean"] <= 1 for g in summary["groups"].values())
    assert (tmp_path / "route_probe.html").exists()


@pytest.mark.parametrize("name, config", [("rome_causal_trace", "rome_gpt2xl.toml"),
                                          ("geva_knockout", "geva_gptj.toml"),
                                          ("two_hop_bridge", "two_hop_llama.toml"),
                                          ("b64_route_probe", "b64_qwen72b.json")])
def test_shipped_configs_load_into_their_dataclasses(name, config):
    module = script(name)
    cls = next(v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, module._common.RunConfig) and v.__module__ == module.__name__)
    cfg = module._common.parse_config(cls, ["--config", str(GPU / "configs" / config)], small={}, description="")
    assert cfg.model != "smollm2" and not cfg.small and cfg.out.startswith("figures/gpu/")


# Each shipped config's model, by the architecture its hub checkpoint declares in config.json, and the
# tiny family (recallscope.models.tiny_hf) of that architecture with the features that matter here.
CONFIG_ARCH = {
    "rome_gpt2xl.toml": ("gpt2-xl", "gpt2", {}),
    "geva_gptj.toml": ("EleutherAI/gpt-j-6b", "gptj", {}),  # partial rotary (64 of 256), parallel block
    "two_hop_llama.toml": ("meta-llama/Llama-2-7b-hf", "llama", {"num_key_value_heads": 4}),  # no GQA
    "b64_qwen72b.json": ("Qwen/Qwen2.5-72B-Instruct", "qwen2", {}),  # GQA, q/k/v biases
}


@pytest.mark.parametrize("config", sorted(CONFIG_ARCH))
def test_shipped_config_architecture_passes_the_fast_self_check(config, gpt2_tokenizer, tmp_path):
    """A tiny model of each config's architecture, in the config's dtype, passes the fast engine's
    self-check, so the config runs on the fast engine (engine='auto' picks it)."""
    from recallscope.models import load_model
    from recallscope.models.selfcheck import resolve_engine, self_check
    from recallscope.models.tiny_hf import save_tiny_hf

    assert sorted(p.name for p in (GPU / "configs").iterdir()) == sorted(CONFIG_ARCH), "new config: add it above"
    text = (GPU / "configs" / config).read_text()
    raw = json.loads(text) if config.endswith(".json") else __import__("tomllib").loads(text)
    hub, family, overrides = CONFIG_ARCH[config]
    assert raw["model"] == hub
    model = load_model(save_tiny_hf(family, tmp_path / family, gpt2_tokenizer, **overrides), dtype=raw["dtype"])
    check = self_check(model)
    assert check.passed, check.reason
    assert resolve_engine(model, "auto") == "fast"


def _hf_knockout_oracle(model_dir, tokens, blocked, answers, monkeypatch):
    """p(answer) at the last position of a Hugging Face model run with eager attention, keys ``blocked``
    [prompt, key] hidden from the last query in every layer (an additive -inf mask)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    module = sys.modules[type(hf).__module__]
    eager = module.eager_attention_forward
    out = []
    for row, keys, answer in zip(tokens, blocked, answers):
        extra = torch.zeros(len(row), len(row))
        extra[-1, keys] = float("-inf")
        monkeypatch.setattr(module, "eager_attention_forward",
                            lambda mod, q, k, v, mask, *a, **kw: eager(mod, q, k, v, mask + extra, *a, **kw))
        with torch.no_grad():
            out.append(torch.softmax(hf(row[None]).logits[0, -1].float(), -1)[answer])
        monkeypatch.setattr(module, "eager_attention_forward", eager)
    return torch.stack(out)


def test_geva_gptj_config_runs_on_tiny_gptj(gpt2_tokenizer, tmp_path, monkeypatch):
    """geva_knockout.py with configs/geva_gptj.toml (bf16, window 9), only the model swapped for a tiny
    random GPT-J on CPU (a random model recalls no fact, so the known-fact filter takes the first facts).
    The knockout runs on the fast engine and, in fp32, equals Hugging Face's own GPT-J attention with the
    blocked keys masked (the bridge's hook_pattern on GPT-J is observational, see test_arch_matrix.py)."""
    from recallscope.models import load_model
    from recallscope.models.tiny_hf import save_tiny_hf
    from recallscope.patching import attention_knockout
    from recallscope.patching.knockout import key_positions
    from recallscope.results import PatchingResult
    from recallscope.tasks.facts import load_builtin_facts, trace_items

    geva = script("geva_knockout")
    tiny = save_tiny_hf("gptj", tmp_path / "gptj", gpt2_tokenizer)
    monkeypatch.setattr(geva._common, "known_facts",
                        lambda model, cfg: load_builtin_facts(cfg.relations)[:cfg.n_facts])
    argv = ["--config", str(GPU / "configs" / "geva_gptj.toml"), "--model", str(tiny), "--device", "cpu",
            "--n-facts", "2", "--out", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--no-progress"]
    summary = geva.main(argv)
    assert summary["config"]["dtype"] == "bf16" and summary["config"]["window"] == 9 and summary["n_facts"] == 2
    res = PatchingResult.load(tmp_path / "out" / "knockout")
    assert res.values.shape == (2, 2, 3) and res.config["engine"] == "fast"
    assert torch.isfinite(res.values).all()

    model = load_model(tiny)  # fp32, for an exact comparison with the oracle
    items = trace_items(model, load_builtin_facts(None)[:2])
    ours = attention_knockout(model, items, edges=geva.EDGES, query="last", window=9, metric="prob",
                              progress=False, engine="fast")
    tokens = torch.cat([model.to_tokens(it.clean) for it in items])
    answers = [model.tokenizer.encode(it.answer, add_special_tokens=False)[0] for it in items]
    for e, edge in enumerate(geva.EDGES):  # window 9 covers both layers: every cell blocks every layer
        blocked = [key_positions(it, edge, tokens.shape[1], has_bos=True) for it in items]
        want = _hf_knockout_oracle(tiny, tokens, blocked, answers, monkeypatch)
        for layer in range(2):
            torch.testing.assert_close(ours.values[:, layer, e], want, rtol=1e-4, atol=1e-9)
        assert (want - ours.clean).abs().max() > 1e-7, f"blocking {edge} should change p(answer)"
