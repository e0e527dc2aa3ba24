"""SparseAdapter (He et al. 2022): bottleneck adapters pruned at initialization.

Each adapter projection keeps exactly ``round((1 - sparsity) * numel)`` of its weight entries (per
matrix; biases stay dense) under a fixed binary mask; the pruned entries are zero and get no
gradient. With ``same_budget=True`` (the paper's "Large-Sparse" setting) the bottleneck grows to
``(hidden // reduction_factor) / (1 - sparsity)``, so the kept weights match the dense adapter's.

Criteria: ``"snip"`` (Lee et al. 2019) scores each entry by |g * w0| from the first training
batch: a gradient hook records g during the first backward pass and the masks are set at the
first ``DeltaModel.step`` (any loop that calls it: the bench's does), so no extra call is needed.
The up-projection starts at zero (the identity at init), where |g * w0| = 0 for every entry: its
score is |g|, the size of the entry's first gradient step. ``"magnitude"`` prunes by |w0| at build
time (the zero up-projection is pruned at random: magnitude says nothing there); ``"random"``
draws the masks. ``delta.prune()`` prunes now (from the gradients recorded so far, for SNIP).

A projection saves only its kept entries: sorted flat int32 indices + values (+ the dense bias),
so a file grows with the kept weights. Adapters are non-linear: no merge into the base.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.registry import register
from ..errors import CheckpointError, ConfigError
from ._sparse_index import check_indices
from .adapter import AdapterConfig, AdapterDelta, linear_projection


@dataclass
class SparseAdapterConfig(AdapterConfig):
    """sparsity: fraction of each projection's weight entries pruned. criterion: "snip" |
    "magnitude" | "random". same_budget: widen the bottleneck by 1 / (1 - sparsity) (when
    ``bottleneck`` is not given), so the kept weights equal the dense adapter's. seed: for the
    random masks."""
    method: ClassVar[str] = "sparse_adapter"

    sparsity: float = 0.5
    criterion: str = "snip"
    same_budget: bool = True
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        self.check_range("sparsity", 0.0, 1.0, high_open=True)
        self.check_choice("criterion", ("snip", "magnitude", "random"))
        self.check_choice("same_budget", (True, False))
        self.check_range("seed", 0, integer=True)

    def bottleneck_size(self, dim: int) -> int:
        size = super().bottleneck_size(dim)
        if self.bottleneck is None and self.same_budget:
            size = max(1, round(size / (1.0 - self.sparsity)))
        return size


class MaskedLinear(nn.Module):
    """y = x (W * M)^T + b with a fixed binary mask M of exactly ``keep`` ones."""

    def __init__(self, lin: nn.Linear, sparsity: float):
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias
        self.keep = lin.weight.numel() - round(sparsity * lin.weight.numel())
        self.register_buffer("mask", torch.ones_like(lin.weight, dtype=torch.bool), persistent=False)
        self.register_buffer("init", lin.weight.detach().clone(), persistent=False)  # w0 (small)
        self.grad: torch.Tensor | None = None
        self._hook: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)

    def record_gradients(self) -> None:
        def keep(g: torch.Tensor) -> None:
            self.grad = g.detach().abs() if self.grad is None else self.grad + g.detach().abs()
        self._hook = self.weight.register_hook(keep)

    def snip_scores(self) -> torch.Tensor:
        if self.grad is None:
            raise ConfigError("sparse_adapter (criterion='snip') has seen no gradient yet: run one "
                              "backward pass on a training batch before prune(), or pick "
                              "criterion='magnitude'.")
        return self.grad * self.init.abs() if self.init.any() else self.grad

    @torch.no_grad()
    def prune(self, scores: torch.Tensor) -> None:
        """Keep the ``keep`` highest-scoring entries; zero the others."""
        idx = torch.topk(scores.flatten().float(), self.keep, sorted=False).indices
        self.set_mask(idx)
        self.weight.mul_(self.mask)
        if self._hook is not None:
            self._hook.remove()
        self.grad, self._hook, self.init = None, None, self.init.new_empty(0)

    def set_mask(self, idx: torch.Tensor) -> None:
        mask = torch.zeros(self.weight.numel(), dtype=torch.bool, device=self.weight.device)
        mask[idx.long()] = True
        self.mask = mask.view_as(self.weight)

    # saved as kept entries only: "<prefix>idx" (int32), "<prefix>val", "<prefix>bias"
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        idx = self.mask.flatten().nonzero().squeeze(1)
        w = self.weight if keep_vars else self.weight.detach()
        destination[prefix + "idx"] = idx.to(torch.int32)
        destination[prefix + "val"] = w.flatten()[idx]
        destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        keys = [prefix + k for k in ("idx", "val", "bias")]
        missing = [k for k in keys if k not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        idx, val, bias = (state_dict[k] for k in keys)
        i = idx.long()
        check_indices(i, self.weight.numel(), f"{prefix}idx")
        if i.shape != val.shape:
            raise CheckpointError(f"{prefix}idx and {prefix}val hold {i.numel()} and {val.numel()} "
                                  f"entries, not one value an index: the checkpoint is corrupt.")
        with torch.no_grad():
            self.set_mask(i)
            self.weight.zero_().view(-1)[i] = val.to(self.weight.dtype)
            self.bias.copy_(bias)


class SparseAdapterDelta(AdapterDelta):
    config_cls = SparseAdapterConfig

    def projection(self, d_in: int, d_out: int, up: bool) -> nn.Module:
        cfg = self.config
        lin = MaskedLinear(linear_projection(d_in, d_out, up, cfg.init), cfg.sparsity)
        if cfg.criterion == "snip":
            lin.record_gradients()
        return lin

    def build(self, model: nn.Module) -> None:
        super().build(model)
        self.pruned = False
        if self.config.criterion != "snip":
            self.prune()

    def masked(self) -> list[MaskedLinear]:
        return [m for m in self.modules() if isinstance(m, MaskedLinear)]

    def prune(self) -> None:
        """Set every mask now (by the config's criterion); a no-op once pruned."""
        if self.pruned:
            return
        g = torch.Generator().manual_seed(self.config.seed)
        for m in self.masked():
            crit = self.config.criterion
            if crit == "magnitude" and not m.init.any():
                crit = "random"  # the zero up-projection: magnitudes are all equal
            scores = {"snip": m.snip_scores, "magnitude": lambda: m.init.abs(),
                      "random": lambda: torch.rand(m.weight.shape, generator=g)}[crit]()
            m.prune(scores)
        self.pruned = True

    def on_step(self, step: int) -> None:
        self.prune()

    def masked_count(self) -> int:
        return sum(m.weight.numel() - m.keep for m in self.masked())  # also before SNIP prunes

    def extra_state(self) -> dict[str, Any]:
        return {"pruned": self.pruned}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("pruned"):  # the file holds `keep` entries a projection: shape the masks so
            for m in self.masked():
                m.prune(torch.zeros(m.weight.shape))
            self.pruned = True


register("sparse_adapter", SparseAdapterConfig, SparseAdapterDelta, family="hybrid", lr=5e-3,
         paper="He et al. 2022 (SparseAdapter)")
