"""Pieces shared by the hybrid methods (mam, unipelt): learned gates and gated prefixes.

A ``Gate`` is UniPELT's (Mao et al. 2022, and its reference code): G = mean over the sequence of
sigmoid(W h + b), one scalar per example, W ~ N(0, 0.02) and b = 0, so G is about 0.5 at init.
Padding positions count in the mean, as in the reference code (the gate sees only hidden states).

A gated prefix is the ``prefix`` method's model-level KV-cache prefix plus, at every attention
module, a ``PrefixGate`` that multiplies that layer's prefix keys and values by the gate computed
from the attention input, just before the module reads its cache (the reference scales
P_K and P_V the same way). On a generation step that continues a cache, the prefix in the cache
keeps the gate of the call that filled it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..core.layer import DeltaLayer, first_input
from ..errors import TargetError
from ._sublayers import SublayerConfig, find_sites
from ._soft import CACHE_KEYS
from .prefix import scale_prefix

GATE_STD = 0.02


class Gate(nn.Module):
    """h (batch, seq, d) -> (batch, 1, 1): the sequence mean of sigmoid(W h + b)."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.proj = nn.Linear(dim, 1, dtype=dtype)
        with torch.no_grad():
            nn.init.normal_(self.proj.weight, std=GATE_STD)
            nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.proj(h.to(self.proj.weight.dtype)))
        return g.mean(dim=-2, keepdim=True) if g.dim() >= 3 else g


def attention_modules(model: nn.Module, layers: list[int] | None, method: str) -> list[str]:
    """The modules that read the KV cache, one per block: the attention module itself."""
    cfg = SublayerConfig(placement="parallel", sites=["attn"], layers=layers)
    try:
        return [site.input_path for site in find_sites(model, cfg, method)]
    except TargetError as e:
        raise TargetError(f"method {method!r} gates the prefix at each attention module: {e}") from None


class PrefixGate(DeltaLayer):
    """On an attention module: scales this layer's prefix in the cache by the gate (first call only).

    The model-level PrefixLayer leaves the cache it filled in the call context under `key`."""

    def __init__(self, key: str, dim: int, index: int, dtype: torch.dtype):
        super().__init__()
        self.gate = Gate(dim, dtype)
        self.key = key
        self.index = index

    def forward_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # a read-only prefix cache comes in the call itself (also when gradient checkpointing
        # replays the layer, after the call context is gone); a generation cache is this call's
        # only if the prefix layer filled it just now (not on a continued generation step)
        cache = next((v for v in map(kwargs.get, CACHE_KEYS) if hasattr(v, "scale_prefix")), None)
        filled = self.call_context().get(self.key)
        cache = cache if cache is not None else (filled[0] if filled is not None else None)
        if cache is None:
            return args, kwargs
        idx = getattr(module, "layer_idx", self.index)
        h = kwargs.get("hidden_states", first_input(args, kwargs))
        g = self.gate(h).reshape(-1, 1, 1, 1).to(cache.layers[idx].keys.dtype)
        scale_prefix(cache, idx, g)
        return args, kwargs


def gate_prefix(add: Any, key: str, model: nn.Module, layers: list[int] | None,
                method: str, dim: int, dtype: torch.dtype) -> None:
    """Add a PrefixGate on every attention module through ``add(path, layer)``; `key`: the prefix
    layer's call-context key."""
    for i, path in enumerate(attention_modules(model, layers, method)):
        add(path, PrefixGate(key, dim, i, dtype))
