"""Organism machinery: tokenizer, determinism, interchange, storage, ROC AUC, registry."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from recallscope.errors import ConfigError, UnknownModelError, WeightsUnavailableError
from recallscope.models.stack import build_stack
from recallscope.organisms import ground_truth, organism_info
from recallscope.organisms.core import (ArchConfig, build_net, deterministic, interchange, resid_pre, state_sha256,
                                        word_tokenizer)
from recallscope.organisms.recipes import get_recipe, recipes, save_recipe, train_recipe
from recallscope.organisms.store import load_organism_dir


pytestmark = pytest.mark.usefixtures("organism_determinism")


TINY_STEPS = {"b64": dict(n_heldout=20), "mnemonic": {}, "facts": {}}


def tiny(name: str, steps: int = 6):
    recipe = get_recipe(name)
    train = dataclasses.replace(recipe.config.train, steps=steps, batch_size=8, warmup=2)
    return recipe.with_config(train=train, **TINY_STEPS[recipe.kind])


def test_word_tokenizer_round_trip(tmp_path):
    tok = word_tokenizer(["VA", "==", "T"])
    assert len(tok) == 5
    assert tok("VA == T", add_special_tokens=False)["input_ids"] == [2, 3, 4]
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == 5 and again.bos_token == "<s>"
    assert again("<s>VA ==", add_special_tokens=False)["input_ids"] == [0, 2, 3]
    with pytest.raises(ConfigError, match="unique"):
        word_tokenizer(["a", "a"])
    with pytest.raises(ConfigError, match="whitespace"):
        word_tokenizer(["a b"])


def test_deterministic_restores_global_state():
    with deterministic(1):
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(2)
        state = torch.random.get_rng_state()
        with deterministic(3):
            assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
            torch.rand(5)
        assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 2
        assert torch.equal(torch.random.get_rng_state(), state)


def test_state_sha256_sees_one_changed_value():
    net = build_net(ArchConfig(n_layers=1, d_model=16, n_heads=2, n_ctx=4), 10, seed=0)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    same = state_sha256(state)
    assert state_sha256({k: v.clone() for k, v in state.items()}) == same
    state["pos.weight"][0, 0] += 1e-6
    assert state_sha256(state) != same


def _hook_interchange(bridge, base, source, layer, pos):
    """Oracle: TransformerLens hooks on the bridge (independent of recallscope's functional forward)."""
    name = f"blocks.{layer}.hook_resid_pre"
    _, cache = bridge.run_with_cache(source, names_filter=[name])
    src = cache[name][:, pos].clone()

    def hook(act, hook):
        act = act.clone()
        act[:, pos] = src
        return act

    return bridge.run_with_hooks(base, fwd_hooks=[(name, hook)])


@pytest.mark.parametrize("name", ["fact-store", "route-s0"])
def test_interchange_matches_hook_oracle_and_bare_net(tmp_path, name):
    recipe = tiny(name)
    net, record = train_recipe(recipe, evaluate=False)
    model = load_organism_dir(save_recipe(recipe, net, record, tmp_path / name))
    g = torch.Generator().manual_seed(0)
    n_ctx = recipe.arch.n_ctx
    base = torch.randint(2, model.cfg.d_vocab, (3, n_ctx), generator=g)
    source = torch.randint(2, model.cfg.d_vocab, (3, n_ctx), generator=g)
    base[:, 0] = source[:, 0] = 0
    pos = torch.full((3,), n_ctx - 2)
    for layer in (1, 2):
        ours = interchange(model, base, source, layer=layer, base_pos=pos, source_pos=pos)
        torch.testing.assert_close(ours, _hook_interchange(model, base, source, layer, n_ctx - 2), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(interchange(net, base, source, layer=layer, base_pos=pos, source_pos=pos), ours,
                                   atol=1e-5, rtol=1e-5)
    stack = build_stack(model)
    final = stack.unembed(stack.final_norm(resid_pre(model, base, recipe.arch.n_layers)))
    torch.testing.assert_close(final, model(base), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(base), net(base), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["b64-decoder", "route-s1", "rote-s1", "fact-store"])
def test_training_is_bit_for_bit_reproducible(name):
    recipe = tiny(name, steps=4)
    first = state_sha256(train_recipe(recipe, evaluate=False)[0].state_dict())
    assert state_sha256(train_recipe(recipe, evaluate=False)[0].state_dict()) == first
    if name == "route-s1":  # the seed matters
        other = dataclasses.replace(recipe.config.train, seed=recipe.config.train.seed + 1)
        assert state_sha256(train_recipe(recipe.with_config(train=other), evaluate=False)[0].state_dict()) != first


def test_store_round_trip_and_errors(tmp_path):
    recipe = tiny("route-s0")
    net, record = train_recipe(recipe)  # with the checks: they land in config.json and the card
    path = save_recipe(recipe, net, record, tmp_path / "r")
    model = load_organism_dir(path)
    info = organism_info(model)
    assert info.name == "route-s0" and model.recallscope_spec == "organism:route-s0"
    assert info.config["metrics"]["swap_follow"] == record["swap_follow"]
    assert "| swap_follow |" in (path / "README.md").read_text()
    assert ground_truth(model).site_layer == 1 and ground_truth(model).is_route
    assert json.loads((path / "config.json").read_text())["weights_sha256"] == state_sha256(net.state_dict())
    (path / "ground_truth.json").unlink()
    with pytest.raises(WeightsUnavailableError, match="ground_truth.json"):
        load_organism_dir(path)
    with pytest.raises(UnknownModelError, match="not a model organism"):
        ground_truth(torch.nn.Linear(2, 2))


def test_registry_lists_shipped_organisms_lazily():
    from recallscope import load_model
    from recallscope.models.organisms_registry import available_organisms

    assert set(recipes()) <= set(available_organisms())
    with pytest.raises(UnknownModelError, match="b64-decoder"):
        load_model("organism:no-such-organism")
    code = "import sys, recallscope; recallscope.__version__; print('recallscope.organisms' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_shipped_configs_match_the_code_recipes():
    from recallscope.organisms.recipes import WEIGHTS_DIR, _config_dict

    for name, recipe in recipes().items():
        stored = json.loads((WEIGHTS_DIR / name / "config.json").read_text())
        assert stored["recipe"]["config"] == _config_dict(recipe.config), name
        assert (WEIGHTS_DIR / name / "README.md").read_text().startswith(f"# organism:{name}")
