"""peft-format saves carry the metadata peft's loaders act on: task_type (the task class),
target_modules as users write them, and a base_model_name_or_path that loads (or null)."""
import json

import pytest
import torch

import deltatune as dt
from deltatune.interop.peft_format import loadable_name
from deltatune.models import logits_of, tiny_inputs, tiny_model

from peft_helpers import train


@pytest.mark.parametrize("arch, task, task_type, auto", [
    ("bert", "auto", "SEQ_CLS", "AutoPeftModelForSequenceClassification"),
    ("llama", "lm", "CAUSAL_LM", "AutoPeftModelForCausalLM"),
])
def test_auto_peft_model_gives_the_task_class(tmp_path, arch, task, task_type, auto):
    import peft
    import transformers

    tiny_model(arch, task).save_pretrained(tmp_path / "base")
    model = getattr(transformers, type(tiny_model(arch, task)).__name__).from_pretrained(tmp_path / "base")
    dm = dt.wrap(model, dt.LoRAConfig(r=2))
    x = tiny_inputs(model)
    train(dm, x)
    want = logits_of(dm, x)
    dm.save(str(tmp_path / "p"), format="peft")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["task_type"] == task_type
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base")
    assert isinstance(cfg["target_modules"], list) and all("." not in t for t in cfg["target_modules"])
    pm = getattr(peft, auto).from_pretrained(str(tmp_path / "p"))
    assert type(pm).__name__ == auto.replace("AutoPeftModel", "PeftModel")
    pm.eval()
    assert torch.allclose(logits_of(pm, x), want, atol=1e-5)


def test_suffixes_only_when_they_select_exactly_the_touched_modules(tmp_path):
    model = tiny_model("bert")
    dm = dt.wrap(model, dt.LoRAConfig(r=2, layers=[0]))
    dm.save(str(tmp_path / "p"), format="peft")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    touched = dm.get_delta("default").paths()
    lora = [p for p in touched if "classifier" not in p]
    assert cfg["target_modules"] == lora  # layer 0 only: the suffixes would select layer 1 too


def test_base_name_only_when_it_loads(tmp_path):
    model = tiny_model("bert")
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model.gguf").write_bytes(b"GGUF")
    for name, want in [(str(gguf), None), (str(tmp_path / "gone"), None), ("org/model", "org/model"),
                       ("", None), ("./relative/dir", None)]:
        model.config._name_or_path = name
        assert loadable_name(model) == want, name
    (gguf / "config.json").write_text("{}")
    model.config._name_or_path = str(gguf)
    assert loadable_name(model) == str(gguf)


def test_task_type_only_when_the_delta_carries_the_head_peft_expects(tmp_path):
    import peft

    model = tiny_model("bert")
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.LoRAConfig(r=2, modules_to_save=[]))  # the base's own classifier
    train(dm, x)
    dm.save(str(tmp_path / "p"), format="peft")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["task_type"] is None  # SEQ_CLS would make peft expect classifier weights
    pm = peft.PeftModel.from_pretrained(tiny_model("bert"), str(tmp_path / "p"))
    pm.eval()
    assert torch.allclose(logits_of(pm, x), logits_of(dm, x), atol=1e-5)
