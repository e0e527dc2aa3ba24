"""Compacter (Karimi Mahabadi et al. 2021): adapters whose projections are PHM layers.

Each projection W (in x out) is a sum of Kronecker products W = sum_i A_i (x) B_i, with n "slow"
rule matrices A_i (n x n) shared by every adapter layer of the delta, and per-layer "fast" factors
B_i = s_i t_i (in/n x r)(r x out/n), rank r = 1 in the paper. Parameters: n^3 shared, plus
r * (in + out) + out (bias) per PHM layer, i.e. n^3 + 4L(k + d) + biases for Houlsby placement
over L layers (k = hidden, d = bottleneck), the paper's count. Compacter++ is the same with the
adapter after the feed-forward sublayer only: ``CompacterConfig.plus_plus()`` =
``CompacterConfig(placement="pfeiffer")``. The up-projection's t factors start at zero (identity at
init); A_i ~ N(0, 1/n), which keeps W at the scale of the fast factors (the reference draws A_i
from N(0, 0.01^2)); s, t Xavier-normal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..core.registry import register
from ..errors import ConfigError
from ._sublayers import Site, site_dtype
from .adapter import AdapterConfig, AdapterDelta, Bottleneck


@dataclass
class CompacterConfig(AdapterConfig):
    """n: number of Kronecker summands (hidden and bottleneck sizes must be divisible by it; a
    bottleneck from ``reduction_factor`` is rounded down to a multiple of n, and is at least n,
    e.g. 576 // 32 = 18 -> 16 on SmolLM2-135M; an explicit ``bottleneck`` is used as given).
    rank: rank of the fast factors (1 in the paper)."""
    method: ClassVar[str] = "compacter"

    reduction_factor: float = 32.0
    activation: str = "gelu"
    n: int = 4
    rank: int = 1

    def validate(self) -> None:
        super().validate()
        self.check_range("n", 1, integer=True)
        self.check_range("rank", 1, integer=True)

    def bottleneck_size(self, dim: int) -> int:
        if self.bottleneck is not None:
            return self.bottleneck
        size = int(dim // self.reduction_factor)
        return max(self.n, size - size % self.n)

    @classmethod
    def plus_plus(cls, **fields: Any) -> CompacterConfig:
        """Compacter++: one adapter per block, after the feed-forward sublayer."""
        return cls(**{"placement": "pfeiffer", **fields})


class _Shared:
    """A plain reference to the delta (not a registered submodule: the rule is saved once)."""

    def __init__(self, owner: nn.Module):
        self.owner = owner


class PHMLinear(nn.Module):
    """y = x W + b, W = sum_i kron(A_i, s_i t_i)."""

    def __init__(self, shared: _Shared, n: int, rank: int, d_in: int, d_out: int, zero: bool):
        super().__init__()
        self._shared = shared
        self.s = nn.Parameter(torch.empty(n, d_in // n, rank))
        self.t = nn.Parameter(torch.empty(n, rank, d_out // n))
        self.bias = nn.Parameter(torch.zeros(d_out))
        with torch.no_grad():
            for i in range(n):
                nn.init.xavier_normal_(self.s[i])
                nn.init.xavier_normal_(self.t[i])
            if zero:
                self.t.zero_()

    def weight(self) -> torch.Tensor:
        rule = self._shared.owner.phm_rule  # (n, n, n)
        fast = torch.bmm(self.s, self.t)     # (n, in/n, out/n)
        n, a, b = fast.shape
        kron = rule[:, :, None, :, None] * fast[:, None, :, None, :]  # (n, n, in/n, n, out/n)
        return kron.reshape(n, n * a, n * b).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight().to(x.dtype) + self.bias


class CompacterDelta(AdapterDelta):
    config_cls = CompacterConfig

    def build(self, model: nn.Module) -> None:
        n = self.config.n
        rule = torch.randn(n, n, n) / n ** 0.5
        self.phm_rule = nn.Parameter(rule.to(site_dtype(model, "")))  # saved as key "phm_rule"
        super().build(model)

    def bottleneck(self, site: Site) -> Bottleneck:
        cfg = self.config
        for what, size in (("hidden size", site.dim), ("bottleneck", cfg.bottleneck_size(site.dim))):
            if size % cfg.n:
                raise ConfigError(f"compacter: the {what} at {site.path} is {size}, not divisible by "
                                  f"n={cfg.n}; pick n dividing it (or set bottleneck/reduction_factor).")
        return super().bottleneck(site)

    def projection(self, d_in: int, d_out: int, up: bool) -> nn.Module:
        cfg = self.config
        return PHMLinear(_Shared(self), cfg.n, cfg.rank, d_in, d_out, zero=up)


register("compacter", CompacterConfig, CompacterDelta, family="additive", lr=5e-3,
         paper="Karimi Mahabadi et al. 2021 (Compacter, Compacter++)")
