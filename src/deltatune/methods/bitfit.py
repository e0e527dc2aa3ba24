"""BitFit (Ben Zaken et al. 2022): train only bias terms (all of them, or those of `targets`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.registry import register
from .partial import PartialConfig, PartialDelta


@dataclass
class BitFitConfig(PartialConfig):
    def __post_init__(self) -> None:
        super(PartialConfig, self).__post_init__()  # no last-layer default: every bias


class BitFitDelta(PartialDelta):
    def param_pattern(self, model):
        return ["bias"] if self.config.params is None else self.config.params


register("bitfit", BitFitConfig, BitFitDelta, family="partial", paper="Ben Zaken et al. 2022")
