"""LoRA-FA (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
Models Fine-tuning", arXiv 2308.03303v1, section 3): LoRA with the projection-down A frozen at its
random init; only the projection-up B (zero at init) trains.

h = W x + s B A x as in LoRA (s = alpha / r, or alpha / sqrt(r) with rsLoRA), A kaiming-uniform
(or gaussian) and never updated. The paper's point is activation memory: B's gradient needs only
A x (r numbers per token), and with A frozen nothing needs x for a gradient of A, so the d_in-wide
input of each adapted module is not kept for backward (LoRA keeps it). Autograd delivers that by
itself: A is a buffer (requires no grad), so the product A x records no input for a weight
gradient (``tests/methods/test_dylora_lorafa.py`` counts the saved tensors; benchmarks/
lora_fa_memory.py measures it on MiniLM). With ``dropout > 0`` the layer drops out by a bool mask,
which backward keeps (1 byte per input feature; LoRA keeps the dropped-out fp32 input, and on CPU
torch's dropout also a float noise tensor of its size).

A is a persistent buffer: saved with the delta (the file is a LoRA file of the same r, lora_A and
lora_B; r * d_in numbers per module that a seed could regenerate, kept so loading is exact on every
device and torch version). The 2025 revision of the paper (v2, peft's ``create_lorafa_optimizer``)
adds a projected gradient for B in the optimizer; that is an optimizer, not part of this delta.

Refused, with the fix: DoRA (use method='lora'), initialisations other than kaiming / gaussian
(the method freezes a random A), embeddings (LoRA's embedding layout starts A at zero: a frozen
zero A would never learn).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..core.registry import register
from .lora import LoRAConfig, LoRADelta, LoRALayer

RANDOM_INITS = ("kaiming", "gaussian")


@dataclass
class LoRAFAConfig(LoRAConfig):
    """LoRA's fields; A is frozen at its init."""
    method: ClassVar[str] = "lora_fa"

    def validate(self) -> None:
        super().validate()
        if self.init not in RANDOM_INITS:
            self._fail("init", self.init, f"one of {', '.join(map(repr, RANDOM_INITS))}: LoRA-FA freezes "
                       f"a random A; use method='lora' for that init")
        if self.dora:
            self._fail("dora", self.dora, "False: LoRA-FA has no DoRA variant; use method='lora' with dora=True")


class LoRAFALayer(LoRALayer):
    """LoRA's layer with ``lora_A`` turned into a (saved) buffer after its random init."""

    def __init__(self, module: nn.Module, cfg: LoRAFAConfig, r: int | None = None, alpha: float | None = None):
        super().__init__(module, cfg, r, alpha)
        frozen = self.lora_A.detach()
        del self.lora_A
        self.register_buffer("lora_A", frozen)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is None or not self.training:
            return super().low_rank(x)
        # dropout by a bool mask, the only thing its backward keeps (torch's CPU dropout keeps a
        # float noise tensor the size of x; its fused CUDA kernel a bool mask, as here)
        p = self.dropout.p
        keep = torch.rand_like(x) >= p
        return self.up(self.down(x * keep * (1.0 / (1.0 - p))))


class LoRAFADelta(LoRADelta):
    config_cls = LoRAFAConfig

    supported_types = (nn.Linear, Conv1D)

    def make_layer(self, path: str, module: nn.Module) -> LoRAFALayer:
        return LoRAFALayer(module, self.config, *self.config.rank_alpha(path))


register("lora_fa", LoRAFAConfig, LoRAFADelta, family="reparameterized", lr=5e-3,
         paper="Zhang et al. 2023 (LoRA-FA)")
