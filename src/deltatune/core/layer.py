"""DeltaLayer: the per-module piece of a delta, and the generic layers the core offers.

A layer changes its base module's call in up to three ways, each optional:
- ``pre(module, x) -> x``            transform the input (or ``forward_pre`` for all args/kwargs)
- ``params(module, current) -> dict`` replace some of the module's parameters for this call
- ``post(module, x, y) -> y``         transform the output (or ``forward_post`` for all args)
The Host (core/hooks.py) runs the active deltas' layers in activation order, so stacking is the
order of ``activate(...)``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn

from ..errors import ConfigError, MergeError
from .context import CallContext


def first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    return next(iter(kwargs.values()))


class LayerUses(NamedTuple):
    """Which of the three ways a layer class changes its module's call."""

    pre: bool
    params: bool
    post: bool


class DeltaLayer(nn.Module):
    mergeable: bool = False
    #: True when ``unmerge`` gives the module's tensors back bit for bit by itself (the layer keeps
    #: what ``merge`` overwrote); otherwise ``Delta.merge(exact=True)`` keeps a copy for it
    exact_unmerge: bool = False
    #: the DeltaModel's CallContext (core/context.py), set when the layer's delta is attached
    context: CallContext | None = None

    def call_context(self) -> CallContext:
        """Where this call's layers leave values for each other (``put`` / ``get`` / ``pop``)."""
        if self.context is None:
            raise ConfigError(f"{type(self).__name__} has no call context: its delta is not attached "
                              f"to a DeltaModel (use dt.wrap(model, config) or dm.add(name, config)).")
        return self.context

    # -- the three ways to change the call (override what you need) ----------------------------
    def pre(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (self.pre(module, args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: self.pre(module, kwargs[key])}

    def params(self, module: nn.Module, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def post(self, module: nn.Module, x: torch.Tensor, y: Any) -> Any:
        return y

    def forward_post(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        return self.post(module, first_input(args, kwargs), out)

    # -- which of them this class uses (decided once per class) ---------------------------------
    @classmethod
    def uses(cls) -> LayerUses:
        """Whatever the class overrides runs; what it leaves to the base class costs nothing."""
        base = DeltaLayer
        return LayerUses(pre=cls.pre is not base.pre or cls.forward_pre is not base.forward_pre,
                         params=cls.params is not base.params,
                         post=cls.post is not base.post or cls.forward_post is not base.forward_post)

    # -- merging --------------------------------------------------------------------------------
    def merge(self, module: nn.Module) -> None:
        raise MergeError(f"{type(self).__name__} cannot be merged into {type(module).__name__}.")

    def unmerge(self, module: nn.Module) -> None:
        raise MergeError(f"{type(self).__name__} cannot be unmerged from {type(module).__name__}.")


class CombiningLayer(DeltaLayer):
    """A layer that mixes other deltas' outputs at its module instead of changing the module
    itself (a delta of such layers has ``combiner = True`` and runs only as a composition's
    combiner, e.g. ``Fuse(a, b, fusion=name)``)."""

    def combine(self, module: nn.Module, args: tuple, kwargs: dict, y: Any, outs: list[Any]) -> Any:
        """The module's output given the base output `y` and each member's output `outs[i]`."""
        raise NotImplementedError


class ParamDiff(DeltaLayer):
    """Trainable differences added to some of a module's parameters (zero at init: identity).

    The base tensors are never written during training; ``merge`` adds the differences in place.
    """

    mergeable = True

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        self.diffs = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros_like(getattr(module, n), requires_grad=True)) for n in names}
        )

    def params(self, module: nn.Module, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: current[n] + d for n, d in self.diffs.items()}

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        for n, d in self.diffs.items():
            getattr(module, n).add_(d.to(getattr(module, n).dtype))

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        for n, d in self.diffs.items():
            getattr(module, n).sub_(d.to(getattr(module, n).dtype))


class ParamCopy(DeltaLayer):
    """Full trainable copies of a module's direct parameters (task heads, ``modules_to_save``)."""

    mergeable = True
    exact_unmerge = True  # merge stashes the base values it overwrites

    def __init__(self, module: nn.Module):
        super().__init__()
        self.values = nn.ParameterDict(
            {n: nn.Parameter(p.detach().clone(), requires_grad=True)
             for n, p in module.named_parameters(recurse=False)}
        )
        self._stash: dict[str, torch.Tensor] = {}

    def params(self, module: nn.Module, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(self.values.items())

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        for n, v in self.values.items():
            p = getattr(module, n)
            self._stash[n] = p.detach().clone()
            p.copy_(v)

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        for n, old in self._stash.items():
            getattr(module, n).copy_(old)
        self._stash.clear()
