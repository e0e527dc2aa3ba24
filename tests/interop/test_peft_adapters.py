"""peft IA3 / LoHa / LoKr / VeRA / AdaLoRA checkpoints <-> deltatune: outputs equal to 1e-5 both ways."""
import json

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.models import logits_of, tiny_inputs, tiny_model
from peft_helpers import peft_logits, train

ATOL = 1e-5


def _peft_config(kind: str, **kw):
    import peft

    return {"ia3": peft.IA3Config, "loha": peft.LoHaConfig, "lokr": peft.LoKrConfig,
            "vera": peft.VeraConfig, "adalora": peft.AdaLoraConfig}[kind](**kw)


# (peft kind, arch, peft config kwargs, what the loaded deltatune config must say)
PEFT_CASES = {
    "ia3-bert-ffn": ("ia3", "bert", dict(target_modules=["key", "value", "output.dense"],
                                         feedforward_modules=["output.dense"], modules_to_save=["classifier"]),
                     dict(method="ia3", targets=["key", "output.dense", "value"])),
    "ia3-gpt2-conv1d": ("ia3", "gpt2", dict(target_modules=["c_attn", "mlp.c_proj"],
                                            feedforward_modules=["mlp.c_proj"]), dict(method="ia3")),
    "loha-llama": ("loha", "llama", dict(r=4, alpha=6, target_modules=["q_proj", "down_proj"]),
                   dict(method="loha", r=4, alpha=6)),
    "lokr-bert": ("lokr", "bert", dict(r=4, alpha=8, target_modules=["query", "intermediate.dense"]),
                  dict(method="lokr", r=4)),
    "lokr-llama-both": ("lokr", "llama", dict(r=1, alpha=2, target_modules=["q_proj", "gate_proj"],
                                              decompose_both=True, decompose_factor=4),
                        dict(decompose_both=True, decompose_factor=4)),
    "vera-bert-projections": ("vera", "bert", dict(r=4, target_modules=["query", "value"], save_projection=True,
                                                   modules_to_save=["classifier"]),
                              dict(method="vera", r=4, projection_prng_key=0)),
    "vera-llama-seed-only": ("vera", "llama", dict(r=8, target_modules=["q_proj", "up_proj"], save_projection=False,
                                                   projection_prng_key=7), dict(projection_prng_key=7)),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_checkpoint_loads_and_goes_back(tmp_path, case):
    from peft import get_peft_model

    kind, arch, kw, expect = PEFT_CASES[case]
    model = tiny_model(arch)
    inputs = tiny_inputs(model)
    pm = get_peft_model(model, _peft_config(kind, **kw))
    train(pm, inputs)
    want = logits_of(pm, inputs)
    assert (want - logits_of(tiny_model(arch), inputs)).abs().max() > 1e-3
    pm.save_pretrained(str(tmp_path / "peft"))
    dm = dt.load(tiny_model(arch), tmp_path / "peft")
    cfg = dm.get_delta("default").config
    for key, value in expect.items():
        assert getattr(cfg, key) == value, key
    torch.testing.assert_close(logits_of(dm, inputs), want, atol=ATOL, rtol=0)
    dm.save(str(tmp_path / "back"), format="peft")
    torch.testing.assert_close(peft_logits(tmp_path / "back", arch, inputs), want, atol=ATOL, rtol=0)


def _adalora_peft(path, arch: str, targets: list[str]):
    """peft AdaLoRA trained through its budget schedule (rank_pattern masks set at the end)."""
    from peft import AdaLoraConfig, get_peft_model

    model = tiny_model(arch)
    inputs = tiny_inputs(model)
    pm = get_peft_model(model, AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, target_modules=targets,
                                             total_step=4))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.05)
    pm.train()
    for step in range(4):
        loss = (pm(**inputs).logits - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
    pm.eval()
    pm.save_pretrained(str(path))
    return inputs, logits_of(pm, inputs)


def test_peft_adalora_with_rank_pattern_loads_kept_ranks(tmp_path):
    inputs, want = _adalora_peft(tmp_path / "peft", "bert", ["query", "value"])
    pattern = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and sum(map(sum, pattern.values())) == 2 * 4  # the final budget: target_r per module
    dm = dt.load(tiny_model("bert"), tmp_path / "peft")
    delta = dm.get_delta("default")
    assert delta.ranks() == {k[: -len(".lora_E")]: sum(v) for k, v in pattern.items()}
    assert delta.config.init_r == 4 and delta.config.total_step == 4 and delta.finalized
    torch.testing.assert_close(logits_of(dm, inputs), want, atol=ATOL, rtol=0)
    dm.save(str(tmp_path / "back"), format="peft")
    torch.testing.assert_close(peft_logits(tmp_path / "back", "bert", inputs), want, atol=ATOL, rtol=0)


# (arch, deltatune config, a trainer: (dm, inputs) -> None)
def _train_adalora(dm, inputs):
    opt = torch.optim.Adam(dm.trainable_parameters(), lr=0.05)
    for step in range(4):
        loss = (dm(**inputs).logits - 1).pow(2).mean() + dm.regularization()
        opt.zero_grad()
        loss.backward()
        opt.step()
        dm.step(step)


OURS_CASES = {
    "ia3-gpt2-default": ("gpt2", dt.config_from_dict({"method": "ia3"}), train),
    "loha-bert": ("bert", dt.config_from_dict({"method": "loha", "r": 2, "alpha": 3.0}), train),
    "lokr-llama-regex": ("llama", dt.config_from_dict({"method": "lokr", "r": 2, "targets": r".*\.(k_proj|up_proj)"}),
                         train),
    "vera-gpt2": ("gpt2", dt.config_from_dict({"method": "vera", "r": 8, "projection_prng_key": 3,
                                               "targets": ["c_attn", "c_fc"]}), train),
    "adalora-bert-pruned": ("bert", dt.config_from_dict({"method": "adalora", "init_r": 4, "target_r": 1,
                                                         "total_step": 4}), _train_adalora),
}


@pytest.mark.parametrize("case", list(OURS_CASES))
def test_deltatune_delta_saves_for_peft(tmp_path, case):
    arch, cfg, trainer = OURS_CASES[case]
    dm = dt.wrap(tiny_model(arch), cfg)
    inputs = tiny_inputs(dm.model)
    trainer(dm, inputs)
    want = logits_of(dm, inputs)
    with dm.disabled():
        assert (logits_of(dm, inputs) - want).abs().max() > 1e-3
    dm.save(str(tmp_path), format="peft")
    torch.testing.assert_close(peft_logits(tmp_path, arch, inputs), want, atol=ATOL, rtol=0)
    back = dt.load(tiny_model(arch), tmp_path)
    ours = dm.get_delta("default").delta_state_dict()
    theirs = back.get_delta("default").delta_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_adalora_saves_peft_masks_and_compact_tensors(tmp_path):
    dm = dt.wrap(tiny_model("bert"), dt.config_from_dict({"method": "adalora", "init_r": 4, "target_r": 1,
                                                          "total_step": 4}))
    _train_adalora(dm, tiny_inputs(dm.model))
    dm.save(str(tmp_path), format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(map(sum, config["rank_pattern"].values())) == 4  # target_r x 4 modules
    for key, mask in config["rank_pattern"].items():
        assert len(mask) == 4 and tensors[f"base_model.model.{key}"].shape == (sum(mask), 1)


def test_lycoris_on_conv1d_is_refused_for_peft(tmp_path):
    dm = dt.wrap(tiny_model("gpt2"), dt.config_from_dict({"method": "loha", "targets": ["c_attn"]}))
    with pytest.raises(dt.ConfigError, match="Conv1D"):
        dm.save(str(tmp_path), format="peft")


def test_vera_files_carry_the_projections(tmp_path):
    dm = dt.wrap(tiny_model("bert"), dt.config_from_dict({"method": "vera", "r": 4}))
    dm.save(str(tmp_path), format="peft")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    p = dm.get_delta("default").projections
    assert torch.equal(tensors["base_model.vera_A"], p.vera_A) and torch.equal(tensors["base_model.vera_B"], p.vera_B)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["save_projection"] is True


@pytest.mark.parametrize("kind,kw,field", [
    ("loha", dict(target_modules=["query"], rank_pattern={"query": 2}), "rank_pattern"),
    ("lokr", dict(target_modules=["query"], rank_dropout=0.1), "rank_dropout"),
    ("lokr", dict(target_modules=["query"], module_dropout=0.1), "module_dropout"),
    ("ia3", dict(target_modules=["query"], feedforward_modules=[]), "feedforward_modules"),
    ("adalora", dict(target_modules=["query"], total_step=3, alpha_pattern={"query": 2}), "alpha_pattern"),
])
def test_unrepresentable_fields_are_named(tmp_path, kind, kw, field):
    from peft import get_peft_model

    get_peft_model(tiny_model("bert"), _peft_config(kind, **kw)).save_pretrained(str(tmp_path))
    with pytest.raises(dt.ConfigError, match=field):
        dt.load(tiny_model("bert"), tmp_path)
