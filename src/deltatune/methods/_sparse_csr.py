"""A sparse weight's product ``x @ S^T`` without a dense S or a dense weight gradient (CSR kernels)."""
from __future__ import annotations

import warnings

import torch


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
