"""Injection by hooks: the base model's modules and ``state_dict`` keys stay exactly as they are.

One Host per touched module owns that module's hooks and dispatches to the layers of the active
deltas. With no active layer a Host removes its hooks, so a disabled model runs at base speed.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from .compose import Call, Composition
from .context import CallContext
from .layer import DeltaLayer, first_input
from .swap import restore, swap_in, swapped


# base module -> its live wrapper (weak both ways: a module keeps no attribute, so it still pickles,
# and a wrapper nobody holds any more does not count; a deepcopy of the base is not marked)
_WRAPPERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def mark(model: nn.Module, wrapper: nn.Module) -> None:
    """Record that `wrapper` owns `model` and its modules (at wrap time: a wrap of a submodule is
    seen too), seen even while none of its hooks is on."""
    ref = weakref.ref(wrapper)
    for m in model.modules():
        _WRAPPERS[m] = ref


def unmark(model: nn.Module) -> None:
    for m in model.modules():
        _WRAPPERS.pop(m, None)


def hosted(model: nn.Module) -> bool:
    """Whether `model` or one of its modules belongs to a live wrapper (marked at wrap time, hooks
    on or not: its deltas may be disabled just now), or carries a Host's hooks."""
    for m in model.modules():
        owner = _WRAPPERS.get(m)
        if owner is not None and owner() is not None:
            return True
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            if any(isinstance(getattr(h, "__self__", None), Host) for h in hooks.values()):
                return True
    return False


def float_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of the module's first floating-point parameter (None: it holds none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


class Host:
    def __init__(self, module: nn.Module, path: str, context: CallContext,
                 on_cast: Callable[[torch.dtype, torch.dtype], None] | None = None):
        self.module = module
        self.path = path
        self.context = context  # the owning DeltaModel's, shared by all its Hosts
        #: the module's dtype when its deltas last matched it; a call that finds another one (the
        #: base was cast after wrapping: model.half()) asks `on_cast(old, new)` to cast the deltas
        self.dtype = float_dtype(module)
        self.on_cast = on_cast
        self.layers: dict[str, DeltaLayer] = {}
        self._pre: list[DeltaLayer] = []
        self._par: list[DeltaLayer] = []
        self._post: list[DeltaLayer] = []
        self._handles: list[Any] = []
        self._swapped: list[dict[str, Any]] = []
        self._routes: list[tuple[DeltaLayer, torch.Tensor]] | None = None
        self._comp: Composition | None = None

    def set_active(self, names: tuple[str, ...], composition: Composition | None = None) -> None:
        """Run these deltas' layers stacked in this order, or evaluate `composition` on each call."""
        self._comp = composition if composition is not None and any(
            n in self.layers for n in composition.names()) else None
        if composition is not None:
            names = ()
        active = [self.layers[n] for n in names if n in self.layers]
        self._pre = [lay for lay in active if type(lay).uses().pre]
        self._par = [lay for lay in active if type(lay).uses().params]
        self._post = [lay for lay in active if type(lay).uses().post]
        self._install()

    def set_routes(self, rows: dict[str, torch.Tensor] | None) -> None:
        """Per-example deltas: row indices of the batch that each delta runs on (None: all rows)."""
        if rows is None:
            self._routes = None
            self.set_active(())
            return
        self._routes = [(self.layers[n], idx) for n, idx in rows.items() if n in self.layers]
        self._pre, self._par, self._comp = [], [], None
        self._post = [layer for layer, _ in self._routes]
        self._install()

    def _install(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        m = self.module
        if self._pre or self._par:
            self._handles.append(m.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        if self._par:
            self._handles.append(m.register_forward_hook(self._restore_hook, always_call=True))
        if self._post or self._comp is not None:
            self._handles.append(m.register_forward_hook(self._post_hook, with_kwargs=True))

    def close(self) -> None:
        self._pre = self._par = self._post = []
        self._comp = None
        self._install()

    # -- the hooks --------------------------------------------------------------------------------
    def _check_cast(self, module: nn.Module) -> None:
        """Before any delta runs on a base that was cast since (cheap: one parameter's dtype)."""
        now = float_dtype(module)
        if now != self.dtype and now is not None and self.dtype is not None and self.on_cast is not None:
            self.on_cast(self.dtype, now)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        self._check_cast(module)
        if self._par:
            self._swapped.append(swap_in(module, self._par))
        for layer in self._pre:
            args, kwargs = layer.forward_pre(module, args, kwargs)
        return args, kwargs

    def _restore_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._swapped:
            restore(module, self._swapped.pop())

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not (self._pre or self._par):  # else the pre hook checked
            self._check_cast(module)
        if self._routes is not None:
            return self._routed_post(module, args, kwargs, output)
        if self._comp is not None:
            return self._comp.run(Call(self, module, args, kwargs), output)
        for layer in self._post:
            output = layer.forward_post(module, args, kwargs, output)
        return output

    def _routed_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """One base call for the whole batch; each delta's transform on its own rows only.

        Output-only layers (LoRA) reuse the base output rows; layers that change the input or the
        weights re-run the module's own forward (no hooks) on their rows.
        """
        x = first_input(args, kwargs)
        whole = output
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            output = output[0]  # attention blocks: (hidden states, weights, ...)
        if not isinstance(output, torch.Tensor) or not isinstance(x, torch.Tensor):
            raise ConfigError(f"{self.path or '<model>'} does not map one tensor to one tensor, so "
                              f"its deltas cannot run per example: split the batch by delta instead.")
        out = output.clone()
        for layer, idx in self._routes:
            pre, par, post = type(layer).uses()  # LayerUses(pre, params, post)
            rows_in, rows_out = x[idx], output[idx]
            if pre or par:
                rows_out = self._rerun(module, layer, rows_in, pre, par)
            if post:
                rows_out = layer.post(module, rows_in, rows_out)
            if rows_out.shape != out[idx].shape:
                raise ConfigError(f"{type(layer).__name__} on {self.path or '<model>'} changes the "
                                  f"output shape, so it cannot run per example: split the batch.")
            out[idx] = rows_out
        return out if whole is output else (out, *whole[1:])

    @staticmethod
    def _rerun(module: nn.Module, layer: DeltaLayer, x: torch.Tensor, pre: bool, par: bool) -> torch.Tensor:
        with swapped(module, [layer] if par else []):
            return module.forward(layer.pre(module, x) if pre else x)
