"""Bottleneck adapters: Houlsby et al. 2019, Pfeiffer et al. 2021 (placement), He et al. 2022
(parallel).

An adapter is f(h) = s * up(act(down(LN?(h)))), with down: d -> m, up: m -> d, m = bottleneck
(or d // reduction_factor). Serial placements add it after a sublayer, on the sublayer output
before the residual add + LayerNorm: y -> y + f(y) ("houlsby": after attention and feed-forward;
"pfeiffer": after feed-forward only). "parallel" computes it from the sublayer input and adds it
to the sublayer output: y -> y + s * f(x), s = 4 by default (He et al.). The up-projection starts
at zero (``init="zero"``), so a fresh adapter is the identity; ``init="houlsby"`` draws both
projections from N(0, 1e-2) (near-identity, as in Houlsby et al.). Adapters are non-linear, so they
do not merge into the base weights.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..core.delta import Delta
from ..core.layer import DeltaLayer
from ..core.outputs import main_tensor, replace_main
from ..core.registry import register
from ..errors import ConfigError
from ._sublayers import Site, SublayerConfig, find_sites

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh,
    "identity": nn.Identity,
}


@dataclass
class AdapterConfig(SublayerConfig):
    """reduction_factor: bottleneck m = hidden // reduction_factor (unless `bottleneck` is given).
    scaling: factor on the adapter output; None = 4.0 for parallel (He et al. 2022), else 1.0.
    layer_norm: a LayerNorm on the adapter input. dropout: on the adapter output."""
    method: ClassVar[str] = "adapter"

    reduction_factor: float = 16.0
    bottleneck: int | None = None
    activation: str = "relu"
    layer_norm: bool = False
    scaling: float | None = None
    init: str = "zero"
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        self.check_range("reduction_factor", 0, low_open=True)
        if self.bottleneck is not None:
            self.check_range("bottleneck", 1, integer=True)
        self.check_choice("activation", tuple(ACTIVATIONS))
        self.check_choice("layer_norm", (True, False))
        if self.scaling is not None:
            self.check_range("scaling")
        self.check_choice("init", ("zero", "houlsby"))
        self.check_range("dropout", 0.0, 1.0, high_open=True)

    @property
    def scale(self) -> float:
        if self.scaling is not None:
            return float(self.scaling)
        return 4.0 if self.parallel else 1.0

    def bottleneck_size(self, dim: int) -> int:
        """``bottleneck``, else ``dim // reduction_factor`` (rounded down, as in AdapterHub)."""
        if self.bottleneck is not None:
            return self.bottleneck
        size = int(dim // self.reduction_factor)
        if size < 1:
            raise ConfigError(
                f"{type(self).__name__}.reduction_factor={self.reduction_factor} leaves no bottleneck for "
                f"hidden size {dim} ({dim} // {self.reduction_factor} = 0): use reduction_factor <= {dim}, "
                f"or set bottleneck=m directly.")
        return size


class Bottleneck(nn.Module):
    """h -> scale * up(act(down(norm(h)))), dropout on the result."""

    def __init__(self, dim: int, cfg: AdapterConfig, down: nn.Module, up: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if cfg.layer_norm else None
        self.down = down
        self.act = ACTIVATIONS[cfg.activation]()
        self.up = up
        self.scaling = cfg.scale
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            h = self.norm(h)
        out = self.up(self.act(self.down(h)))
        if self.scaling != 1.0:
            out = out * self.scaling
        return self.dropout(out) if self.dropout is not None else out


class SerialAdapter(DeltaLayer):
    """y -> y + f(y) on the sublayer output (its first element for tuple outputs)."""

    def __init__(self, adapter: nn.Module):
        super().__init__()
        self.adapter = adapter

    def post(self, module: nn.Module, x: Any, y: Any) -> Any:
        h = main_tensor(y)
        return replace_main(y, h + self.adapter(h))


class InputTap(DeltaLayer):
    """Leaves the input of the module that receives a sublayer's input in the call context, under
    `key`, for the ParallelAdapter at the sublayer's output."""

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def post(self, module: nn.Module, x: Any, y: Any) -> Any:
        self.call_context().put(self.key, x)
        return y


class ParallelAdapter(DeltaLayer):
    """y -> y + f(x), x the sublayer input: this module's own input, or an InputTap's (`tap_key`)."""

    def __init__(self, adapter: nn.Module, tap_key: str | None, path: str):
        super().__init__()
        self.adapter = adapter
        self.tap_key = tap_key
        self._path = path

    def post(self, module: nn.Module, x: Any, y: Any) -> Any:
        if self.tap_key is not None:
            x = self.call_context().pop(self.tap_key)
            if x is None:
                raise ConfigError(f"the parallel adapter at {self._path} did not see its sublayer input: "
                                  f"the '*_block_in' module must run before {self._path}.")
        h = main_tensor(y)
        return replace_main(y, h + self.adapter(main_tensor(x)))


class AdapterDelta(Delta):
    config_cls = AdapterConfig

    def build(self, model: nn.Module) -> None:
        for site in find_sites(model, self.config, self.config.method):
            net = self.bottleneck(site)
            if not self.config.parallel:
                self.add_layer(site.path, SerialAdapter(net))
                continue
            key = None
            if site.input_path != site.path:
                key = f"{self.name}:{site.input_path}:input"
                self.add_layer(site.input_path, InputTap(key), self._clash(site.input_path))
            self.add_layer(site.path, ParallelAdapter(net, key, site.path), self._clash(site.path))

    def _clash(self, path: str) -> str:
        return (f"{path!r} is both a sublayer input and output for method {self.config.method!r}: "
                f"name distinct modules in sublayers=.")

    def bottleneck(self, site: Site) -> Bottleneck:
        return bottleneck(site, self.config, self.projection)

    def projection(self, d_in: int, d_out: int, up: bool) -> nn.Module:
        """One of the bottleneck's two projections (Compacter, SparseAdapter override it)."""
        return linear_projection(d_in, d_out, up, self.config.init)


def linear_projection(d_in: int, d_out: int, up: bool, init: str) -> nn.Linear:
    """An adapter projection: zero bias; "houlsby": N(0, 1e-2) truncated, else a zero up-projection."""
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        nn.init.zeros_(lin.bias)
        if init == "houlsby":
            nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2)
        elif up:
            nn.init.zeros_(lin.weight)  # the identity at init
    return lin


def bottleneck(site: Site, cfg: AdapterConfig,
               projection: Callable[[int, int, bool], nn.Module] | None = None) -> Bottleneck:
    """The bottleneck adapter of `cfg` at one site; ``projection(d_in, d_out, up)`` builds its two
    projections (default: linear ones with the config's init)."""
    if projection is None:
        def projection(d_in: int, d_out: int, up: bool) -> nn.Module:
            return linear_projection(d_in, d_out, up, cfg.init)
    m = cfg.bottleneck_size(site.dim)
    return Bottleneck(site.dim, cfg, projection(site.dim, m, False), projection(m, site.dim, True)).to(site.dtype)


register("adapter", AdapterConfig, AdapterDelta, family="additive", lr=5e-3,
         paper="Houlsby et al. 2019; Pfeiffer et al. 2021 (placement); He et al. 2022 (parallel)")
