"""Shared by LoHa and LoKr (the LyCORIS family): a layer whose update ΔW is built densely from its
factors, added to the output as ``F.linear(x, ΔW)`` and merged as ``W += ΔW``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.layer import DeltaLayer
from ._weights import writable_weight


class WeightUpdateLayer(DeltaLayer):
    mergeable = True

    def update(self) -> torch.Tensor:
        """ΔW as (out, in)."""
        raise NotImplementedError

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + F.linear(x, self.update().to(x.dtype))

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        w = writable_weight(module)
        w.add_(self.update().to(w.dtype))

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        w = writable_weight(module, "unmerge from")
        w.sub_(self.update().to(w.dtype))


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (Kaiming-uniform, a=√5), as LyCORIS and peft use."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension: (factor, dimension / factor) when factor divides it, else the
    divisor pair nearest the square root with m <= factor, m <= n (LyCORIS' rule, as in peft, so
    that shapes match peft's)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        if new_m > limit:
            break
        m, n = new_m, dimension // new_m
    return (m, n) if m <= n else (n, m)
