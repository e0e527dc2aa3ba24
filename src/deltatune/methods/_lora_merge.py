"""Weighted combination of LoRA deltas into one new LoRA delta (``DeltaModel.add_weighted``).

With dW_i = s_i B_i A_i the update of delta i on a module (zero where it has none):
- ``linear``: dW = sum_i w_i dW_i exactly, by concatenating factors: A = [A_1; A_2; ...],
  B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (per module, the sum of the ranks there: ``rank_pattern``).
- ``svd``: the same dW, re-factorized to ``rank`` (default: the largest source rank) by a truncated
  SVD; exact when ``rank`` >= the rank of dW.
- ``ties`` (Yadav et al. 2023): each dW_i keeps its top ``density`` fraction of entries by
  magnitude; each entry's sign is elected by the sign of the sum of the trimmed dW_i; the weighted
  entries that agree with it are averaged (disjoint mean); then SVD to ``rank``.
- ``dare`` (Yu et al. 2024): each dW_i keeps a random ``density`` fraction of its entries (seeded),
  rescaled by 1/density; then the weighted sum and SVD to ``rank``.
- ``magnitude_prune`` and ``dare_ties``: the trim of ``ties`` or the drop of ``dare`` (with ties's
  sign election after the drop), then SVD to ``rank``. The dense strategies are core/task_arith.py's
  (peft's definitions, which peft calls ``*_svd`` for LoRA; peft's ``ties`` / ``dare_*`` without
  ``_svd`` combine A and B separately, which is not the combination of the updates).
- ``cat``: peft's name for the exact concatenation, the same as ``linear`` here (peft's ``linear``
  sums the A's and the B's of equal-rank deltas, whose product is not the sum of the updates).
Task heads saved with the deltas combine as base + sum_i w_i (head_i - base). DoRA deltas have a
per-row magnitude that does not combine linearly, so they are refused.

The caller (``LoRADelta.weighted``) names its delta class and its layer class, so this module needs
nothing from lora.py (no import cycle): the new delta is ``cls(name, cls.config_cls(...), model)``,
and layers are read and written only through their factors (``Factors``).
"""
from __future__ import annotations

import re
from typing import Protocol

import torch
import torch.nn as nn

from ..core import task_arith
from ..core.delta import Delta, key_to_path, path_to_key
from ..core.layer import DeltaLayer, ParamCopy
from ..errors import ConfigError, MergeError

HOWS = ("linear", "cat", "svd", *(h for h in task_arith.DENSE if h != "linear"))


class Factors(Protocol):
    """What a combination reads and writes of a LoRA layer: dW = update() = B' A' with (A', B') =
    factors() (scaling * lora_B @ lora_A, and minus the initial factors a PiSSA / OLoRA layer
    holds); a new layer is written through lora_A, lora_B and scaling."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    def update(self) -> torch.Tensor: ...

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]: ...


def weighted(cls: type[Delta], layer_type: type[DeltaLayer], name: str, deltas: list[Delta],
             weights: list[float], model: nn.Module, how: str = "linear", rank: int | None = None,
             density: float = 0.5, seed: int = 0) -> Delta:
    """The new delta of class `cls`; `layer_type`: the layers (with ``Factors``) that combine."""
    _check_options(how, rank, density)
    for d in deltas:
        if d.config.dora:
            raise MergeError(f"delta {d.name!r} uses DoRA, whose magnitude vector does not combine "
                             f"linearly: add_weighted() takes plain LoRA (or rsLoRA) deltas.")
        odd = [k for k, lay in d.layers.items() if not isinstance(lay, (layer_type, ParamCopy))]
        if odd:
            raise MergeError(f"delta {d.name!r} has a {type(d.layers[odd[0]]).__name__} at "
                             f"{key_to_path(odd[0])}: add_weighted() combines LoRA layers only.")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    paths = sorted({key_to_path(k) for d in deltas for k, lay in d.layers.items()
                    if isinstance(lay, layer_type)}, key=order.__getitem__)
    parts = {p: [d.layers[path_to_key(p)] if path_to_key(p) in d.layers else None for d in deltas]
             for p in paths}
    exact = how in ("linear", "cat")
    if exact:  # every source factor kept: per module, the sum of the ranks found there
        ranks = {p: sum(x.factors()[0].shape[0] for x in ps if x is not None) for p, ps in parts.items()}
    else:
        r_max = max(x.lora_A.shape[0] for ps in parts.values() for x in ps if x is not None)
        ranks = {p: rank or r_max for p in paths}
    r_new = max(ranks.values())
    pattern = {re.escape(p): r for p, r in ranks.items() if r != r_new} or None
    heads = sorted({h for d in deltas for h in d.head_names(model)})
    dropouts = {d.config.dropout for d in deltas}
    cfg = cls.config_cls(r=r_new, alpha=float(r_new), targets=paths, modules_to_save=heads,
                         rank_pattern=pattern, dropout=dropouts.pop() if len(dropouts) == 1 else 0.0)
    new = cls(name, cfg, model)
    gen = torch.Generator().manual_seed(seed)  # dare's random masks, drawn in module order
    with torch.no_grad():
        for path in paths:
            layer: Factors = new.layers[path_to_key(path)]
            if exact:
                _concat(layer, parts[path], weights)
            else:
                dense = [p.update().double() if p is not None else None for p in parts[path]]
                how_dense = "linear" if how == "svd" else how
                _factorize(layer, task_arith.combine(dense, weights, how_dense, density, gen))
        combine_heads(new, deltas, weights, model)
    return new


def _check_options(how: str, rank: int | None, density: float) -> None:
    task_arith.check_options(how, density, HOWS)
    if rank is not None:
        if how in ("linear", "cat"):
            raise ConfigError(f"rank= applies to the re-factorized strategies ({', '.join(HOWS[2:])}); "
                              f"how={how!r} keeps every factor.")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"rank={rank!r} is invalid: expected a positive integer.")


def _concat(layer: Factors, parts: list[Factors | None], weights: list[float]) -> None:
    a_blocks, b_blocks = [], []
    for part, w in zip(parts, weights):
        if part is not None:
            a, b = part.factors()
            a_blocks.append(a)
            b_blocks.append(b * w)
    layer.lora_A.copy_(torch.cat(a_blocks, dim=0))
    layer.lora_B.copy_(torch.cat(b_blocks, dim=1) / layer.scaling)


def _factorize(layer: Factors, dense: torch.Tensor) -> None:
    """lora_B @ lora_A * scaling = the best rank-r approximation of `dense` (sqrt(S) on each side)."""
    r = layer.lora_A.shape[0]
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    k = min(r, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(dense.shape[0], r, dtype=dense.dtype)
    a = torch.zeros(r, dense.shape[1], dtype=dense.dtype)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    layer.lora_A.copy_(a.to(layer.lora_A.dtype))
    layer.lora_B.copy_((b / layer.scaling).to(layer.lora_B.dtype))


def combine_heads(new: Delta, deltas: list[Delta], weights: list[float], model: nn.Module) -> None:
    for key, layer in new.layers.items():
        if not isinstance(layer, ParamCopy):
            continue
        module = model.get_submodule(key_to_path(key))
        for pname, value in layer.values.items():
            base = getattr(module, pname).detach()
            total = base.clone()
            for d, w in zip(deltas, weights):
                src = d.layers[key].values[pname] if key in d.layers else base
                total += w * (src - base)
            value.copy_(total)
