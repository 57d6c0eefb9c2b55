"""Numba cluster: the clustered linear layer from packed codes and codebooks.

Same signature as ``pykernels._C.cluster_linear``.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, inline="always")
def _code(row, p, bits):
    """Code of weight p in a packed row: one byte each at 8 bits; at 4 bits the
    native layout (blocks of 128 weights, 16-weight groups in nibbles)."""
    if bits == 8:
        return row[p]
    q = (p % 128) // 16
    return (row[64 * (p // 128) + 4 * (p % 16) + q // 2] >> (4 * (q % 2))) & 15


@numba.njit(cache=True, nogil=True)
def _linear(x, codes, codebook, bias, has_bias, bits, y):
    m, k = x.shape
    n = codes.shape[0]
    per_row = codebook.shape[0] == n
    nc = codebook.shape[1]
    w = np.empty(k, dtype=np.float32)
    for j in range(n):
        cb = codebook[j] if per_row else codebook[0]
        row = codes[j]
        for p in range(k):
            c = _code(row, p, bits)
            w[p] = cb[c] if c < nc else np.float32(0.0)
        for i in range(m):
            s = np.float32(0.0)
            for p in range(k):
                s += x[i, p] * w[p]
            if has_bias:
                s += bias[j]
            y[i, j] = s


@numba.njit(cache=True, nogil=True)
def _dynamic(xq, xs, codes, cq, cs, bias, has_bias, bits, y):
    m, k = xq.shape
    n = codes.shape[0]
    per_row = cq.shape[0] == n
    w = np.empty(k, dtype=np.int32)
    for j in range(n):
        r = j if per_row else 0
        row = codes[j]
        for p in range(k):
            c = _code(row, p, bits)
            w[p] = cq[r, c] if c < cq.shape[1] else 0
        for i in range(m):
            acc = np.int32(0)
            for p in range(k):
                acc += np.int32(xq[i, p]) * w[p]
            v = np.float32(acc) * (xs[i] * cs[r])
            if has_bias:
                v += bias[j]
            y[i, j] = v


def cluster_linear(
    x: np.ndarray,
    codes: np.ndarray,
    codebook: np.ndarray,
    bias: np.ndarray | None,
    bits: int,
    dynamic: bool,
    y: np.ndarray,
) -> None:
    b = bias if bias is not None else codebook[0]
    if not dynamic:
        _linear(x, codes, codebook, b, bias is not None, int(bits), y)
        return
    from .int8 import _quantize

    xq = np.empty(x.shape, np.int8)
    xs = np.empty(x.shape[0], np.float32)
    _quantize(x, xq, xs)
    cq = np.empty(codebook.shape, np.int8)
    cs = np.empty(codebook.shape[0], np.float32)
    _quantize(codebook, cq, cs)
    _dynamic(xq, xs, codes, cq, cs, b, bias is not None, int(bits), y)
