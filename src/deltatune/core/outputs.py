"""The main tensor of a module's output, and batch-row surgery on nested args/outputs.

Methods use these to read and replace the hidden states of modules that return tuples
(attention blocks); compositions use the row helpers to split a batch between members.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError


def main_tensor(out: Any) -> torch.Tensor:
    """The hidden-state tensor of a module output (attention modules return tuples)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"cannot find the hidden states in a module output of type {type(out).__name__}: "
                      f"place the delta on a module that returns a tensor or a tuple starting with one.")


def replace_main(out: Any, main: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return main
    return type(out)([main, *out[1:]]) if isinstance(out, list) else (main, *out[1:])


def split_rows(obj: Any, start: int, stop: int, total: int) -> Any:
    """Rows [start, stop) of every batch-first tensor (dim 0 == total) inside obj."""
    if isinstance(obj, torch.Tensor):
        return obj[start:stop] if obj.dim() and obj.shape[0] == total else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(split_rows(o, start, stop, total) for o in obj)
    if isinstance(obj, list):
        return [split_rows(o, start, stop, total) for o in obj]
    if isinstance(obj, dict):
        return type(obj)({k: split_rows(v, start, stop, total) for k, v in obj.items()})
    return obj


def cat_rows(parts: list[Any], like: Any, total: int) -> Any:
    """Inverse of split_rows: concatenate the batch-first tensors, keep the rest from parts[0]."""
    if isinstance(like, torch.Tensor):
        return torch.cat(parts) if like.dim() and like.shape[0] == total else parts[0]
    if isinstance(like, (tuple, list)) and not hasattr(like, "_fields"):
        items = [cat_rows([p[i] for p in parts], like[i], total) for i in range(len(like))]
        return type(like)(items)
    if isinstance(like, dict):
        return type(like)({k: cat_rows([p[k] for p in parts], v, total) for k, v in like.items()})
    return parts[0]


def repeat_rows(obj: Any, n: int, rows: int) -> Any:
    """Every batch-first tensor (dim 0 == rows) repeated n times along the batch."""
    if isinstance(obj, torch.Tensor):
        return torch.cat([obj] * n) if obj.dim() and obj.shape[0] == rows else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(repeat_rows(o, n, rows) for o in obj)
    if isinstance(obj, dict):
        return type(obj)({k: repeat_rows(v, n, rows) for k, v in obj.items()})
    return obj


def first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for o in items:
        t = first_tensor(o)
        if t is not None:
            return t
    return None
