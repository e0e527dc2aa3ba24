"""Delta-LoRA (Zi et al. 2023, "Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of
Low-Rank Matrices"): LoRA whose pretrained weight W also moves, after each optimizer step past
the first K, by λ times the change of the scaled low-rank product (the paper's Algorithm 1):

    W(t+1) = W(t) + λ · (α/r) · (B(t+1) A(t+1) - B(t) A(t))      for t > K

with A Kaiming-initialised, B zero (identity at init), and the dropout of the low-rank branch
removed (the paper drops it so that the gradient of W equals that of the product, ∂L/∂W =
∂L/∂(BA); a config with dropout > 0 is refused). The paper's settings: update ratio λ = 2, start
steps K = 500; the scaling is LoRA's s = α/r (or α/√r with rslora).

The sum telescopes: for t > K, W(t) = W(0) + λ·s·(B(t)A(t) - B(K+1)A(K+1)) exactly, where
B(K+1)A(K+1) is the product right after step K. So this layer keeps that product's factors (the
``anchor_A`` / ``anchor_B`` buffers, copied at ``dm.step(K)``) and adds W's movement in the
forward instead of writing into W:

    h = W(0) x + s B A x + λ · s (sg[B A] - B_K A_K) x      (sg: no gradient, as W gets none)

which is the paper's W(t) x + s B(t) A(t) x at every step, with the paper's gradients: A and B get
theirs from the LoRA branch only, and x gets W(t)ᵀ ∂L/∂h + s (B A)ᵀ ∂L/∂h as through the moved W
(a stop-gradient on the whole movement term would also cut λ s (B A)ᵀ ∂L/∂h from x, and every
module below a moving one would train on a wrong gradient). What this buys: the base model is
never written (``remove`` / ``unwrap`` give it back bit for bit; merge and unmerge are the core's
exact ones); no movement is lost to rounding (an in-place per-step ``W += λ ΔP`` drops every
change below half an ulp of W: in a bf16 base about 1e-4 for |W| ≈ 0.05); and the saved delta
stays low-rank: A, B and the anchor (2 r (in + out) numbers per module, twice LoRA's file)
reproduce the adapted weight exactly, where saving W's accumulated change would cost a dense
out x in tensor per module. On the shipped MiniLM, query and value, r = 8, fp32: 589,824 tensor
bytes against LoRA's 294,912 (files 598,281 / 300,510 bytes with headers and config; the task
head adds 3,080 to either), where the dense change of W would be 7,077,888. The merged weight is
W(0) + (1 + λ) s B A - λ s B_K A_K, the paper's W(T) + s B(T) A(T). By the telescoping, W's
movement has rank at most 2r (the title's "high-rank" update is a rank-2r one).

Training loop: ``dm(**b).loss.backward(); opt.step(); dm.step(i)`` for i = 0, 1, ...: step K's
``dm.step`` copies the anchor (W starts to move from then on). A loop that never calls
``dm.step`` is refused after a few training calls (the delta has a schedule: ``Delta.scheduled``).
``start_step`` (K) None is the paper's 500 when set by hand; a training harness fills it with a
tenth of the run (``run_length_fields``), so that short runs move W too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..core.registry import register
from ..errors import MergeError
from .lora import LoRAConfig, LoRADelta, LoRALayer

PAPER_START = 500  # the paper's start steps K
RANDOM_INITS = ("kaiming", "gaussian")


@dataclass
class DeltaLoRAConfig(LoRAConfig):
    """LoRA's fields (dropout must stay 0, no DoRA), plus update_ratio (λ) and start_step (K: W
    moves after steps t > K; None = the paper's 500, or a tenth of the run when a harness fills it)."""
    method: ClassVar[str] = "delta_lora"
    update_ratio: float = 2.0
    start_step: int | None = None

    @classmethod
    def run_length_fields(cls, steps: int) -> dict[str, Any]:
        return {"start_step": steps // 10}

    def validate(self) -> None:
        super().validate()
        self.check_range("update_ratio", 0, low_open=True)
        if self.start_step is not None:
            self.check_range("start_step", 0, integer=True)
        if self.dropout != 0:
            self._fail("dropout", self.dropout, "0: Delta-LoRA removes the low-rank branch's dropout (so "
                       "that W's gradient equals the product's); use method='lora' for dropout")
        if self.dora:
            self._fail("dora", self.dora, "False: DoRA renormalises W + BA per row, which the delta "
                       "update of W does not follow; use method='lora' with dora=True")
        if self.init not in RANDOM_INITS:
            self._fail("init", self.init, f"one of {', '.join(map(repr, RANDOM_INITS))} (the paper: A "
                       f"Kaiming, B zero); use method='lora' for other initialisations")

    @property
    def start(self) -> int:
        """K: W moves after the optimizer steps t > K."""
        return PAPER_START if self.start_step is None else self.start_step


class DeltaLoRALayer(LoRALayer):
    """LoRA's layer plus W's movement λ·s·(BA - B_K A_K), added in the forward (detached) and in
    the merge; the anchor B_K, A_K is the product's factors when W started to move."""

    def __init__(self, module: nn.Module, cfg: DeltaLoRAConfig, r: int | None = None, alpha: float | None = None):
        super().__init__(module, cfg, r, alpha)
        self.ratio = cfg.update_ratio
        self.register_buffer("anchor_A", torch.zeros_like(self.lora_A))
        self.register_buffer("anchor_B", torch.zeros_like(self.lora_B))
        self.moving = False

    @torch.no_grad()
    def set_anchor(self) -> None:
        self.anchor_A.copy_(self.lora_A)
        self.anchor_B.copy_(self.lora_B)

    def moved(self) -> torch.Tensor:
        """How far W has moved, as (out, in): λ s (B A - B_K A_K) (zero before step K)."""
        if not self.moving:
            return torch.zeros_like(self.lora_B @ self.lora_A)
        s = self.scaling
        return self.ratio * ((self.lora_B @ self.lora_A) * s - (self.anchor_B @ self.anchor_A) * s).detach()

    def update(self) -> torch.Tensor:
        """What the module adds to W(0): s B A + W's movement."""
        lora = (self.lora_B @ self.lora_A) * self.scaling
        if not self.moving:
            return lora
        return lora + self.ratio * (lora.detach() - (self.anchor_B @ self.anchor_A) * self.scaling)

    def movement(self, x: torch.Tensor) -> torch.Tensor:
        """W's movement applied to x, without λ: s (B A - B_K A_K) x as one rank-2r product. A, B
        enter detached (W gets no gradient in the paper, so neither do they through it); x keeps
        its gradient, since the paper's moved W(t) passes ∂L/∂h back to the layers below."""
        a = torch.cat([self.lora_A.detach(), self.anchor_A])
        b = torch.cat([self.lora_B.detach(), -self.anchor_B], dim=1)
        return F.linear(F.linear(x, a) * self.scaling, b)

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.up(self.down(x))  # s B A x: the only term with gradients for A and B
        if self.moving:
            out = out + self.ratio * self.movement(x)
        return y + out


class DeltaLoRADelta(LoRADelta):
    config_cls = DeltaLoRAConfig

    supported_types = (nn.Linear, Conv1D)

    def make_layer(self, path: str, module: nn.Module) -> DeltaLoRALayer:
        return DeltaLoRALayer(module, self.config, *self.config.rank_alpha(path))

    def delta_layers(self) -> list[DeltaLoRALayer]:
        return [lay for lay in self.layers.values() if isinstance(lay, DeltaLoRALayer)]

    @property
    def moving(self) -> bool:
        """Whether W moves (the anchor was taken at step K)."""
        return any(lay.moving for lay in self.delta_layers())

    def on_step(self, step: int) -> None:
        if self.moving or step < self.config.start:
            return
        if self._base_copy is not None or self._at_merge is not None:
            raise MergeError(f"Delta-LoRA delta {self.name!r} is merged: call unmerge() before training "
                             f"on (W starts to move at step {step}).")
        for layer in self.delta_layers():
            layer.set_anchor()
            layer.moving = True

    @classmethod
    def weighted(cls, name, deltas, weights, model, how="linear", **options):
        """Refused: a combination of the LoRA factors would drop each delta's movement of W."""
        raise MergeError("Delta-LoRA deltas have no weighted combination into one delta (combining their "
                         "LoRA factors would drop each one's movement of W): run them together with "
                         "activate(..., composition='average', weights=[...]), or merge them one by one.")

    def extra_state(self) -> dict[str, Any]:
        return {"moving": self.moving}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for layer in self.delta_layers():
            layer.moving = bool(state.get("moving", False))


# lr: W's movement makes each step (1 + λ) = 3 times LoRA's, so LoRA's 5e-3 overshoots (MiniLM on
# SST-2, q/v, 50 steps, seed 0: 0.535 -> 0.65 at 5e-3, 0.72 at 3e-3, 0.765 to 0.775 at 2e-3)
register("delta_lora", DeltaLoRAConfig, DeltaLoRADelta, family="reparameterized", lr=2e-3,
         paper="Zi et al. 2023 (Delta-LoRA)")
