"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): a Hadamard product of two low-rank matrices.

ΔW = s · (W1a W1b) ⊙ (W2a W2b), s = alpha / r, with W1a, W2a (out, r) and W1b, W2b (r, in); the
effective rank reaches r² for 2r(out + in) parameters. Init and names as peft: W1a, W1b, W2a
Kaiming-uniform, W2b zero (identity at init). Linear and GPT-2 Conv1D (as (out, in)).
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
from ._lycoris import kaiming_
from ._weights import WeightUpdateLayer, module_dims


@dataclass
class LoHaConfig(DeltaConfig):
    method: ClassVar[str] = "loha"
    r: int = 8
    alpha: float = 8.0

    def validate(self) -> None:
        super().validate()
        self.check_range("r", 0, low_open=True, integer=True)
        self.check_range("alpha", 0, low_open=True)


class LoHaLayer(WeightUpdateLayer):
    def __init__(self, module: nn.Module, cfg: LoHaConfig):
        super().__init__()
        d_in, d_out = module_dims(module)
        kw = dict(dtype=module.weight.dtype, device=module.weight.device)
        self.scaling = cfg.alpha / cfg.r
        self.hada_w1_a = nn.Parameter(kaiming_(torch.empty(d_out, cfg.r, **kw)))
        self.hada_w1_b = nn.Parameter(kaiming_(torch.empty(cfg.r, d_in, **kw)))
        self.hada_w2_a = nn.Parameter(kaiming_(torch.empty(d_out, cfg.r, **kw)))
        self.hada_w2_b = nn.Parameter(torch.zeros(cfg.r, d_in, **kw))

    def update(self) -> torch.Tensor:
        return (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling


class LoHaDelta(Delta):
    config_cls = LoHaConfig

    default_roles = ("query", "value")
    supported_types = (nn.Linear, Conv1D)

    def make_layer(self, path: str, module: nn.Module) -> LoHaLayer:
        return LoHaLayer(module, self.config)


register("loha", LoHaConfig, LoHaDelta, family="reparameterized", lr=5e-3,
         paper="Hyeon-Woo et al. 2022 (FedPara); Yeh et al. 2024 (LyCORIS)")
