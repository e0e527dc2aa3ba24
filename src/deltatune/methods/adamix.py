"""AdaMix (Wang et al. 2022): a mixture of adapter experts at every adapter site.

Each site holds ``num_experts`` down-projections and ``num_experts`` up-projections. Training:
every forward call picks one down and one up expert at random per site (stochastic routing, the
same experts for the whole batch). With ``consistency > 0`` the model runs a second time on the
same inputs with fresh routes, and ``Delta.regularization()`` returns
consistency * (KL(p1 || p2) + KL(p2 || p1)) / 2 over the two passes' output distributions (mean
squared difference for single-output regression heads): the paper's consistency regularizer.
The second pass re-runs the base model's forward inside the delta's model-level hook, so it doubles
the training cost, as the paper's two passes do.

Inference: the experts' weights (and biases) are averaged into one adapter. In eval mode an unmerged
mixture computes with the averaged weights; ``delta.merge_experts()`` replaces each mixture by a
plain ``adapter`` bottleneck holding those averages, so inference then costs exactly what one
adapter costs (same modules, shapes and keys as an ``adapter`` delta of the same config), and saves
store only it. Placements, sizes, activation, scaling and init are the ``adapter`` method's (Houlsby
placement by default, as in the paper); up-projections start at zero, so every expert, and so the
mixture in any route, is the identity at init. A shared LayerNorm (``layer_norm=True``) is not
mixed. Not mergeable into the base weights (adapters are non-linear).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.outputs import first_tensor
from ..core.layer import DeltaLayer
from ..core.registry import register
from ._sublayers import Site
from .adapter import ACTIVATIONS, AdapterConfig, AdapterDelta, Bottleneck, linear_projection


@dataclass
class AdaMixConfig(AdapterConfig):
    """The ``adapter`` fields plus num_experts (per projection) and consistency (the weight of the
    consistency loss between two stochastically routed passes; 0 = one pass, no loss)."""
    method: ClassVar[str] = "adamix"

    num_experts: int = 4
    consistency: float = 1.0

    def validate(self) -> None:
        super().validate()
        self.check_range("num_experts", 1, integer=True)
        self.check_range("consistency", 0.0)


class ExpertMixture(nn.Module):
    """num_experts stacked down / up projections of one site, routed at random while training."""

    def __init__(self, site: Site, cfg: AdaMixConfig):
        super().__init__()
        d, m, k = site.dim, cfg.bottleneck_size(site.dim), cfg.num_experts
        downs = [linear_projection(d, m, False, cfg.init) for _ in range(k)]
        ups = [linear_projection(m, d, True, cfg.init) for _ in range(k)]
        stack = lambda ps: nn.Parameter(torch.stack([p.detach() for p in ps]).to(site.dtype))  # noqa: E731
        self.down_weight, self.down_bias = stack([l.weight for l in downs]), stack([l.bias for l in downs])
        self.up_weight, self.up_bias = stack([l.weight for l in ups]), stack([l.bias for l in ups])
        self.norm = nn.LayerNorm(d).to(site.dtype) if cfg.layer_norm else None
        self.act = ACTIVATIONS[cfg.activation]()
        self.scaling = cfg.scale
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self._cfg = cfg
        self.route: tuple[int, int] | None = None  # the experts the last training call used

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            k = self.down_weight.shape[0]
            i, j = torch.randint(k, (2,)).tolist()
            self.route = (i, j)
            weights = (self.down_weight[i], self.down_bias[i], self.up_weight[j], self.up_bias[j])
        else:
            weights = self.averaged()
        return self.run(h, *weights)

    def run(self, h, dw, db, uw, ub) -> torch.Tensor:
        if self.norm is not None:
            h = self.norm(h)
        out = F.linear(self.act(F.linear(h, dw, db)), uw, ub)
        if self.scaling != 1.0:
            out = out * self.scaling
        return self.dropout(out) if self.dropout is not None else out

    def averaged(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.mean(dim=0) for p in (self.down_weight, self.down_bias, self.up_weight, self.up_bias))

    @torch.no_grad()
    def merged(self) -> Bottleneck:
        """A plain adapter bottleneck whose weights are the experts' averages."""
        dw, db, uw, ub = self.averaged()
        down, up = nn.Linear(dw.shape[1], dw.shape[0]), nn.Linear(uw.shape[1], uw.shape[0])
        for lin, w, b in ((down, dw, db), (up, uw, ub)):
            lin.weight, lin.bias = nn.Parameter(w.clone()), nn.Parameter(b.clone())
        net = Bottleneck(dw.shape[1], self._cfg, down, up)
        if self.norm is not None:
            net.norm.load_state_dict(self.norm.state_dict())
        return net.to(dw.device, dw.dtype).train(self.training)


def symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(KL(p_a || p_b) + KL(p_b || p_a)) / 2 averaged over positions; MSE for one output."""
    if a.shape[-1] == 1:
        return F.mse_loss(a.float(), b.float())
    la, lb = F.log_softmax(a.float(), -1), F.log_softmax(b.float(), -1)
    kl = (la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1)
    return kl.mean() / 2


class Consistency(DeltaLayer):
    """On the model: a second, independently routed pass while training; keeps the loss between them."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight
        self.pending: torch.Tensor | None = None
        self._inside = False

    def forward_post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()) or self._inside or self.weight == 0:
            return out
        self._inside = True
        try:
            again = module.forward(*args, **kwargs)  # the inner hooks run: new routes
        finally:
            self._inside = False
        self.pending = self.weight * symmetric_kl(logits(out), logits(again))
        return out


def logits(out: Any) -> torch.Tensor:
    value = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    value = first_tensor(out) if value is None else value
    if value is None:
        raise TypeError(f"AdaMix's consistency loss needs a tensor output, got {type(out).__name__}.")
    return value


class AdaMixDelta(AdapterDelta):
    config_cls = AdaMixConfig

    def build(self, model: nn.Module) -> None:
        super().build(model)
        if self.config.consistency > 0:
            self.add_layer("", Consistency(self.config.consistency))

    def bottleneck(self, site: Site) -> nn.Module:
        return ExpertMixture(site, self.config)

    def mixtures(self) -> dict[str, DeltaLayer]:
        return {k: layer for k, layer in self.layers.items()
                if isinstance(getattr(layer, "adapter", None), ExpertMixture)}

    @property
    def experts_merged(self) -> bool:
        return not self.mixtures()

    def merge_experts(self) -> None:
        """Average every mixture's experts into one adapter (for inference; training goes on with it)."""
        for layer in self.mixtures().values():
            layer.adapter = layer.adapter.merged()
        for layer in self.layers.values():
            if isinstance(layer, Consistency):
                layer.weight, layer.pending = 0.0, None  # one adapter: nothing left to route

    def regularization(self) -> torch.Tensor | None:
        tap = next((lay for lay in self.layers.values() if isinstance(lay, Consistency)), None)
        if tap is None or tap.pending is None:
            return None
        loss, tap.pending = tap.pending, None
        return loss

    def extra_state(self) -> dict[str, Any]:
        return {"experts_merged": self.experts_merged}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("experts_merged"):
            self.merge_experts()


register("adamix", AdaMixConfig, AdaMixDelta, family="additive", lr=5e-3,
         paper="Wang et al. 2022 (AdaMix: mixture of adapters, stochastic routing, weight averaging)")
