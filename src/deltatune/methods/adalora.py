"""AdaLoRA (Zhang et al. 2023): SVD-form updates ΔW = s · P Λ Q whose singular values are pruned
during training, by importance, down to a total rank budget.

Per module: Q = ``lora_A`` (r, in), Λ = ``lora_E`` (r, 1), P = ``lora_B`` (out, r); A and B ~ N(0,
0.02), E zero (identity at init); s = alpha / init_r, fixed while ranks shrink (peft's ``ranknum``).
Importance of a weight is its sensitivity |w · ∂L/∂w|, smoothed (EMA, beta1) times its uncertainty
(EMA of the deviation, beta2); a triplet (P_:i, λ_i, Q_i:) scores s(λ_i) + mean s(Q_i:) + mean s(P_:i).
The total budget falls from init_r per module to target_r per module on a cubic schedule; every
deltaT steps the top-`budget` triplets stay and the others are masked (λ_i = 0). Loss term:
orth_reg_weight · mean over P, Q of ||PᵀP - I||_F, ||QQᵀ - I||_F. Names and formulas as peft.

Training loop: ``loss = dm(**b).loss + dm.regularization(); loss.backward(); opt.step();
dm.step(i)`` for i = 0 .. total_step - 1. The sensitivities are captured while gradients are
accumulated (a hook), so ``dm.step(i)`` may come before or after ``zero_grad``. Step
``total_step - tfinal - 1`` sets the final budget (peft sets it one step later, which a loop over
``range(total_step)`` with tfinal=0 never reaches); the masks stay fixed after it. Pruned triplets
are masked in memory (the optimizer keeps its tensors) and left out of the saved delta; extra_state
records each module's kept rank, so loading rebuilds exactly the kept shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..core.config import DeltaConfig
from ..core.delta import Delta, key_to_path, path_to_key
from ..core.registry import register
from ..errors import CheckpointError, ConfigError, DeltaError
from . import _importance
from ._weights import LowRankLayer, module_dims

_NAMES = ("lora_A", "lora_B", "lora_E")


@dataclass
class AdaLoRAConfig(DeltaConfig):
    """total_step: the number of optimizer steps (required). tinit: warm-up steps at the full
    budget; tfinal: final steps at the target budget; deltaT: steps between reallocations."""
    method: ClassVar[str] = "adalora"

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    total_step: int | None = None
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5

    @classmethod
    def run_length_fields(cls, steps: int) -> dict[str, Any]:
        return {"total_step": steps}

    def validate(self) -> None:
        super().validate()
        self.check_range("init_r", 0, low_open=True, integer=True)
        self.check_range("target_r", 0, self.init_r, integer=True)
        self.check_range("alpha", 0, low_open=True)
        self.check_range("dropout", 0.0, 1.0, high_open=True)
        self.check_range("tinit", 0, integer=True)
        self.check_range("tfinal", 0, integer=True)
        self.check_range("deltaT", 1, integer=True)
        self.check_range("beta1", 0, 1, low_open=True, high_open=True)
        self.check_range("beta2", 0, 1, low_open=True, high_open=True)
        self.check_range("orth_reg_weight", 0)
        if self.total_step is not None:
            self.check_range("total_step", 1, integer=True)
            if self.tinit >= self.total_step - self.tfinal:
                self._fail("tinit", self.tinit, f"< total_step - tfinal = {self.total_step - self.tfinal} "
                           f"(no steps are left to prune in); lower tinit/tfinal or raise total_step")


class SVDLayer(LowRankLayer):
    """The shared low-rank layer with down = Λ Q x (pruned values masked) and up = s P h; adds the
    triplet masks, the sensitivity capture and the orthogonality term."""

    def __init__(self, module: nn.Module, cfg: AdaLoRAConfig):
        super().__init__(cfg.dropout)
        self.d_in, self.d_out = module_dims(module)
        self.scaling = cfg.alpha / (cfg.init_r + 1e-5)  # peft: alpha / (ranknum + 1e-5), ranknum = init_r
        self._hooks: list[Any] = []
        self.sensitivity: dict[str, torch.Tensor] = {}  # |w * grad| of the last backward
        self.resize(cfg.init_r, like=module.weight)
        with torch.no_grad():
            self.lora_A.normal_(0.0, 0.02)
            self.lora_B.normal_(0.0, 0.02)

    def resize(self, rank: int, like: torch.Tensor | None = None) -> None:
        """Fresh (zero) tensors of `rank` triplets, all kept; a loaded delta fills them."""
        like = self.lora_A if like is None else like
        kw = dict(dtype=like.dtype, device=like.device)
        self.lora_A = nn.Parameter(torch.zeros(rank, self.d_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, rank, **kw))
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, **kw))
        self.register_buffer("mask", torch.ones(rank, dtype=torch.bool, device=like.device), persistent=False)
        for h in self._hooks:
            h.remove()
        self._hooks = [getattr(self, n).register_post_accumulate_grad_hook(self._capture(n)) for n in _NAMES]
        self.sensitivity = {}

    def _capture(self, name: str):
        def hook(p: torch.Tensor) -> None:
            self.sensitivity[name] = (p.detach() * p.grad).abs()
        return hook

    def values(self) -> torch.Tensor:
        """Λ with the pruned singular values zeroed (robust to optimizer steps between masks)."""
        return self.lora_E * self.mask.unsqueeze(1).to(self.lora_E.dtype)

    def update(self) -> torch.Tensor:
        """s P Λ Q as (out, in)."""
        return self.lora_B @ (self.lora_A * self.values()) * self.scaling

    def down(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.lora_A * self.values())

    def up(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.lora_B) * self.scaling

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor) -> None:
        self.mask.copy_(keep)
        self.lora_E.masked_fill_(~keep.unsqueeze(1), 0.0)

    def compact(self) -> dict[str, torch.Tensor]:
        """The kept triplets only: what a save writes."""
        m = self.mask
        return {"lora_A": self.lora_A[m], "lora_B": self.lora_B[:, m], "lora_E": self.lora_E[m]}

    def orthogonality(self) -> list[torch.Tensor]:
        return _importance.orthogonality(self.lora_A, self.lora_B)


class Importance(_importance.Importance):
    """The shared EMA of the sensitivity and of its uncertainty (methods/_importance.py), per
    tensor of one layer (the paper's Ī, Ū), scored per singular triplet."""

    def triplet_scores(self) -> torch.Tensor | None:
        if len(self.avg) < len(_NAMES):
            return None
        s = {n: self.score(n) for n in _NAMES}
        return s["lora_E"].view(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)


class AdaLoRADelta(Delta):
    config_cls = AdaLoRAConfig

    default_roles = ("query", "value")
    supported_types = (nn.Linear, Conv1D)

    def build(self, model: nn.Module) -> None:
        if self.config.total_step is None:
            raise ConfigError("AdaLoRA needs total_step (the number of optimizer steps) for its budget "
                              "schedule: AdaLoRAConfig(total_step=..., ...).")
        super().build(model)
        self._scores = {key: Importance(self.config.beta1, self.config.beta2) for key in self.svd_layers()}
        self.init_budget = self.config.init_r * len(self._scores)
        self.target_budget = self.config.target_r * len(self._scores)
        self.finalized = False

    def make_layer(self, path: str, module: nn.Module) -> SVDLayer:
        return SVDLayer(module, self.config)

    def svd_layers(self) -> dict[str, SVDLayer]:
        return {k: lay for k, lay in self.layers.items() if isinstance(lay, SVDLayer)}

    def ranks(self) -> dict[str, int]:
        """Kept rank per module path."""
        return {key_to_path(k): int(lay.mask.sum()) for k, lay in self.svd_layers().items()}

    # -- the schedule -------------------------------------------------------------------------------
    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank budget at `step`, whether to reallocate now): the cubic schedule."""
        cfg = self.config
        last = cfg.total_step - cfg.tfinal - 1
        if step >= last:
            return self.target_budget, True
        if step <= cfg.tinit:
            return self.init_budget, False
        frac = 1 - (step - cfg.tinit) / (last - cfg.tinit)
        budget = int((self.init_budget - self.target_budget) * frac ** 3 + self.target_budget)
        return budget, step % cfg.deltaT == 0

    def on_step(self, step: int) -> None:
        if self.finalized:
            return
        for key, layer in self.svd_layers().items():
            if layer.sensitivity:
                self._scores[key].update(layer.sensitivity)
                layer.sensitivity = {}
        budget, now = self.budget(step)
        if now:
            self._allocate(budget)
        if step >= self.config.total_step - self.config.tfinal - 1:
            self.finalized = True
            self._scores = {key: Importance(self.config.beta1, self.config.beta2) for key in self._scores}

    def _allocate(self, budget: int) -> None:
        layers = self.svd_layers()
        scores = {k: self._scores[k].triplet_scores() for k in layers}
        if any(s is None for s in scores.values()):
            raise DeltaError(
                f"AdaLoRA delta {self.name!r} has seen no gradients of its singular vectors: call "
                f"loss.backward() before dm.step(i), with the delta active and trainable."
            )
        flat = torch.cat([s.float().cpu() for s in scores.values()])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, min(budget, flat.numel())).indices] = True
        start = 0
        for k, layer in layers.items():
            n = layer.mask.numel()
            layer.set_mask(keep[start:start + n].to(layer.mask.device))
            start += n

    # -- loss term and state ------------------------------------------------------------------------
    def regularization(self) -> torch.Tensor | None:
        if self.config.orth_reg_weight == 0:
            return None
        terms = [t for layer in self.svd_layers().values() for t in layer.orthogonality()]
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        out = super().delta_state_dict()
        for key, layer in self.svd_layers().items():
            out.update({f"{key_to_path(key)}.{n}": t for n, t in layer.compact().items()})
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"ranks": self.ranks(), "finalized": self.finalized}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        ranks = state.get("ranks")
        layers = self.svd_layers()
        if not isinstance(ranks, dict) or {path_to_key(p) for p in ranks} != set(layers):
            raise CheckpointError(f"the saved AdaLoRA delta {self.name!r} lists ranks for modules "
                                  f"{sorted(ranks or {})[:4]}, which do not match its targets here: load it "
                                  f"into the base (and config) it was trained on.")
        for path, rank in ranks.items():
            layers[path_to_key(path)].resize(int(rank))
        self.finalized = bool(state.get("finalized", True))


register("adalora", AdaLoRAConfig, AdaLoRADelta, family="reparameterized", lr=5e-3, paper="Zhang et al. 2023 (AdaLoRA)")
