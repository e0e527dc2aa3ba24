"""peft LoRA checkpoints <-> deltatune, on tiny bert / gpt2 / llama / t5: outputs equal to 1e-5."""
import json

import peft
import pytest
import torch

import deltatune as dt
from deltatune.interop.peft_schema import PEFT_TESTED_VERSIONS
from deltatune.models import logits_of, tiny_inputs, tiny_model
from peft_helpers import peft_adapter, peft_logits, train

ATOL = 1e-5

# (arch, task, peft LoraConfig kwargs, what the deltatune config must say)
PEFT_CASES = {
    "bert-embedding-patterns-head": ("bert", "cls", dict(
        target_modules=["query", "value", "word_embeddings"], modules_to_save=["classifier"],
        rank_pattern={"layer.0.attention.self.query": 2}, alpha_pattern={"value": 3}),
        dict(rank_pattern={"layer.0.attention.self.query": 2}, alpha_pattern={"value": 3},
             modules_to_save=["classifier"])),
    "gpt2-conv1d-dora-rslora": ("gpt2", "auto", dict(
        target_modules=["c_attn", "c_proj"], use_dora=True, use_rslora=True),
        dict(dora=True, rslora=True, modules_to_save=[])),
    "llama-regex-dropout-exclude": ("llama", "auto", dict(
        target_modules=r".*\.(q_proj|v_proj|down_proj)", exclude_modules=["layers.0.mlp.down_proj"],
        lora_dropout=0.1, init_lora_weights="gaussian"),
        dict(targets=r".*\.(q_proj|v_proj|down_proj)", exclude=["layers.0.mlp.down_proj"],
             dropout=0.1, init="gaussian")),
    "t5-layers-to-transform": ("t5", "auto", dict(target_modules=["q", "v", "wo"], layers_to_transform=[1]),
                               dict(targets=["q", "v", "wo"], layers=[1])),
    "gpt2-layers-pattern": ("gpt2", "auto", dict(target_modules=["c_fc"], layers_to_transform=0,
                                                 layers_pattern="h"), {}),
    "llama-seq-cls-task": ("llama", "cls", dict(target_modules=["k_proj", "o_proj"], task_type="SEQ_CLS"),
                           dict(modules_to_save=["score"])),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_checkpoint_loads_with_equal_outputs_and_goes_back(tmp_path, case):
    arch, task, lora, expect = PEFT_CASES[case]
    inputs, want = peft_adapter(tmp_path / "peft", arch, task, **lora)
    dm = dt.load(tiny_model(arch, task), tmp_path / "peft")
    torch.testing.assert_close(logits_of(dm, inputs), want, atol=ATOL, rtol=0)
    cfg = dm.get_delta("default").config
    for key, value in expect.items():
        assert getattr(cfg, key) == value, key
    dm.save(str(tmp_path / "back"), format="peft")
    torch.testing.assert_close(peft_logits(tmp_path / "back", arch, inputs, task), want, atol=ATOL, rtol=0)


def test_layer_selection_by_pattern_keeps_exact_modules(tmp_path):
    peft_adapter(tmp_path / "p", "gpt2", target_modules=["c_fc"], layers_to_transform=0, layers_pattern="h")
    dm = dt.load(tiny_model("gpt2"), tmp_path / "p")
    assert dm.get_delta("default").paths() == ["transformer.h.0.mlp.c_fc"]


# (arch, task, deltatune config)
OURS_CASES = {
    "bert-default-head": ("bert", "cls", dt.LoRAConfig(r=4, alpha=8)),
    "gpt2-rslora-patterns-embedding": ("gpt2", "auto", dt.LoRAConfig(
        r=4, alpha=8, rslora=True, targets=["c_attn", "mlp.c_proj", "wpe"],
        rank_pattern={"h.1.attn.c_attn": 2}, alpha_pattern={"c_proj": 3.0})),
    "gpt2-dora": ("gpt2", "auto", dt.LoRAConfig(r=4, dora=True, targets=["c_attn", "c_fc"])),
    "llama-regex-layers-gaussian": ("llama", "cls", dt.LoRAConfig(
        r=2, targets=r".*\.(q_proj|up_proj)", layers=[-1], init="gaussian")),
    "t5-encoder-decoder": ("t5", "auto", dt.LoRAConfig(r=4, targets=["q", "k", "o", "wi"], exclude=["EncDecAttention.k"])),
}


@pytest.mark.parametrize("case", list(OURS_CASES))
def test_deltatune_delta_saves_for_peft_with_equal_outputs(tmp_path, case):
    arch, task, cfg = OURS_CASES[case]
    dm = dt.wrap(tiny_model(arch, task), cfg)
    inputs = tiny_inputs(dm.model)
    train(dm, inputs)
    want = logits_of(dm, inputs)
    with dm.disabled():
        assert (logits_of(dm, inputs) - want).abs().max() > 1e-3
    dm.save(str(tmp_path / "p"), format="peft")
    torch.testing.assert_close(peft_logits(tmp_path / "p", arch, inputs, task), want, atol=ATOL, rtol=0)
    back = dt.load(tiny_model(arch, task), tmp_path / "p")  # and home again, bit-exact
    ours = dm.get_delta("default").delta_state_dict()
    theirs = back.get_delta("default").delta_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_saved_peft_files_use_peft_keys(tmp_path):
    dm = dt.wrap(tiny_model("bert", "cls"), dt.LoRAConfig(r=2, targets=["query", "word_embeddings"]))
    dm.save(str(tmp_path), format="peft")
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_B" in keys
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    assert len(keys) == 2 * 3 + 2
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["classifier"]
    assert config["r"] == 2 and config["lora_alpha"] == 16.0


def test_bin_checkpoint_loads_through_weights_only(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    inputs = tiny_inputs(model)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    train(pm, inputs)
    want = logits_of(pm, inputs)
    pm.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    dm = dt.load(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(logits_of(dm, inputs), want, atol=ATOL, rtol=0)


class _Trap:
    """Unpickling this would run code (create a file): a weights-only load must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_bin_with_code_is_refused_unrun(tmp_path):
    peft_adapter(tmp_path, "llama", target_modules=["q_proj"])
    (tmp_path / "adapter_model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"base_model.model.x": _Trap(marker)}, tmp_path / "adapter_model.bin")
    with pytest.raises(dt.CheckpointError, match="weights-only"):
        dt.load(tiny_model("llama"), tmp_path)
    assert not marker.exists()


def test_tested_version_is_recorded():
    assert peft.__version__ in PEFT_TESTED_VERSIONS, (
        f"peft {peft.__version__} is not in PEFT_TESTED_VERSIONS: run tests/interop against it and add it.")


def test_several_deltas_use_peft_s_layout(tmp_path):
    dm = dt.wrap(tiny_model("llama"), dt.LoRAConfig(r=2, targets=["q_proj"]))
    dm.add("other", dt.LoRAConfig(r=3, targets=["v_proj"]))
    inputs = tiny_inputs(dm.model)
    dm.activate("default", "other")
    train(dm, inputs)
    dm.save(str(tmp_path), format="peft")
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "other" / "adapter_config.json").exists()
    back = dt.load(tiny_model("llama"), tmp_path)
    dt.load(back, tmp_path / "other", name="other")
    back.activate("default", "other")
    dm.activate("default", "other")
    torch.testing.assert_close(logits_of(back, inputs), logits_of(dm, inputs), atol=ATOL, rtol=0)
