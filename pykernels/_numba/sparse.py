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


def sparse_linear(x, row_ptr, col, values, bias, y) -> None:
    b = bias if bias is not None else values[:1]
    _forward(x, row_ptr, col, values, b, bias is not None, y)


def sparse_linear_backward(dy, x, row_ptr, col, values, dx, dv) -> None:
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
