import pytest
import torch.nn as nn

import deltatune as dt
from deltatune.core.targets import layer_index, select
from deltatune.errors import TargetError
from deltatune.models import tiny_model


def names(dm, name="default"):
    return sorted(dm.get_delta(name).paths())


def test_suffix_regex_and_layers():
    m = tiny_model("bert")
    dm = dt.wrap(m, dt.LoRAConfig(targets=["query"], modules_to_save=[]))
    assert names(dm) == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    dm.add("b", dt.LoRAConfig(targets=r".*layer\.1\.attention\.self\.(query|key)", modules_to_save=[]))
    assert names(dm, "b") == ["bert.encoder.layer.1.attention.self.key", "bert.encoder.layer.1.attention.self.query"]
    dm.add("c", dt.LoRAConfig(targets=["value"], layers=[-1], modules_to_save=[]))
    assert names(dm, "c") == ["bert.encoder.layer.1.attention.self.value"]


def test_layer_index():
    assert layer_index("h.3.attn.c_attn") == 3
    assert layer_index("bert.encoder.layer.11.output.dense") == 11
    assert layer_index("embeddings.word_embeddings") is None


def test_no_match_lists_close_names():
    m = tiny_model("bert")
    with pytest.raises(TargetError, match=r"match no module.*Closest module names:.*query"):
        dt.wrap(m, dt.LoRAConfig(targets=["querry"]))


def test_unsupported_module_type_is_an_error():
    m = tiny_model("bert")
    with pytest.raises(TargetError, match="supports Linear, Conv1D, Embedding.*LayerNorm"):
        dt.wrap(m, dt.LoRAConfig(targets=["LayerNorm"]))


def test_select_params():
    m = tiny_model("gpt2")
    found = select(m, ["bias"], what="params", layers=[0])
    assert found and all(n.startswith("transformer.h.0.") and n.endswith("bias") for n, _ in found)


def test_unknown_architecture_default_needs_targets():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(TargetError, match="no default targets.*pass targets"):
        dt.wrap(model, dt.LoRAConfig())
    dm = dt.wrap(model, dt.LoRAConfig(targets=["0", "2"]))
    assert names(dm) == ["0", "2"]
