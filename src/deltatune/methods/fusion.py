"""AdapterFusion (Pfeiffer et al. 2021): attention over several trained adapters' outputs.

Two stages: train adapters one by one; then add a fusion delta and train it with the adapters
frozen: ``dm.add("f", FusionConfig(placement=...)); dm.activate("a", "b", composition="fuse",
fusion="f")`` (activating a Fuse freezes its members until another activate). At each site, with y
the sublayer output and f_i = (member i's output) - y each adapter's contribution:

    out = y + V sum_i softmax_i((Q y) . (K f_i) / T) f_i

Q, K are d x d (with bias, N(0, 0.02) as in AdapterHub), V is d x d initialised to the identity and
pulled towards it by ``value_reg * ||V - I||^2`` (``DeltaModel.regularization()``). Fusing one
adapter (or identical copies of it) gives that adapter exactly at init. Sites come from
``placement`` as for adapters (default "pfeiffer", the paper's adapters); use the members'
placement. With a task head of its own (``modules_to_save``, default: the model's fresh head) the
fusion's head replaces the members' heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.outputs import main_tensor, replace_main
from ..core.delta import Delta
from ..core.layer import CombiningLayer
from ..core.registry import register
from ._sublayers import SublayerConfig, find_sites


@dataclass
class FusionConfig(SublayerConfig):
    """temperature: softmax temperature T. dropout: on the attention scores.
    value_reg: weight of the ||V - I||^2 regularizer."""
    method: ClassVar[str] = "fusion"

    placement: str = "pfeiffer"
    temperature: float = 1.0
    dropout: float = 0.0
    value_reg: float = 0.01

    def validate(self) -> None:
        super().validate()
        self.check_range("temperature", 0, low_open=True)
        self.check_range("dropout", 0.0, 1.0, high_open=True)
        self.check_range("value_reg", 0.0)


class FusionLayer(CombiningLayer):
    """Combines the members' outputs at one site (called by compose.Fuse, never on its own)."""

    def __init__(self, dim: int, cfg: FusionConfig, dtype: torch.dtype):
        super().__init__()
        self.query = nn.Linear(dim, dim, dtype=dtype)
        self.key = nn.Linear(dim, dim, dtype=dtype)
        self.value = nn.Linear(dim, dim, bias=False, dtype=dtype)
        with torch.no_grad():
            for lin in (self.query, self.key):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            self.value.weight.copy_(torch.eye(dim, dtype=dtype))
        self.temperature = cfg.temperature
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def combine(self, module: nn.Module, args: tuple, kwargs: dict, y: Any, outs: list[Any]) -> Any:
        h = main_tensor(y)
        f = torch.stack([main_tensor(o) - h for o in outs], dim=-2)      # (..., N, d)
        scores = (self.query(h).unsqueeze(-2) * self.key(f)).sum(-1)     # (..., N)
        if self.dropout is not None:
            scores = self.dropout(scores)
        probs = F.softmax(scores / self.temperature, dim=-1)
        mixed = (probs.unsqueeze(-1) * f).sum(-2)
        return replace_main(y, h + self.value(mixed))

    def value_distance(self) -> torch.Tensor:
        w = self.value.weight
        return (w - torch.eye(w.shape[0], dtype=w.dtype, device=w.device)).pow(2).sum()


class FusionDelta(Delta):
    config_cls = FusionConfig
    combiner = True

    def build(self, model: nn.Module) -> None:
        for site in find_sites(model, self.config, self.config.method):
            self.add_layer(site.path, FusionLayer(site.dim, self.config, site.dtype))

    def regularization(self) -> torch.Tensor | None:
        terms = [layer.value_distance() for layer in self.layers.values() if isinstance(layer, FusionLayer)]
        if not terms or self.config.value_reg == 0:
            return None
        return self.config.value_reg * torch.stack(terms).sum()


register("fusion", FusionConfig, FusionDelta, family="additive", lr=1e-3,
         paper="Pfeiffer et al. 2021 (AdapterFusion)")
