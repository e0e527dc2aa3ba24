"""deltatune under the Hugging Face training stack, as a peft user's script runs it: the real
``transformers.Trainer`` (checkpoints, resume, best model) and TRL's ``SFTTrainer`` (every method
that trains on a decoder, gradient checkpointing on, completion-only loss, packing)."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from datasets import Dataset
from safetensors import safe_open

import deltatune as dt
from deltatune.core.registry import get_method
from deltatune.models import logits_of, tiny_inputs, tiny_model, tiny_tokenizer

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")


def classification_data(model, rows=8):
    x = tiny_inputs(model, batch=rows, seed=3)
    return Dataset.from_dict({"input_ids": x["input_ids"].tolist(), "attention_mask": x["attention_mask"].tolist(),
                              "labels": [i % 2 for i in range(rows)]})


def trainer_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                use_cpu=True, disable_tqdm=True, save_strategy="steps", save_steps=2, max_steps=4)
    return transformers.TrainingArguments(**{**base, **kw})


def delta_state(dm, name="default"):
    return {k: v.detach().clone() for k, v in dm.get_delta(name).state_dict().items()}


def file_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# -- transformers.Trainer ---------------------------------------------------------------------------
def test_checkpoints_hold_the_delta_and_resume_exactly(tmp_path):
    model = tiny_model("bert")
    dm = dt.wrap(model, dt.LoRAConfig(r=2))
    data = classification_data(model)
    trainer = transformers.Trainer(model=dm, args=trainer_args(tmp_path / "run"), train_dataset=data)
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-4"
    saved = file_tensors(ckpt / "model.safetensors")
    assert set(saved) == {f"delta_modules.default.{k}" for k in dm.get_delta("default").state_dict()}
    assert all(torch.equal(saved[f"delta_modules.default.{k}"], v) for k, v in delta_state(dm).items())
    dm.save(tmp_path / "plain")
    plain = sum(f.stat().st_size for f in (tmp_path / "plain").iterdir())
    size = (ckpt / "model.safetensors").stat().st_size
    assert abs(size - plain) / plain < 0.10, (size, plain)  # the delta's size, not the base's
    x = tiny_inputs(model)
    dm.eval()  # Trainer leaves it in training mode (dropout)
    assert torch.equal(logits_of(dt.load(tiny_model("bert"), ckpt), x), logits_of(dm, x))

    # resume into a fresh wrapper: the delta comes back bit for bit, without missing-key warnings
    model2 = tiny_model("bert")
    dm2 = dt.wrap(model2, dt.LoRAConfig(r=2))
    seen = Warnings()
    log = transformers.utils.logging.get_logger("transformers.trainer")
    log.addHandler(seen)
    try:
        again = transformers.Trainer(model=dm2, args=trainer_args(tmp_path / "run"), train_dataset=data)
        again.train(resume_from_checkpoint=str(ckpt))  # at max_steps already: no step runs
    finally:
        log.removeHandler(seen)
    got = delta_state(dm2)
    assert all(torch.equal(got[k], v) for k, v in delta_state(dm).items())
    assert not [m for m in seen.messages if "missing keys" in m or "unexpected keys" in m], seen.messages


def test_load_best_model_at_end_and_save_model(tmp_path):
    model = tiny_model("bert")
    dm = dt.wrap(model, dt.LoRAConfig(r=2))
    data = classification_data(model)
    args = trainer_args(tmp_path / "run", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                        metric_for_best_model="loss", max_steps=6)
    trainer = transformers.Trainer(model=dm, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    best = file_tensors(f"{trainer.state.best_model_checkpoint}/model.safetensors")
    assert all(torch.equal(best[f"delta_modules.default.{k}"], v) for k, v in delta_state(dm).items())
    trainer.save_model(str(tmp_path / "final"))
    assert {p.name for p in (tmp_path / "final").iterdir()} <= {"model.safetensors", "training_args.bin"}
    x = tiny_inputs(model)
    dm.eval()
    assert torch.equal(logits_of(dt.load(tiny_model("bert"), tmp_path / "final"), x), logits_of(dm, x))


def test_a_scheduled_method_needs_the_callback_and_gets_its_steps(tmp_path):
    model = tiny_model("bert")
    cfg = {"method": "adalora", "init_r": 4, "target_r": 2, "total_step": 40, "tinit": 2, "tfinal": 2,
           "deltaT": 1, "targets": ["query", "value"]}
    dm = dt.wrap(model, cfg)
    data = classification_data(model, rows=8)
    args = trainer_args(tmp_path / "a", max_steps=40, per_device_train_batch_size=2, save_strategy="no")
    unstepped = trainer_args(tmp_path / "a", max_steps=80, per_device_train_batch_size=2, save_strategy="no")
    with pytest.raises(dt.ConfigError, match=r"dm.step\(\) was never called.*DeltaCallback"):
        transformers.Trainer(model=dm, args=unstepped, train_dataset=data).train()

    model = tiny_model("bert")
    dm = dt.wrap(model, cfg)
    ranks = dm.get_delta("default").ranks()
    transformers.Trainer(model=dm, args=args, train_dataset=data, callbacks=[dt.DeltaCallback()]).train()
    assert sum(dm.get_delta("default").ranks().values()) < sum(ranks.values())  # the budget schedule ran
    assert not dm.loss_adds_regularization  # only while the callback's trainer trains


def test_a_switch_of_tensors_under_trainer_moves_the_optimizer(tmp_path):
    model = tiny_model("bert")
    dm = dt.wrap(model, {"method": "lt_sft", "density": 0.2, "switch_at": 2, "targets": ["query"]})
    version = dm.param_version
    trainer = transformers.Trainer(model=dm, args=trainer_args(tmp_path / "s", save_strategy="no", max_steps=5),
                                   train_dataset=classification_data(model), callbacks=[dt.DeltaCallback()])
    trainer.train()
    assert dm.param_version != version
    new = {id(p) for p in dm.trainable_parameters()}
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == new  # the optimizer trains exactly the delta's current tensors


# -- save_pretrained's directory ------------------------------------------------------------------------
def test_save_pretrained_never_replaces_a_file_it_did_not_write(tmp_path):
    model = tiny_model("bert")
    model.save_pretrained(tmp_path)  # the base's own model.safetensors
    before = (tmp_path / "model.safetensors").read_bytes()
    dm = dt.wrap(model, dt.LoRAConfig(r=2))
    with pytest.raises(dt.ConfigError, match="not written by deltatune"):
        dm.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_layouts_replace_each_other(tmp_path):
    model = tiny_model("bert")
    dm = dt.wrap(model, dt.LoRAConfig(r=2))
    dm.add("bias", {"method": "bitfit"})
    x = tiny_inputs(model)
    dm.save(tmp_path)
    dm.save_pretrained(tmp_path)  # the Hugging Face layout replaces dm.save's files
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors"}
    loaded = dt.load(tiny_model("bert"), tmp_path)
    assert loaded.deltas == ["default", "bias"] and torch.equal(logits_of(loaded, x), logits_of(dm, x))
    header = json.loads(safe_open(str(tmp_path / "model.safetensors"), "pt").metadata()["deltatune"])
    assert header["deltas"] == ["default", "bias"] and header["active"] == ["default"]
    dm.save(tmp_path, name="default")
    assert "model.safetensors" not in {p.name for p in tmp_path.iterdir()}


METHODS = [m for m in dt.available_methods() if not get_method(m).delta_cls.combiner]
# DyLoRA's default (frozen) mode trains only the sampled rank's row of A, whose gradient needs that
# rank's column of B trained at an earlier step: a 2-3 step run may leave an A untouched. Every rank
# up to the sampled one trains here, so that "every tensor moves" can be asserted.
FEW_STEP_OPTIONS = {"dylora": {"frozen": False}}


@pytest.mark.parametrize("method", METHODS)
def test_save_pretrained_round_trip_every_method(method, tmp_path):
    """Trainer's layout keeps the training state as it is (a prompt encoder stays unfolded): the
    loaded delta gives the same logits and the same tensors."""
    model = tiny_model("bert")
    dm = dt.wrap(model, {"method": method, **get_method(method).config_cls.run_length_fields(3)})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dm.get_delta("default").parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    dm.eval()
    x = tiny_inputs(model)
    dm.save_pretrained(tmp_path)
    loaded = dt.load(tiny_model("bert"), tmp_path).eval()
    assert torch.equal(logits_of(loaded, x), logits_of(dm, x))
    a, b = delta_state(dm), delta_state(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", METHODS)
def test_trainer_trains_every_method_with_gradient_checkpointing(method, tmp_path):
    """Default arguments plus gradient checkpointing and the callback: every trainable tensor of
    every method moves (the schedules and regularization terms included)."""
    model = tiny_model("bert")
    # tiny BERT's 32 features make a default adapter bottleneck of 2 ReLU units, which can be dead
    # for every token of the batch: a wider one, so that "every tensor moves" can be asserted
    wide = {"reduction_factor": 2} if method in ("adapter", "sparse_adapter") else {}
    dm = dt.wrap(model, {"method": method, **wide, **FEW_STEP_OPTIONS.get(method, {}),
                         **get_method(method).config_cls.run_length_fields(3)})
    before = delta_state(dm)
    args = trainer_args(tmp_path, max_steps=3, save_strategy="no", gradient_checkpointing=True)
    transformers.Trainer(model=dm, args=args, train_dataset=classification_data(model),
                         callbacks=[dt.DeltaCallback()]).train()
    assert_all_trained(dm, before)


# -- TRL's SFTTrainer ---------------------------------------------------------------------------------
# cells `dm.add` refuses on a decoder (tests/methods/test_decoder_methods.py says why), and those whose
# regularization cannot join a loss that TRL's fused LM head computes itself (refused, with the way out)
NOT_ON_DECODERS = {"bitfit", "lst"}
REGULARIZED = {"adalora", "adamix", "diff_pruning", "increlora", "lt_sft"}


def sft(dm, out, gradient_checkpointing=True, data=None, **kw):
    tok = tiny_tokenizer()
    data = data or Dataset.from_dict({"text": [f"hello world number {i} is here" for i in range(8)]})
    args = trl.SFTConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", max_length=32,
                         gradient_checkpointing=gradient_checkpointing,
                         bf16=False, **kw)  # SFTConfig's bf16 default would set accelerate's process-wide
    # state to bf16, and an Accelerator that later tests in this worker build (the bench's) to "no"
    return trl.SFTTrainer(model=dm, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[dt.DeltaCallback()])


def lm():
    return tiny_model("llama", task="lm", tie_word_embeddings=True)  # SmolLM2's layout


def assert_all_trained(dm, before):
    after = delta_state(dm)
    trainable = [n for n, p in dm.get_delta("default").named_parameters() if p.requires_grad]
    assert trainable
    same = [n for n in trainable if n in before and torch.equal(before[n], after[n])]
    assert not same, f"tensors SFTTrainer did not train: {same[:5]}"


@pytest.mark.parametrize("method", [m for m in METHODS if m not in NOT_ON_DECODERS])
def test_sft_trains_every_tensor_with_gradient_checkpointing(method, tmp_path):
    dm = dt.wrap(lm(), {"method": method, **FEW_STEP_OPTIONS.get(method, {}),
                        **get_method(method).config_cls.run_length_fields(2)})
    before = delta_state(dm)
    trainer = sft(dm, tmp_path)
    if method in REGULARIZED:
        with pytest.raises(dt.ConfigError, match="regularization .* cannot join the loss"):
            trainer.train()
        return
    trainer.train()
    assert_all_trained(dm, before)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_sft_without_gradient_checkpointing(method, tmp_path):
    dm = dt.wrap(lm(), {"method": method})
    before = delta_state(dm)
    sft(dm, tmp_path, gradient_checkpointing=False).train()
    assert_all_trained(dm, before)


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
def test_sft_completion_only_loss(method, tmp_path):
    data = Dataset.from_dict({"prompt": [f"say {i}:" for i in range(8)], "completion": [f" number {i}" for i in range(8)]})
    dm = dt.wrap(lm(), {"method": method})
    before = delta_state(dm)
    trainer = sft(dm, tmp_path, data=data)
    batch = next(iter(trainer.get_train_dataloader()))
    assert bool((batch["labels"] == -100).any()) and bool((batch["labels"] != -100).any())
    trainer.train()
    assert_all_trained(dm, before)


@pytest.mark.parametrize("method", ["lora", "prompt", "ptuning"])
def test_sft_packing(method, tmp_path):
    dm = dt.wrap(lm(), {"method": method})
    before = delta_state(dm)
    trainer = sft(dm, tmp_path, packing=True)
    assert "position_ids" in next(iter(trainer.get_train_dataloader()))
    trainer.train()
    assert_all_trained(dm, before)


def test_sft_packing_with_a_prefix_is_refused(tmp_path):
    dm = dt.wrap(lm(), {"method": "prefix"})
    with pytest.raises(dt.ConfigError, match="packed rows .* set packing=False"):
        sft(dm, tmp_path, packing=True).train()


def test_a_packed_row_gives_each_example_its_own_prompt():
    """One row holding two examples (no mask, restarting position ids) gives the logits of each
    example run alone with the prompt."""
    model = lm()
    dm = dt.wrap(model, {"method": "prompt", "num_virtual_tokens": 3})
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 128, (1, 5), generator=g), torch.randint(3, 128, (1, 7), generator=g)
    with torch.no_grad():
        alone = torch.cat([dm(input_ids=a, use_cache=False).logits, dm(input_ids=b, use_cache=False).logits], 1)
        pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
        packed = dm(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits
    assert packed.shape == alone.shape and torch.allclose(packed, alone, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # GPT-2 drops the cache of its blocks itself
@pytest.mark.parametrize("method", ["prefix", "unipelt"])
def test_gradient_checkpointing_gives_the_same_gradients(method, arch):
    """The read-only prefix cache survives checkpointing's replay: the same loss and gradients."""
    grads = []
    for checkpointing in (False, True):
        model = lm() if arch == "llama" else tiny_model("gpt2", task="lm")
        dm = dt.wrap(model, {"method": method})
        if checkpointing:
            model.gradient_checkpointing_enable()
        dm.train()
        x = tiny_inputs(model, seq=6)
        loss = dm(**x, labels=x["input_ids"], use_cache=False).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in dm.get_delta("default").named_parameters()
                                      if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1, atol=1e-6) and g0.keys() == g1.keys() and g0
    assert all(torch.allclose(g0[k], g1[k], atol=1e-6) for k in g0)
