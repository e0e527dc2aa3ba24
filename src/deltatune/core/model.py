"""DeltaModel: a frozen base model that owns any number of named deltas.

Activation, disabling, merging and removal only change which layers each Host dispatches to;
the base model's modules and state_dict keys are never replaced.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError, DeltaNotFoundError, MergeError, did_you_mean
from . import compose
from .compose import Composition
from .config import DeltaConfig
from .context import CallContext
from .delta import Delta
from .hf import HFSurface, refused, typed_class
from .hooks import Host, float_dtype, hosted, mark, unmark
from .outputs import first_tensor
from .registry import config_from_dict, get_method
from .report import summary
from .savedir import save as save_state

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
#: training calls without a ``dm.step()`` after which a delta with a schedule is refused: its
#: schedule would silently never run (Trainer without ``DeltaCallback``, a loop that forgot it)
UNSTEPPED_CALLS = 64


class DeltaModel(HFSurface, nn.Module):
    """Forwards everything it does not define (``generate``, ``config``, ...) to the base model.

    ``DeltaModel(model)`` is an instance of a subclass made for the base's class, whose
    ``forward`` shows the base's parameters (core/hf.py: Trainer reads them)."""

    def __new__(cls, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> DeltaModel:
        if cls is DeltaModel and isinstance(model, nn.Module) and not isinstance(model, DeltaModel):
            cls = typed_class(type(model), DeltaModel)
        return super().__new__(cls)

    def __init__(self, model: nn.Module):
        nn.Module.__init__(self)  # not PreTrainedModel's (a typed class may derive from it: core/hf.py)
        if isinstance(model, DeltaModel):
            raise ConfigError("the model is already a DeltaModel: call .add(name, config) on it.")
        if hosted(model):
            raise ConfigError(
                "this model already runs the deltas of another DeltaModel, active or disabled (wrapped "
                "twice, e.g. a notebook cell run again): keep using the first wrapper (dm.add(...) adds "
                "more deltas), or call unwrap() on it first; if you no longer hold it, load the base "
                "model again.")
        self.model = model
        mark(model, self)  # seen by a second wrap even while every delta here is disabled
        self.delta_modules = nn.ModuleDict()
        self._hosts: dict[str, Host] = {}
        self.context = CallContext()  # what the layers of one forward pass pass on (core/context.py)
        self._active: tuple[str, ...] = ()
        self._composition: Composition | None = None  # None: plain stacking of _active
        self._frozen: list[nn.Parameter] = []  # frozen by the active composition (Fuse members)
        self._root_hook: Any = None
        self._merged: list[str] = []
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self._unstepped = 0  # training calls since wrapping, until the first step()
        #: add the active deltas' regularization to the output's loss (set by deltatune's
        #: Trainer callback: Trainer's loss is the model's); off for loops that add it themselves
        self.loss_adds_regularization = False
        # a hook, not forward code: it also sees calls of a forward replaced from outside (TRL)
        self.register_forward_pre_hook(DeltaModel._count_training_call)
        model.requires_grad_(False)

    # -- the deltas ---------------------------------------------------------------------------------
    @property
    def deltas(self) -> list[str]:
        return list(self.delta_modules.keys())

    @property
    def delta_configs(self) -> dict[str, DeltaConfig]:
        """Each delta's deltatune config by name (``dm.config`` stays the base model's own config,
        as Hugging Face code expects; ``dm.get_delta(name).config`` is one of these)."""
        return {n: d.config for n, d in self.delta_modules.items()}

    @property
    def active(self) -> tuple[str, ...]:
        return self._active

    @property
    def composition(self) -> Composition:
        """The active composition (``Stack`` of ``active`` unless another one was activated)."""
        return self._composition or compose.Stack(*self._active)

    @property
    def merged(self) -> tuple[str, ...]:
        return tuple(self._merged)

    def get_delta(self, name: str) -> Delta:
        self._check_name(name)
        return self.delta_modules[name]

    def add(self, name: str, config: DeltaConfig | dict[str, Any]) -> Delta:
        """Attach a new delta (inactive unless it is the first one)."""
        if isinstance(config, dict):
            config = config_from_dict(config)
        if not isinstance(config, DeltaConfig):
            raise ConfigError(f"config must be a DeltaConfig or a dict, got {type(config).__name__}.")
        self._check_new_name(name)
        return self._attach(name, get_method(config.method).delta_cls(name, config, self.model))

    def add_weighted(self, name: str, sources: list[str], weights: list[float] | None = None,
                     how: str = "linear", **options: Any) -> Delta:
        """A new delta `name` from a weighted combination of `sources` (same method), inactive.

        The sources' method defines what that means (``Delta.weighted``); for LoRA: ``how="linear"``
        (exact: the factors concatenated), ``"svd"``, ``"ties"`` or ``"dare"`` (dense updates
        combined, then re-factorized to ``rank``). Default weights: 1 each.
        """
        self._check_new_name(name)
        if not sources:
            raise ConfigError("add_weighted() needs at least one source delta.")
        deltas = [self.get_delta(n) for n in sources]
        kinds = {type(d) for d in deltas}
        if len(kinds) > 1:
            raise MergeError(f"add_weighted() combines deltas of one method; got "
                             f"{sorted({d.config.method for d in deltas})}.")
        w = [1.0] * len(deltas) if weights is None else [float(v) for v in weights]
        if len(w) != len(deltas):
            raise ConfigError(f"add_weighted() got {len(w)} weights for {len(deltas)} sources.")
        delta = type(deltas[0]).weighted(name, deltas, w, self.model, how=how, **options)
        return self._attach(name, delta)

    def compose_lorahub(self, name: str, sources: list[str], examples: Any, **search: Any) -> Any:
        """LoRAHub: weights for the LoRA deltas `sources` found gradient-free on `examples`; adds
        the composed delta `name` as an ordinary ``lora`` (deltatune/lorahub.py)."""
        from ..lorahub import compose_lorahub

        return compose_lorahub(self, name, sources, examples, **search)

    def _check_new_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"delta name {name!r} is invalid: use letters, digits, '_' or '-'.")
        if name in self.delta_modules:
            raise ConfigError(f"a delta named {name!r} exists already: remove it or pick a new name.")
        if hasattr(self.delta_modules, name):  # torch's ModuleDict would raise a bare KeyError
            raise ConfigError(f"delta name {name!r} is the name of a torch.nn.Module attribute (the deltas "
                              f"are held in a ModuleDict): pick another name, e.g. {name + '_delta'!r}.")

    def _attach(self, name: str, delta: Delta) -> Delta:
        delta.to(self._device())
        delta.train(self.model.training)
        self.delta_modules[name] = delta
        for key, layer in delta.layers.items():
            path = delta.site(key)
            host = self._hosts.get(path)
            if host is None:
                host = self._hosts[path] = Host(self.model.get_submodule(path), path, self.context,
                                                on_cast=self._follow_cast)
            host.layers[name] = layer
            layer.context = self.context
        if not self._active and not delta.combiner:
            self.activate(name)
        return delta

    def activate(self, *names: str | Composition, composition: str | Composition = "stack",
                 weights: list[float] | None = None, fusion: str | None = None) -> None:
        """Make exactly these deltas active, applied in this order (stacking) by default.

        ``composition="parallel"`` (one batch copy per delta, outputs concatenated along the batch),
        ``"average"`` (``weights``), ``"fuse"`` (``fusion=`` a fusion delta), or a composition
        object (``dt.Stack``, ``dt.Parallel``, ``dt.Average``, ``dt.Fuse``; they nest).
        """
        comp = compose.build(names, composition, weights, fusion)
        for n in comp.names():
            self._check_name(n)
        compose.check(comp, self.get_delta)
        plain = comp.is_plain_stack()
        merged = [n for n in comp.names() if n in self._merged]
        if merged and not plain:
            raise MergeError(f"deltas {merged} are merged into the base weights, so {comp!r} cannot "
                             f"keep them apart: call unmerge() first.")
        self._active = comp.names()
        self._composition = None if plain else comp
        self._refreeze()
        self._refresh()

    def _refreeze(self) -> None:
        """Unfreeze what the previous composition froze; freeze what the current one keeps fixed."""
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []
        if self._composition is not None:
            for n in self._composition.frozen():
                self._frozen += [p for p in self.delta_modules[n].parameters() if p.requires_grad]
            for p in self._frozen:
                p.requires_grad_(False)

    def remove(self, name: str) -> None:
        self._check_name(name)
        if name in self._merged:
            raise MergeError(f"delta {name!r} is merged into the base: call unmerge() before remove().")
        for path, host in list(self._hosts.items()):
            if host.layers.pop(name, None) is not None and not host.layers:
                host.close()
                del self._hosts[path]
        del self.delta_modules[name]
        if self._composition is not None and name in self._composition.names():
            self._composition, self._active = None, ()  # a composition without a member: none
            self._refreeze()
        self._active = tuple(n for n in self._active if n != name)
        self._refresh()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model alone inside the block."""
        if self._merged:
            raise MergeError(
                f"deltas {self._merged} are merged into the base weights, so disabling cannot give "
                f"the base model: call unmerge() first."
            )
        saved = self._active, self._composition
        self._active, self._composition = (), None
        self._refresh()
        try:
            yield
        finally:
            self._active, self._composition = saved
            self._refresh()

    @contextlib.contextmanager
    def per_example(self, names: list[str | None]) -> Iterator[None]:
        """Inside the block, example i of a batch runs delta ``names[i]`` (None: the base alone).

        One forward pass serves a batch whose examples each want a different delta (serving many
        users' LoRAs at once). Works for methods that transform a module's output (LoRA, IA3 on
        outputs, adapters); methods that swap weights or inputs raise a clear error.
        """
        if self._merged:
            raise MergeError("per-example deltas need unmerged deltas: call unmerge() first.")
        rows: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            if n is not None:
                self._check_name(n)
                rows.setdefault(n, []).append(i)
        index = {n: torch.tensor(r, device=self._device()) for n, r in rows.items()}
        try:
            for host in self._hosts.values():
                host.set_routes(index)
            yield
        finally:
            for host in self._hosts.values():
                host.set_routes(None)
            self._refresh()

    def _refresh(self) -> None:
        running = tuple(n for n in self._active if n not in self._merged)
        for host in self._hosts.values():
            host.set_active(running, self._composition)
        if self._root_hook is not None:
            self._root_hook.remove()
            self._root_hook = None
        comp = self._composition
        if isinstance(comp, compose.Parallel):  # one batch copy per member, made at the model input
            self._root_hook = self.model.register_forward_pre_hook(
                lambda module, args, kwargs: comp.replicate(args, kwargs), with_kwargs=True, prepend=True)

    def _check_name(self, name: str) -> None:
        if name not in self.delta_modules:
            raise DeltaNotFoundError(
                f"no delta named {name!r}.{did_you_mean(name, self.deltas)} "
                f"This model holds: {', '.join(self.deltas) or 'none'}."
            )

    # -- merging ----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, name: str | None = None, exact: bool = True) -> None:
        """Fold a delta (default: every active one) into the base weights.

        ``exact`` (default): keep a copy of each base tensor the merge writes, so that unmerge()
        gives it back bit for bit in every dtype (memory: one copy of the touched weights).
        ``exact=False`` keeps none: unmerge subtracts the delta again, off by float rounding
        (docs/errors.md, "Merging exactly")."""
        names = [name] if name is not None else list(self._active)
        for n in names:
            self._check_name(n)
            if n in self._merged:
                raise MergeError(f"delta {n!r} is merged already.")
            if self._composition is not None and n in self._composition.names():
                raise MergeError(f"delta {n!r} runs in {self._composition!r}, which weights cannot "
                                 f"hold: activate it alone or stacked before merging.")
        for n in names:
            self.delta_modules[n].merge(self.model, exact=exact)
            self._merged.append(n)
        self._refresh()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged delta out of the base weights again (newest first)."""
        while self._merged:
            self.delta_modules[self._merged[-1]].unmerge(self.model)
            self._merged.pop()
        self._refresh()

    def unwrap(self, merge: bool = False) -> nn.Module:
        """The plain base module: with the active deltas folded in if ``merge``, else pristine."""
        if merge:
            self.merge_all_active(exact=False)  # never unmerged: no copy to keep
        else:
            self.unmerge()
        self._active, self._composition = (), None
        self._refresh()
        for host in self._hosts.values():
            host.close()
        self._hosts.clear()
        self._merged.clear()
        self.delta_modules = nn.ModuleDict()
        unmark(self.model)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, True))
        return self.model

    def merge_all_active(self, exact: bool = True) -> None:
        todo = [n for n in self._active if n not in self._merged]
        for n in todo:
            self.merge(n, exact=exact)

    # -- training helpers ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_groups(self, lr: float, weight_decay: float | None = None, head_lr: float | None = None,
                         names: list[str] | None = None) -> list[dict[str, Any]]:
        """Torch optimizer groups over ``trainable_parameters()``, each tensor in exactly one group:
        each delta's (``names``: these; default all) at ``lr`` times its per-parameter multipliers
        (``Delta.lr_scales``: a method's parts at their own rates), its task head at ``head_lr``
        (default ``lr``), then any other trainable tensor (base parameters unfrozen by hand) at
        ``lr``. ``weight_decay``: set in every group (None: the optimizer's default).
        ``torch.optim.AdamW(dm.optimizer_groups(1e-3))``."""
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
            raise ConfigError(f"optimizer_groups(lr={lr!r}): expected a positive learning rate.")
        groups: list[dict[str, Any]] = []
        for n in self.deltas if names is None else names:
            groups += self.get_delta(n).optimizer_groups(self.model, lr, head_lr)
        seen = {id(p) for g in groups for p in g["params"]}
        if names is None:
            rest = [p for p in self.trainable_parameters() if id(p) not in seen]
            if rest:
                groups.append({"params": rest, "lr": lr})
        if weight_decay is not None:
            for g in groups:
                g["weight_decay"] = weight_decay
        return groups

    def check_optimizer(self, optimizer: Any) -> None:
        """Refuse an optimizer that trains a delta's scaled tensors (``Delta.lr_scales``: LoRA+'s B)
        at the rate of its other tensors: an optimizer built over ``trainable_parameters()`` (or by
        transformers.Trainer) would silently drop the ratio. Compared per delta, as the ratio of the
        groups' initial learning rates, so a schedule's common factor does not matter."""
        rate = {id(p): g.get("initial_lr", g["lr"]) for g in optimizer.param_groups for p in g["params"]}
        for name in self._active:
            delta = self.get_delta(name)
            scales = delta.lr_scales()
            if not scales:
                continue
            named = {n: p for n, p in delta.named_parameters() if p.requires_grad and id(p) in rate}
            heads = delta.head_parameter_ids(self.model)
            plain = [p for n, p in named.items() if n not in scales and id(p) not in heads]
            if not plain:
                continue  # nothing at 1x to compare with (e.g. A frozen)
            base = rate[id(plain[0])]
            for n, scale in scales.items():
                if n in named and not math.isclose(rate[id(named[n])], base * scale, rel_tol=1e-6):
                    got = rate[id(named[n])] / base if base else float("inf")
                    raise ConfigError(
                        f"delta {name!r} trains {n} at {scale:g}x the learning rate of its other tensors "
                        f"(lr_scales: LoRA+'s lr_ratio), but this optimizer has it at {got:g}x: build the "
                        f"optimizer from dm.optimizer_groups(lr) (with transformers.Trainer: optimizers="
                        f"(torch.optim.AdamW(dm.optimizer_groups(args.learning_rate)), None)).")

    def regularization(self) -> torch.Tensor | float:
        """Sum of the active deltas' extra loss terms (0.0 when none has one)."""
        total: torch.Tensor | float = 0.0
        for n in self._active:
            r = self.delta_modules[n].regularization()
            if r is not None:
                total = total + r
        return total

    def step(self, step: int) -> None:
        """Call once per optimizer step: runs the active deltas' schedules."""
        self._unstepped = -1  # stepped: the loop drives the schedules
        for n in self._active:
            self.delta_modules[n].on_step(step)

    @property
    def param_version(self) -> int:
        """Changes when a delta's ``step`` replaced its trainable tensors: rebuild the optimizer."""
        return sum(self.delta_modules[n].param_version for n in self.deltas)

    # -- I/O and reporting ----------------------------------------------------------------------
    def save(self, path: str, name: str | None = None, **kwargs: Any) -> None:
        save_state(self, path, name=name, **kwargs)

    def summary(self):
        return summary(self)

    # -- forwarding -----------------------------------------------------------------------------
    def _count_training_call(self, args: tuple) -> None:
        if self._unstepped < 0 or not (self.training and torch.is_grad_enabled()):
            return
        self._unstepped += 1
        if self._unstepped < UNSTEPPED_CALLS:
            return
        needy = [n for n in self._active if self.delta_modules[n].scheduled]
        if needy:
            raise ConfigError(
                f"{UNSTEPPED_CALLS} training calls ran and dm.step() was never called, so the schedule of "
                f"{needy} ({', '.join(sorted({self.delta_modules[n].config.method for n in needy}))}) never "
                f"ran: under transformers.Trainer / TRL pass callbacks=[deltatune.DeltaCallback()]; in "
                f"your own loop call dm.step(i) after each optimizer step.")

    def forward(self, *args: Any, deltas: list[str | None] | None = None,
                task_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The base model's forward; ``deltas=[name per example]`` runs a mixed batch;
        ``task_ids=`` (one integer per example) is for deltas that route by task (MoELoRA)."""
        if task_ids is not None:
            task_ids = self._check_task_ids(task_ids, (args, kwargs))
        with self.context.inputs(task_ids=task_ids):
            out = self._forward(args, kwargs, deltas)
        if self.loss_adds_regularization and self.training and getattr(out, "loss", None) is not None:
            reg = self.regularization()
            if isinstance(reg, torch.Tensor):
                out["loss"] = out["loss"] + reg
        return out

    @contextlib.contextmanager
    def tasks(self, task_ids: Any) -> Iterator[None]:
        """Inside the block every model call routes by these task ids (one per example): for
        ``generate()``, which calls the base directly, or any caller that cannot pass ``task_ids=``."""
        with self.context.inputs(task_ids=self._check_task_ids(task_ids, None)):
            yield

    def _check_task_ids(self, task_ids: Any, batch: tuple | None) -> torch.Tensor:
        t = first_tensor(batch) if batch is not None else None
        rows = t.shape[0] if t is not None and t.dim() else None
        ids = torch.as_tensor(task_ids, device=self._device())
        if (ids.dim() != 1 or ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool
                or (rows is not None and len(ids) != rows)):
            raise ConfigError(f"task_ids= must be one integer task id per example (a 1-D integer tensor of "
                              f"{rows} rows for this batch); got shape {tuple(ids.shape)}, dtype {ids.dtype}.")
        return ids.long()

    def _forward(self, args: tuple, kwargs: dict, deltas: list[str | None] | None) -> Any:
        if deltas is not None:
            t = first_tensor((args, kwargs))
            rows = t.shape[0] if t is not None and t.dim() else None
            if not isinstance(deltas, (list, tuple)) or rows is None or len(deltas) != rows:
                raise ConfigError(f"deltas= gives {len(deltas) if isinstance(deltas, (list, tuple)) else deltas!r} "
                                  f"names for a batch of {rows} rows: give one delta name (or None for "
                                  f"the base) per example.")
            with self.per_example(deltas):
                return self.model(*args, **kwargs)
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return refused(name) or getattr(self.model, name)

    @torch.no_grad()
    def _follow_cast(self, old: torch.dtype, new: torch.dtype) -> None:
        """The base was cast after wrapping (``model.half()``, ``model.to(torch.bfloat16)``): cast
        the deltas' tensors that had the base's old dtype, as ``dm.to(new)`` would have, before any
        of them runs. A base cast only in part is refused: no one dtype to follow."""
        behind = [(h.path or "<model>", float_dtype(h.module)) for h in self._hosts.values()
                  if h.dtype == old and float_dtype(h.module) not in (new, None)]
        if behind:
            raise ConfigError(
                f"part of the base model was cast from {old} to {new} after wrapping, but {behind[0][0]} "
                f"is {behind[0][1]}: cast the whole model (dm.to({new})) so that its deltas follow "
                f"one dtype.")
        for delta in self.delta_modules.values():
            delta._apply(lambda t: t.to(new) if t.dtype == old else t)
        for host in self._hosts.values():
            host.dtype = float_dtype(host.module)

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


def wrap(model: nn.Module, config: DeltaConfig | dict[str, Any], name: str = "default") -> DeltaModel:
    """Freeze `model` and attach one delta named `name` (active)."""
    dm = DeltaModel(model)
    dm.add(name, config)
    return dm
