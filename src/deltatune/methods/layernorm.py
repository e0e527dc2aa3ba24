"""LayerNorm tuning (Zhao et al. 2024; Qi et al. 2022): train only the normalisation layers' gain
and bias (LayerNorm, RMSNorm, T5LayerNorm)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..core import arch
from ..core.registry import register
from .partial import PartialConfig, PartialDelta


@dataclass
class LayerNormConfig(PartialConfig):
    method: ClassVar[str] = "layernorm"

    def __post_init__(self) -> None:
        super(PartialConfig, self).__post_init__()  # every norm layer by default


class LayerNormDelta(PartialDelta):
    config_cls = LayerNormConfig

    def module_pattern(self, model):
        if self.config.targets is not None:
            return self.config.targets
        norms = [n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()]
        return norms or arch.role_patterns(model, ("layernorm",), "layernorm")


register("layernorm", LayerNormConfig, LayerNormDelta, family="partial", lr=5e-3,
         paper="Zhao et al. 2024 (LayerNorm tuning); Qi et al. 2022")
