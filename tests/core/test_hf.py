"""The Hugging Face surface of a DeltaModel: what Trainer and peft users' scripts call acts on base +
deltas (or refuses), never on the base alone."""
import inspect

import pytest
import torch

import deltatune as dt
from deltatune.errors import ConfigError
from deltatune.models import logits_of, tiny_inputs, tiny_model


def trained(arch="bert", seed=0):
    model = tiny_model(arch)
    dm = dt.wrap(model, dt.LoRAConfig(r=2))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dm.get_delta("default").parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model, dm


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_forward_shows_the_base_signature_and_labels(arch):
    from transformers.utils.generic import find_labels

    model = tiny_model(arch)
    dm = dt.wrap(model, dt.LoRAConfig(r=2, targets=None))
    base = list(inspect.signature(model.forward).parameters)
    ours = list(inspect.signature(dm.forward).parameters)
    assert [p for p in ours if p not in ("deltas", "task_ids")] == base
    assert {"deltas", "task_ids"} <= set(ours)  # Trainer keeps the dataset's task_ids column
    assert find_labels(type(dm)) == find_labels(type(model)) and "labels" in find_labels(type(dm))
    assert isinstance(dm, dt.DeltaModel) and type(model).__name__ in type(dm).__name__


def test_counts_are_the_deltas():
    model, dm = trained()
    delta = sum(p.numel() for p in dm.get_delta("default").parameters())
    base = sum(p.numel() for p in model.parameters())
    assert dm.num_parameters(only_trainable=True) == delta > 0
    assert dm.num_parameters() == base + delta
    assert dm.get_nb_trainable_parameters() == (delta, base + delta)
    emb = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters())
    assert dm.num_parameters(exclude_embeddings=True) == base + delta - emb
    footprint = sum(t.nelement() * t.element_size() for t in [*dm.parameters(), *dm.buffers()])
    assert dm.get_memory_footprint() == footprint > model.get_memory_footprint()


def test_save_pretrained_saves_the_delta(tmp_path):
    model, dm = trained()
    x = tiny_inputs(model)
    want = logits_of(dm, x)
    dm.save_pretrained(tmp_path / "d")
    again = dt.load(tiny_model("bert"), tmp_path / "d")
    assert torch.equal(logits_of(again, x), want)
    dm.save_pretrained(tmp_path / "p", format="peft")
    assert (tmp_path / "p" / "adapter_config.json").exists()
    assert torch.equal(logits_of(dt.load(tiny_model("bert"), tmp_path / "p"), x), want)


@pytest.mark.parametrize("kwargs, match", [
    ({"state_dict": {}}, "state_dict"), ({"safe_serialization": False}, "safetensors"),
    ({"push_to_hub": True}, "does not upload"), ({"max_shard_size": "1GB"}, "max_shard_size"),
])
def test_save_pretrained_refuses_what_it_would_not_do(tmp_path, kwargs, match):
    _, dm = trained()
    with pytest.raises(ConfigError, match=match):
        dm.save_pretrained(tmp_path / "d", **kwargs)
    assert not (tmp_path / "d").exists()


def test_peft_habits():
    model, dm = trained()
    x = tiny_inputs(model)
    y = logits_of(dm, x)
    with torch.no_grad(), dm.disable_adapter():
        base = logits_of(dm, x)
    dm.add("other", dt.LoRAConfig(r=2))
    dm.set_adapter("other")
    assert dm.active == ("other",)
    assert torch.allclose(logits_of(dm, x), base, atol=1e-6)  # a fresh LoRA is the identity
    dm.set_adapter("default")
    merged = dm.merge_and_unload()
    assert merged is model and torch.allclose(logits_of(merged, x), y, atol=1e-5)
    assert not torch.allclose(base, y, atol=1e-3)


@pytest.mark.parametrize("name", ["load_adapter", "add_adapter", "enable_adapters", "disable_adapters",
                                  "active_adapters", "delete_adapter"])
def test_transformers_adapter_api_is_refused(name):
    _, dm = trained()
    assert hasattr(dm, name)
    with pytest.raises(ConfigError, match="transformers' own adapter API"):
        getattr(dm, name)("x")


def test_trainer_with_default_arguments_trains_and_evaluates(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = tiny_model("bert")
    dm = dt.wrap(model, dt.LoRAConfig(r=2))
    x = tiny_inputs(model, batch=8, seed=3)
    rows = {"input_ids": x["input_ids"].tolist(), "attention_mask": x["attention_mask"].tolist(),
            "labels": [i % 2 for i in range(8)], "text": ["unused"] * 8}
    data = Dataset.from_dict(rows)
    seen = []

    def metrics(p):
        seen.append(p.predictions.shape)
        return {"acc": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True)
    before = {k: v.clone() for k, v in dm.get_delta("default").state_dict().items()}
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=dm, args=args, train_dataset=data, eval_dataset=data, compute_metrics=metrics)
    assert trainer.label_names == ["labels"]
    trainer.train()
    out = trainer.evaluate()
    assert "eval_loss" in out and "eval_acc" in out and seen == [(8, 2)]
    after = dm.get_delta("default").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items() if "classifier" not in k)


def test_a_hugging_face_base_gives_a_pretrained_model_whose_names_read_the_base():
    from transformers import PreTrainedModel

    model, dm = trained()
    assert isinstance(dm, PreTrainedModel) and isinstance(dm, dt.DeltaModel)
    assert dm.config is model.config and dm.base_model is model.base_model
    assert dm.main_input_name == model.main_input_name and dm.device == model.device
    assert dm.get_input_embeddings() is model.get_input_embeddings()
    dm.eval()  # torch.nn.Module's own: the whole wrapper, deltas included
    assert not any(m.training for m in dm.modules())
    dm.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in dm.get_delta("default").parameters())
    plain = dt.wrap(torch.nn.Sequential(torch.nn.Linear(4, 4)), dt.LoRAConfig(r=2, targets=["0"]))
    assert not isinstance(plain, PreTrainedModel)  # no Hugging Face names to read from a plain module
