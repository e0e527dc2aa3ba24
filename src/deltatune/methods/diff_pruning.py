"""Diff pruning (Guo et al. 2021): a sparse task diff vector learned with a relaxed L0 penalty.

theta = theta0 + z * w, with w zero at init (identity) and z a hard-concrete gate per entry
(Louizos et al. 2018): u ~ U(0, 1), s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
z = clamp(s (high - low) + low, 0, 1); at eval z = clamp(sigmoid(log_alpha) (high - low) + low, 0, 1).
``regularization()`` is the expected L0 norm times ``l0_penalty``:
l0_penalty * sum sigmoid(log_alpha - beta log(-low / high)). The reference code uses low = -1.5,
high = 1.5, beta = 1, log_alpha initialised to 5 (gates open) and a separate, larger learning rate for
the gates (``gate_parameters()`` / ``diff_parameters()`` give the two groups).

``finalize()`` projects the diff to exactly k = round(density x target size) entries by magnitude
(the L0-ball projection of the paper) and stores it sparsely; its values stay trainable, so the
paper's final fixed-mask fine-tuning is simply more training. Build a new optimizer afterwards.
"""
from __future__ import annotations

import math
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
class DiffPruningConfig(SparseConfig):
    """density: fraction of target entries kept by ``finalize()``. l0_penalty: weight of the
    expected-L0 term. low < 0 < 1 < high stretch the gate; beta is its temperature."""
    method: ClassVar[str] = "diff_pruning"

    switch_fraction: ClassVar[float | None] = 2 / 3  # L0 phase, then the projection and fixed-mask steps
    density: float = 0.005
    l0_penalty: float = 1.25e-7
    alpha_init: float = 5.0
    low: float = -1.5
    high: float = 1.5
    beta: float = 1.0

    def validate(self) -> None:
        super().validate()
        self.check_range("density", 0.0, 1.0, low_open=True)
        self.check_range("l0_penalty", 0.0)
        self.check_range("alpha_init", -20.0, 20.0)
        self.check_range("low", high=0.0, high_open=True)
        self.check_range("high", 1.0, low_open=True)
        self.check_range("beta", 0.0, low_open=True)


class DiffPruningLayer(SparseDiffLayer):
    dense_attrs = ("diffs", "log_alpha")

    def __init__(self, module: nn.Module, names: list[str], cfg: DiffPruningConfig):
        super().__init__(module, names)
        self.low, self.high, self.beta = cfg.low, cfg.high, cfg.beta
        self.diffs = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros_like(getattr(module, n)), requires_grad=True) for n in names}
        )
        self.log_alpha = nn.ParameterDict(
            {n: nn.Parameter(torch.full_like(getattr(module, n), cfg.alpha_init, dtype=torch.float32),
                             requires_grad=True) for n in names}
        )

    def gate(self, name: str, sample: bool) -> torch.Tensor:
        la = self.log_alpha[name]
        if sample:
            u = torch.rand_like(la).clamp_(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / self.beta)
        else:
            s = torch.sigmoid(la)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def dense_delta(self, name: str, train: bool = False) -> torch.Tensor:
        return self.diffs[name] * self.gate(name, sample=train).to(self.diffs[name].dtype)

    def expected_l0(self) -> torch.Tensor:
        shift = self.beta * math.log(-self.low / self.high)
        return sum(torch.sigmoid(la - shift).sum() for la in self.log_alpha.values())


class DiffPruningDelta(SparseTargetsDelta):
    config_cls = DiffPruningConfig

    def make_sparse_layer(self, module: nn.Module, names: list[str]) -> DiffPruningLayer:
        return DiffPruningLayer(module, names, self.config)

    def regularization(self) -> torch.Tensor | None:
        if self.is_compact or self.config.l0_penalty == 0:
            return None
        return self.config.l0_penalty * sum(lay.expected_l0() for _, lay in self.compact_layers())

    def expected_density(self) -> float:
        """Expected fraction of non-zero gates (training form), for monitoring."""
        with torch.no_grad():
            return float(sum(lay.expected_l0() for _, lay in self.compact_layers())) / self.target_numel()

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for _, lay in self.compact_layers() for p in lay.log_alpha.values()]

    def diff_parameters(self) -> list[nn.Parameter]:
        gates = {id(p) for p in self.gate_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in gates]

    def switch(self) -> None:
        self.finalize()

    def finalize(self, k: int | None = None, trainable: bool = True) -> int:
        """Magnitude projection to exactly k entries of z * w, stored sparsely; returns k."""
        self.check_switch("finalize()")
        k = self.budget(self.config.density, k)
        layers = self.compact_layers()
        with torch.no_grad():
            deltas = {f"{i}|{n}": lay.dense_delta(n) for i, (_, lay) in enumerate(layers) for n in lay.names}
            top = topk_global({key: d.abs() for key, d in deltas.items()}, k)
            for i, (_, lay) in enumerate(layers):
                idx = {n: top[f"{i}|{n}"] for n in lay.names}
                vals = {n: deltas[f"{i}|{n}"].reshape(-1).index_select(0, idx[n]) for n in lay.names}
                lay.to_sparse(idx, vals, trainable)
        return k


register("diff_pruning", DiffPruningConfig, DiffPruningDelta, family="partial", lr=5e-3,
         paper="Guo et al. 2021 (Parameter-Efficient Transfer Learning with Diff Pruning)")
