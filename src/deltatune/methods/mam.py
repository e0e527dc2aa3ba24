"""MAM adapter (He et al. 2022, "Towards a unified view of parameter-efficient transfer learning").

One delta with both pieces of the paper's best combination: prefix tuning on every attention layer
(the ``prefix`` method's KV-cache prefixes, through its MLP reparameterization; ``fold()`` and the
saved layout are the same) and a scaled parallel adapter on the feed-forward sublayer,
y -> y + s * up(relu(down(x))) with x the sublayer input and s = 4 (the ``adapter`` method's
parallel placement). Defaults follow the paper's MAM: l = 30 prefix tokens, scaling 4, bottleneck
d / 2 (r = 512 on d = 1024). The adapter's up-projection starts at zero, so at init the delta is
exactly its prefix (a prefix is never the identity: attention mass goes to it). ``targets``,
``layers`` and ``exclude`` select the adapter sites; the prefix covers every layer. Encoder-decoders
are refused (as by ``prefix``). Not mergeable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from ..core.registry import register
from .adapter import AdapterConfig, AdapterDelta
from .prefix import PrefixDelta


@dataclass
class MAMConfig(AdapterConfig):
    """The adapter fields of ``adapter`` (placement fixed to "parallel") plus prefix fields:
    num_virtual_tokens, projection (train the prefix through an MLP of width projection_hidden),
    save_reparam (also save that MLP, to resume training)."""
    method: ClassVar[str] = "mam"

    placement: str = "parallel"
    reduction_factor: float = 2.0
    num_virtual_tokens: int = 30
    projection: bool = True
    projection_hidden: int = 512
    save_reparam: bool = False

    def validate(self) -> None:
        super().validate()
        self.check_choice("placement", ("parallel",))
        self.check_range("num_virtual_tokens", 1, integer=True)
        self.check_choice("projection", (True, False))
        self.check_range("projection_hidden", 1, integer=True)
        self.check_choice("save_reparam", (True, False))


class MAMDelta(PrefixDelta, AdapterDelta):
    """PrefixDelta's prefix at the model (saving and folding as ``prefix``) + AdapterDelta's sites."""
    config_cls = MAMConfig

    encoder_decoder_hint = ("use 'adapter' with placement='parallel' (MAM's adapter half), stacked "
                            "with 'prompt' for virtual tokens in the encoder input")

    def build(self, model: nn.Module) -> None:
        PrefixDelta.build(self, model)
        AdapterDelta.build(self, model)


register("mam", MAMConfig, MAMDelta, family="hybrid", lr=5e-4,
         paper="He et al. 2022 (MAM adapter: prefix tuning + scaled parallel FFN adapter)")
