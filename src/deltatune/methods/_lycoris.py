"""Shared by LoHa and LoKr (the LyCORIS family): their init and the factorization of a dimension.
Their layers are ``_weights.WeightUpdateLayer`` (ΔW built densely from the factors, added to the
output as ``F.linear(x, ΔW)`` and merged as ``W += ΔW``)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


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
