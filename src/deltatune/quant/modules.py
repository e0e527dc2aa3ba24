"""The quantized module shell shared by every format (NF4, group-wise INT): a Linear / Conv1D /
Embedding whose class is swapped in place (same object, hooks, parents and state_dict keys) and
whose forward multiplies through the format's autograd Function, so that the backward dequantizes
again instead of keeping the dense weight alive."""
from __future__ import annotations

import torch
import torch.nn as nn


class QuantModule:
    """Mixed in before the dense class (``class NF4Linear(QuantModule, nn.Linear)``); made by
    ``install`` on an existing module, never built. Computes in ``compute_dtype`` and returns the
    input's dtype (as bitsandbytes' Linear4bit does)."""

    compute_dtype: torch.dtype | None = None
    dense_class: type[nn.Module]
    in_out = False                            # Conv1D's (in, out) weight layout
    matmul: type[torch.autograd.Function]     # the format's x @ dequantize(W).T with its backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or self.weight.dtype
        y = self.matmul.apply(x.to(dtype), self.weight, self.in_out)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def format_repr(self) -> str:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.format_repr()}"


def install(module: nn.Module, weight: torch.Tensor, classes: dict[type, type],
            compute_dtype: torch.dtype | None) -> None:
    """Give `module` its quantized weight and class, in place."""
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.__class__ = classes[type(module)]
    module.compute_dtype = compute_dtype


def uninstall(module: nn.Module, dense: torch.Tensor) -> torch.Tensor:
    """A quantized module back to its dense class with the dense weight `dense`."""
    module.__class__ = module.dense_class
    module.__dict__.pop("compute_dtype", None)
    module.weight = nn.Parameter(dense, requires_grad=False)
    return dense
