"""The generic key machinery of the peft mapping table, on a synthetic mapping (no method needed)."""
import pytest
import torch
import torch.nn as nn

import deltatune as dt
from deltatune.core.layer import ParamCopy
from deltatune.interop.peft_keys import our_item, peft_item
from deltatune.interop.peft_schema import KeyRule, PeftMapping

MODEL = nn.Sequential(nn.Linear(3, 3), nn.Embedding(5, 3))
MAPPING = PeftMapping(
    peft_type="TEST", method="test", to_ours=None, to_peft=None,
    keys=(
        KeyRule("prompt_embeddings", "@prompt", full=True),
        KeyRule("a.weight", "a", lambda m: isinstance(m, nn.Linear)),
        KeyRule("emb_a", "a", lambda m: isinstance(m, nn.Embedding)),
        KeyRule("copy", "diff", load=lambda t, m: t - m.weight, save=lambda t, m: t + m.weight),
    ),
    prefix="base_model.model.", head_prefix="base_model.",
)


@pytest.mark.parametrize("peft_key,ours,path,name", [
    ("prompt_embeddings", "@prompt", "", "@prompt"),           # a whole-key (model-level) tensor
    ("base_model.model.0.a.weight", "0.a", "0", "a"),          # spelling chosen by module type
    ("base_model.model.1.emb_a", "1.a", "1", "a"),
    ("base_model.2.weight", "2.values.weight", "2", "values.weight"),  # else: modules_to_save
])
def test_keys_map_both_ways(peft_key, ours, path, name):
    t = torch.randn(3)
    key, value = our_item(peft_key, t, MAPPING, MODEL)
    assert key == ours and value is t
    layer = ParamCopy(nn.Linear(1, 1)) if name.startswith("values.") else nn.Module()
    assert peft_item(path, name, t, layer, MAPPING, MODEL) == (peft_key, t)


def test_value_transforms_use_the_base_module():
    full = MODEL[0].weight.detach() + 0.5
    key, diff = our_item("base_model.model.0.copy", full, MAPPING, MODEL)
    assert key == "0.diff" and torch.allclose(diff, torch.full_like(full, 0.5))
    key, back = peft_item("0", "diff", diff, nn.Module(), MAPPING, MODEL)
    assert key == "base_model.model.0.copy" and torch.allclose(back, full)


def test_foreign_keys_and_tensors_are_errors():
    with pytest.raises(dt.CheckpointError, match="prefix"):
        our_item("model.0.a.weight", torch.zeros(1), MAPPING, MODEL)
    with pytest.raises(dt.ConfigError, match="no peft TEST counterpart"):
        peft_item("0", "other", torch.zeros(1), nn.Module(), MAPPING, MODEL)
