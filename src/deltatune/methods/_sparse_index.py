"""Flat index sets of sparse tensors: their dtype, the exact-k choice, and the check of loaded ones.

Indices are sorted and unique: merging adds each kept entry once, so unmerging restores it exactly.
"""
from __future__ import annotations

import torch

from ..errors import CheckpointError, ConfigError


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices (4 bytes a kept entry on disk) unless the tensor is too large for them."""
    return torch.int32 if numel < 2**31 else torch.int64


def topk_global(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Exactly the k largest entries over all score tensors: sorted flat int64 indices per name."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    if not 0 <= k <= flat.numel():
        raise ConfigError(f"cannot keep {k} entries of {flat.numel()}: pick 0 <= k <= {flat.numel()}.")
    top = torch.topk(flat, k, sorted=False).indices if k else flat.new_zeros(0, dtype=torch.long)
    top, _ = torch.sort(top)
    out: dict[str, torch.Tensor] = {}
    start = 0
    for n in names:
        end = start + scores[n].numel()
        lo, hi = torch.searchsorted(top, torch.tensor([start, end], device=top.device)).tolist()
        out[n] = top[lo:hi] - start
        start = end
    return out


def check_indices(idx: torch.Tensor, numel: int, where: str) -> None:
    """Flat indices read from a file: one dimension, sorted, unique, within [0, numel)."""
    if idx.dim() != 1 or (idx.numel() and (idx[0] < 0 or idx[-1] >= numel or bool((idx[1:] <= idx[:-1]).any()))):
        raise CheckpointError(
            f"sparse indices of {where} are not sorted, unique and within [0, {numel}): "
            f"the checkpoint is corrupt or from another base model."
        )
