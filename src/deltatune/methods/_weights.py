"""Weight access shared by the reparameterizing methods (LoRA, IA3, VeRA, LoHa, LoKr, AdaLoRA).

Every method works on a weight as (out, in): GPT-2's Conv1D stores (in, out) and nn.Embedding
(num, dim), so they are transposed views. A base quantized by ``deltatune.quantize`` holds packed
4-bit weights: reads that need numbers (DoRA's norm) dequantize, and merges refuse with the fix,
because adding a delta into packed NF4 codes in place is not possible.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..errors import MergeError
from ..quant import dense, is_quantized


def _out_in(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    return w.T if isinstance(module, (Conv1D, nn.Embedding)) else w


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out, in): Conv1D stores (in, out), Embedding (num, dim) = (in, out)."""
    return _out_in(module, module.weight)


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear / Conv1D / Embedding (quantized or not)."""
    rows, cols = module.weight.shape
    return (rows, cols) if isinstance(module, (Conv1D, nn.Embedding)) else (cols, rows)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight as a plain tensor (dequantized when the base is quantized)."""
    return _out_in(module, dense(module.weight))


def writable_weight(module: nn.Module, what: str = "merge into") -> torch.Tensor:
    """The (out, in) weight for an in-place merge; a MergeError when it is quantized."""
    if is_quantized(module.weight):
        raise MergeError(
            f"cannot {what} a quantized weight ({type(module.weight).__name__}, packed 4-bit codes): "
            f"use deltatune.merge_quantized(dm, requantize=True|False) (dequantize -> merge -> "
            f"optionally requantize, reporting the error), or deltatune.dequantize(model) first."
        )
    return weight_out_in(module)
