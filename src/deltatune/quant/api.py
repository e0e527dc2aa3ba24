"""quantize / dequantize / merge_quantized / memory_report: the public face of quantized bases."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..core import arch
from ..core.targets import name_matches
from ..errors import ConfigError, MergeError, did_you_mean
from . import intq, nf4

INT_SCHEMES = {f"int{b}": b for b in intq.BITS}  # group-wise min-max INT (quant/intq.py)
SCHEMES = ("nf4", *INT_SCHEMES)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _base(model: nn.Module) -> tuple[nn.Module, Any]:
    """(the plain base module, the DeltaModel or None)."""
    from ..core.model import DeltaModel

    return (model.model, model) if isinstance(model, DeltaModel) else (model, None)


def _compute_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str) and value.replace("torch.", "") in _DTYPES:
        return _DTYPES[value.replace("torch.", "")]
    raise ConfigError(f"compute_dtype={value!r} is invalid: use None (the weight's dtype), "
                      f"torch.bfloat16, torch.float16 or torch.float32 (or their names).")


def _kept_dense(model: nn.Module, skip: list[str] | str | None) -> set[int]:
    """ids of modules quantize() leaves alone: task heads, the output embedding, tied weights."""
    keep = {id(m) for h in arch.head_modules(model) for m in getattr(model, h).modules()}
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(out, nn.Module):
        keep.add(id(out))
    owners: dict[int, list[nn.Module]] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(m)
    keep |= {id(m) for ms in owners.values() if len(ms) > 1 for m in ms}
    if skip:
        keep |= {id(m) for n, m in model.named_modules() if n and name_matches(n, skip)}
    return keep


def quantize(model: nn.Module, scheme: str = "nf4", *, compute_dtype: torch.dtype | str | None = None,
             block_size: int = 64, scaler_block_size: int = 256, group_size: int = 32,
             skip: list[str] | str | None = None, embeddings: bool = False) -> nn.Module:
    """Store the frozen base's nn.Linear (and GPT-2 Conv1D) weights in 4 bits, in place; returns `model`.

    scheme: "nf4" (QLoRA's NormalFloat, torchao's NF4Tensor) or "int2" / "int4" / "int8" (group-wise
        min-max INT with float scales and zero points, quant/intq.py: QA-LoRA's base format).
    compute_dtype: the dtype the matmuls run in (None: the weight's own dtype); outputs come back in
        the input's dtype. block_size: NF4 values per absmax scale (64 as in QLoRA);
        scaler_block_size: NF4 scales per second-level scale (256). group_size: INT input columns
        per scale and zero point (32 as in QA-LoRA). skip: module-name suffixes or a regex kept
        dense, on top of the task head, the output embedding (lm_head) and tied weights, which
        always stay dense. embeddings: quantize nn.Embedding tables too (NF4 only; QLoRA keeps them
        dense; in a small model with a large vocabulary they are most of the memory).
    Works on a plain model (quantize before ``wrap``) or a DeltaModel (its base). Modules whose size
    is not a multiple of block_size (NF4) or whose input size is not one of group_size (INT) stay dense.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}.{did_you_mean(scheme, SCHEMES)} "
                          f"Available: {', '.join(SCHEMES)}.")
    if not (isinstance(block_size, int) and block_size > 0 and block_size % 2 == 0):
        raise ConfigError(f"block_size={block_size!r} is invalid: expected a positive even integer (64).")
    if not (isinstance(scaler_block_size, int) and scaler_block_size > 0):
        raise ConfigError(f"scaler_block_size={scaler_block_size!r} is invalid: expected a positive integer (256).")
    bits = INT_SCHEMES.get(scheme)
    if bits is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % (8 // bits):
            raise ConfigError(f"group_size={group_size!r} is invalid: expected a positive integer, a multiple "
                              f"of {8 // bits} for {scheme} (codes packed {8 // bits} to a byte; 32 as in QA-LoRA).")
        if embeddings:
            raise ConfigError(f"embeddings=True quantizes embedding tables to NF4 only: use scheme='nf4', "
                              f"or leave embeddings=False with {scheme!r} (Linear / Conv1D weights).")
    dtype = _compute_dtype(compute_dtype)
    base, dm = _base(model)
    if dm is not None and dm.merged:
        raise MergeError(f"deltas {list(dm.merged)} are merged into the base: unmerge() before quantizing.")
    keep = _kept_dense(base, skip)
    nf4_kinds = set(nf4.QUANTIZED_CLASS) - (set() if embeddings else {nn.Embedding})
    done = 0
    for _, m in base.named_modules():
        if id(m) in keep:
            continue
        if bits is None and type(m) in nf4_kinds and nf4.fits(m, block_size):
            nf4.quantize_module(m, block_size, scaler_block_size, dtype)
        elif bits is not None and type(m) in intq.QUANTIZED_CLASS and intq.fits(m, group_size):
            intq.quantize_module(m, bits, group_size, dtype)
        else:
            continue
        done += 1
    if not done:
        size = f"block_size={block_size}" if bits is None else f"group_size={group_size} (input features)"
        raise ConfigError(f"quantize found no nn.Linear / Conv1D weight to quantize in {type(base).__name__} "
                          f"(heads, lm_head, tied weights and `skip` stay dense; sizes must be "
                          f"multiples of {size}).")
    return model


def _kind(module: nn.Module):
    """The module that quantizes / restores this quantized module (nf4 or intq), or None."""
    if isinstance(module, nf4._NF4Module):
        return nf4
    if isinstance(module, intq._IntModule):
        return intq
    return None


def quantized_modules(model: nn.Module) -> list[str]:
    """Paths of the modules whose weight is quantized."""
    base, _ = _base(model)
    return [n for n, m in base.named_modules() if _kind(m) is not None]


def dequantize(model: nn.Module, modules: list[str] | None = None) -> nn.Module:
    """Dense weights back (in their original dtype), for all or some quantized modules; returns `model`."""
    base, _ = _base(model)
    for path in quantized_modules(base) if modules is None else modules:
        m = base.get_submodule(path)
        _kind(m).restore_module(m)
    return model


@dataclass
class MergeReport:
    """What merge_quantized did: the modules it touched and, when requantized, the rounding error
    of the merged weights (max |W_q - W| and ||W_q - W||_F / ||W||_F over those modules)."""

    modules: list[str]
    requantized: bool
    max_abs_error: float = 0.0
    rel_error: float = 0.0
    per_module: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        what = (f"requantized: max abs error {self.max_abs_error:.3g}, relative "
                f"{self.rel_error:.3g}" if self.requantized else "kept dense (exact merge)")
        return f"merged into {len(self.modules)} quantized module(s), {what}"


def merge_quantized(dm, name: str | None = None, requantize: bool = True) -> MergeReport:
    """Merge a delta (default: the active ones) into a quantized base: dequantize the modules it
    touches, merge exactly, then requantize them (``requantize=True``: the base stays 4-bit, the
    merged weights carry the format's rounding, reported; unmerge is no longer possible) or keep
    them dense. (A QA-LoRA delta on an INT base needs none of this: ``dm.merge()`` keeps the format.)
    """
    from ..core.delta import key_to_path

    names = [name] if name is not None else [n for n in dm.active if n not in dm.merged]
    quantized = set(quantized_modules(dm.model))
    paths = sorted({key_to_path(k) for n in names for k in dm.get_delta(n).layers} & quantized)
    saved = {}
    for p in paths:
        m = dm.model.get_submodule(p)
        saved[p] = (_kind(m), _kind(m).settings(m))
    dequantize(dm.model, paths)
    try:
        for n in names:
            dm.merge(n, exact=not requantize)  # requantized: never unmerged, so keep no copy
    except Exception:
        _requantize(dm.model, saved)
        raise
    if not requantize:
        return MergeReport(paths, False)
    return _report(paths, _requantize(dm.model, saved))


def _requantize(base: nn.Module, saved: dict[str, tuple]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from . import dense

    out = {}
    for path, (kind, options) in saved.items():
        m = base.get_submodule(path)
        exact = m.weight.detach().clone()
        kind.quantize_module(m, *options)
        out[path] = (exact, dense(m.weight))
    return out


def _report(paths: list[str], pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> MergeReport:
    per = {p: (q - w).abs().max().item() for p, (w, q) in pairs.items()}
    num = sum(((q - w).float() ** 2).sum().item() for w, q in pairs.values())
    den = sum((w.float() ** 2).sum().item() for w, _ in pairs.values())
    return MergeReport(paths, True, max(per.values(), default=0.0), (num / max(den, 1e-30)) ** 0.5, per)


@dataclass
class MemoryReport:
    """Tensor bytes of a model's parameters and buffers: quantized weights (as stored) vs the same
    weights in fp32, and everything else."""

    quantized_bytes: int
    quantized_fp32_bytes: int
    other_bytes: int
    other_fp32_bytes: int

    @property
    def quantized_ratio(self) -> float:
        """Size of the quantized weights relative to fp32."""
        return self.quantized_bytes / max(self.quantized_fp32_bytes, 1)

    @property
    def ratio(self) -> float:
        """Size of the whole model relative to all-fp32."""
        return (self.quantized_bytes + self.other_bytes) / max(self.quantized_fp32_bytes + self.other_fp32_bytes, 1)


def memory_report(model: nn.Module) -> MemoryReport:
    base, _ = _base(model)
    q = qf = o = of = 0
    seen: set[int] = set()
    for t in list(base.parameters()) + list(base.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, intq.GroupQuantTensor):
            q, qf = q + t.nbytes_held(), qf + 4 * t.numel()
        elif nf4.nf4_type() is not None and isinstance(t, nf4.nf4_type()):
            q, qf = q + nf4.nbytes(t), qf + 4 * t.numel()
        else:
            size = t.numel() * t.element_size()
            o, of = o + size, of + (4 * t.numel() if t.is_floating_point() else size)
    return MemoryReport(q, qf, o, of)
