"""Threshold weight masking (Zhao et al. 2020, "Masking as an Efficient Alternative to Finetuning").

Each targeted weight gets a real-valued score s (float32, trainable); the forward pass uses
W * m with m = 1[s >= threshold] and the base W frozen. The straight-through estimator passes the
gradient of the masked weight through the threshold: dL/ds = dL/d(W m) * W. Scores start at
``init_score`` >= threshold, so the mask starts all ones and the model is exactly the base;
``init_sparsity`` > 0 starts that random fraction masked instead (the paper's option; not the
identity).

``finalize()`` freezes the mask into bit-packed uint8 buffers (numel / 8 bytes a tensor, 1/32 of
the float32 weight); a finalized delta saves only those bits (plus the task head).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..core.config import field_list
from ..core.layer import DeltaLayer
from ..core.registry import register
from ..errors import CheckpointError
from ._sparse_bits import pack_bits, packed_size, unpack_bits
from ._sparse_config import SparseConfig
from ._sparse_store import BufferDict, flat_view
from ._sparse_targets import SparseTargetsDelta


@dataclass
class MaskConfig(SparseConfig):
    """threshold: scores >= threshold keep their weight. init_score: the scores' start value
    (>= threshold: all ones). init_sparsity: fraction of entries that start masked instead."""
    method: ClassVar[str] = "mask"

    params: list[str] | None = field_list(["weight"])
    switch_fraction: ClassVar[float | None] = None  # the bench trains the scores throughout (finalize() only packs them)
    threshold: float = 5e-3
    init_score: float = 1e-2
    init_sparsity: float = 0.0

    def validate(self) -> None:
        super().validate()
        self.check_range("threshold")
        self.check_range("init_score")
        self.check_range("init_sparsity", 0.0, 1.0, high_open=True)
        if self.init_score < self.threshold:
            self._fail("init_score", self.init_score,
                       f"a value >= threshold ({self.threshold}), so that the mask starts all ones")


class _ThresholdMask(torch.autograd.Function):
    """W * 1[s >= t] forward; straight-through backward: grad_s = grad * W, grad_W = grad * m."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
        mask = scores >= threshold
        ctx.save_for_backward(weight, mask)
        return torch.where(mask, weight, 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, mask = ctx.saved_tensors
        g_weight = torch.where(mask, grad, 0.0) if ctx.needs_input_grad[0] else None
        g_scores = (grad * weight).to(torch.float32) if ctx.needs_input_grad[1] else None
        return g_weight, g_scores, None


class MaskLayer(DeltaLayer):
    """Binary masks over some direct parameters of one module: scores while training, bits after."""

    mergeable = True
    exact_unmerge = True  # merge stashes the entries it zeroes

    def __init__(self, module: nn.Module, names: list[str], cfg: MaskConfig):
        super().__init__()
        self.names = list(names)
        self.shapes = {n: tuple(getattr(module, n).shape) for n in names}
        self.threshold = cfg.threshold
        self.scores = nn.ParameterDict({n: nn.Parameter(self._init_scores(getattr(module, n), cfg))
                                        for n in names})
        self.bits = BufferDict()
        self.is_compact = False
        self._stash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _init_scores(p: torch.Tensor, cfg: MaskConfig) -> torch.Tensor:
        scores = torch.full(p.shape, cfg.init_score, dtype=torch.float32, device=p.device)
        if cfg.init_sparsity > 0:  # masked entries start as far below the threshold as the rest above
            off = torch.rand(p.shape, device=p.device) < cfg.init_sparsity
            scores[off] = 2 * cfg.threshold - cfg.init_score - 1e-3
        return scores

    def mask(self, name: str) -> torch.Tensor:
        if self.is_compact:
            return unpack_bits(self.bits.get(name), self.shapes[name])
        return self.scores[name].detach() >= self.threshold

    def params(self, module: nn.Module, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.is_compact:
            return {n: torch.where(self.mask(n), current[n], 0.0) for n in self.names}
        return {n: _ThresholdMask.apply(current[n], self.scores[n], self.threshold) for n in self.names}

    # the compact form: bit-packed masks ------------------------------------------------------------
    def finalize(self) -> None:
        for n in self.names:
            self.bits.set(n, pack_bits(self.mask(n)))
        self.scores = nn.ParameterDict()
        self.is_compact = True

    def compact_sizes(self) -> dict[str, int]:
        return {n: self.bits.get(n).numel() for n in self.names}

    def allocate_compact(self, sizes: dict[str, int]) -> None:
        """Zero bit placeholders of the saved sizes (on the layer's device), for a load to fill."""
        for n in self.names:
            if sizes[n] != packed_size(self.shapes[n]):
                raise CheckpointError(f"saved mask of {n} has {sizes[n]} bytes, expected "
                                      f"{packed_size(self.shapes[n])}: the base model differs.")
            held = self.bits.get(n) if self.is_compact else self.scores[n]
            self.bits.set(n, torch.zeros(sizes[n], dtype=torch.uint8, device=held.device))
        self.scores = nn.ParameterDict()
        self.is_compact = True

    def check_compact(self, where: str) -> None:
        """Nothing to check: every bit pattern is a valid mask (padding bits are ignored)."""

    # merging: zero the masked entries, stash them for an exact unmerge ---------------------------
    @property
    def merged(self) -> bool:
        return bool(self._stash)

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        for n in self.names:
            flat = flat_view(getattr(module, n))
            off = (~self.mask(n)).reshape(-1).nonzero().squeeze(1)
            self._stash[n] = (off, flat.index_select(0, off).clone())
            flat.index_fill_(0, off, 0.0)

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        for n in self.names:
            off, old = self._stash.pop(n)
            flat_view(getattr(module, n)).index_copy_(0, off, old)


class MaskDelta(SparseTargetsDelta):
    config_cls = MaskConfig

    def make_sparse_layer(self, module: nn.Module, names: list[str]) -> MaskLayer:
        return MaskLayer(module, names, self.config)

    def switch(self) -> None:
        self.finalize()

    def finalize(self) -> None:
        """Freeze the current masks into bit-packed buffers (no trainable tensors left but heads)."""
        self.check_switch("finalize()")
        with torch.no_grad():
            for _, lay in self.compact_layers():
                lay.finalize()

    def density(self) -> float:
        """Fraction of the target entries the masks keep."""
        with torch.no_grad():
            kept = sum(int(lay.mask(n).sum()) for _, lay in self.compact_layers() for n in lay.names)
        return kept / self.target_numel()


register("mask", MaskConfig, MaskDelta, family="partial", lr=5e-3,
         paper="Zhao et al. 2020 (Masking as an Efficient Alternative to Finetuning)")
