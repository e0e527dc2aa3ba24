"""peft PROMPT_TUNING / P_TUNING / PREFIX_TUNING <-> deltatune prompt / ptuning / prefix (folded forms)."""
import json

import pytest
import torch

import deltatune as dt
from deltatune.models import logits_of, tiny_inputs, tiny_model
from peft_helpers import peft_logits, train

ATOL = 1e-5
N = 3


def _peft_config(kind: str, **kw):
    import peft

    cls = {"prompt": peft.PromptTuningConfig, "ptuning": peft.PromptEncoderConfig,
           "prefix": peft.PrefixTuningConfig}[kind]
    return cls(num_virtual_tokens=N, **kw)


def _real(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """peft's causal-LM logits include the virtual tokens' positions; deltatune returns the caller's."""
    return logits[:, N:] if kind != "prefix" and logits.dim() == 3 else logits


# (peft kind, arch, peft config kwargs, what the loaded deltatune config must say)
PEFT_CASES = {
    "prompt-bert-cls": ("prompt", "bert", dict(task_type="SEQ_CLS"), dict(insert_at=0, modules_to_save=["classifier"])),
    "prompt-llama-lm": ("prompt", "llama", dict(task_type="CAUSAL_LM"), dict(insert_at=0)),
    "ptuning-gpt2-mlp": ("ptuning", "gpt2", dict(task_type="CAUSAL_LM", encoder_hidden_size=16),
                         dict(encoder="mlp", encoder_hidden=16)),
    "ptuning-bert-lstm": ("ptuning", "bert", dict(task_type="SEQ_CLS", encoder_reparameterization_type="LSTM",
                                                  encoder_hidden_size=8), dict(encoder="lstm")),
    # (peft 0.21.2's prefix tuning does not run on transformers 5's BERT: no past_key_values argument)
    "prefix-llama-projection": ("prefix", "llama", dict(task_type="CAUSAL_LM", prefix_projection=True,
                                                        encoder_hidden_size=16), dict(projection=True)),
    "prefix-gpt2": ("prefix", "gpt2", dict(task_type="CAUSAL_LM"), dict(projection=False, shift_positions=True)),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_prompt_checkpoint_loads_folded_and_goes_back(tmp_path, case):
    from peft import get_peft_model

    kind, arch, kw, expect = PEFT_CASES[case]
    model = tiny_model(arch)
    inputs = tiny_inputs(model)
    pm = get_peft_model(model, _peft_config(kind, **kw))
    train(pm, inputs)
    want = _real(logits_of(pm, inputs), kind)
    assert (want - logits_of(tiny_model(arch), inputs)).abs().max() > 1e-3
    pm.save_pretrained(str(tmp_path / "peft"))
    dm = dt.load(tiny_model(arch), tmp_path / "peft")
    delta = dm.get_delta("default")
    assert delta.config.method == kind and delta.config.num_virtual_tokens == N
    assert getattr(delta, "folded", True)  # P-tuning / prefix: the encoder output, encoder dropped
    for key, value in expect.items():
        assert getattr(delta.config, key) == value, key
    torch.testing.assert_close(logits_of(dm, inputs), want, atol=ATOL, rtol=0)
    dm.save(str(tmp_path / "back"), format="peft")
    back = peft_logits(tmp_path / "back", arch, inputs)
    torch.testing.assert_close(_real(back, kind), want, atol=ATOL, rtol=0)


OURS_CASES = {
    "prompt-bert-front": ("bert", "prompt", {"insert_at": 0}),
    "ptuning-llama-lstm": ("llama", "ptuning", {"encoder": "lstm", "encoder_hidden": 8}),
    "prefix-gpt2-projection": ("gpt2", "prefix", {"projection_hidden": 16, "shift_positions": True}),
}


@pytest.mark.parametrize("case", list(OURS_CASES))
def test_deltatune_prompt_saves_for_peft(tmp_path, case):
    arch, method, extra = OURS_CASES[case]
    dm = dt.wrap(tiny_model(arch), dt.config_from_dict({"method": method, "num_virtual_tokens": N, **extra}))
    inputs = tiny_inputs(dm.model)
    train(dm, inputs)
    want = logits_of(dm, inputs)
    with dm.disabled():
        assert (logits_of(dm, inputs) - want).abs().max() > 1e-3
    dm.save(str(tmp_path), format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == ("SEQ_CLS" if arch == "bert" else "CAUSAL_LM")
    torch.testing.assert_close(_real(peft_logits(tmp_path, arch, inputs), method), want, atol=ATOL, rtol=0)
    back = dt.load(tiny_model(arch), tmp_path)  # home again: the folded tensors, bit-exact
    ours = dm.get_delta("default").delta_state_dict()
    theirs = back.get_delta("default").delta_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("method,extra,field", [
    ("prompt", {}, "insert_at"),                                   # BERT default: after [CLS]
    ("prefix", {}, "shift_positions"),
    ("ptuning", {"insert_at": 0, "save_reparam": True}, "save_reparam"),
])
def test_unrepresentable_prompt_deltas_are_refused(tmp_path, method, extra, field):
    dm = dt.wrap(tiny_model("bert"), dt.config_from_dict({"method": method, "num_virtual_tokens": N, **extra}))
    with pytest.raises(dt.ConfigError, match=field):
        dm.save(str(tmp_path), format="peft")


def test_prefix_shift_positions_changes_only_positions():
    """shift_positions=True numbers the real tokens n.. (peft); the prefix itself is unchanged."""
    model = tiny_model("gpt2")
    inputs = tiny_inputs(model)
    a = dt.wrap(model, dt.config_from_dict({"method": "prefix", "num_virtual_tokens": N}))
    plain = logits_of(a, inputs)
    prefix = a.get_delta("default").layers["@"].value().detach().clone()
    b = dt.wrap(tiny_model("gpt2"), dt.config_from_dict({"method": "prefix", "num_virtual_tokens": N,
                                                         "projection": False, "shift_positions": True}))
    with torch.no_grad():
        b.get_delta("default").layers["@"].prefix.copy_(prefix)
    shifted = logits_of(b, inputs)
    ids = {**inputs, "position_ids": torch.arange(N, N + inputs["input_ids"].shape[1]).unsqueeze(0)}
    torch.testing.assert_close(logits_of(a, ids), shifted, atol=1e-6, rtol=0)
    assert (plain - shifted).abs().max() > 1e-4
