"""Partial (specification-based) tuning: train a chosen subset of the base's own tensors.

The delta holds trainable differences (zero at init), so the base tensors never change while
training and several partial deltas can be switched, stacked or disabled; merging adds them in.
``partial`` picks tensors by parameter-name suffix or regex (``params``) and by layer (``layers``,
``last_k``); ``bitfit`` and ``layernorm`` (own files) are presets on the same machinery.
"""
from __future__ import annotations

from typing import ClassVar

import re
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..core.targets import num_layers
from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.delta import key_to_path
from ..core.layer import ParamCopy, ParamDiff
from ..core.registry import register
from ..core.targets import name_matches, select
from ..errors import MergeError, TargetError
from ..quant import is_quantized


@dataclass
class PartialConfig(DeltaConfig):
    """params: parameter-name suffixes or one regex (None: all parameters of the chosen layers).
    last_k: train the last k layers (shorthand for ``layers=[-k, ..., -1]``)."""
    method: ClassVar[str] = "partial"

    params: list[str] | str | None = None
    last_k: int | None = None

    def __post_init__(self) -> None:
        if self.params is None and self.last_k is None and self.layers is None and self.targets is None:
            self.last_k = 1  # the default: the last layer
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.last_k is not None:
            self.check_range("last_k", 1, integer=True)
            if self.layers is not None:
                self._fail("last_k", self.last_k, "None when `layers` is given (use one of them)")


class PartialDelta(Delta):
    config_cls = PartialConfig

    def param_pattern(self, model: nn.Module) -> list[str] | str:
        return self.config.params if self.config.params is not None else r".*"

    def module_pattern(self, model: nn.Module) -> list[str] | str | None:
        """Modules whose tensors may be tuned (None: any)."""
        return self.config.targets

    def build(self, model: nn.Module) -> None:
        cfg = self.config
        layers = cfg.layers
        if cfg.last_k is not None:
            n = num_layers(model) or 0
            layers = list(range(max(n - cfg.last_k, 0), n))
        found = select(model, self.param_pattern(model), layers=layers, exclude=cfg.exclude,
                       what="params", method=cfg.method)
        heads = self.head_names(model)
        modules = self.module_pattern(model)
        by_module: dict[str, list[str]] = defaultdict(list)
        for full, param in found:
            path, _, pname = full.rpartition(".")
            if modules is not None and not name_matches(path, modules):
                continue
            if path.split(".", 1)[0] in heads:
                continue
            if is_quantized(param):
                raise TargetError(f"{full} is quantized (4-bit): partial tuning cannot train it. Narrow "
                                  f"`params`/`layers` to dense tensors, or deltatune.dequantize(model) first.")
            by_module[path].append(pname)
        for path, names in by_module.items():
            self.add_layer(path, ParamDiff(model.get_submodule(path), names))


    @classmethod
    def from_updates(cls, name: str, updates: dict[str, torch.Tensor], model: nn.Module,
                     heads: list[str]) -> PartialDelta:
        """A partial delta whose differences are `updates` ({parameter name: dense change}); the
        `heads` modules are saved whole (base + their update): how task arithmetic's combination
        of any mergeable deltas is held (core/task_arith.py)."""
        def in_head(n: str) -> bool:
            return n.split(".", 1)[0] in heads

        body = sorted(n for n in updates if not in_head(n))
        if not body:
            raise MergeError("the combination changes no base tensor outside the task heads (the weights "
                             "cancel out, or the deltas are zero): there is nothing to hold in a delta.")
        pattern = "|".join(re.escape(n) for n in body)
        new = cls(name, PartialConfig(params=pattern, modules_to_save=heads), model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, layer in new.layers.items():
                path = key_to_path(key)
                if isinstance(layer, ParamDiff):
                    for pname, diff in layer.diffs.items():
                        diff.copy_(updates[f"{path}.{pname}" if path else pname])
                elif isinstance(layer, ParamCopy):
                    for pname, value in layer.values.items():
                        full = f"{path}.{pname}" if path else pname
                        value.copy_(params[full].detach() + updates.get(full, 0))
        return new


register("partial", PartialConfig, PartialDelta, family="partial", lr=5e-4,
         paper="Lee et al. 2019 (last layers); Ding et al. 2023 (specification-based)")
