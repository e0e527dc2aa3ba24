import json

import pytest

import deltatune as dt
from deltatune.errors import ConfigError


def test_available_methods_has_core_methods():
    assert {"lora", "bitfit", "layernorm", "partial"} <= set(dt.available_methods())


def test_config_from_dict_and_json_round_trip():
    cfg = dt.config_from_dict({"method": "lora", "r": 4, "alpha": 8, "targets": ["query", "value"],
                               "dropout": 0.1, "rslora": True, "dora": True, "layers": 1})
    assert isinstance(cfg, dt.LoRAConfig)
    assert cfg.layers == [1] and cfg.r == 4
    again = dt.config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert cfg.scaling == pytest.approx(8 / 2)


@pytest.mark.parametrize("bad, words", [
    ({"method": "lora", "r": 0}, "r=0"),
    ({"method": "lora", "r": 2.5}, "integer"),
    ({"method": "lora", "dropout": 1.0}, "dropout"),
    ({"method": "lora", "dropout": -0.1}, "dropout"),
    ({"method": "lora", "init": "xavier"}, "init"),
    ({"method": "lora", "targets": []}, "targets"),
    ({"method": "lora", "layers": ["a"]}, "layers"),
    ({"method": "partial", "last_k": 0}, "last_k"),
    ({"method": "partial", "last_k": 1, "layers": [0]}, "last_k"),
])
def test_invalid_values_name_the_field(bad, words):
    with pytest.raises(ConfigError, match=words):
        dt.config_from_dict(bad)


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown key 'rank'.*Did you mean: r\b|unknown key 'rank'"):
        dt.config_from_dict({"method": "lora", "rank": 8})
    with pytest.raises(ConfigError, match="Did you mean: alpha"):
        dt.config_from_dict({"method": "lora", "alpah": 8})


def test_unknown_method_lists_registered():
    with pytest.raises(ConfigError, match="unknown method 'lorra'.*Did you mean: lora"):
        dt.config_from_dict({"method": "lorra"})
    with pytest.raises(ConfigError, match="no 'method' key"):
        dt.config_from_dict({"r": 8})


def test_config_classes_reachable_by_name():
    assert dt.BitFitConfig().method == "bitfit"
    assert dt.LayerNormConfig().method == "layernorm"
    assert dt.PartialConfig().last_k == 1


def test_register_checks_the_classes_and_changes_none():
    from dataclasses import dataclass

    from deltatune.core import registry
    from deltatune.methods.lora import LoRAConfig, LoRADelta

    @dataclass
    class Undeclared(LoRAConfig):  # inherits method "lora": it does not say its own name
        pass

    with pytest.raises(ValueError, match="Undeclared must declare `method"):
        registry.register("undeclared_test", Undeclared, LoRADelta, family="reparameterized")
    assert Undeclared.method == "lora" and LoRADelta.config_cls is LoRAConfig
    Undeclared.method = "undeclared_test"
    with pytest.raises(ValueError, match="LoRADelta must declare `config_cls = Undeclared`"):
        registry.register("undeclared_test", Undeclared, LoRADelta, family="reparameterized")
    assert LoRADelta.config_cls is LoRAConfig and "undeclared_test" not in registry.available_methods()
