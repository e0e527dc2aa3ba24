"""UniPELT (Mao et al. 2022): LoRA, prefix tuning and a bottleneck adapter in every layer, each
behind its own learned gate.

- LoRA on the query and value projections: y -> y + G_L(x) * s B A x, G_L from the projection input.
- Prefix tuning (the ``prefix`` method's KV-cache prefixes): each layer's prefix keys and values are
  multiplied by G_P, computed from the attention module's input (methods/_hybrid.py).
- A bottleneck adapter after the feed-forward sublayer (the ``adapter`` method's "pfeiffer"
  placement): y -> y + G_A(y) * up(act(down(y))), G_A from the adapter input.

Every gate is sigmoid(W h + b) averaged over the sequence, one scalar per example (as in the
reference code); W ~ N(0, 0.02), b = 0, so each gate starts near 0.5. ``gates=False`` drops them
(the plain sum of the three methods).

Identity at init: LoRA's B is zero and the adapter's up-projection is zero (``adapter_init="zero"``,
the default), so those two branches add exactly nothing whatever their gates. A prefix is never the
identity, gated or not: even a zero gate leaves zero keys that take attention mass. So
``components=["lora", "adapter"]`` (prefix off) reproduces the base model exactly at init, and the
full method does not. (The reference code draws the adapter's up-projection from N(0, 0.02), which
is ``adapter_init="houlsby"`` here and is not the identity either.)

``targets`` / ``layers`` / ``exclude`` select LoRA's modules (default: query and value); ``layers``
also picks the adapter and prefix-gate layers. The prefix itself is filled for every layer.
Encoder-decoders are refused when the prefix is on. Not mergeable (the gates depend on the input).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..core.config import DeltaConfig, field_list
from ..core.layer import DeltaLayer
from ..core.outputs import main_tensor, replace_main
from ..core.registry import register
from ..errors import TargetError
from . import _soft as soft
from ._hybrid import Gate, gate_prefix
from ._sublayers import find_sites, site_dtype
from .adapter import ACTIVATIONS, AdapterConfig, SerialAdapter, bottleneck
from .lora import LoRAConfig, LoRALayer
from .prefix import PrefixConfig, PrefixLayer

COMPONENTS = ("lora", "prefix", "adapter")


@dataclass
class UniPELTConfig(DeltaConfig):
    """components: which of lora / prefix / adapter to use. gates: put each behind its gate.
    LoRA: r, alpha. Prefix: num_virtual_tokens, projection_hidden (the MLP reparameterization),
    save_reparam. Adapter: reduction_factor (or bottleneck), activation, adapter_init."""
    method: ClassVar[str] = "unipelt"

    components: list[str] = field_list(list(COMPONENTS))
    gates: bool = True
    r: int = 8
    alpha: float = 16.0
    num_virtual_tokens: int = 10
    projection_hidden: int = 512
    save_reparam: bool = False
    reduction_factor: float = 16.0
    bottleneck: int | None = None
    activation: str = "relu"
    adapter_init: str = "zero"

    def validate(self) -> None:
        super().validate()
        if (not isinstance(self.components, list) or not self.components
                or any(c not in COMPONENTS for c in self.components)
                or len(set(self.components)) != len(self.components)):
            self._fail("components", self.components, f"a non-empty list of distinct names from {COMPONENTS}")
        self.check_choice("gates", (True, False))
        self.check_choice("save_reparam", (True, False))
        self.check_choice("activation", tuple(ACTIVATIONS))
        self.check_choice("adapter_init", ("zero", "houlsby"))
        self.lora_config()
        self.prefix_config()
        self.adapter_config()

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(r=self.r, alpha=self.alpha, modules_to_save=[])

    def prefix_config(self) -> PrefixConfig:
        return PrefixConfig(num_virtual_tokens=self.num_virtual_tokens, projection=True,
                            projection_hidden=self.projection_hidden, save_reparam=self.save_reparam,
                            modules_to_save=[])

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(placement="pfeiffer", layers=self.layers, reduction_factor=self.reduction_factor,
                             bottleneck=self.bottleneck, activation=self.activation,
                             init=self.adapter_init, modules_to_save=[])


class GatedLoRA(LoRALayer):
    """y -> y + G(x) * s B A x (plain LoRA, and mergeable, without a gate)."""

    def __init__(self, module: nn.Module, cfg: LoRAConfig, gated: bool):
        super().__init__(module, cfg)
        self.gate = Gate(self.lora_A.shape[1], self.lora_A.dtype) if gated else None
        self.mergeable = not gated

    def post(self, module: nn.Module, x, y):
        if self.gate is None:
            return super().post(module, x, y)
        return y + self.gate(x).to(y.dtype) * self.low_rank(x)


class GatedAdapter(SerialAdapter):
    """y -> y + G(y) * f(y) on the sublayer output."""

    def __init__(self, adapter: nn.Module, gate: Gate | None):
        super().__init__(adapter)
        self.gate = gate

    def post(self, module: nn.Module, x, y):
        if self.gate is None:
            return super().post(module, x, y)
        h = main_tensor(y)
        return replace_main(y, h + self.gate(h).to(h.dtype) * self.adapter(h))


class UniPELTDelta(soft.FoldableDelta):
    config_cls = UniPELTConfig

    default_roles = ("query", "value")
    supported_types = (nn.Linear, Conv1D)

    def build(self, model: nn.Module) -> None:
        cfg = self.config
        if "lora" in cfg.components:
            lora = cfg.lora_config()
            for path, module in self.targets(model):
                self._add_unique(path, GatedLoRA(module, lora, cfg.gates))
        if "adapter" in cfg.components:
            for site in find_sites(model, cfg.adapter_config(), cfg.method):
                gate = Gate(site.dim, site.dtype) if cfg.gates else None
                self._add_unique(site.path, GatedAdapter(bottleneck(site, cfg.adapter_config()), gate))
        if "prefix" in cfg.components:
            self._build_prefix(model)

    def _build_prefix(self, model: nn.Module) -> None:
        if soft.is_encoder_decoder(model):
            raise TargetError(f"unipelt: its prefix component supports encoder-only and decoder-only "
                              f"models, not the encoder-decoder {type(model).__name__} (the prefixes "
                              f"enter as a filled KV cache, and its encoder reads none): drop it with "
                              f"components=['lora', 'adapter'].")
        prefix = PrefixLayer(model, self.config.prefix_config(), f"{self.name}:prefix")
        self._add_unique("", prefix, site=soft.module_path(model, soft.backbone(model)))
        if self.config.gates:
            dim = soft.input_embedding(model)[1].embedding_dim
            dim = getattr(getattr(model, "config", None), "hidden_size", dim)
            gate_prefix(self._add_unique, prefix.key, model, self.config.layers, self.config.method, dim,
                        site_dtype(model, ""))

    def _add_unique(self, path: str, layer: DeltaLayer, site: str | None = None) -> None:
        self.add_layer(path, layer, site=site,
                       clash=f"UniPELT would put two of its pieces on {path or '<model>'!r}: narrow `targets` "
                             f"(LoRA's modules) so that they avoid the attention and feed-forward blocks.")


register("unipelt", UniPELTConfig, UniPELTDelta, family="hybrid", lr=1e-3,
         paper="Mao et al. 2022 (UniPELT: gated LoRA + prefix tuning + adapter)")
