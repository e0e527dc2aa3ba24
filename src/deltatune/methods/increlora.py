"""IncreLoRA (Zhang et al. 2023, "IncreLoRA: Incremental Parameter Allocation Method for
Parameter-Efficient Fine-tuning"): SVD-form updates ΔW = s · P Λ Q that start at a small rank in
every module and grow during training, a few ranks at a time, in the modules whose importance is
highest, until a total rank budget is spent (AdaLoRA's opposite direction: AdaLoRA prunes from a
large start down to its budget).

Checked against the paper (section 3) and the authors' code (github FeiyuZhang98/IncreLoRA:
loralib/loralib/increlora.py ``SVDLinear`` / ``RankAllocator``, NLU/scripts, the NLU trainer):

- Form: per module, components (P_i, λ_i, Q_i): Q = ``lora_A`` (r, in), Λ = ``lora_E`` (r, 1),
  P = ``lora_B`` (out, r); A, B ~ N(0, 0.02), E zero (identity at init). s = alpha / (r + 1e-5)
  where r is the module's *current* rank (the reference's ``ranknum``, raised at each growth: a
  module's existing update is rescaled by r_old / r_new when it grows, as in the reference).
- Importance of a module: the sensitivity of its whole update, I = Σ|ΔW ⊙ ∂L/∂ΔW| / sqrt(out·in)
  (the reference's backward hook on ΔW), smoothed as AdaLoRA's (methods/_importance.py, shared:
  Ī, Ū with beta1, beta2; score Ī·Ū), updated after every step until the budget is spent.
- Allocation: at steps i > tinit with i % deltaT == 0 (the reference's init_warmup /
  incre_interval), the top_h modules by score get rank_step more ranks each (the reference's
  incre_rank_num: target_rank / 2 by default) until the total rank is target_r per module on
  average. The budget is never exceeded: the last allocation adds only what is left (the
  reference's threshold test can overshoot it by a few ranks).
- Advance learning: each module holds rank_step reserved components whose P, Q train from the
  second step with λ fixed at 1e-5 (not trained) so that gradients reach them; when the module is
  chosen they become its new ranks (λ trainable from 1e-5) and a fresh reserve starts
  (``advance_learning=False``: new components start untrained, A, B random and λ = 0). The
  reserve is part of the forward (as in the reference), so it is saved with the delta while
  training goes on; when the budget is spent the reserves are dropped.
- Orthogonality (as AdaLoRA): orth_reg_weight · mean over modules of ||QQᵀ - I||_F and
  ||PᵀP - I||_F of each module's whole P, Q (reserve included). The reference code takes the
  norm per component tensor instead (for a rank-1 component | ||q||² - 1 |).
- Restart warmup (the reference's per-group learning-rate schedule for new components) is a
  training loop's business; here new components join at the loop's current learning rate.

Growing tensors, not a pre-allocated masked budget: new ranks are new ``nn.Parameter``s, and the
delta bumps ``param_version``, the cue for a loop to give them to its optimizer (DeltaCallback
under transformers.Trainer does, with fresh optimizer state as the reference's add_param_group;
``deltatune bench`` builds a new optimizer). Masked rows of one pre-allocated tensor would share
that tensor's Adam step count, so their bias correction would be off and their first updates
several times the learning rate; pre-allocated separate tensors would be trainable tensors no
gradient reaches, and memory would hold every module's largest possible rank. A loop that does
not give the new tensors to its optimizer is refused (DeltaError) two steps after the growth,
never left silently untrained. The forward is always the factored low-rank one; until the budget is
spent a hook on the update's output g = ∂L/∂(ΔW x) forms ∂L/∂ΔW = Σ_tokens g xᵀ for the score (the
reference runs the training forward densely for it: three out x in x tokens products a step
instead of this one; on MiniLM q/v 8% more FLOPs than LoRA's step while allocating, not 22%).

Training loop: ``loss = dm(**b).loss + dm.regularization(); loss.backward(); opt.step();
dm.step(i)`` for i = 0, 1, ... (``dm.step`` may come before or after ``zero_grad``), and
``if dm.param_version != seen: opt.add_param_group({"params": new tensors})`` after it.
``total_step`` (the run's length) lets tinit / deltaT / top_h / rank_step left at None be derived
so that the budget is reached by about half of the run; given explicitly, a schedule that cannot
reach the budget within total_step is refused. Saved: every component and the reserve, with the
chunk sizes, the schedule state and the smoothed scores in extra_state, so that a loaded delta
has the same ranks, gives the same logits and resumes the same schedule.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..core.config import DeltaConfig
from ..core.delta import Delta, key_to_path, path_to_key
from ..core.registry import register
from ..errors import CheckpointError, ConfigError, DeltaError, MergeError
from ._importance import Importance, orthogonality
from ._weights import LowRankLayer, module_dims

RESERVE_VALUE = 1e-5  # λ of reserved components (the reference's advance learning)
INIT_STD = 0.02       # A, B ~ N(0, 0.02), as the reference
TOP_H_SHARE = 6       # default top_h: a sixth of the modules (the reference GLUE scripts: 3 to 18 of DeBERTa's 72)
STRIKES = 2           # steps with gradients after which unmoved new tensors are refused


@dataclass
class IncreLoRAConfig(DeltaConfig):
    """init_r: each module's starting rank; target_r: the final average rank (budget = target_r
    x modules); rank_step: ranks a chosen module gains per allocation (None: target_r // 2, as
    the reference); top_h: modules chosen per allocation (None: a sixth of them); tinit: steps
    before the first allocation; deltaT: steps between allocations; total_step: the number of
    optimizer steps (needed when tinit or deltaT is None)."""
    method: ClassVar[str] = "increlora"

    init_r: int = 1
    target_r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rank_step: int | None = None
    top_h: int | None = None
    total_step: int | None = None
    tinit: int | None = None
    deltaT: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    advance_learning: bool = True

    @classmethod
    def run_length_fields(cls, steps: int) -> dict[str, Any]:
        return {"total_step": steps}

    def validate(self) -> None:
        super().validate()
        self.check_range("init_r", 1, integer=True)
        self.check_range("target_r", 1, integer=True)
        if self.target_r <= self.init_r:
            self._fail("target_r", self.target_r, f"> init_r = {self.init_r} (IncreLoRA adds ranks up to "
                       f"target_r; for a fixed rank use method='lora')")
        self.check_range("alpha", 0, low_open=True)
        self.check_range("dropout", 0.0, 1.0, high_open=True)
        for name, low in (("rank_step", 1), ("top_h", 1), ("total_step", 1), ("tinit", 0), ("deltaT", 1)):
            if getattr(self, name) is not None:
                self.check_range(name, low, integer=True)
        self.check_range("beta1", 0, 1, low_open=True, high_open=True)
        self.check_range("beta2", 0, 1, low_open=True, high_open=True)
        self.check_range("orth_reg_weight", 0)
        self.check_choice("advance_learning", (True, False))
        if self.total_step is not None and self.tinit is not None and self.tinit >= self.total_step - 1:
            self._fail("tinit", self.tinit, f"< total_step - 1 = {self.total_step - 1} (no step is left to "
                       f"add ranks in); lower tinit or raise total_step")


@dataclass(frozen=True)
class Schedule:
    """The allocation schedule of one delta, the config's None fields resolved."""
    tinit: int
    deltaT: int
    top_h: int
    rank_step: int

    def allocates(self, step: int) -> bool:
        return step > self.tinit and step % self.deltaT == 0


def schedule(cfg: IncreLoRAConfig, modules: int) -> Schedule:
    """Resolve tinit / deltaT / top_h / rank_step for `modules` targeted modules (see module doc)."""
    need = (cfg.target_r - cfg.init_r) * modules
    if cfg.top_h is not None and cfg.top_h > modules:
        raise ConfigError(f"IncreLoRAConfig.top_h={cfg.top_h} is invalid: expected at most the {modules} "
                          f"targeted modules.")
    rank_step = cfg.rank_step if cfg.rank_step is not None else max(1, cfg.target_r // 2)
    top_h = cfg.top_h if cfg.top_h is not None else max(1, math.ceil(modules / TOP_H_SHARE))
    tinit, delta_t, total = cfg.tinit, cfg.deltaT, cfg.total_step
    if total is None:
        if tinit is None or delta_t is None:
            raise ConfigError("IncreLoRA needs total_step (the number of optimizer steps) to place its "
                              "allocations, or both tinit and deltaT: IncreLoRAConfig(total_step=..., ...).")
        return Schedule(tinit, delta_t, top_h, rank_step)
    if tinit is None:
        tinit = min(total // 10, total - 2) if total >= 2 else 0
    if delta_t is None:  # the rounds spread over (tinit, total / 2]
        rounds = math.ceil(need / (top_h * rank_step))
        delta_t = max(1, (max(1, total // 2 - tinit)) // rounds)
    slots = sum(1 for i in range(tinit + 1, total) if i % delta_t == 0)
    if slots and slots * top_h * rank_step < need and cfg.top_h is None:
        top_h = min(modules, math.ceil(need / (rank_step * slots)))
    if slots and slots * top_h * rank_step < need and cfg.rank_step is None:
        rank_step = math.ceil(need / (top_h * slots))
    if slots * top_h * rank_step < need:
        raise ConfigError(
            f"IncreLoRA's schedule cannot reach its budget: {slots} allocation steps (i > tinit={tinit}, "
            f"i % deltaT={delta_t} == 0, i < total_step={total}) x top_h={top_h} x rank_step={rank_step} "
            f"< {need} ranks to add ((target_r - init_r) x {modules} modules): lower tinit or deltaT, raise "
            f"top_h / rank_step or total_step, or leave them at None to be derived.")
    return Schedule(tinit, delta_t, top_h, rank_step)


class IncreLayer(LowRankLayer):
    """s P Λ Q over a growing list of components (chunks of rows) plus an optional reserve; while
    the delta still allocates, the training forward leaves a hook that scores the module."""

    def __init__(self, module: nn.Module, cfg: IncreLoRAConfig, reserve: int):
        super().__init__(cfg.dropout)
        self.d_in, self.d_out = module_dims(module)
        self.alpha = cfg.alpha
        w = module.weight
        self.lora_A = nn.ParameterList([nn.Parameter(self._normal(cfg.init_r, self.d_in, like=w))])
        self.lora_B = nn.ParameterList([nn.Parameter(self._normal(self.d_out, cfg.init_r, like=w))])
        self.lora_E = nn.ParameterList([nn.Parameter(w.new_zeros(cfg.init_r, 1))])
        self.reserve_value = 0.0  # after the first step 1e-5 (the reference adds the reserve at step 0)
        self.capturing = True     # the delta still allocates: the training forward reads ∂L/∂ΔW
        self.sensitivity: torch.Tensor | None = None  # I of the last backward
        self.register_parameter("reserve_A", None)
        self.register_parameter("reserve_B", None)
        if reserve:
            self.new_reserve(reserve)

    @staticmethod
    def _normal(*shape: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(*shape, dtype=like.dtype, device=like.device).normal_(0.0, INIT_STD)

    # -- shape --------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """Active rank (the reserve not counted): the reference's ``ranknum``."""
        return sum(e.shape[0] for e in self.lora_E)

    def chunks(self) -> list[int]:
        return [e.shape[0] for e in self.lora_E]

    @property
    def reserve_size(self) -> int:
        return 0 if self.reserve_A is None else self.reserve_A.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank + 1e-5)  # the reference: lora_alpha / (ranknum + 1e-5)

    def _like(self) -> torch.Tensor:
        return self.lora_A[0]

    def new_reserve(self, size: int) -> list[nn.Parameter]:
        like = self._like()
        self.reserve_A = nn.Parameter(self._normal(size, self.d_in, like=like))
        self.reserve_B = nn.Parameter(self._normal(self.d_out, size, like=like))
        return [self.reserve_A, self.reserve_B]

    def drop_reserve(self) -> None:
        self.reserve_A = None
        self.reserve_B = None

    def grow(self, add: int, advance: bool) -> list[nn.Parameter]:
        """`add` more ranks: the reserve's first `add` components (advance learning) or fresh ones;
        returns the tensors the optimizer does not know yet. The caller renews the reserve."""
        like = self._like()
        if advance and self.reserve_A is not None:
            if add == self.reserve_size:  # the same tensors go on training (and keep their optimizer state)
                a, b, new = self.reserve_A, self.reserve_B, []
            else:
                a = nn.Parameter(self.reserve_A.detach()[:add].clone())
                b = nn.Parameter(self.reserve_B.detach()[:, :add].clone())
                new = [a, b]
            e = nn.Parameter(torch.full((add, 1), RESERVE_VALUE, dtype=like.dtype, device=like.device))
        else:
            a = nn.Parameter(self._normal(add, self.d_in, like=like))
            b = nn.Parameter(self._normal(self.d_out, add, like=like))
            e = nn.Parameter(like.new_zeros(add, 1))
            new = [a, b]
        self.lora_A.append(a)
        self.lora_B.append(b)
        self.lora_E.append(e)
        return [*new, e]

    def rebuild(self, chunks: list[int], reserve: int) -> None:
        """Zero tensors of the given chunk sizes and reserve (a loaded delta fills them)."""
        like = self._like()
        self.lora_A = nn.ParameterList([nn.Parameter(like.new_zeros(c, self.d_in)) for c in chunks])
        self.lora_B = nn.ParameterList([nn.Parameter(like.new_zeros(self.d_out, c)) for c in chunks])
        self.lora_E = nn.ParameterList([nn.Parameter(like.new_zeros(c, 1)) for c in chunks])
        if reserve:
            self.reserve_A = nn.Parameter(like.new_zeros(reserve, self.d_in))
            self.reserve_B = nn.Parameter(like.new_zeros(self.d_out, reserve))
        else:
            self.drop_reserve()

    # -- the update -----------------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q, Λ, P) of every component, the reserve last (its λ fixed)."""
        a, b, e = list(self.lora_A), list(self.lora_B), list(self.lora_E)
        if self.reserve_A is not None:
            a.append(self.reserve_A)
            b.append(self.reserve_B)
            e.append(torch.full((self.reserve_size, 1), self.reserve_value, dtype=e[0].dtype,
                                device=e[0].device))
        return torch.cat(a), torch.cat(e), torch.cat(b, dim=1)

    def update(self) -> torch.Tensor:
        """s P Λ Q as (out, in) (the reference's ``loraW``)."""
        a, e, b = self.factors()
        return b @ (a * e) * self.scaling

    def down(self, x: torch.Tensor) -> torch.Tensor:
        a, e, _ = self.factors()
        return F.linear(x, a * e)

    def up(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.factors()[2]) * self.scaling

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        a, e, b = self.factors()
        s = self.scaling
        out = F.linear(F.linear(x, a * e), b) * s
        if self.capturing and self.training and out.requires_grad:
            out.register_hook(self._capture(x.detach(), (a.detach(), e.detach(), b.detach(), s)))
        return y + out

    def _capture(self, x: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]):
        """A hook on g = ∂L/∂(ΔW x), the update's output: ∂L/∂ΔW = Σ_tokens g xᵀ is formed once
        here (one out x in x tokens product), where a dense forward (the reference's) would cost
        three such products per step: its forward and both backward products."""
        a, e, b, s = factors

        def hook(g: torch.Tensor) -> None:
            dw = b @ (a * e) * s
            grad = g.reshape(-1, self.d_out).T.to(dw.dtype) @ x.reshape(-1, self.d_in).to(dw.dtype)
            self.sensitivity = (dw * grad).abs().sum() / math.sqrt(dw.numel())
        return hook

    def orthogonality(self) -> list[torch.Tensor]:
        a, _, b = self.factors()
        return orthogonality(a, b)


@dataclass
class _Watch:
    """A tensor the delta added: it must move once it has a gradient (the optimizer knows it)."""
    param: nn.Parameter
    before: torch.Tensor
    handle: Any
    grad: torch.Tensor | None = None
    strikes: int = 0


class IncreLoRADelta(Delta):
    config_cls = IncreLoRAConfig

    default_roles = ("query", "value")
    supported_types = (nn.Linear, Conv1D)

    def build(self, model: nn.Module) -> None:
        cfg = self.config
        found = self.targets(model)
        self.plan = schedule(cfg, len(found))
        reserve = self.plan.rank_step if cfg.advance_learning else 0
        for path, module in found:
            self.add_layer(path, IncreLayer(module, cfg, reserve))
        self.budget = cfg.target_r * len(found)
        self.importance: Importance | None = Importance(cfg.beta1, cfg.beta2)
        self.started = False   # the reserves run (after the first step)
        self.finished = False  # the budget is spent: ranks fixed, no reserve, no capture
        self.grown_at: list[int] = []
        self._watch: list[_Watch] = []

    def incre_layers(self) -> dict[str, IncreLayer]:
        return {k: lay for k, lay in self.layers.items() if isinstance(lay, IncreLayer)}

    def ranks(self) -> dict[str, int]:
        """Active rank per module path."""
        return {key_to_path(k): lay.rank for k, lay in self.incre_layers().items()}

    def total_rank(self) -> int:
        return sum(lay.rank for lay in self.incre_layers().values())

    # -- the schedule ---------------------------------------------------------------------------------
    def on_step(self, step: int) -> None:
        self._check_followed()
        layers = self.incre_layers()
        if not self.started:
            self.started = True
            for layer in layers.values():
                layer.reserve_value = RESERVE_VALUE if self.config.advance_learning else 0.0
        if self.finished:
            return
        fresh = {k: lay.sensitivity for k, lay in layers.items() if lay.sensitivity is not None}
        self.importance.update(fresh)
        for layer in layers.values():
            layer.sensitivity = None
        if self.plan.allocates(step):
            self._allocate(step)

    def _allocate(self, step: int) -> None:
        if self._base_copy is not None or self._at_merge is not None:
            raise MergeError(f"IncreLoRA delta {self.name!r} is merged: call unmerge() before training on "
                             f"(its ranks grow at step {step}).")
        layers = self.incre_layers()
        scores = {k: self.importance.score(k) for k in layers}
        if any(s is None for s in scores.values()):
            raise DeltaError(
                f"IncreLoRA delta {self.name!r} has seen no gradient of some modules' updates by step "
                f"{step}: call loss.backward() before dm.step(i), with the delta active and trainable.")
        keys = list(layers)
        flat = torch.stack([scores[k].detach().float().cpu() for k in keys])
        order = torch.argsort(flat, descending=True, stable=True)[: self.plan.top_h].tolist()
        left = self.budget - self.total_rank()
        grown, new = [], []
        for i in order:
            if left <= 0:
                break
            add = min(self.plan.rank_step, left)
            new += layers[keys[i]].grow(add, self.config.advance_learning)
            grown.append(keys[i])
            left -= add
        self.finished = left <= 0
        for key, layer in layers.items():
            if self.finished:
                layer.drop_reserve()
                layer.capturing = False
            elif key in grown and self.config.advance_learning:
                new += layer.new_reserve(self.plan.rank_step)
        self.grown_at.append(step)
        self.param_version += 1
        self._watch += [self._watched(p) for p in new]
        if self.finished:
            self.importance = None
            live = {id(p) for p in self.parameters()}  # dropped reserves get no gradient: not watched
            for w in self._watch:
                if id(w.param) not in live:
                    w.handle.remove()
            self._watch = [w for w in self._watch if id(w.param) in live]

    # -- refusing a loop whose optimizer does not train the new tensors -------------------------------
    def _watched(self, p: nn.Parameter) -> _Watch:
        w = _Watch(p, p.detach().clone(), None)

        def hook(t: torch.Tensor) -> None:
            w.grad = t.grad.detach().abs().sum()
        w.handle = p.register_post_accumulate_grad_hook(hook)
        return w

    def _check_followed(self) -> None:
        keep = []
        for w in self._watch:
            if w.grad is not None and float(w.grad) > 0:
                if not torch.equal(w.param.detach(), w.before):
                    w.handle.remove()
                    continue
                w.strikes += 1
                if w.strikes >= STRIKES:
                    self._unwatch()
                    raise DeltaError(
                        f"IncreLoRA delta {self.name!r} added ranks at step {self.grown_at[-1]}, but the "
                        f"optimizer does not train them (they got gradients and did not move): after "
                        f"dm.step(i), when dm.param_version changes, give the new tensors to the optimizer "
                        f"(opt.add_param_group({{'params': [p for p in dm.trainable_parameters() if p not "
                        f"in known]}})); transformers.Trainer does it with deltatune.DeltaCallback(), "
                        f"`deltatune bench` / `deltatune train` by themselves.")
            w.grad = None
            keep.append(w)
        self._watch = keep

    def _unwatch(self) -> None:
        for w in self._watch:
            w.handle.remove()
        self._watch = []

    # -- loss term and state --------------------------------------------------------------------------
    def regularization(self) -> torch.Tensor | None:
        if self.config.orth_reg_weight == 0:
            return None
        terms = [t for layer in self.incre_layers().values() for t in layer.orthogonality()]
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    def extra_state(self) -> dict[str, Any]:
        layers = self.incre_layers()
        scores = {}
        if self.importance is not None:
            scores = {key_to_path(k): [float(self.importance.avg[k]), float(self.importance.unc[k])]
                      for k in layers if k in self.importance.avg}
        return {"ranks": self.ranks(),
                "chunks": {key_to_path(k): lay.chunks() for k, lay in layers.items()},
                "reserve": {key_to_path(k): lay.reserve_size for k, lay in layers.items()},
                "started": self.started, "finished": self.finished, "grown_at": list(self.grown_at),
                "scores": scores, "schedule": asdict(self.plan)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        layers = self.incre_layers()
        chunks, reserve = state.get("chunks"), state.get("reserve")
        if (not isinstance(chunks, dict) or not isinstance(reserve, dict)
                or {path_to_key(p) for p in chunks} != set(layers) or set(chunks) != set(reserve)):
            raise CheckpointError(f"the saved IncreLoRA delta {self.name!r} lists components for modules "
                                  f"{sorted(chunks or {})[:4]}, which do not match its targets here: load it "
                                  f"into the base (and config) it was trained on.")
        self._unwatch()
        self.started = bool(state.get("started", True))
        self.finished = bool(state.get("finished", True))
        self.grown_at = [int(s) for s in state.get("grown_at", [])]
        for path, sizes in chunks.items():
            layer = layers[path_to_key(path)]
            sizes = [int(c) for c in sizes]
            if layer.chunks() != sizes or layer.reserve_size != int(reserve[path]):
                # only then new tensors: a resumed training loop's optimizer holds the current ones
                layer.rebuild(sizes, int(reserve[path]))
            layer.reserve_value = RESERVE_VALUE if self.started and self.config.advance_learning else 0.0
            layer.capturing = not self.finished
            layer.sensitivity = None
        if self.finished:
            self.importance = None
            return
        self.importance = Importance(self.config.beta1, self.config.beta2)
        for path, (avg, unc) in (state.get("scores") or {}).items():
            like = layers[path_to_key(path)].lora_E[0]
            self.importance.avg[path_to_key(path)] = torch.tensor(avg, dtype=like.dtype, device=like.device)
            self.importance.unc[path_to_key(path)] = torch.tensor(unc, dtype=like.dtype, device=like.device)


# lr: the SVD form (λ from 0, P and Q from N(0, 0.02)) learns slower than LoRA at LoRA's 5e-3, as
# AdaLoRA's does (MiniLM on SST-2, q/v, seed 0: 60 steps 0.535 -> 0.64 at 5e-3; 50 steps with a
# linear decay 0.695 at 2e-2, 0.725 at 3e-2, 0.76 at 5e-2; LoRA r=8 at 5e-3: 0.69 to 0.785)
register("increlora", IncreLoRAConfig, IncreLoRADelta, family="reparameterized", lr=3e-2,
         paper="Zhang et al. 2023 (IncreLoRA)")
