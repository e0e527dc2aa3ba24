"""BitFit (Ben Zaken et al. 2022): train only bias terms (all of them, or those of `targets`).

Models whose layers have no biases (Llama, Mistral, Qwen, T5, ...) are refused when the delta is
built: there would be nothing to train.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from ..core.registry import register
from ..core.targets import name_matches
from ..errors import TargetError
from .partial import PartialConfig, PartialDelta


@dataclass
class BitFitConfig(PartialConfig):
    method: ClassVar[str] = "bitfit"

    def __post_init__(self) -> None:
        super(PartialConfig, self).__post_init__()  # no last-layer default: every bias


class BitFitDelta(PartialDelta):
    config_cls = BitFitConfig

    def param_pattern(self, model):
        return ["bias"] if self.config.params is None else self.config.params

    def build(self, model: nn.Module) -> None:
        if self.config.params is None:
            self._check_has_biases(model)
        super().build(model)

    def _check_has_biases(self, model: nn.Module) -> None:
        targets = self.config.targets
        heads = set(self.head_names(model))
        biases = [n for n, p in model.named_parameters()
                  if p is not None and n.rsplit(".", 1)[-1] == "bias" and n.split(".", 1)[0] not in heads
                  and (targets is None or name_matches(n.rpartition(".")[0], targets))]
        if not biases:
            where = " in its targets" if targets is not None else ""
            raise TargetError(
                f"bitfit: {type(model).__name__} has no bias parameters{where} (its linear and norm "
                f"layers are bias-free, as in Llama and T5), so BitFit has nothing to train; use "
                f"'layernorm' (the norm gains) or 'lora' instead."
            )


register("bitfit", BitFitConfig, BitFitDelta, family="partial", lr=5e-3, paper="Ben Zaken et al. 2022")
