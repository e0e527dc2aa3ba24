"""Quantized frozen bases: ``deltatune.quantize(model, "nf4")`` stores the base's Linear weights in
4 bits (QLoRA) so that a delta (LoRA, ...) trains on top of a base a quarter of its size;
``quantize(model, "int4", group_size=32)`` stores them as group-wise INT codes with float scales
and zero points (quant/intq.py), the format QA-LoRA merges into without leaving it.

torchao is imported only when something is quantized to NF4; ``is_quantized`` and ``dense`` are
cheap checks the methods call on every weight they read.
"""
from __future__ import annotations

import torch

from . import intq, nf4
from .api import MemoryReport, MergeReport, dequantize, memory_report, merge_quantized, quantize

__all__ = ["MemoryReport", "MergeReport", "dense", "dequantize", "is_quantized", "memory_report",
           "merge_quantized", "quantize"]


def is_quantized(t: object) -> bool:
    """True for a quantized weight (an NF4Tensor or a GroupQuantTensor)."""
    if isinstance(t, intq.GroupQuantTensor):
        return True
    cls = nf4.nf4_type()
    return cls is not None and isinstance(t, cls)


def dense(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor with t's values: dequantized when t is quantized, else t itself."""
    if isinstance(t, intq.GroupQuantTensor):
        return t.dequantize()
    return nf4.dequantize_nf4(t) if is_quantized(t) else t
