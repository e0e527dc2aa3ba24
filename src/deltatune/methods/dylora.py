"""DyLoRA (Valipour et al. 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using
Dynamic Search-Free Low-Rank Adaptation"): LoRA trained at every rank b in [r_min, r] at once.

Each optimizer step samples one rank b ~ Uniform{r_min, ..., r} (the paper's p_B, section 3) for
all modules of the delta; the forward uses the truncated factors (section 3, eq. 6):

    h = W x + (alpha / b) B[:, :b] A[:b, :] x

(the official code, huawei-noah/Efficient-NLP DyLoRA/loralib, scales each truncated factor by
sqrt(r / b) on top of alpha / r: the same alpha / b). ``frozen=True`` (the default, as the official
training callback, ``set_rank(b, frozen=True)``, and the paper's update rule) trains only the
b-th row of A and the b-th column of B at that step: the first b - 1 are used, detached. With
``frozen=False`` all of the first b are trained. At inference any rank 1..r works: ``rank`` in the
config (None: r) or ``delta.set_rank(b)``, used by the eval forward and by ``merge``; merging at
rank b adds (alpha / b) B[:, :b] A[:b]. ``rslora=True`` scales by alpha / sqrt(b) instead.

The sampled rank is reproducible: step i's rank is drawn from a generator seeded by (``seed``, i)
(``DyLoRADelta.sample_rank``). ``dm.step(i)`` after the optimizer step sets the rank of step i + 1;
step 0's is set when the delta is built. A loop that never calls ``dm.step`` would train at one
rank: the DeltaModel refuses it after a few calls (the delta has a schedule, ``Delta.scheduled``).
Gradient accumulation keeps one rank over the micro-batches of a step. The saved delta is a LoRA
file (A, B at full rank r); extra_state holds the inference rank and the step, so a loaded delta
evaluates at the same rank and resumes the same rank sequence.

Not supported (refused, with the fix): DoRA (its magnitude is fitted to one update, not to every
truncation), ``rank_pattern`` (one rank b is sampled for all modules), initialisations other than
kaiming / gaussian (PiSSA-style inits move the top-r directions out of the base, which a rank
b < r would drop), embeddings, weighted combinations (concatenating factors breaks the rank order).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..core.registry import register
from ..errors import CheckpointError, ConfigError, MergeError
from .lora import LoRAConfig, LoRADelta, LoRALayer

RANDOM_INITS = ("kaiming", "gaussian")


@dataclass
class DyLoRAConfig(LoRAConfig):
    """r: the largest rank; r_min: the smallest rank sampled in training; rank: the inference rank
    (None = r); frozen: train only the sampled rank's row / column (the paper's default); seed: of
    the rank sequence."""
    method: ClassVar[str] = "dylora"
    r_min: int = 1
    rank: int | None = None
    frozen: bool = True
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        self.check_range("r_min", 1, self.r, integer=True)
        if self.rank is not None:
            self.check_range("rank", 1, self.r, integer=True)
        self.check_choice("frozen", (True, False))
        self.check_range("seed", 0, 2**63 - 1, integer=True)
        if self.init not in RANDOM_INITS:
            self._fail("init", self.init, f"one of {', '.join(map(repr, RANDOM_INITS))}: DyLoRA truncates to "
                       f"ranks below r, which an init that moves the top-r directions out of the base "
                       f"would drop; use method='lora' for that init")
        if self.dora:
            self._fail("dora", self.dora, "False: DoRA's magnitude is fitted to one update, not to every "
                       "truncation of it; use method='lora' with dora=True")
        if self.rank_pattern:
            self._fail("rank_pattern", self.rank_pattern, "None: DyLoRA samples one rank for all modules "
                       "up to r; give r (and alpha_pattern for per-module alphas)")


class DyLoRALayer(LoRALayer):
    """LoRA's layer whose forward, update and merge use the first b ranks, scaled alpha / b: b is
    the delta's sampled rank in training mode and its inference rank otherwise."""

    def __init__(self, module: nn.Module, cfg: DyLoRAConfig, alpha: float):
        super().__init__(module, cfg, cfg.r, alpha)
        self.r, self.alpha, self.frozen = cfg.r, alpha, cfg.frozen
        self._scaling_for = cfg.scaling_for  # alpha / b (rsLoRA: alpha / sqrt(b))
        self.train_rank = cfg.r
        self.eval_rank = cfg.rank or cfg.r
        self.merged_rank: int | None = None  # the rank merged into the base, while merged
        self.scaling = self.scaling_at(self.eval_rank)

    def scaling_at(self, b: int) -> float:
        return self._scaling_for(b, self.alpha)

    def current_rank(self) -> int:
        return self.train_rank if self.training else self.eval_rank

    def _tail_only(self) -> bool:
        return self.frozen and self.training and torch.is_grad_enabled()

    def factor_A(self, b: int) -> torch.Tensor:
        a = self.lora_A[:b]
        if b > 1 and self._tail_only():  # the first b - 1 rows are used, not trained
            a = torch.cat([a[:-1].detach(), a[-1:]])
        return a

    def factor_B(self, b: int) -> torch.Tensor:
        m = self.lora_B[:, :b]
        if b > 1 and self._tail_only():
            m = torch.cat([m[:, :-1].detach(), m[:, -1:]], dim=1)
        return m

    def down(self, x: torch.Tensor) -> torch.Tensor:
        b = self.current_rank()
        return F.linear(x, self.factor_A(b)) * self.scaling_at(b)

    def up(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.factor_B(h.shape[-1]))

    def update(self) -> torch.Tensor:
        """(alpha / b) B[:, :b] A[:b] at the merged rank while merged, else the inference rank."""
        b = self.merged_rank or self.eval_rank
        return (self.lora_B[:, :b] @ self.lora_A[:b]) * self.scaling_at(b)

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        super().merge(module)
        self.merged_rank = self.eval_rank

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        super().unmerge(module)
        self.merged_rank = None


class DyLoRADelta(LoRADelta):
    config_cls = DyLoRAConfig

    supported_types = (nn.Linear, Conv1D)

    def build(self, model: nn.Module) -> None:
        super().build(model)
        self.step_index = 0  # the step whose sampled rank the training forward uses
        self._put_train_rank(self.sample_rank(0))

    def make_layer(self, path: str, module: nn.Module) -> DyLoRALayer:
        return DyLoRALayer(module, self.config, self.config.rank_alpha(path)[1])

    def dylora_layers(self) -> list[DyLoRALayer]:
        return [lay for lay in self.layers.values() if isinstance(lay, DyLoRALayer)]

    # -- ranks ----------------------------------------------------------------------------------
    def sample_rank(self, step: int) -> int:
        """The training rank of optimizer step `step`: uniform in [r_min, r], from (seed, step)."""
        cfg = self.config
        return random.Random(f"dylora:{cfg.seed}:{step}").randint(cfg.r_min, cfg.r)

    @property
    def training_rank(self) -> int:
        """The rank the training forward uses at this step."""
        return self.dylora_layers()[0].train_rank

    @property
    def rank(self) -> int:
        """The inference rank (the eval forward's and the merge's)."""
        return self.dylora_layers()[0].eval_rank

    def set_rank(self, rank: int) -> None:
        """Evaluate and merge at `rank` (1..r) from now on (training keeps sampling its ranks)."""
        r = self.config.r
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r:
            raise ConfigError(f"set_rank({rank!r}) on DyLoRA delta {self.name!r}: expected an integer "
                              f"rank in [1, {r}] (r={r}, the largest trained rank).")
        if any(lay.merged_rank is not None for lay in self.dylora_layers()):
            raise MergeError(f"DyLoRA delta {self.name!r} is merged at rank {self.rank}: dm.unmerge() "
                             f"before set_rank({rank}), then merge again.")
        for lay in self.dylora_layers():
            lay.eval_rank = rank
            lay.scaling = lay.scaling_at(rank)

    def _put_train_rank(self, rank: int) -> None:
        for lay in self.dylora_layers():
            lay.train_rank = rank

    def on_step(self, step: int) -> None:
        """After optimizer step `step`: the next step's rank."""
        self.step_index = step + 1
        self._put_train_rank(self.sample_rank(self.step_index))

    # -- combinations and state ---------------------------------------------------------------
    @classmethod
    def weighted(cls, name, deltas, weights, model, how="linear", **options):
        raise MergeError("DyLoRA deltas have no weighted combination into one delta (concatenated "
                         "factors would lose the rank order that truncation relies on): set_rank(b) on "
                         "each and run them with activate(..., composition='average', weights=[...]).")

    def extra_state(self) -> dict[str, Any]:
        return {"rank": self.rank, "step": self.step_index}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        rank, step = state.get("rank"), state.get("step")
        if not (isinstance(rank, int) and 1 <= rank <= self.config.r and isinstance(step, int) and step >= 0):
            raise CheckpointError(f"the saved DyLoRA delta {self.name!r} records rank={rank!r}, step={step!r}: "
                                  f"expected a rank in [1, {self.config.r}] and a step >= 0; the file "
                                  f"is damaged or from another method: save it again.")
        self.set_rank(rank)
        self.step_index = step
        self._put_train_rank(self.sample_rank(step))


register("dylora", DyLoRAConfig, DyLoRADelta, family="reparameterized", lr=5e-3,
         paper="Valipour et al. 2023 (DyLoRA)")
