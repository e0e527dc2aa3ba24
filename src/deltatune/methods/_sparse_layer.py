"""SparseDiffLayer: a difference to some direct parameters of one module, dense while training and
sparse (indices + values) after its one-way switch."""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..core.layer import DeltaLayer
from ._sparse_csr import sparse_linear
from ._sparse_store import SparseParams

_MATMUL_DTYPES = (torch.float32, torch.float64)
PRODUCT_MAX_DENSITY = 0.02  # above it, sparse kernels cost more than one dense weight gradient


class SparseDiffLayer(DeltaLayer):
    """Differences to some direct parameters of one module.

    Dense form (training): ``dense_delta(name)``, defined by subclasses from their own tensors.
    Sparse form: ``self.sparse`` (indices + values). ``to_sparse`` switches once; the dense
    tensors are dropped then, so only the kept entries (and their optimizer state) remain.
    In the sparse form the float32/64 weight of a Linear or Conv1D with at most 2% of its entries
    kept adds ``x @ S^T`` to the output (``sparse_linear``) instead of building W + S: no dense
    copy of the weight, no dense weight gradient. It composes exactly with additive deltas; under
    a multiplicative one (``mask``) on the same weight it applies after it, whatever the
    activation order. Other tensors (biases, norms, embeddings, half precision, denser weights)
    are swapped in as base + S.
    """

    mergeable = True
    exact_unmerge = True  # merge stashes the entries it changes (dense form: the whole tensor)
    #: ParameterDicts of the dense form, emptied by to_sparse. The first holds the difference
    #: itself (made like the base parameter): the sparse values take its dtype and device.
    dense_attrs: tuple[str, ...] = ()

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        self.names = list(names)
        self.shapes = {n: tuple(getattr(module, n).shape) for n in names}
        self.product = "weight" if isinstance(module, (nn.Linear, Conv1D)) and "weight" in names else None
        self.transposed = isinstance(module, Conv1D)
        self.sparse = SparseParams()
        self.is_compact = False
        self._stash: dict[str, torch.Tensor] = {}

    # dense form -------------------------------------------------------------------------------
    def dense_delta(self, name: str, train: bool = False) -> torch.Tensor:
        """The dense difference (``train``: the training-time form, e.g. with sampled gates)."""
        raise NotImplementedError

    def scores(self) -> dict[str, torch.Tensor]:
        """What top-k ranks when the layer turns sparse: the magnitude of the dense difference."""
        with torch.no_grad():
            return {n: self.dense_delta(n).abs() for n in self.names}

    # the call ---------------------------------------------------------------------------------
    def params(self, module: nn.Module, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.is_compact:
            skip = self._by_product(module)
            return {n: self.sparse.add_to(n, current[n]) for n in self.names if n != skip}
        return {n: current[n] + self.dense_delta(n, self.training).to(current[n].dtype) for n in self.names}

    def post(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = self._by_product(module) if self.is_compact else None
        if n is None:
            return y
        return y + sparse_linear(x, self.sparse.index(n), self.sparse.val[n], self.shapes[n],
                                 self.transposed)

    def _by_product(self, module: nn.Module) -> str | None:
        """The weight computed as a sparse product (a sparse float32/64 Linear or Conv1D weight)."""
        n = self.product
        if n is None or module.weight.dtype not in _MATMUL_DTYPES:
            return None
        numel = int(torch.Size(self.shapes[n]).numel())
        return n if self.sparse.count(n) <= PRODUCT_MAX_DENSITY * numel else None

    # switching ----------------------------------------------------------------------------------
    def to_sparse(self, idx: dict[str, torch.Tensor], values: dict[str, torch.Tensor],
                  trainable: bool = True) -> None:
        for n in self.names:
            self.sparse.set(n, self.shapes[n], idx[n], values[n], trainable)
        self._drop_dense()

    def compact_sizes(self) -> dict[str, int]:
        return {n: self.sparse.count(n) for n in self.names}

    def allocate_compact(self, sizes: dict[str, int]) -> None:
        """Zero sparse placeholders of the saved sizes, for a load to fill."""
        for n in self.names:
            self.sparse.allocate(n, self.shapes[n], sizes[n], self._values_like(n))
        self._drop_dense()

    def _values_like(self, name: str) -> torch.Tensor:
        """A tensor of the dtype and device the sparse values of `name` take: the current values,
        else the dense difference (which was made like the base parameter)."""
        if self.is_compact:
            return self.sparse.val[name]
        return getattr(self, self.dense_attrs[0])[name]

    def check_compact(self, where: str) -> None:
        self.sparse.check(where)

    def _drop_dense(self) -> None:
        for attr in self.dense_attrs:
            setattr(self, attr, nn.ParameterDict())
        self.is_compact = True

    # merging (exact: the original entries are stashed) -------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self._stash) or self.sparse.merged

    @torch.no_grad()
    def merge(self, module: nn.Module) -> None:
        for n in self.names:
            p = getattr(module, n)
            if self.is_compact:
                self.sparse.merge_into(n, p)
            else:
                self._stash[n] = p.detach().clone()
                p.add_(self.dense_delta(n).to(p.dtype))

    @torch.no_grad()
    def unmerge(self, module: nn.Module) -> None:
        for n in self.names:
            if self.is_compact:
                self.sparse.unmerge_from(n, getattr(module, n))
            else:
                getattr(module, n).copy_(self._stash.pop(n))
