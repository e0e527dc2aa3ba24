"""(IA)^3 (Liu et al. 2022, T-Few): learned vectors that rescale the keys, the values and the
feed-forward intermediate activation.

Attention modules scale their output, h = l * (W x + b) (``ia3_l`` of shape (out, 1)); feed-forward
modules (the down projection: input of ``ffn_out``) scale their input, h = W (l * x) + b
(``ia3_l`` of shape (1, in)). Ones at init (identity). Layout, defaults and merge follow peft:
merging multiplies the rows (and bias) or the columns of W. On GPT-2 the fused ``c_attn`` is
scaled whole (queries too), as in peft.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..core import arch
from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.layer import DeltaLayer
from ..core.registry import register
from ..core.targets import name_matches
from ..errors import TargetError
from ._weights import module_dims, writable_weight

_EXACT = 1e-4  # below this |l|, dividing back would lose the weight: keep a copy instead


@dataclass
class IA3Config(DeltaConfig):
    """feedforward: which targeted modules scale their input (suffixes or a regex); None: those
    playing the architecture's ``ffn_out`` role. Every other target scales its output."""
    method: ClassVar[str] = "ia3"

    feedforward: list[str] | str | None = None

    def validate(self) -> None:
        super().validate()
        value = self.feedforward
        if value is not None and not isinstance(value, str):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self._fail("feedforward", value, "a list of module-name suffixes or one regex string")


class IA3Layer(DeltaLayer):
    mergeable = True

    def __init__(self, module: nn.Module, feedforward: bool):
        super().__init__()
        d_in, d_out = module_dims(module)
        self.feedforward = feedforward
        shape = (1, d_in) if feedforward else (d_out, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=module.weight.dtype, device=module.weight.device))
        self._stash: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def pre(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l.flatten().to(x.dtype) if self.feedforward else x

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y if self.feedforward else y * self.ia3_l.flatten().to(y.dtype)

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        w = writable_weight(module)
        bias = None if self.feedforward else getattr(module, "bias", None)
        small = self.ia3_l.abs().min() < _EXACT
        self._stash = (w.clone(), None if bias is None else bias.clone()) if small else None
        w.mul_(self.ia3_l.to(w.dtype))
        if bias is not None:
            bias.mul_(self.ia3_l.flatten().to(bias.dtype))

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        w = writable_weight(module, "unmerge from")
        bias = None if self.feedforward else getattr(module, "bias", None)
        if self._stash is not None:
            w.copy_(self._stash[0])
            if bias is not None:
                bias.copy_(self._stash[1])
            self._stash = None
            return
        w.div_(self.ia3_l.to(w.dtype))
        if bias is not None:
            bias.div_(self.ia3_l.flatten().to(bias.dtype))


class IA3Delta(Delta):
    config_cls = IA3Config

    default_roles = ("key", "value", "ffn_out")
    supported_types = (nn.Linear, Conv1D)

    def build(self, model: nn.Module) -> None:
        targets = self.targets(model)
        ff = self._feedforward_pattern(model)
        for path, module in targets:
            self.add_layer(path, IA3Layer(module, ff is not None and name_matches(path, ff)))
        if self.config.feedforward is not None and not any(
                layer.feedforward for layer in self.layers.values() if isinstance(layer, IA3Layer)):
            raise TargetError(
                f"IA3 feedforward={self.config.feedforward!r} matches none of the targeted modules "
                f"({', '.join(p for p, _ in targets[:4])}, ...): feedforward modules must also be targets."
            )

    def _feedforward_pattern(self, model: nn.Module) -> list[str] | str | None:
        if self.config.feedforward is not None:
            return self.config.feedforward
        table = arch.ARCHITECTURES.get(arch.model_type(model) or "")
        return arch.role_patterns(model, ("ffn_out",), "ia3") if table and "ffn_out" in table else None


register("ia3", IA3Config, IA3Delta, family="additive", lr=1e-2, paper="Liu et al. 2022 (T-Few, (IA)^3)")
