"""LoRA's per-module rank_pattern / alpha_pattern (peft's semantics: regex on the path's end)."""
import math

import pytest

import deltatune as dt
from deltatune.models import tiny_model


def test_pattern_matching_is_end_anchored_first_match_wins():
    cfg = dt.LoRAConfig(r=8, alpha=16, rank_pattern={r"layer\.0\..*query": 2, "query": 4},
                        alpha_pattern={"value": 3.0})
    assert cfg.rank_alpha("bert.encoder.layer.0.attention.self.query") == (2, 16)
    assert cfg.rank_alpha("bert.encoder.layer.1.attention.self.query") == (4, 16)
    assert cfg.rank_alpha("bert.encoder.layer.1.attention.self.value") == (8, 3.0)
    assert cfg.rank_alpha("bert.encoder.layer.1.attention.self.query_extra") == (8, 16)  # no partial tail
    assert cfg.rank_alpha("bert.encoder.layer.1.attention.self.xquery") == (8, 16)  # whole components


def test_layers_get_their_rank_and_scaling():
    cfg = dt.LoRAConfig(r=8, alpha=16, rslora=True, rank_pattern={"layer.0.attention.self.query": 2},
                        alpha_pattern={"value": 3})
    layers = dt.wrap(tiny_model("bert"), cfg).get_delta("default").layers
    q0 = layers["bert/encoder/layer/0/attention/self/query"]
    q1 = layers["bert/encoder/layer/1/attention/self/query"]
    v1 = layers["bert/encoder/layer/1/attention/self/value"]
    assert q0.lora_A.shape == (2, 32) and q0.lora_B.shape == (32, 2)
    assert q0.scaling == pytest.approx(16 / math.sqrt(2))
    assert q1.lora_A.shape == (8, 32) and q1.scaling == pytest.approx(16 / math.sqrt(8))
    assert v1.scaling == pytest.approx(3 / math.sqrt(8))


def test_patterns_round_trip_and_validate():
    cfg = dt.LoRAConfig(rank_pattern={"q": 2}, alpha_pattern={"v": 1.5})
    assert dt.config_from_dict(cfg.to_dict()) == cfg
    for bad in ({"q": 0}, {"q": 2.5}, {"q": True}, ["q"], {"(": 2}):
        with pytest.raises(dt.ConfigError, match="rank_pattern"):
            dt.LoRAConfig(rank_pattern=bad)
    with pytest.raises(dt.ConfigError, match="alpha_pattern"):
        dt.LoRAConfig(alpha_pattern={"v": -1.0})
