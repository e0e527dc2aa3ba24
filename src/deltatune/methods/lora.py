"""LoRA (Hu et al. 2021) with rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024) options.

h = W x + s * B A x, with A (r x in) Kaiming-uniform (or Gaussian), B (out x r) zero, and
s = alpha / r (or alpha / sqrt(r) with rsLoRA). DoRA rescales the merged direction per output:
W' = m * (W + sBA) / ||W + sBA||, m initialised to ||W|| (row norms), the norm not back-propagated
(as in the DoRA paper, section 4.3, and peft). Works on nn.Linear, GPT-2's Conv1D and nn.Embedding.
``rank_pattern`` / ``alpha_pattern`` give single modules their own r / alpha, matched as peft does
(a regex matching the end of the module path, first match wins), so peft checkpoints carry over.
"""
from __future__ import annotations

from typing import ClassVar

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.layer import DeltaLayer
from ..core.registry import register
from ..errors import ConfigError
from . import _lora_merge
from ._weights import LowRankLayer, dense_weight, module_dims, writable_weight


@dataclass
class LoRAConfig(DeltaConfig):
    method: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "kaiming"  # or "gaussian" (A ~ N(0, 1/r)), B zero either way
    rank_pattern: dict[str, int] | None = None     # {regex on module path: r}, e.g. {"layer.0.*query": 4}
    alpha_pattern: dict[str, float] | None = None  # {regex on module path: alpha}

    def validate(self) -> None:
        super().validate()
        self.check_range("r", 0, low_open=True, integer=True)
        self.check_range("alpha", 0, low_open=True)
        self.check_range("dropout", 0.0, 1.0, high_open=True)
        self.check_choice("init", ("kaiming", "gaussian"))
        self.check_choice("rslora", (True, False))
        self.check_choice("dora", (True, False))
        self._check_pattern("rank_pattern", integer=True)
        self._check_pattern("alpha_pattern", integer=False)

    def _check_pattern(self, name: str, integer: bool) -> None:
        patterns = getattr(self, name)
        if patterns is None:
            return
        kind = "positive integers" if integer else "positive numbers"
        if not isinstance(patterns, dict):
            self._fail(name, patterns, f"a dict {{module-path regex: value}} of {kind}")
        for key, value in patterns.items():
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if not isinstance(key, str) or isinstance(value, bool) or not ok or value <= 0:
                self._fail(name, patterns, f"a dict {{module-path regex: value}} of {kind}")
            try:
                re.compile(key)
            except re.error as e:
                self._fail(name, patterns, f"valid regexes ({key!r}: {e})")

    @property
    def scaling(self) -> float:
        return self.scaling_for(self.r, self.alpha)

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / (math.sqrt(r) if self.rslora else r)

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """r and alpha of the module at `path`: the first matching pattern, else the defaults."""
        return (_pattern_value(self.rank_pattern, path, self.r),
                _pattern_value(self.alpha_pattern, path, self.alpha))


def _pattern_value(patterns: dict | None, path: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


class LoRALayer(LowRankLayer):
    """s B A on top of the shared low-rank layer: down = s A x, up = B h; lookups on embeddings,
    and DoRA's per-row magnitude, which changes the forward and the merge."""

    def __init__(self, module: nn.Module, cfg: LoRAConfig, r: int | None = None, alpha: float | None = None):
        super().__init__(cfg.dropout)
        r = cfg.r if r is None else r
        alpha = cfg.alpha if alpha is None else alpha
        d_in, d_out = module_dims(module)
        w = module.weight
        self.embedding = isinstance(module, nn.Embedding)
        self.scaling = cfg.scaling_for(r, alpha)
        self.lora_A = nn.Parameter(torch.empty(r, d_in, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, dtype=w.dtype, device=w.device))
        if self.embedding:  # as peft: A zero, B normal, so that lookups start at zero
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)
        elif cfg.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if cfg.dora:
            if self.embedding:
                raise ConfigError("DoRA supports Linear and Conv1D modules, not Embedding: "
                                  "exclude embeddings from targets or set dora=False.")
            with torch.no_grad():
                self.magnitude = nn.Parameter(dense_weight(module).norm(dim=1))
        else:
            self.magnitude = None
        self._merged_norm: torch.Tensor | None = None

    def update(self) -> torch.Tensor:
        """s * B A as (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.lora_A) * self.scaling

    def up(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.lora_B)

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding:  # token ids, not features: look up A's columns (no dropout on ids)
            return F.embedding(x, self.lora_A.T) @ self.lora_B.T * self.scaling
        return super().low_rank(x)

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.magnitude is None:
            return super().post(module, x, y)
        return y + self._dora(module, x, y)

    def _dora(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = dense_weight(module)
        norm = (w + self.update().to(w.dtype)).norm(dim=1).detach()
        scale = self.magnitude / norm
        if self.dropout is None:
            bias = getattr(module, "bias", None)
            base = y - bias if bias is not None else y
        else:
            x = self.dropout(x)
            base = F.linear(x, w)
        return (scale - 1) * base + scale * self.up(self.down(x))

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        if self.magnitude is None:
            return super().merge(module)
        w = writable_weight(module)
        new = w + self.update().to(w.dtype)
        self._merged_norm = new.norm(dim=1)
        w.copy_(new * (self.magnitude / self._merged_norm).unsqueeze(1))

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        if self.magnitude is not None and self._merged_norm is not None:
            w = writable_weight(module, "unmerge from")
            w.copy_(w * (self._merged_norm / self.magnitude).unsqueeze(1))
            self._merged_norm = None
        super().unmerge(module)


class LoRADelta(Delta):
    config_cls = LoRAConfig

    default_roles = ("query", "value")
    supported_types = (nn.Linear, Conv1D, nn.Embedding)

    def make_layer(self, path: str, module: nn.Module) -> DeltaLayer:
        return LoRALayer(module, self.config, *self.config.rank_alpha(path))

    @classmethod
    def weighted(cls, name, deltas, weights, model, how="linear", **options):
        """linear (exact factor concatenation), svd, ties or dare: see methods/_lora_merge.py."""
        return _lora_merge.weighted(cls, LoRALayer, name, deltas, weights, model, how=how, **options)


register("lora", LoRAConfig, LoRADelta, family="reparameterized", lr=5e-3, paper="Hu et al. 2021 (LoRA); "
         "Kalajdzievski 2023 (rsLoRA); Liu et al. 2024 (DoRA)")
