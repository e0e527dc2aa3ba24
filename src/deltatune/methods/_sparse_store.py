"""Storage of sparse tensors of fixed dense shapes: sorted flat int32 indices (buffers) + values.

Saved keys are ``<owner>.idx.<name>`` and ``<owner>.val.<name>``, so a file grows with the kept
entries, not with the dense size. ``add_to`` is one out-of-place ``index_add`` (its backward is a
gather of k entries: no dense gradient is kept); merging stashes the k original entries, so
merge/unmerge is exact and untouched entries are never written.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import MergeError
from ._sparse_index import check_indices, index_dtype


class BufferDict(nn.Module):
    """Named persistent buffers (an nn.ParameterDict for tensors that are not trained)."""

    def set(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor)

    def get(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def names(self) -> list[str]:
        return list(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """`t` as one dimension, sharing its storage (merging writes entries of the base in place)."""
    if not t.is_contiguous():
        raise MergeError("cannot merge a sparse delta into a non-contiguous tensor: call "
                         ".contiguous() on the base parameter first.")
    return t.view(-1)


class SparseParams(nn.Module):
    """Sparse tensors of fixed dense shapes: sorted unique flat indices + (trainable) values."""

    def __init__(self) -> None:
        super().__init__()
        self.idx = BufferDict()
        self.val = nn.ParameterDict()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._stash: dict[str, torch.Tensor] = {}

    def set(self, name: str, shape: tuple[int, ...], idx: torch.Tensor, values: torch.Tensor,
            trainable: bool = True) -> None:
        numel = int(torch.Size(shape).numel())
        self.shapes[name] = tuple(shape)
        self.idx.set(name, idx.to(index_dtype(numel)).contiguous())
        self.val[name] = nn.Parameter(values.detach().clone().contiguous(), requires_grad=trainable)

    def allocate(self, name: str, shape: tuple[int, ...], count: int, like: torch.Tensor) -> None:
        """Zero placeholders of `count` entries (a load fills them, then ``check`` validates)."""
        idx = torch.zeros(count, dtype=torch.long, device=like.device)
        self.set(name, shape, idx, torch.zeros(count, dtype=like.dtype, device=like.device))

    def names(self) -> list[str]:
        return list(self.shapes)

    def index(self, name: str) -> torch.Tensor:
        """The flat indices as int64 (stored as int32 to halve their size on disk)."""
        return self.idx.get(name).long()

    def count(self, name: str | None = None) -> int:
        names = [name] if name is not None else self.names()
        return sum(self.idx.get(n).numel() for n in names)

    def add_to(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """base + this sparse tensor, out of place (gradients reach the values and `base`)."""
        flat = base.reshape(-1).index_add(0, self.index(name), self.val[name].to(base.dtype))
        return flat.view(base.shape)

    def dense(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.add_to(name, torch.zeros(self.shapes[name], dtype=like.dtype, device=like.device))

    def check(self, where: str) -> None:
        """Loaded indices must be in range, sorted and unique (else merge/unmerge is not exact)."""
        for n in self.names():
            check_indices(self.index(n), int(torch.Size(self.shapes[n]).numel()), f"{where}.{n}")

    # exact merge: stash the k original entries, restore them on unmerge
    @torch.no_grad()
    def merge_into(self, name: str, target: torch.Tensor) -> None:
        flat = flat_view(target)
        idx = self.index(name)
        self._stash[name] = flat.index_select(0, idx).clone()
        flat.index_add_(0, idx, self.val[name].to(target.dtype))

    @torch.no_grad()
    def unmerge_from(self, name: str, target: torch.Tensor) -> None:
        flat_view(target).index_copy_(0, self.index(name), self._stash.pop(name))

    @property
    def merged(self) -> bool:
        return bool(self._stash)
