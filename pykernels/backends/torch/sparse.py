"""Sparse linear with torch's sparse tensors on the data's device (MKL or
cuSPARSE): CSR (or 4x4 BSR) times dense, a transposed product for dX and a
sampled dense product (SDDMM) for the stored values' gradient.

Only stored entries enter a sum, so a NaN in x reaches only the outputs whose
rows store its column, as in the native kernels.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

BLOCK = 4


# torch trusts a sparse tensor's structure unless asked to check it, and a bad
# index then reads out of bounds (on a GPU too). pykernels.ops.sparse checks
# every structure (the same invariants torch's check_invariants does, and
# once per weight rather than on every call, which on a GPU would also
# synchronise the stream) before any backend runs, so it is not checked again.
_CHECK = False


def _csr(values: Tensor, col: Tensor, row_ptr: Tensor, n: int, k: int) -> Tensor:
    return torch.sparse_csr_tensor(row_ptr, col, values, size=(n, k), check_invariants=_CHECK)


@functools.cache
def bsr_mm_runs(device_type: str) -> bool:
    """Whether torch multiplies BSR by dense on this device: CPU builds without MKL
    (torch's aarch64 wheels) raise "not implemented ... without MKL"."""
    w = torch.eye(BLOCK, device=device_type).to_sparse_bsr((BLOCK, BLOCK))
    try:
        w @ torch.ones(BLOCK, 1, device=device_type)
    except RuntimeError:
        return False
    return True


def _bsr_mm_blocks(values: Tensor, col: Tensor, row_ptr: Tensor, xp: Tensor) -> Tensor:
    """W @ xp for a BSR W without torch's BSR product: one 4x4 @ 4xM per stored
    block, summed into its block row (only stored blocks enter a sum, as there)."""
    nb = row_ptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(nb, device=xp.device), row_ptr.diff())
    prod = torch.bmm(values, xp.view(-1, BLOCK, xp.shape[1])[col])
    out = xp.new_zeros(nb, BLOCK, xp.shape[1]).index_add_(0, rows, prod)
    return out.view(nb * BLOCK, xp.shape[1])


def sparse_linear(
    x: Tensor,
    values: Tensor,
    col: Tensor,
    row_ptr: Tensor,
    bias: Tensor | None,
    n: int,
    block: int,
) -> Tensor:
    """y = x @ W.T + bias; x [M, K] fp32, col int64, values [nnz] or [nblocks, 4, 4]."""
    m, k = x.shape
    if block == 1:
        y = (_csr(values, col, row_ptr, n, k) @ x.T).T
    else:
        nb, kb = row_ptr.numel() - 1, -(-k // BLOCK)
        if k % BLOCK:
            # The padding past K multiplies zeros here but is skipped by the
            # native kernels: zero it, so a NaN stored there cannot leak in.
            values = values.clone()
            values[col == kb - 1, :, k % BLOCK :] = 0
        xp = x if kb * BLOCK == k else torch.nn.functional.pad(x, (0, kb * BLOCK - k))
        if bsr_mm_runs(x.device.type):
            w = torch.sparse_bsr_tensor(
                row_ptr, col, values, size=(nb * BLOCK, kb * BLOCK), check_invariants=_CHECK
            )
            y = (w @ xp.T)[:n].T
        else:
            y = _bsr_mm_blocks(values, col, row_ptr, xp.T.contiguous())[:n].T
    y = y.contiguous()
    if bias is not None:
        y = y + bias
    return y


def sparse_linear_backward(
    dy: Tensor,
    x: Tensor,
    values: Tensor,
    col: Tensor,
    row_ptr: Tensor,
    n: int,
    need_dx: bool,
    need_dv: bool,
) -> tuple[Tensor, Tensor]:
    """(dx [M, K], dvalues [nnz]) for a CSR weight; a side not needed is empty."""
    m, k = x.shape
    w = _csr(values, col, row_ptr, n, k)
    dx = x.new_empty(0, k)
    dv = values.new_empty(0)
    if need_dx:
        # dy @ W as (W^T dy^T)^T: the transpose of a CSR matrix multiplies as CSC.
        dx = (w.t() @ dy.T).T.contiguous()
    if need_dv:
        pattern = _csr(torch.ones_like(values), col, row_ptr, n, k)
        dv = torch.sparse.sampled_addmm(pattern, dy.T.contiguous(), x, beta=0.0).values()
    return dx, dv
