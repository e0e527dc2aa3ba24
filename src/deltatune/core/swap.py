"""The one parameter swap: a module's parameters replaced, for one call, by what layers give.

A layer's ``params(module, current)`` returns tensors (base + difference, a masked copy, ...) that
stand in for some of the module's parameters. They are written into ``module._parameters`` as
plain tensors so that autograd reaches the layer's own parameters, and the originals are put back
afterwards. (``torch.func.functional_call`` swaps the same way but calls the module with its hooks,
the ones that do this swap: re-runs need the module's bare ``forward``.)
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.nn as nn


def swap_in(module: nn.Module, layers: list[Any]) -> dict[str, Any]:
    """Put the layers' replacement tensors in place (in order: later layers see earlier ones');
    returns what was replaced, for `restore`."""
    params = module._parameters
    current = {n: p for n, p in params.items() if p is not None}
    for layer in layers:
        current.update(layer.params(module, current))
    saved = {n: params[n] for n in current if params.get(n) is not current[n]}
    for n in saved:
        params[n] = current[n]  # plain dict write: a tensor stands in for the Parameter
    return saved


def restore(module: nn.Module, saved: dict[str, Any]) -> None:
    module._parameters.update(saved)


@contextlib.contextmanager
def swapped(module: nn.Module, layers: list[Any]) -> Iterator[None]:
    saved = swap_in(module, layers) if layers else {}
    try:
        yield
    finally:
        restore(module, saved)
