"""LT-SFT, lottery-ticket sparse fine-tuning (Ansell et al. 2022).

Phase 1 fine-tunes the target tensors fully (dense differences, zero at init). ``start_phase2()``
keeps the k entries that changed most (k = round(density x target size), or given), resets every
difference to zero (pretrained values; the task head back to its initial values as in the
reference implementation, unless ``reset_heads=False``), and phase 2 trains only those k entries.
Build a new optimizer after ``start_phase2()``: the trainable tensors change.

    delta = dm.get_delta("default")          # phase 1: train as usual
    delta.start_phase2()                      # or start_phase2(k=...)
    opt = torch.optim.AdamW(dm.trainable_parameters(), lr=...)   # phase 2: train again

A phase-2 delta saves only indices + values. Several sparse deltas (a language one and a task one)
compose by addition: ``dm.activate("lang", "task")``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core.registry import register
from ._sparse_config import SparseConfig
from ._sparse_index import topk_global
from ._sparse_layer import SparseDiffLayer
from ._sparse_targets import SparseTargetsDelta


@dataclass
class LTSFTConfig(SparseConfig):
    """density: fraction of target entries kept for phase 2. l1: weight of an L1 pull towards the
    pretrained values, ``l1 * mean |difference|`` over the target entries (0: off)."""
    method: ClassVar[str] = "lt_sft"

    density: float = 0.01
    l1: float = 0.0
    reset_heads: bool = True

    def validate(self) -> None:
        super().validate()
        self.check_range("density", 0.0, 1.0, low_open=True)
        self.check_range("l1", 0.0)
        self.check_choice("reset_heads", (True, False))


class LTSFTLayer(SparseDiffLayer):
    dense_attrs = ("diffs",)

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__(module, names)
        self.diffs = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros_like(getattr(module, n)), requires_grad=True) for n in names}
        )

    def dense_delta(self, name: str, train: bool = False) -> torch.Tensor:
        return self.diffs[name]

    def l1(self) -> torch.Tensor:
        tensors = self.sparse.val.values() if self.is_compact else self.diffs.values()
        return sum(t.abs().sum() for t in tensors)


class LTSFTDelta(SparseTargetsDelta):
    config_cls = LTSFTConfig

    def make_sparse_layer(self, module: nn.Module, names: list[str]) -> LTSFTLayer:
        return LTSFTLayer(module, names)

    def start_phase2(self, k: int | None = None) -> int:
        """Keep the k most changed entries, reset to pretrained, train only those; returns k."""
        self.check_switch("start_phase2()")
        k = self.budget(self.config.density, k)
        layers = self.compact_layers()
        scores = {f"{i}|{n}": s for i, (_, lay) in enumerate(layers) for n, s in lay.scores().items()}
        top = topk_global(scores, k)
        for i, (_, lay) in enumerate(layers):
            idx = {n: top[f"{i}|{n}"] for n in lay.names}
            zeros = {n: lay.diffs[n].new_zeros(idx[n].numel()) for n in lay.names}
            lay.to_sparse(idx, zeros, trainable=True)
        if self.config.reset_heads:
            self.reset_heads()
        return k

    def switch(self) -> None:
        self.start_phase2()

    @property
    def phase(self) -> int:
        return 2 if self.is_compact else 1

    def regularization(self) -> torch.Tensor | None:
        if self.config.l1 == 0:
            return None
        total = sum(lay.l1() for _, lay in self.compact_layers())
        return self.config.l1 * total / self.target_numel()


register("lt_sft", LTSFTConfig, LTSFTDelta, family="partial", lr=5e-4,
         paper="Ansell et al. 2022 (Composable Sparse Fine-Tuning, LT-SFT)")
