"""Shared machinery of the sparse methods (diff_pruning, lt_sft, mask; sparse_adapter later).

- ``SparseParams``: named sparse tensors of fixed dense shapes, stored as sorted flat int32 indices
  (buffers) + values (Parameters). Saved keys ``<owner>.idx.<name>`` and ``<owner>.val.<name>``, so a
  file grows with the kept entries, not with the dense size. ``add_to`` is one out-of-place
  ``index_add`` (its backward is a gather of k entries: no dense gradient is kept); merging stashes
  the k original entries, so merge/unmerge is exact and untouched entries are never written.
- ``SparseDiffLayer``: a per-parameter difference with a dense training form (subclasses define it)
  and a sparse form; ``CompactingDelta``: the one-way switch of every layer to its compact form
  (``compact(...)``), recorded in the saved extra state so that loading rebuilds the right storage.
- ``topk_global``, ``pack_bits`` / ``unpack_bits``: exact-k selection and bit-packed masks.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..core.config import DeltaConfig
from ..core.delta import Delta, key_to_path
from ..core.layer import DeltaLayer, ParamCopy
from ..errors import CheckpointError, ConfigError, MergeError, TargetError


# -- helpers ---------------------------------------------------------------------------------------
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


_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8, 8 entries a byte (most significant bit first, zero padded)."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = int(torch.Size(shape).numel())
    flat = (bits.view(-1, 1) >> _SHIFTS.to(bits.device)) & 1
    return flat.view(-1)[:numel].view(shape).bool()


def packed_size(shape: tuple[int, ...]) -> int:
    return (int(torch.Size(shape).numel()) + 7) // 8


# -- a sparse weight's product without a dense weight -----------------------------------------------
_MATMUL_DTYPES = (torch.float32, torch.float64)
PRODUCT_MAX_DENSITY = 0.02  # above it, sparse kernels cost more than one dense weight gradient


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
         shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A CSR matrix from coordinates in any order, and the permutation into CSR order."""
    perm = torch.argsort(rows * shape[1] + cols)
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():  # "CSR support is in beta": the ops used here are tested
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(crow, cols[perm], values[perm], shape, check_invariants=False)
    return csr, perm


class _SparseLinear(torch.autograd.Function):
    """y = x @ S^T for S (out, in) with k entries: O(N k) work, no dense S or dense gradient.

    grad_x = g @ S (a sparse product), grad_values = (g^T x) sampled at S's entries (SDDMM).
    """

    @staticmethod
    def forward(ctx, x2, values, rows, cols, out_f: int, in_f: int):
        csr, perm = _csr(rows, cols, values, (out_f, in_f))
        ctx.save_for_backward(x2, csr, perm)
        return torch.mm(x2, csr.t())

    @staticmethod
    def backward(ctx, g):
        x2, csr, perm = ctx.saved_tensors
        g_x = torch.mm(g, csr) if ctx.needs_input_grad[0] else None
        g_v = None
        if ctx.needs_input_grad[1]:
            sampled = torch.sparse.sampled_addmm(csr, g.t(), x2, beta=0.0).values()
            g_v = torch.empty_like(sampled).index_copy_(0, perm, sampled)
        return g_x, g_v, None, None, None, None


def sparse_linear(x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, weight_shape: tuple[int, int],
                  transposed: bool = False) -> torch.Tensor:
    """x @ S^T for a sparse weight S given by flat indices into ``weight_shape`` (out, in), or
    (in, out) when ``transposed`` (GPT-2's Conv1D)."""
    idx = idx.long()
    a, b = idx // weight_shape[1], idx % weight_shape[1]
    rows, cols = (b, a) if transposed else (a, b)
    out_f, in_f = (weight_shape[1], weight_shape[0]) if transposed else weight_shape
    y = _SparseLinear.apply(x.reshape(-1, in_f), values.to(x.dtype), rows, cols, out_f, in_f)
    return y.reshape(*x.shape[:-1], out_f)


# -- sparse storage -------------------------------------------------------------------------------
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
        flat = _flat_view(target)
        idx = self.index(name)
        self._stash[name] = flat.index_select(0, idx).clone()
        flat.index_add_(0, idx, self.val[name].to(target.dtype))

    @torch.no_grad()
    def unmerge_from(self, name: str, target: torch.Tensor) -> None:
        _flat_view(target).index_copy_(0, self.index(name), self._stash.pop(name))

    @property
    def merged(self) -> bool:
        return bool(self._stash)


def check_indices(idx: torch.Tensor, numel: int, where: str) -> None:
    """Flat indices read from a file: one dimension, sorted, unique, within [0, numel)."""
    if idx.dim() != 1 or (idx.numel() and (idx[0] < 0 or idx[-1] >= numel or bool((idx[1:] <= idx[:-1]).any()))):
        raise CheckpointError(
            f"sparse indices of {where} are not sorted, unique and within [0, {numel}): "
            f"the checkpoint is corrupt or from another base model."
        )


def _flat_view(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise MergeError("cannot merge a sparse delta into a non-contiguous tensor: call "
                         ".contiguous() on the base parameter first.")
    return t.view(-1)


# -- a difference with a dense training form and a sparse final form ------------------------------
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
    dense_attrs: tuple[str, ...] = ()  # ParameterDicts of the dense form, emptied by to_sparse

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

    def allocate_compact(self, sizes: dict[str, int], module: nn.Module) -> None:
        for n in self.names:
            self.sparse.allocate(n, self.shapes[n], sizes[n], getattr(module, n))
        self._drop_dense()

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


# -- the delta side: one switch to the compact form, saved in the extra state ----------------------
class CompactingDelta(Delta):
    """A delta whose layers (those with ``to_sparse``-like compact forms) switch once.

    Layers taking part define ``names``, ``shapes``, ``is_compact``, ``compact_sizes()``,
    ``allocate_compact(sizes, module)``, ``check_compact(where)`` and ``merged``. Task heads
    (ParamCopy) stay as they are.
    """

    def __init__(self, name: str, config: Any, model: nn.Module):
        super().__init__(name, config, model)
        self._base = weakref.ref(model)  # a weak reference: not a submodule, never saved

    def compact_layers(self) -> list[tuple[str, DeltaLayer]]:
        return [(key_to_path(k), lay) for k, lay in self.layers.items() if not isinstance(lay, ParamCopy)]

    @property
    def is_compact(self) -> bool:
        return all(lay.is_compact for _, lay in self.compact_layers())

    def target_numel(self) -> int:
        """Entries of all targeted tensors (the denominator of ``density``)."""
        return sum(int(torch.Size(s).numel()) for _, lay in self.compact_layers() for s in lay.shapes.values())

    def kept(self) -> int:
        """Entries stored in the compact form."""
        return sum(sum(lay.compact_sizes().values()) for _, lay in self.compact_layers())

    def budget(self, density: float | None, k: int | None) -> int:
        total = self.target_numel()
        if k is None:
            k = max(1, round(density * total))
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= total:
            raise ConfigError(f"k={k!r} entries to keep must be an int in (0, {total}] (the targets' size).")
        return k

    def switch(self) -> None:
        """The method's one-way switch to its compact form (``finalize`` / ``start_phase2``)."""
        raise NotImplementedError

    def on_step(self, step: int) -> None:
        at = getattr(self.config, "switch_at", None)
        if at is not None and step + 1 == at and not self.is_compact:
            self.switch()
            self.param_version += 1

    def check_switch(self, action: str) -> None:
        if self.is_compact:
            raise ConfigError(f"delta {self.name!r} is in its compact form already; {action} runs once.")
        heads_merged = any(getattr(lay, "_stash", None) for lay in self.layers.values()
                           if isinstance(lay, ParamCopy))
        if heads_merged or any(lay.merged for _, lay in self.compact_layers()):
            raise MergeError(f"delta {self.name!r} is merged: call unmerge() before {action}.")

    def reset_heads(self) -> None:
        """Task heads back to their initial values (the base module keeps them untouched)."""
        with torch.no_grad():
            for key, lay in self.layers.items():
                if isinstance(lay, ParamCopy):
                    for n, v in lay.values.items():
                        v.copy_(getattr(self._module_of(key), n))

    def _module_of(self, key: str) -> nn.Module:
        model = self._base()
        if model is None:
            raise ConfigError(f"the base model of delta {self.name!r} no longer exists.")
        return model.get_submodule(key_to_path(key))

    # state ------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        if not self.is_compact:
            return {"compact": False}
        sizes = {f"{p}|{n}": c for p, lay in self.compact_layers() for n, c in lay.compact_sizes().items()}
        return {"compact": True, "sizes": sizes}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if not state.get("compact"):
            return
        sizes = state.get("sizes")
        if not isinstance(sizes, dict):
            raise CheckpointError(f"delta {self.name!r}: compact extra state lacks 'sizes'; the file is corrupt.")
        for key, lay in self.layers.items():
            if isinstance(lay, ParamCopy):
                continue
            path = key_to_path(key)
            want = {n: sizes.get(f"{path}|{n}") for n in lay.names}
            if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in want.values()):
                raise CheckpointError(f"delta {self.name!r}: no valid saved size for {path}; the file is corrupt.")
            lay.allocate_compact(want, self._module_of(key))

    def load_delta_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_delta_state_dict(tensors)
        for path, lay in self.compact_layers():
            if lay.is_compact:
                lay.check_compact(path)


# -- config and targets shared by the methods that change chosen base tensors ---------------------
BLOCK_LINEAR_ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


@dataclass
class SparseConfig(DeltaConfig):
    """params: names of the direct parameters of each target module to change (None: all of
    them, e.g. weight and bias). Targets default to every linear layer of the blocks.
    switch_at: ``dm.step(switch_at - 1)`` (after that many optimizer steps) runs the method's
    one-way switch (``finalize()`` / ``start_phase2()``) by itself and bumps ``param_version``;
    None: call it yourself. A harness sets it to ``switch_fraction`` of the run."""

    params: list[str] | None = None
    switch_at: int | None = None
    switch_fraction: ClassVar[float | None] = 0.5  # not a field: where a harness puts the switch

    @classmethod
    def run_length_fields(cls, steps: int) -> dict[str, Any]:
        return {} if cls.switch_fraction is None else {"switch_at": max(1, round(steps * cls.switch_fraction))}

    def validate(self) -> None:
        super().validate()
        if self.switch_at is not None:
            self.check_range("switch_at", 1, integer=True)
        if self.params is not None and (
            not isinstance(self.params, list) or not self.params
            or not all(isinstance(p, str) for p in self.params)
        ):
            self._fail("params", self.params, "a non-empty list of parameter names (e.g. ['weight']), or None")


class SparseTargetsDelta(CompactingDelta):
    """Builds one layer per target module over the chosen direct parameters."""

    default_roles = BLOCK_LINEAR_ROLES

    def make_sparse_layer(self, module: nn.Module, names: list[str]) -> DeltaLayer:
        raise NotImplementedError

    def build(self, model: nn.Module) -> None:
        wanted = self.config.params
        found = self.targets(model)
        for path, module in found:
            names = [n for n, p in module.named_parameters(recurse=False)
                     if p is not None and (wanted is None or n in wanted)]
            if names:
                self.add_layer(path, self.make_sparse_layer(module, names))
        if not len(self.layers):
            have = sorted({n for _, m in found for n, _ in m.named_parameters(recurse=False)})
            raise TargetError(
                f"method {self.config.method!r}: the {len(found)} target modules have no parameter "
                f"named {wanted}; their direct parameters are {have or 'none'}. Fix `params` or `targets`."
            )
