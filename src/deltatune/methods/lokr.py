"""LoKr (Yeh et al. 2024, LyCORIS): a Kronecker product of a small and a (low-rank) larger matrix.

With out = a·b and in = c·d (factors near the square root, or `decompose_factor`):
ΔW = s · W1 ⊗ W2, s = alpha / r, W1 (a, c), W2 (b, d). W2 is stored as W2a (b, r) W2b (r, d) when
r < max(b, d) / 2, and W1 likewise as W1a W1b when `decompose_both`. Names, shapes and init as peft:
W1 (or W1a) zero, the rest Kaiming-uniform (identity at init). Linear and GPT-2 Conv1D.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.registry import register
from ._lycoris import factorization, kaiming_
from ._weights import WeightUpdateLayer, module_dims


@dataclass
class LoKrConfig(DeltaConfig):
    """decompose_factor: the size of the small Kronecker factor when it divides the dimension
    (-1: the divisor pair nearest the square root). decompose_both: low-rank W1 too."""
    method: ClassVar[str] = "lokr"

    r: int = 8
    alpha: float = 8.0
    decompose_both: bool = False
    decompose_factor: int = -1

    def validate(self) -> None:
        super().validate()
        self.check_range("r", 0, low_open=True, integer=True)
        self.check_range("alpha", 0, low_open=True)
        self.check_choice("decompose_both", (True, False))
        if self.decompose_factor != -1:
            self.check_range("decompose_factor", 1, integer=True)


class LoKrLayer(WeightUpdateLayer):
    def __init__(self, module: nn.Module, cfg: LoKrConfig):
        super().__init__()
        d_in, d_out = module_dims(module)
        (a, b), (c, d) = factorization(d_out, cfg.decompose_factor), factorization(d_in, cfg.decompose_factor)
        kw = dict(dtype=module.weight.dtype, device=module.weight.device)
        r = cfg.r
        self.scaling = cfg.alpha / r
        if cfg.decompose_both and r < max(a, c) / 2:
            self.lokr_w1_a = nn.Parameter(torch.zeros(a, r, **kw))
            self.lokr_w1_b = nn.Parameter(kaiming_(torch.empty(r, c, **kw)))
        else:
            self.lokr_w1 = nn.Parameter(torch.zeros(a, c, **kw))
        if r < max(b, d) / 2:
            self.lokr_w2_a = nn.Parameter(kaiming_(torch.empty(b, r, **kw)))
            self.lokr_w2_b = nn.Parameter(kaiming_(torch.empty(r, d, **kw)))
        else:
            self.lokr_w2 = nn.Parameter(kaiming_(torch.empty(b, d, **kw)))

    def _factor(self, i: int) -> torch.Tensor:
        full = getattr(self, f"lokr_w{i}", None)
        return full if full is not None else getattr(self, f"lokr_w{i}_a") @ getattr(self, f"lokr_w{i}_b")

    def update(self) -> torch.Tensor:
        return torch.kron(self._factor(1), self._factor(2)) * self.scaling


class LoKrDelta(Delta):
    config_cls = LoKrConfig

    default_roles = ("query", "value")
    supported_types = (nn.Linear, Conv1D)

    def make_layer(self, path: str, module: nn.Module) -> LoKrLayer:
        return LoKrLayer(module, self.config)


register("lokr", LoKrConfig, LoKrDelta, family="reparameterized", lr=5e-3, paper="Yeh et al. 2024 (LyCORIS, LoKr)")
