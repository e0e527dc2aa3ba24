import math

import pytest
import torch
import torch.nn as nn

import deltatune as dt
from deltatune.models import logits_of, tiny_inputs, tiny_model
from realrun import finetune


def test_scaling_and_rslora():
    assert dt.LoRAConfig(r=8, alpha=16).scaling == 2.0
    assert dt.LoRAConfig(r=16, alpha=16, rslora=True).scaling == pytest.approx(16 / math.sqrt(16))


def test_update_matches_definition_on_linear():
    lin = nn.Linear(6, 5)
    dm = dt.wrap(nn.Sequential(lin), dt.LoRAConfig(r=3, alpha=6, targets=["0"]))
    layer = dm.get_delta("default").layers["0"]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    want = lin.weight @ x.T + lin.bias[:, None] + 2.0 * layer.lora_B @ layer.lora_A @ x.T
    assert torch.allclose(dm(x), want.T, atol=1e-5)
    assert layer.lora_A.shape == (3, 6) and layer.lora_B.shape == (5, 3)


def test_conv1d_and_embedding_merge():
    model = tiny_model("gpt2")
    x = tiny_inputs(model)
    dm = dt.wrap(model, dt.LoRAConfig(r=2, targets=["c_attn", "c_fc", "wpe"]))
    with torch.no_grad():
        for n, p in dm.get_delta("default").named_parameters():
            p.normal_(std=0.05)
    tuned = logits_of(dm, x)
    dm.merge()
    assert torch.allclose(logits_of(dm, x), tuned, atol=1e-5)
    dm.unmerge()


def test_tied_embedding_merge_is_refused():
    model = tiny_model("gpt2")
    dm = dt.wrap(model, dt.LoRAConfig(r=2, targets=["wte"]))
    with pytest.raises(dt.MergeError, match="tied to lm_head.weight"):
        dm.merge()
    assert dm.merged == ()


def test_dora_magnitude_and_merge():
    lin = nn.Linear(8, 4)
    dm = dt.wrap(nn.Sequential(lin), dt.LoRAConfig(r=2, dora=True, targets=["0"]))
    layer = dm.get_delta("default").layers["0"]
    assert torch.allclose(layer.magnitude, lin.weight.norm(dim=1))
    x = torch.randn(3, 8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.magnitude.mul_(1.5)
    w = lin.weight + layer.update()
    want = (layer.magnitude[:, None] * w / w.norm(dim=1, keepdim=True)) @ x.T + lin.bias[:, None]
    assert torch.allclose(dm(x), want.T, atol=1e-5)
    w0 = lin.weight.clone()
    dm.merge()
    assert torch.allclose(dm(x), want.T, atol=1e-5)
    dm.unmerge()
    assert torch.allclose(lin.weight, w0, atol=1e-6)


def test_dora_rejects_embeddings():
    with pytest.raises(dt.ConfigError, match="DoRA"):
        dt.wrap(tiny_model("gpt2"), dt.LoRAConfig(dora=True, targets=["wte"]))


def test_lora_learns_sst2_on_real_model():
    before, after, dm = finetune(dt.LoRAConfig(r=8, targets=["query", "value"]), steps=120, lr=2e-3)
    print(f"LoRA SST-2 dev accuracy: untrained {before:.3f} -> {after:.3f}")
    assert before < 0.6
    assert after >= 0.75
