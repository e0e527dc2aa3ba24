"""SparseTargetsDelta: one sparse layer per target module, over the direct parameters its config
names (``SparseConfig.params``); targets default to every linear layer of the blocks."""
from __future__ import annotations

import torch.nn as nn

from ..core.layer import DeltaLayer
from ..errors import TargetError
from ._sparse_switch import CompactingDelta

BLOCK_LINEAR_ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


class SparseTargetsDelta(CompactingDelta):
    """Builds one layer per target module over the chosen direct parameters."""

    default_roles = BLOCK_LINEAR_ROLES

    def make_sparse_layer(self, module: nn.Module, names: list[str]) -> DeltaLayer:
        raise NotImplementedError

    def build(self, model: nn.Module) -> None:
        wanted = self.config.params
        found = self.targets(model)
        for path, module in found:
            names = [n for n, p in module.named_parameters(recurse=False)
                     if p is not None and (wanted is None or n in wanted)]
            if names:
                self.add_layer(path, self.make_sparse_layer(module, names))
        if not len(self.layers):
            have = sorted({n for _, m in found for n, _ in m.named_parameters(recurse=False)})
            raise TargetError(
                f"method {self.config.method!r}: the {len(found)} target modules have no parameter "
                f"named {wanted}; their direct parameters are {have or 'none'}. Fix `params` or `targets`."
            )
