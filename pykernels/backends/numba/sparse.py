"""Numba sparse: CSR forward, transposed product and SDDMM.

Same roles as ``pykernels._C.sparse_linear`` / ``sparse_linear_backward``
(BSR weights reach it expanded to CSR); column indices as int64.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _forward(x, row_ptr, col, values, bias, has_bias, y):
    m = x.shape[0]
    n = row_ptr.shape[0] - 1
    for i in range(m):
        for r in range(n):
            s = np.float32(0.0)
            for j in range(row_ptr[r], row_ptr[r + 1]):
                s += values[j] * x[i, col[j]]
            if has_bias:
                s += bias[r]
            y[i, r] = s


@numba.njit(cache=True, nogil=True)
def _backward(dy, x, row_ptr, col, values, dx, need_dx, dv, need_dv):
    m = x.shape[0]
    n = row_ptr.shape[0] - 1
    if need_dx:
        dx[:, :] = 0
    for r in range(n):
        for j in range(row_ptr[r], row_ptr[r + 1]):
            c = col[j]
            if need_dv:
                s = np.float32(0.0)
                for i in range(m):
                    s += dy[i, r] * x[i, c]
                dv[j] = s
            if need_dx:
                v = values[j]
                for i in range(m):
                    dx[i, c] += v * dy[i, r]


@numba.njit(cache=True, nogil=True)
def _structure_error(row_ptr, col, nnz, k):
    """0 if the CSR structure is safe to read, else a code for what is wrong."""
    if row_ptr.shape[0] < 1 or row_ptr[0] != 0:
        return 1
    for r in range(row_ptr.shape[0] - 1):
        if row_ptr[r + 1] < row_ptr[r]:
            return 2
    if row_ptr[row_ptr.shape[0] - 1] != nnz or col.shape[0] != nnz:
        return 3
    for j in range(nnz):
        if col[j] < 0 or col[j] >= k:
            return 4
    return 0


_STRUCTURE_ERRORS = {
    1: "row_ptr: must start at 0",
    2: "row_ptr: must not decrease",
    3: "row_ptr: last entry must equal the number of column indices and values",
    4: "col: index out of range [0, K)",
}


def _check(row_ptr, col, values, k) -> None:
    # The Python layer has checked the structure already; this is the second
    # line of defence the native bindings also keep (a write through a NumPy
    # view after the first check is invisible to the first one), and cheap
    # next to the product.
    code = _structure_error(row_ptr, col, values.shape[0], k)
    if code:
        raise ValueError(_STRUCTURE_ERRORS[code])


def sparse_linear(x, row_ptr, col, values, bias, y) -> None:
    _check(row_ptr, col, values, x.shape[1])
    b = bias if bias is not None else values[:1]
    _forward(x, row_ptr, col, values, b, bias is not None, y)


def sparse_linear_backward(dy, x, row_ptr, col, values, dx, dv) -> None:
    _check(row_ptr, col, values, x.shape[1])
    empty2 = np.empty((0, 0), np.float32)
    empty1 = np.empty(0, np.float32)
    _backward(
        dy,
        x,
        row_ptr,
        col,
        values,
        dx if dx is not None else empty2,
        dx is not None,
        dv if dv is not None else empty1,
        dv is not None,
    )
