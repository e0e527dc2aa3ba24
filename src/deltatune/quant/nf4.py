"""NF4 (QLoRA, Dettmers et al. 2023): 4-bit NormalFloat weights with block-wise absmax scales whose
scales are themselves quantized (double quantization).

Storage and quantization are torchao's ``NF4Tensor`` (maintained, runs on CPU and CUDA, moves with
``.to(device)``). The matmul path is ours: torchao's ``F.linear`` dequantizes element by element
(two gathers, a stack and an interleave); a 256-entry table that maps one packed byte to its two
values gives the same numbers bit for bit, ~3.7x faster on CPU (44 vs 163 ms for a 1536x384
weight, interleaved runs on a loaded 2-core machine), which matters because every forward and
backward dequantizes. A quantized ``nn.Linear`` (or GPT-2 ``Conv1D``) keeps its identity (hooks,
parents, state_dict keys); only its class becomes ``NF4Linear`` (``NF4Conv1D``, ``NF4Embedding``)
so that its forward takes that path.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import math
import sys
from collections.abc import Iterator
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from .modules import QuantModule, install, uninstall


# torchao moved NF4Tensor between releases; the newest location first.
NF4_MODULES = ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor")
_QUIET = ("torchao", "torch.utils._pytree")  # loggers that report optional CUDA kernels on import


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torchao's import-time warnings about GPU kernels this machine cannot load."""
    loggers = [logging.getLogger(n) for n in _QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def torchao_nf4() -> ModuleType:
    """torchao's NF4 module (imported on first use)."""
    with _quiet():
        for name in NF4_MODULES:
            try:
                return importlib.import_module(name)
            except ImportError:
                continue
    raise ImportError("NF4 quantization needs torchao (pip install torchao): its NF4Tensor was not found.")


def nf4_type() -> type | None:
    """The NF4Tensor class if torchao is loaded (no tensor can be NF4 otherwise)."""
    for name in NF4_MODULES:
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "NF4Tensor"):
            return mod.NF4Tensor
    return None


def to_nf4(weight: torch.Tensor, block_size: int = 64, scaler_block_size: int = 256) -> torch.Tensor:
    """Quantize a 2-D tensor. The scale blocks shrink to a divisor of the block count when needed."""
    n_blocks = weight.numel() // block_size
    scaler = math.gcd(n_blocks, scaler_block_size)
    mod = torchao_nf4()
    with _quiet():
        return mod.to_nf4(weight.detach().contiguous(), block_size, scaler)


def fits(module: nn.Module, block_size: int) -> bool:
    """NF4 needs whole blocks; an embedding that renormalizes its rows writes its weight."""
    w = module.weight
    writes = getattr(module, "max_norm", None) is not None or getattr(module, "sparse", False)
    return w.dim() == 2 and w.numel() % block_size == 0 and w.numel() % 2 == 0 and not writes


def _pair_table(levels: torch.Tensor) -> torch.Tensor:
    """(256, 2): the two NF4 values packed in each byte (high nibble first, as torchao packs)."""
    idx = torch.arange(256, device=levels.device)
    return torch.stack([levels[idx >> 4], levels[idx & 15]], dim=-1)


def dequantize_nf4(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense tensor of an NF4Tensor (bit-identical to torchao's ``get_original_weight``)."""
    scales = w.quantized_scalers.view(-1, w.scaler_block_size) / w.quantization_factor.unsqueeze(-1)
    scales = scales.flatten().to(w.dtype) + w.scaler_mean
    values = _pair_table(w.nf4).index_select(0, w.quantized_data.int())
    out = (values.view(-1, w.block_size) * scales.unsqueeze(-1)).view(w.shape)
    return out if dtype is None or dtype == out.dtype else out.to(dtype)


class _MatmulNF4(torch.autograd.Function):
    """x @ W.T (W stored (out, in), nn.Linear) or x @ W (stored (in, out), GPT-2's Conv1D), with W
    dequantized on the fly; backward dequantizes again rather than keeping the dense W alive."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, in_out: bool) -> torch.Tensor:
        ctx.save_for_backward(w)
        ctx.in_out = in_out
        d = dequantize_nf4(w, x.dtype)
        return x @ d if in_out else F.linear(x, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (w,) = ctx.saved_tensors
        d = dequantize_nf4(w, grad.dtype)
        return (grad @ d.T if ctx.in_out else grad @ d), None, None


class _NF4Module(QuantModule):
    """Shared by NF4Linear / NF4Conv1D / NF4Embedding."""

    matmul = _MatmulNF4

    def __deepcopy__(self, memo: dict) -> nn.Module:
        """Copy the packed tensors as they are (torchao's clone requantizes, with default sizes)."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_parameters":
                value = {n: copy_nf4(p) if p is self.weight else copy.deepcopy(p, memo) for n, p in value.items()}
                memo.update({id(self.weight): value["weight"]})
                new.__dict__[key] = value
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def format_repr(self) -> str:
        w = self.weight
        return (f"nf4(block_size={w.block_size}, scaler_block_size={w.scaler_block_size}, "
                f"compute_dtype={self.compute_dtype or w.dtype})")


class NF4Linear(_NF4Module, nn.Linear):
    dense_class = nn.Linear


class NF4Conv1D(_NF4Module, Conv1D):
    dense_class = Conv1D
    in_out = True


class NF4Embedding(_NF4Module, nn.Embedding):
    """Looks up rows by dequantizing only the looked-up values (codes, then their block scales);
    the output keeps the table's dtype, since what follows an embedding is not quantized."""

    dense_class = nn.Embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        dim = w.shape[1]
        flat = ids.reshape(-1, 1) * dim + torch.arange(dim, device=ids.device)   # element indices
        byte = w.quantized_data[flat >> 1]
        code = torch.where(flat & 1 == 0, byte >> 4, byte & 15).long()
        block = flat // w.block_size
        scale = (w.quantized_scalers[block] / w.quantization_factor[block // w.scaler_block_size]).to(w.dtype)
        return (w.nf4[code] * (scale + w.scaler_mean)).view(*ids.shape, dim)


QUANTIZED_CLASS: dict[type, type] = {nn.Linear: NF4Linear, Conv1D: NF4Conv1D, nn.Embedding: NF4Embedding}


def quantize_module(module: nn.Module, block_size: int, scaler_block_size: int,
                    compute_dtype: torch.dtype | None) -> None:
    """Quantize one nn.Linear / Conv1D in place (same object, same parameter names)."""
    install(module, to_nf4(module.weight, block_size, scaler_block_size), QUANTIZED_CLASS, compute_dtype)


def restore_module(module: nn.Module) -> torch.Tensor:
    """A quantized module back to its dense class (the weight in its original dtype)."""
    return uninstall(module, dequantize_nf4(module.weight))


def settings(module: nn.Module) -> tuple[int, int, torch.dtype | None]:
    """(block_size, scaler_block_size, compute_dtype) of an NF4Linear, to requantize it alike."""
    w = module.weight
    return w.block_size, w.scaler_block_size, module.compute_dtype


def copy_nf4(w: torch.Tensor) -> nn.Parameter:
    """An independent NF4 parameter with the same packed codes and scales."""
    names, ctx = w.__tensor_flatten__()
    inner = {n: getattr(w, n).clone() for n in names}
    return nn.Parameter(type(w).__tensor_unflatten__(inner, ctx, w.shape, w.stride()), requires_grad=False)


def nbytes(w: torch.Tensor) -> int:
    """Bytes an NF4Tensor really holds: packed codes, int8 scales, their factors, mean and table."""
    names, _ = w.__tensor_flatten__()
    return sum(getattr(w, n).numel() * getattr(w, n).element_size() for n in names)
