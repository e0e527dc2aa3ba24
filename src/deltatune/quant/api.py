"""quantize / dequantize / merge_quantized / memory_report: the public face of quantized bases."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..core import arch
from ..core.targets import name_matches
from ..errors import ConfigError, MergeError, did_you_mean
from . import nf4

SCHEMES = ("nf4",)
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
             block_size: int = 64, scaler_block_size: int = 256,
             skip: list[str] | str | None = None, embeddings: bool = False) -> nn.Module:
    """Store the frozen base's nn.Linear (and GPT-2 Conv1D) weights in NF4, in place; returns `model`.

    compute_dtype: the dtype the matmuls run in (None: the weight's own dtype); outputs come back in
        the input's dtype. block_size: values per absmax scale (64 as in QLoRA); scaler_block_size:
        scales per second-level scale (256). skip: module-name suffixes or a regex kept dense, on top
        of the task head, the output embedding (lm_head) and tied weights, which always stay dense.
        embeddings: quantize nn.Embedding tables too (QLoRA keeps them dense; in a small model with
        a large vocabulary they are most of the memory).
    Works on a plain model (quantize before ``wrap``) or a DeltaModel (its base). Modules whose size
    is not a multiple of block_size stay dense.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}.{did_you_mean(scheme, SCHEMES)} "
                          f"Available: {', '.join(SCHEMES)}.")
    if not (isinstance(block_size, int) and block_size > 0 and block_size % 2 == 0):
        raise ConfigError(f"block_size={block_size!r} is invalid: expected a positive even integer (64).")
    if not (isinstance(scaler_block_size, int) and scaler_block_size > 0):
        raise ConfigError(f"scaler_block_size={scaler_block_size!r} is invalid: expected a positive integer (256).")
    dtype = _compute_dtype(compute_dtype)
    base, dm = _base(model)
    if dm is not None and dm.merged:
        raise MergeError(f"deltas {list(dm.merged)} are merged into the base: unmerge() before quantizing.")
    keep = _kept_dense(base, skip)
    kinds = set(nf4.QUANTIZED_CLASS) - (set() if embeddings else {nn.Embedding})
    done = 0
    for _, m in base.named_modules():
        if type(m) in kinds and id(m) not in keep and nf4.fits(m, block_size):
            nf4.quantize_module(m, block_size, scaler_block_size, dtype)
            done += 1
    if not done:
        raise ConfigError(f"quantize found no nn.Linear / Conv1D weight to quantize in {type(base).__name__} "
                          f"(heads, lm_head, tied weights and `skip` stay dense; sizes must be "
                          f"multiples of block_size={block_size}).")
    return model


def quantized_modules(model: nn.Module) -> list[str]:
    """Paths of the modules whose weight is quantized."""
    base, _ = _base(model)
    return [n for n, m in base.named_modules() if isinstance(m, nf4._NF4Module)]


def dequantize(model: nn.Module, modules: list[str] | None = None) -> nn.Module:
    """Dense weights back (in their original dtype), for all or some quantized modules; returns `model`."""
    base, _ = _base(model)
    for path in quantized_modules(base) if modules is None else modules:
        nf4.restore_module(base.get_submodule(path))
    return model


@dataclass
class MergeReport:
    """What merge_quantized did: the modules it touched and, when requantized, the rounding error
    of the merged weights (max |W_nf4 - W| and ||W_nf4 - W||_F / ||W||_F over those modules)."""

    modules: list[str]
    requantized: bool
    max_abs_error: float = 0.0
    rel_error: float = 0.0
    per_module: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        what = (f"requantized to NF4: max abs error {self.max_abs_error:.3g}, relative "
                f"{self.rel_error:.3g}" if self.requantized else "kept dense (exact merge)")
        return f"merged into {len(self.modules)} quantized module(s), {what}"


def merge_quantized(dm, name: str | None = None, requantize: bool = True) -> MergeReport:
    """Merge a delta (default: the active ones) into a quantized base: dequantize the modules it
    touches, merge exactly, then requantize them (``requantize=True``: the base stays 4-bit, the
    merged weights carry NF4 rounding, reported; unmerge is no longer possible) or keep them dense.
    """
    from ..core.delta import key_to_path

    names = [name] if name is not None else [n for n in dm.active if n not in dm.merged]
    quantized = set(quantized_modules(dm.model))
    paths = sorted({key_to_path(k) for n in names for k in dm.get_delta(n).layers} & quantized)
    saved = {p: nf4.settings(dm.model.get_submodule(p)) for p in paths}
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
    out = {}
    for path, (block, scaler, dtype) in saved.items():
        m = base.get_submodule(path)
        exact = m.weight.detach().clone()
        nf4.quantize_module(m, block, scaler, dtype)
        out[path] = (exact, nf4.dequantize_nf4(m.weight))
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
        if nf4.nf4_type() is not None and isinstance(t, nf4.nf4_type()):
            q, qf = q + nf4.nbytes(t), qf + 4 * t.numel()
        else:
            size = t.numel() * t.element_size()
            o, of = o + size, of + (4 * t.numel() if t.is_floating_point() else size)
    return MemoryReport(q, qf, o, of)
