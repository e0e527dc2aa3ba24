"""Group-wise INT quantization (min-max, asymmetric): the base format of QA-LoRA (Xu et al. 2023,
"QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models", section 3.3).

Each row of a weight W (out, in) is cut into groups of ``group_size`` consecutive input columns. A
group keeps integer codes q in [0, 2^bits - 1], a scale α = (max - min) / (2^bits - 1) and a zero
point β = min, both in floating point:  W̃ = α q + β,  q = clamp(round((W - β) / α)).  The codes
are packed 8 // bits to a byte (bits 2, 4 or 8), so INT4 with group 32 and fp32 scales holds 0.75
bytes per weight. β stays a float (GPTQ rounds its zeros to integers): a constant added to every
weight of a group, which is what a QA-LoRA adapter is once merged, then changes β alone and the
weight stays in this format exactly, codes and scales untouched (methods/qalora.py).

A quantized ``nn.Linear`` / GPT-2 ``Conv1D`` keeps its identity (hooks, parents, state_dict keys);
its class becomes ``IntLinear`` / ``IntConv1D`` and its weight a ``GroupQuantTensor``: a tensor of
the dense weight's shape and dtype that holds the codes, scales and zeros, dequantized by the
forward (and again by the backward, instead of keeping the dense weight alive). Only moves and
casts (``.to``, ``.half()``), detach / clone and copies between such tensors are defined on it;
anything else is refused with the fix (dequantize first).
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from .modules import QuantModule, install, uninstall

BITS = (2, 4, 8)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) codes in [0, 2^bits) -> (rows, n * bits / 8) bytes, the first code highest."""
    per = 8 // bits
    if per == 1:
        return q.to(torch.uint8)
    shifts = torch.arange(per - 1, -1, -1, device=q.device, dtype=torch.uint8) * bits
    q = q.to(torch.uint8).view(q.shape[0], -1, per)
    return (q << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of ``pack``: (rows, n) uint8 codes."""
    per = 8 // bits
    if per == 1:
        return codes
    shifts = torch.arange(per - 1, -1, -1, device=codes.device, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    return ((codes.unsqueeze(-1) >> shifts) & mask).view(codes.shape[0], -1)


def quantize_groups(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed codes, scale α, zero β) of an (out, in) weight; α and β are (out, in / group_size)
    in w's dtype, computed in float32. A constant group gets α = 1 and codes 0 (W̃ = β exactly)."""
    rows, n = w.shape
    g = w.detach().float().contiguous().view(rows, n // group_size, group_size)
    low, high = g.amin(dim=-1), g.amax(dim=-1)
    levels = (1 << bits) - 1
    scale = (high - low) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((g - low.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, levels)
    return pack(q.view(rows, n), bits), scale.to(w.dtype), low.to(w.dtype)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                      group_size: int) -> torch.Tensor:
    """α q + β as an (out, in) tensor in the scales' dtype."""
    q = unpack(codes, bits)
    rows, n = q.shape
    w = q.view(rows, n // group_size, group_size).to(scale.dtype) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
    return w.view(rows, n)


class GroupQuantTensor(torch.Tensor):
    """A weight stored as group-wise INT codes: ``codes`` (out, in * bits / 8) uint8, ``scale`` and
    ``zero`` (out, in / group_size). Its shape is the stored weight's: (out, in) for nn.Linear,
    (in, out) for Conv1D (``transposed``); ``dequantize()`` gives that dense tensor back."""

    @staticmethod
    def __new__(cls, codes, scale, zero, bits, group_size, transposed, shape, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=codes.device,
                                                   requires_grad=False)

    def __init__(self, codes, scale, zero, bits, group_size, transposed, shape, dtype):
        self.codes, self.scale, self.zero = codes, scale, zero
        self.bits, self.group_size, self.transposed = bits, group_size, transposed

    # -- what it is -----------------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = dequantize_groups(self.codes, self.scale, self.zero, self.bits, self.group_size)
        w = w.T if self.transposed else w
        return w if dtype is None or dtype == w.dtype else w.to(dtype)

    def nbytes_held(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def __repr__(self, *, tensor_contents=None) -> str:
        return (f"GroupQuantTensor(int{self.bits}, group_size={self.group_size}, shape={tuple(self.shape)}, "
                f"dtype={self.dtype})")

    def _like(self, codes, scale, zero, dtype=None) -> GroupQuantTensor:
        return GroupQuantTensor(codes, scale, zero, self.bits, self.group_size, self.transposed, self.shape,
                                dtype or self.dtype)

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        new = self._like(self.codes.clone(), self.scale.clone(), self.zero.clone())
        if getattr(self, "_is_param", False):
            new = nn.Parameter(new, requires_grad=False)
        memo[id(self)] = new
        return new

    # -- the tensor-subclass protocol (torch.compile / FSDP flatten it; Module._apply swaps it) ---
    def __tensor_flatten__(self):
        return ["codes", "scale", "zero"], (self.bits, self.group_size, self.transposed, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        bits, group_size, transposed, dtype = ctx
        return GroupQuantTensor(inner["codes"], inner["scale"], inner["zero"], bits, group_size, transposed,
                                outer_size, dtype)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        t = args[0]
        if func in (aten.detach.default, aten.alias.default):
            return t._like(func(t.codes), func(t.scale), func(t.zero))
        if func is aten.clone.default:
            return t._like(t.codes.clone(), t.scale.clone(), t.zero.clone())
        if func is aten._to_copy.default:
            device, dtype = kwargs.get("device"), kwargs.get("dtype")
            if dtype is not None and not dtype.is_floating_point:
                raise NotImplementedError(f"a group-quantized weight has no {dtype} form: dequantize it first.")
            move = dict(device=device, copy=True) if device is not None else dict(copy=True)
            return t._like(t.codes.to(**move), t.scale.to(dtype=dtype, **move), t.zero.to(dtype=dtype, **move),
                           dtype)
        if func is aten.copy_.default and isinstance(args[1], GroupQuantTensor):
            src = args[1]
            if (src.bits, src.group_size, src.transposed, tuple(src.shape)) != (
                    t.bits, t.group_size, t.transposed, tuple(t.shape)):
                raise NotImplementedError("copying between group-quantized weights of other layouts.")
            t.codes.copy_(src.codes)
            t.scale.copy_(src.scale)
            t.zero.copy_(src.zero)
            return t
        raise NotImplementedError(
            f"{func} is not defined on a group-quantized (int{t.bits}) weight: dequantize it first "
            f"(deltatune.dequantize(model), or deltatune.quant.dense(weight) for one tensor).")


class _MatmulGroupInt(torch.autograd.Function):
    """x @ W.T (nn.Linear) or x @ W (Conv1D) with W dequantized on the fly, in forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: GroupQuantTensor, in_out: bool) -> torch.Tensor:
        ctx.w, ctx.in_out = w, in_out  # frozen: no autograd through it, so no saved-tensor packing
        d = w.dequantize(x.dtype)
        return x @ d if in_out else F.linear(x, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        d = ctx.w.dequantize(grad.dtype)
        return (grad @ d.T if ctx.in_out else grad @ d), None, None


class _IntModule(QuantModule):
    """Shared by IntLinear / IntConv1D."""

    matmul = _MatmulGroupInt

    def format_repr(self) -> str:
        w = self.weight
        return f"int{w.bits}(group_size={w.group_size}, compute_dtype={self.compute_dtype or w.dtype})"


class IntLinear(_IntModule, nn.Linear):
    dense_class = nn.Linear


class IntConv1D(_IntModule, Conv1D):
    dense_class = Conv1D
    in_out = True


QUANTIZED_CLASS: dict[type, type] = {nn.Linear: IntLinear, Conv1D: IntConv1D}


def in_features(module: nn.Module) -> int:
    w = module.weight
    return w.shape[0] if isinstance(module, Conv1D) else w.shape[1]


def fits(module: nn.Module, group_size: int) -> bool:
    """Whole groups along the input dimension of a 2-D weight."""
    return module.weight.dim() == 2 and in_features(module) % group_size == 0


def quantize_module(module: nn.Module, bits: int, group_size: int, compute_dtype: torch.dtype | None) -> None:
    """Quantize one nn.Linear / Conv1D in place (same object, same parameter names)."""
    transposed = isinstance(module, Conv1D)
    w = module.weight.detach()
    codes, scale, zero = quantize_groups(w.T if transposed else w, bits, group_size)
    install(module, GroupQuantTensor(codes, scale, zero, bits, group_size, transposed, w.shape, w.dtype),
            QUANTIZED_CLASS, compute_dtype)


def restore_module(module: nn.Module) -> torch.Tensor:
    """A quantized module back to its dense class (the weight dequantized, in its dtype)."""
    return uninstall(module, module.weight.dequantize().contiguous())


def settings(module: nn.Module) -> tuple[int, int, torch.dtype | None]:
    """(bits, group_size, compute_dtype) of a quantized module, to requantize it alike."""
    w = module.weight
    return w.bits, w.group_size, module.compute_dtype


def is_group_quant(t: object) -> bool:
    return isinstance(t, GroupQuantTensor)


