"""Config files: TOML/JSON into the library's config dataclasses, with clear errors, and back."""

import json

import pytest

from recallscope.config import config_from_dict, config_to_dict, load_config, save_config
from recallscope.errors import ConfigError
from recallscope.patching.activation import PatchingConfig
from recallscope.patching.causal_trace import TraceConfig
from recallscope.vocab import Component, Direction


@pytest.mark.parametrize("config", [
    PatchingConfig(),
    PatchingConfig(component=Component("z"), per_head=False, window=3, direction=Direction.NOISING, layers=(0, 2),
                   positions=(4,), memory_budget_mb=64.0),
    TraceConfig(component=Component.MLP_OUT, window=10, noise_scale=2.5, n_samples=4, seed=7, layers=(1,)),
])
@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_round_trip(tmp_path, config, suffix):
    path = save_config(config, tmp_path / f"cfg{suffix}")
    assert load_config(path, type(config)) == config


def test_values_are_coerced_to_field_types(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('component = "attn_out"\nlayers = [3, 4]\nmemory_budget_mb = 16\n')
    cfg = load_config(path, PatchingConfig)
    assert cfg.component is Component.ATTN_OUT and cfg.layers == (3, 4)
    assert isinstance(cfg.memory_budget_mb, float) and cfg.memory_budget_mb == 16.0
    assert load_config(path, PatchingConfig, overrides={"window": 5}).window == 5
    assert config_to_dict(cfg)["component"] == "attn_out" and config_to_dict(cfg)["layers"] == [3, 4]
    json_path = tmp_path / "c.json"
    json_path.write_text(json.dumps({"layers": None, "direction": "noising"}))
    assert load_config(json_path, PatchingConfig) == PatchingConfig(direction=Direction.NOISING)


@pytest.mark.parametrize("data, message", [
    ({"componnt": "z"}, "'componnt' (did you mean 'component'?)"),
    ({"bogus": 1}, "valid keys are ['component', 'corruption'"),
    ({"component": "zz"}, "'zz' is not a valid Component; choose one of ['resid_pre'"),
    ({"window": 2.5}, "window = 2.5 (float) should be int"),
    ({"per_head": 1}, "per_head = 1 (int) should be bool"),
    ({"layers": [0, "1"]}, "layers[1] = '1' (str) should be int"),
    ({"layers": 3}, "should be a list"),
    ({"memory_budget_mb": True}, "should be float"),
])
def test_bad_values_name_the_field_and_the_fix(data, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(PatchingConfig, data, where="patch.toml")
    assert message in str(info.value) and "patch.toml" in str(info.value)


def test_bad_files(tmp_path):
    (tmp_path / "c.yaml").write_text("a: 1")
    with pytest.raises(ConfigError, match="use a .toml or .json file"):
        load_config(tmp_path / "c.yaml", PatchingConfig)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml", PatchingConfig)
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a table"):
        load_config(tmp_path / "c.json", PatchingConfig)
    (tmp_path / "c.toml").write_text("window = = 3")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(tmp_path / "c.toml", PatchingConfig)
