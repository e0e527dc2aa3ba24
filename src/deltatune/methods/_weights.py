"""Weight access and the weight-update layers shared by the reparameterizing methods (LoRA, IA3,
VeRA, LoHa, LoKr, AdaLoRA).

Every method works on a weight as (out, in): GPT-2's Conv1D stores (in, out) and nn.Embedding
(num, dim), so they are transposed views. A base quantized by ``deltatune.quantize`` holds packed
4-bit weights: reads that need numbers (DoRA's norm) dequantize, and merges refuse with the fix,
because adding a delta into packed NF4 codes in place is not possible.

``WeightUpdateLayer`` is the one implementation of "y + ΔW x, merged as W += ΔW": a method gives
only ``update()`` (ΔW). ``LowRankLayer`` adds the factored forward of the rank-r methods (LoRA,
VeRA, AdaLoRA): they give ``down`` and ``up`` instead of forming ΔW on every call.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..core.layer import DeltaLayer
from ..errors import MergeError
from ..quant import dense, is_quantized


def _out_in(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    return w.T if isinstance(module, (Conv1D, nn.Embedding)) else w


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out, in): Conv1D stores (in, out), Embedding (num, dim) = (in, out)."""
    return _out_in(module, module.weight)


def stored_layout(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """An (out, in) tensor in the module's own layout (Conv1D, Embedding: (in, out)), or back: the
    same transposition either way (what an init that rewrites the stored weight needs)."""
    return _out_in(module, t)


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


class WeightUpdateLayer(DeltaLayer):
    """Adds ΔW x to the module's output; merges as W += ΔW (and back), refusing 4-bit bases.

    Subclasses give ``update()``. The default forward forms ΔW densely, which suits updates that
    are no plain product of two thin factors (LoHa's Hadamard, LoKr's Kronecker product).
    """

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


class LowRankLayer(WeightUpdateLayer):
    """ΔW x = up(down(dropout(x))) through an r-wide bottleneck: (in + out) r work per token
    instead of forming the (out, in) ΔW. Each method puts its scales where its paper does, in
    ``down`` (the A side) and ``up`` (the B side); ``update()`` stays the same product, merged."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., r)."""
        raise NotImplementedError

    def up(self, h: torch.Tensor) -> torch.Tensor:
        """(..., r) -> (..., out)."""
        raise NotImplementedError

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x, factor by factor (after the input dropout)."""
        if self.dropout is not None:
            x = self.dropout(x)
        return self.up(self.down(x))

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.low_rank(x)
