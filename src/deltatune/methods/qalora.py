"""QA-LoRA (Xu et al. 2023, "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language
Models", ICLR 2024): a LoRA whose input is average-pooled over groups of input columns, so that
its merged update is constant within each quantization group and folds into the group's zero point.

The base is quantized group-wise (section 3.3; ``deltatune.quantize(model, "int4", group_size=L)``,
quant/intq.py): each row of W (out, in) is cut into groups of L consecutive input columns with
W̃ = α q + β (min-max: α = (max - min) / (2^N - 1), β = min, per row and group). The adapter
pools its input first, x̄_j = mean(x_{jL .. (j+1)L-1}), so A is (r, in / L) and

    h = W̃ x + s B A x̄,        ΔW_ik = s (B A)_{i, k // L} / L,

one constant per row and group. Merging adds it to the zero points, β' = β + s (B A) / L (the
official code's merge.py: ``qzeros -= (B A)ᵀ s / L / scales`` in GPTQ's β = -α z form): codes and
scales are untouched, so the merged model is in the same INT format, with no requantization error
(only float rounding of one addition). Pooling as the official code (``nn.AvgPool1d(L)``), which
peft's GPTQ-only ``use_qalora`` multiplies by in / L (an A rescaled by that factor).

Works on any base: on an INT base, ``group_size`` None takes the base's group size (a multiple of
it also folds); on a dense base it is a pooled LoRA (None: 32, or less where a module would
have fewer than 4 groups) merged as W += ΔW; on an NF4 base
(no zero points) merging goes through ``deltatune.merge_quantized``. ``dora`` is refused: its row
norm is no per-group constant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..core.delta import Delta
from ..core.registry import register
from ..errors import ConfigError
from ..quant.intq import GroupQuantTensor
from ._weights import module_dims
from .lora import LoRAConfig, LoRADelta, LoRALayer

DENSE_GROUP = 32  # QA-LoRA's group size, for a base that is not group-quantized
MIN_GROUPS = 4    # a narrower module pools by less: one group of a LayerNorm output averages to ~0


def dense_group(d_in: int) -> int:
    """The default pooling of a dense module: 32, or the largest divisor of d_in that leaves
    MIN_GROUPS groups (the row mean of a normalised input is ~0, so one group learns nothing)."""
    if d_in % DENSE_GROUP == 0 and d_in // DENSE_GROUP >= MIN_GROUPS:
        return DENSE_GROUP
    return max(g for g in range(1, DENSE_GROUP + 1) if d_in % g == 0 and (d_in // g >= MIN_GROUPS or g == 1))


@dataclass
class QALoRAConfig(LoRAConfig):
    """group_size: input columns pooled into one adapter input (L); None: the quantized base's
    group size, or on a dense base 32 (less where that would leave fewer than 4 groups)."""
    method: ClassVar[str] = "qalora"
    group_size: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.group_size is not None:
            self.check_range("group_size", 1, integer=True)
        if self.dora:
            self._fail("dora", self.dora, "False: DoRA's per-row norm is no per-group constant, so a "
                                          "QA-LoRA update could no longer fold into the zero points")
        if self.init_kind not in ("kaiming", "gaussian"):
            self._fail("init", self.init, "'kaiming' or 'gaussian': A acts on pooled inputs (r x in / "
                                          "group_size), so there is no weight factorization to start from")


def base_group(module: nn.Module) -> int | None:
    """The quantization group size of a group-quantized module, else None."""
    w = module.weight
    return w.group_size if isinstance(w, GroupQuantTensor) else None


class QALoRALayer(LoRALayer):
    """LoRA with down = s A pool(x): A is (r, in / L); merged into a group-quantized weight's zero
    points, else into the dense weight as the expanded ΔW."""

    def __init__(self, module: nn.Module, cfg: QALoRAConfig, r: int, alpha: float, path: str):
        super().__init__(module, cfg, r, alpha)
        d_in, _ = module_dims(module)
        group, quant = cfg.group_size, base_group(module)
        group = group if group is not None else (quant or dense_group(d_in))
        if d_in % group:
            raise ConfigError(f"QALoRAConfig.group_size={group} does not divide the {d_in} input features "
                              f"of {path}: choose a group_size that divides them (or narrow `targets`).")
        if quant is not None and group % quant:
            raise ConfigError(f"QALoRAConfig.group_size={group} is no multiple of the quantization group size "
                              f"{quant} of {path}, so the merged update could not fold into its zero points: "
                              f"use group_size={quant} (or None).")
        self.group = group
        w = module.weight
        self.lora_A = nn.Parameter(torch.empty(r, d_in // group, dtype=w.dtype, device=w.device))
        if cfg.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._zero_stash: torch.Tensor | None = None

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., in / L): the mean of each group of L input columns."""
        return x.unflatten(-1, (-1, self.group)).mean(dim=-1)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.pool(x), self.lora_A) * self.scaling

    def group_update(self) -> torch.Tensor:
        """s B A / L as (out, in / L): the constant each weight of a group gets."""
        return (self.lora_B @ self.lora_A) * (self.scaling / self.group)

    def update(self) -> torch.Tensor:
        """ΔW (out, in): the group constants repeated over their L columns."""
        return self.group_update().repeat_interleave(self.group, dim=1)

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        w = module.weight
        if not isinstance(w, GroupQuantTensor):
            return super().merge(module)
        c = self.group_update().to(w.zero.dtype).repeat_interleave(self.group // w.group_size, dim=1)
        self._zero_stash = w.zero.clone()
        w.zero.add_(c)

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        if self._zero_stash is None:
            return super().unmerge(module)
        module.weight.zero.copy_(self._zero_stash)
        self._zero_stash = None


class QALoRADelta(LoRADelta):
    config_cls = QALoRAConfig
    supported_types = (nn.Linear, Conv1D)
    weighted = Delta.__dict__["no_weighted"]  # LoRA's factor concatenation would lose the pooling: refused

    def make_layer(self, path: str, module: nn.Module) -> QALoRALayer:
        return QALoRALayer(module, self.config, *self.config.rank_alpha(path), path)


register("qalora", QALoRAConfig, QALoRADelta, family="reparameterized", lr=1e-2,
         paper="Xu et al. 2023 (QA-LoRA)")
