"""LoRAPrune (Zhang et al. 2023, "LoRAPrune: Structured Pruning Meets Low-Rank Parameter-Efficient
Fine-Tuning", ACL Findings 2024): LoRA fine-tuning that prunes attention heads and FFN channels,
their importance estimated from the LoRA weights and gradients only (section 3.2).

Importance (as the paper and its code, ``loraprune/utils.py: compute_sensitivity``): the gradient
of the merged weight is estimated from the LoRA factors' gradients, Ĝ = G_B A + B G_A - G_B G_A,
and a weight's importance is the first-order Taylor term of removing it,
I(W_ij) = |Ĝ_ij (W_ij + s (B A)_ij)|.  A group's importance is the sum over its weights, per
module normalised to unit L2 norm and summed over the modules of the group (Eq. 9), smoothed by a
moving average Ī ← β Ī + (1 - β) I (β = 0.9, Eq. 10).

Groups: an attention head is its rows of the query / key / value projections and its columns of the
output projection (with grouped KV heads, as in Llama, a KV head and the query heads sharing it
form one group: removing fewer would leave a KV head that some query heads still read); an FFN
channel is its row of every input projection (up / gate / intermediate) and its column of the
output projection. Groups live per block (``core.arch`` roles: attn_out with the query / key / value
under the same block; ffn_out with the ffn_in modules beside it).

Schedule (the official trainer's ``schedule_sparsity_ratio``, cubic): the fraction of pruned groups
of each block (local pruning, per block and kind) stays ``init_sparsity`` for the first ``warmup``
fraction of ``total_step``, rises as s = s_f + (s_0 - s_f)(1 - t)^3 and reaches ``sparsity`` at
step ``total_step - 1 - int(cooldown * total_step)``; every ``prune_every`` steps on the ramp the
lowest-importance groups of each block are masked, int(n * s) of n. Two deviations, both to make the
result what the config says: the last step of the ramp prunes to ``sparsity`` exactly (the
official loop stops pruning once s reaches it, one pruning step short), and a masked group stays
masked (the official argsort can revive a masked group when importances tie at zero).

A mask multiplies the input of the output projection (a head's context vector, a channel's
activation), which is exactly the model with those structures removed, whatever the activation.
The masks are buffers of the delta and saved with it. ``merge`` folds W + sBA and zeroes the pruned
columns; ``prune_model(dm)`` merges and slices the pruned heads and channels out for good (smaller
Linear / Conv1D layers; BERT, GPT-2, Llama heads, every architecture's channels; T5's heads share one
relative position bias of all heads across layers and stay masked there).

Training loop: ``loss.backward(); opt.step(); opt.zero_grad(); dm.step(i)`` (the gradients are
captured when they are accumulated, so the order of zero_grad and dm.step does not matter).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..core import arch
from ..core.delta import Delta, path_to_key
from ..core.layer import DeltaLayer
from ..core.registry import register
from ..core.targets import select
from ..errors import ConfigError, DeltaError, MergeError, TargetError
from ._weights import dense_weight, module_dims, writable_weight
from .lora import LoRAConfig, LoRADelta, LoRALayer

# kind -> (role of the output projection that takes the mask, roles of the input projections)
KINDS = {"heads": ("attn_out", ("query", "key", "value")), "channels": ("ffn_out", ("ffn_in",))}


@dataclass
class LoRAPruneConfig(LoRAConfig):
    """sparsity: the fraction of each block's heads / channels pruned at the end; heads, channels:
    which structures are pruned; total_step: the number of optimizer steps (required; a harness
    fills it); init_sparsity, warmup, cooldown, prune_every: the cubic schedule (warmup and cooldown
    as fractions of total_step); beta: the importance moving average."""
    method: ClassVar[str] = "loraprune"
    sparsity: float = 0.5
    heads: bool = True
    channels: bool = True
    total_step: int | None = None
    init_sparsity: float = 0.0
    warmup: float = 0.1
    cooldown: float = 0.1
    prune_every: int = 10
    beta: float = 0.9

    @classmethod
    def run_length_fields(cls, steps: int) -> dict[str, Any]:
        return {"total_step": steps}

    def validate(self) -> None:
        super().validate()
        self.check_range("sparsity", 0.0, 1.0, high_open=True)
        self.check_range("init_sparsity", 0.0, self.sparsity)
        self.check_choice("heads", (True, False))
        self.check_choice("channels", (True, False))
        if not (self.heads or self.channels):
            self._fail("heads", self.heads, "True, or channels=True: LoRAPrune needs something to prune")
        self.check_range("warmup", 0.0, 1.0, high_open=True)
        self.check_range("cooldown", 0.0, 1.0, high_open=True)
        if self.warmup + self.cooldown >= 1.0:
            self._fail("warmup", self.warmup, f"warmup + cooldown < 1 (cooldown={self.cooldown}): no steps "
                                              f"would be left to prune in")
        self.check_range("prune_every", 1, integer=True)
        self.check_range("beta", 0.0, 1.0, high_open=True)
        if self.total_step is not None:
            self.check_range("total_step", 1, integer=True)
        if self.dora:
            self._fail("dora", self.dora, "False: LoRAPrune's criterion is defined on W + BA")
        if self.init_kind not in ("kaiming", "gaussian"):
            self._fail("init", self.init, "'kaiming' or 'gaussian': the criterion and the pruned model "
                                          "read the base weight W as given (no principal part moved out)")

    def last_step(self) -> int:
        """The step that sets the final sparsity."""
        return self.total_step - 1 - int(self.cooldown * self.total_step)

    def sparsity_at(self, step: int) -> float:
        warm, last = int(self.warmup * self.total_step), self.last_step()
        if step >= last:
            return self.sparsity
        if step <= warm:
            return self.init_sparsity
        t = (step - warm) / (last - warm)
        return self.sparsity + (self.init_sparsity - self.sparsity) * (1 - t) ** 3


@dataclass
class Unit:
    """One block's prunable groups: ``members`` are (module path, group of each row for an input
    projection / of each column for the output projection, is the output projection)."""
    kind: str
    site: str
    groups: int
    members: list[tuple[str, torch.Tensor, bool]]
    importance: torch.Tensor = field(default=None)  # the moving average Ī, per group
    seen: bool = False


class LoRAPruneLayer(LoRALayer):
    """LoRA that keeps the gradients of its factors from the last backward (the criterion's G_A, G_B)."""

    def __init__(self, module: nn.Module, cfg: LoRAPruneConfig, r: int, alpha: float):
        super().__init__(module, cfg, r, alpha)
        self.grads: dict[str, torch.Tensor] = {}
        self.capture = True  # off once the masks are final
        for name in ("lora_A", "lora_B"):
            getattr(self, name).register_post_accumulate_grad_hook(self._capture(name))

    def _capture(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if self.capture:
                self.grads[name] = p.grad.detach().clone()
        return hook

    @torch.no_grad()
    def saliency(self, module: nn.Module) -> torch.Tensor | None:
        """|Ĝ ⊙ (W + s B A)| (out, in) in float32, Ĝ = G_B A + B G_A - G_B G_A; None before a backward."""
        if len(self.grads) < 2:
            return None
        a, b = self.lora_A.float(), self.lora_B.float()
        ga, gb = self.grads["lora_A"].float(), self.grads["lora_B"].float()
        est = torch.addmm(gb @ a, b - gb, ga)                       # G_B A + (B - G_B) G_A
        merged = torch.addmm(dense_weight(module).float(), b, a, alpha=self.scaling)  # W + s B A
        return est.mul_(merged).abs_()


class _InputMask:
    """The mask half of a layer on an output projection: the input columns of pruned groups are
    zeroed (``pre``); merged, those weight columns are zeroed, and kept to be put back."""

    def init_mask(self, module: nn.Module, groups: int, col_group: torch.Tensor) -> None:
        self.register_buffer("prune_mask", torch.ones(groups, dtype=torch.bool, device=module.weight.device))
        self.register_buffer("col_group", col_group.to(module.weight.device), persistent=False)
        self._cols: tuple[torch.Tensor, torch.Tensor] | None = None

    def column_mask(self) -> torch.Tensor:
        return self.prune_mask[self.col_group]

    def pre(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x * self.column_mask().to(x.dtype)

    @torch.no_grad()
    def zero_pruned(self, module: nn.Module) -> None:
        w = writable_weight(module)
        cut = ~self.column_mask()
        self._cols = (cut, w[:, cut].clone())
        w[:, cut] = 0

    @torch.no_grad()
    def restore_pruned(self, module: nn.Module) -> None:
        if self._cols is not None:
            cut, values = self._cols
            writable_weight(module, "unmerge from")[:, cut] = values
            self._cols = None


class MaskedLoRAPruneLayer(_InputMask, LoRAPruneLayer):
    """LoRA on an output projection, with the mask of its block's groups on its input (the LoRA
    branch sees the masked input too, as the sliced model would)."""

    def __init__(self, module, cfg, r, alpha, groups: int, col_group: torch.Tensor):
        super().__init__(module, cfg, r, alpha)
        self.init_mask(module, groups, col_group)

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        super().merge(module)
        self.zero_pruned(module)

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        self.restore_pruned(module)
        super().unmerge(module)


class PruneMaskLayer(_InputMask, DeltaLayer):
    """The mask alone, on an output projection that has no LoRA of this delta."""

    mergeable = True

    def __init__(self, module: nn.Module, groups: int, col_group: torch.Tensor):
        super().__init__()
        self.init_mask(module, groups, col_group)

    def merge(self, module: nn.Module) -> None:
        self.zero_pruned(module)

    def unmerge(self, module: nn.Module) -> None:
        self.restore_pruned(module)


class LoRAPruneDelta(LoRADelta):
    config_cls = LoRAPruneConfig
    default_roles = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
    supported_types = (nn.Linear, Conv1D)
    weighted = Delta.__dict__["no_weighted"]  # masks do not add up: refused

    def build(self, model: nn.Module) -> None:
        cfg = self.config
        if cfg.total_step is None:
            raise ConfigError("LoRAPrune needs total_step (the number of optimizer steps) for its pruning "
                              "schedule: LoRAPruneConfig(total_step=..., ...).")
        self.units = self._find_units(model)
        #: the base modules the criterion reads (W) and prune_model slices; a plain dict: not saved
        self.modules_at: dict[str, nn.Module] = {}
        sites = {u.site: u for u in self.units}
        for path, module in self.targets(model):
            r, alpha = cfg.rank_alpha(path)
            unit = sites.get(path)
            layer = (MaskedLoRAPruneLayer(module, cfg, r, alpha, unit.groups, self._cols(unit))
                     if unit is not None else LoRAPruneLayer(module, cfg, r, alpha))
            self.add_layer(path, layer)
        for unit in self.units:
            if path_to_key(unit.site) not in self.layers:
                module = model.get_submodule(unit.site)
                self.add_layer(unit.site, PruneMaskLayer(module, unit.groups, self._cols(unit)))
            if not any(path_to_key(p) in self.layers and isinstance(self.layers[path_to_key(p)], LoRAPruneLayer)
                       for p, _, _ in unit.members):
                roles = ", ".join((KINDS[unit.kind][0], *KINDS[unit.kind][1]))
                raise ConfigError(
                    f"LoRAPrune estimates the importance of the {unit.kind} of {unit.site.rsplit('.', 2)[0]} from "
                    f"LoRA gradients, but none of its modules ({roles}) is in targets: add them to targets, "
                    f"or set {unit.kind}=False.")
            for p, _, _ in unit.members:
                self.modules_at[p] = model.get_submodule(p)
        self.finalized = False

    @staticmethod
    def _cols(unit: Unit) -> torch.Tensor:
        return next(g for _, g, site in unit.members if site)

    # -- the groups ---------------------------------------------------------------------------------
    def _find_units(self, model: nn.Module) -> list[Unit]:
        cfg = self.config
        units: list[Unit] = []
        for kind, (site_role, in_roles) in KINDS.items():
            if not getattr(cfg, kind):
                continue
            role_re = {r: re.compile(arch.role_patterns(model, (r,), cfg.method)) for r in in_roles}
            sites = select(model, arch.role_patterns(model, (site_role,), cfg.method), layers=cfg.layers,
                           method=cfg.method)
            for site, module in sites:
                if not isinstance(module, (nn.Linear, Conv1D)):
                    continue
                block = site.rsplit(".", 2)[0] + "."
                inputs: dict[str, list[str]] = {}
                for name, m in model.named_modules():
                    if name.startswith(block) and isinstance(m, (nn.Linear, Conv1D)):
                        for role, pattern in role_re.items():
                            if pattern.fullmatch(name):
                                inputs.setdefault(name, []).append(role)
                if not inputs:
                    raise TargetError(f"LoRAPrune found no {'/'.join(in_roles)} projection beside {site}: "
                                      f"this architecture's role table does not describe its blocks; set "
                                      f"{kind}=False or register its roles (core.arch.register_architecture).")
                units.append(self._unit(model, kind, site, module, inputs))
        if not units:
            raise TargetError(f"LoRAPrune found no block to prune in {type(model).__name__} (layers={cfg.layers}).")
        return units

    def _unit(self, model: nn.Module, kind: str, site: str, module: nn.Module,
              inputs: dict[str, list[str]]) -> Unit:
        d_in, _ = module_dims(module)
        if kind == "channels":
            cols = torch.arange(d_in)
            members = [(site, cols, True)]
            for path, _ in inputs.items():
                d_out = module_dims(model.get_submodule(path))[1]
                if d_out != d_in:
                    raise TargetError(f"LoRAPrune: {path} has {d_out} outputs but {site} takes {d_in} inputs; "
                                      f"its FFN is not the up/down pair channel pruning expects: set channels=False.")
                members.append((path, cols, False))
            return Unit(kind, site, d_in, members, torch.zeros(d_in))
        config = getattr(model, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        kv = getattr(config, "num_key_value_heads", None) or heads
        if not heads or d_in % heads or heads % kv:
            raise TargetError(f"LoRAPrune: cannot tell the heads of {site} ({d_in} inputs, config num_attention_heads="
                              f"{heads}, num_key_value_heads={kv}): set heads=False.")
        head_dim, share = d_in // heads, heads // kv
        q_groups = torch.arange(heads * head_dim) // head_dim // share   # a KV group: query heads sharing one
        kv_groups = torch.arange(kv * head_dim) // head_dim
        by_role = {"query": q_groups, "key": kv_groups, "value": kv_groups}
        members = [(site, q_groups, True)]
        for path, roles in inputs.items():
            rows = torch.cat([by_role[r] for r in roles])  # a fused projection (GPT-2's c_attn): q | k | v
            d_out = module_dims(model.get_submodule(path))[1]
            if d_out != rows.numel():
                raise TargetError(f"LoRAPrune: {path} ({'/'.join(roles)}) has {d_out} outputs, not the "
                                  f"{rows.numel()} its {heads} heads of {head_dim} imply: set heads=False.")
            members.append((path, rows, False))
        return Unit(kind, site, kv, members, torch.zeros(kv))

    # -- the schedule -------------------------------------------------------------------------------
    def on_step(self, step: int) -> None:
        if self.finalized:
            return
        self._accumulate()
        cfg = self.config
        ratio, last = cfg.sparsity_at(step), cfg.last_step()
        warm = int(cfg.warmup * cfg.total_step)
        if step >= last or (step > warm and (step - warm) % cfg.prune_every == 0 and ratio > cfg.init_sparsity):
            self.prune_to(ratio)
        if step >= last:
            self.finalize()

    def finalize(self) -> None:
        """The masks are final: no more gradients are kept for the criterion."""
        self.finalized = True
        for layer in self.layers.values():
            if isinstance(layer, LoRAPruneLayer):
                layer.capture, layer.grads = False, {}

    @torch.no_grad()
    def _accumulate(self) -> None:
        """One moving-average step of every unit's group importance from the last backward."""
        beta = self.config.beta
        for unit in self.units:
            total, found = torch.zeros(unit.groups), False
            for path, groups, is_site in unit.members:
                layer = self.layers[path_to_key(path)] if path_to_key(path) in self.layers else None
                if not isinstance(layer, LoRAPruneLayer):
                    continue
                s = layer.saliency(self.modules_at[path])
                if s is None:
                    continue
                per = s.sum(dim=0) if is_site else s.sum(dim=1)
                g = torch.zeros(unit.groups).index_add_(0, groups, per.cpu())
                total += g / (g.norm() + 1e-8)
                found = True
            if found and torch.isfinite(total).all():  # the official code skips a step with nan too
                unit.importance = beta * unit.importance + (1 - beta) * total
                unit.seen = True
        for layer in self.layers.values():
            if isinstance(layer, LoRAPruneLayer):
                layer.grads = {}

    @torch.no_grad()
    def prune_to(self, ratio: float) -> None:
        """Mask the lowest-importance groups of each unit until int(groups * ratio) are masked."""
        for unit in self.units:
            if not unit.seen:
                raise DeltaError(f"LoRAPrune delta {self.name!r} has seen no gradients of its LoRA factors "
                                 f"in {unit.site}: call loss.backward() before dm.step(i), with the delta "
                                 f"active and trainable.")
            mask = self.mask(unit)
            need = int(unit.groups * ratio) - int((~mask).sum())
            if need <= 0:
                continue
            score = unit.importance.clone()
            score[~mask.cpu()] = float("inf")
            cut = torch.argsort(score, stable=True)[:need]
            mask[cut.to(mask.device)] = False

    def mask(self, unit: Unit) -> torch.Tensor:
        """The unit's group mask (True: kept), the saved buffer itself."""
        return self.layers[path_to_key(unit.site)].prune_mask

    def pruned(self) -> dict[str, dict[str, int]]:
        """Kept and pruned groups per output projection."""
        return {u.site: {"kind": u.kind, "kept": int(self.mask(u).sum()), "groups": u.groups} for u in self.units}

    # -- state --------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"finalized": self.finalized}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("finalized", True):
            self.finalize()

    # -- the pruned model ---------------------------------------------------------------------------
    @torch.no_grad()
    def slice_model(self) -> None:
        """Cut the masked heads and channels out of the (merged) base modules: smaller layers."""
        for unit in self.units:
            keep = self.mask(unit).cpu()
            if bool(keep.all()):
                continue
            for path, groups, is_site in unit.members:
                _slice(self.modules_at[path], keep[groups], inputs=is_site, where=path)


def _slice(module: nn.Module, keep: torch.Tensor, inputs: bool, where: str) -> None:
    """Keep these rows of the (out, in) weight (inputs=False; and of the bias) or these columns."""
    from ..quant import is_quantized

    if is_quantized(module.weight):
        raise MergeError(f"prune_model slices dense weights, and {where} is quantized: "
                         f"deltatune.dequantize(model) first.")
    idx = keep.nonzero().flatten().to(module.weight.device)
    conv = isinstance(module, Conv1D)
    w = module.weight
    if inputs:
        new = w.index_select(0 if conv else 1, idx)
        if conv:
            module.nx = idx.numel()
        else:
            module.in_features = idx.numel()
    else:
        new = w.index_select(1 if conv else 0, idx)
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.index_select(0, idx), requires_grad=module.bias.requires_grad)
        if conv:
            module.nf = idx.numel()
        else:
            module.out_features = idx.numel()
    module.weight = nn.Parameter(new.contiguous(), requires_grad=w.requires_grad)


def prune_model(dm, name: str = "default") -> nn.Module:
    """The pruned model: the delta (and any other active delta) merged, the masked heads and
    channels sliced out of the base, the wrapper removed. Irreversible; the model's config still
    states the original sizes (a model saved from it is no from_pretrained checkpoint)."""
    delta = dm.get_delta(name)
    if not isinstance(delta, LoRAPruneDelta):
        raise ConfigError(f"prune_model needs a loraprune delta; {name!r} is {delta.config.method!r}.")
    if name not in dm.active:
        raise ConfigError(f"delta {name!r} is not active: dm.activate({name!r}) before prune_model.")
    attn = [_attention_of(dm.model, u) for u in delta.units if u.kind == "heads"]
    model = dm.unwrap(merge=True)
    delta.slice_model()
    for unit, module in zip([u for u in delta.units if u.kind == "heads"], attn):
        _set_head_sizes(module, unit, delta.mask(unit).cpu())
    return model


def _attention_of(model: nn.Module, unit: Unit) -> nn.Module:
    """The attention module of a heads unit (the parent of its query projection), checked to be
    one whose head count follows from its projections."""
    q_path = next(p for p, _, s in unit.members if not s)
    module = model.get_submodule(q_path.rsplit(".", 1)[0])
    if hasattr(module, "has_relative_attention_bias"):  # T5: one position bias of all heads, shared by layers
        raise MergeError(f"prune_model cannot slice the heads of {q_path.rsplit('.', 1)[0]}: T5's relative "
                         f"position bias covers every head and is shared by all layers. Use the merged model "
                         f"(dm.merge(): pruned heads are zero columns), or train with heads=False.")
    return module


def _set_head_sizes(module: nn.Module, unit: Unit, keep: torch.Tensor) -> None:
    """The size attributes an attention module keeps besides its projections' shapes."""
    q_width = int(keep[next(g for _, g, s in unit.members if s)].sum())
    heads = None
    for name in ("attention_head_size", "head_dim"):
        if isinstance(getattr(module, name, None), int):
            heads = q_width // getattr(module, name)
    for name, value in (("all_head_size", q_width), ("split_size", q_width), ("num_attention_heads", heads),
                        ("num_heads", heads)):
        if value is not None and isinstance(getattr(module, name, None), int):
            setattr(module, name, value)


register("loraprune", LoRAPruneConfig, LoRAPruneDelta, family="reparameterized", lr=2e-3,
         paper="Zhang et al. 2023 (LoRAPrune)")
