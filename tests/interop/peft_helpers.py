"""Shared helpers of the peft interop tests: train tiny adapters so that they are non-trivial."""
from __future__ import annotations

import torch

from deltatune.models import logits_of, tiny_inputs, tiny_model


def train(model, inputs, steps: int = 4, lr: float = 0.05) -> None:
    """A few Adam steps on a loss that moves every trainable tensor (a peft or deltatune model)."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing to train"
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        logits = model(**inputs).logits
        loss = (logits - torch.randn(logits.shape, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def peft_adapter(path, arch: str, task: str = "auto", peft_kwargs=None, **lora):
    """Train a peft LoRA adapter on a tiny model and save it; returns (inputs, its logits)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_model(arch, task)
    inputs = tiny_inputs(model)
    pm = get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}), **(peft_kwargs or {}))
    train(pm, inputs)
    want = logits_of(pm, inputs)
    base = logits_of(tiny_model(arch, task), inputs)
    assert (want - base).abs().max() > 1e-3, "the trained adapter must change the outputs"
    pm.save_pretrained(str(path))
    return inputs, want


def peft_logits(path, arch: str, inputs, task: str = "auto"):
    """Logits of peft's own loader on a fresh base."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(tiny_model(arch, task), str(path))
    pm.eval()
    return logits_of(pm, inputs)
