"""Quantized frozen bases (QLoRA): ``deltatune.quantize(model, "nf4")`` stores the base's Linear
weights in 4 bits so that a delta (LoRA, ...) trains on top of a base a quarter of its size.

torchao is imported only when something is quantized; ``is_quantized`` and ``dense`` are cheap
checks the methods call on every weight they read.
"""
from __future__ import annotations

import torch

from . import nf4
from .api import MemoryReport, MergeReport, dequantize, memory_report, merge_quantized, quantize

__all__ = ["MemoryReport", "MergeReport", "dense", "dequantize", "is_quantized", "memory_report",
           "merge_quantized", "quantize"]


def is_quantized(t: object) -> bool:
    """True for a quantized weight (an NF4Tensor)."""
    cls = nf4.nf4_type()
    return cls is not None and isinstance(t, cls)


def dense(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with t's values: dequantized when t is quantized, else t itself."""
    return nf4.dequantize_nf4(t) if is_quantized(t) else t

