"""Numba int8: per-row quantization and an exact int32 GEMM.

Same signatures as ``pykernels._C.quantize_per_row`` / ``int8_gemm``.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _quantize(x, q, scale):
    rows, cols = x.shape
    for r in range(rows):
        amax = np.float32(0.0)
        nan = False
        for c in range(cols):
            v = abs(x[r, c])
            if math.isnan(v):
                nan = True
            elif v > amax:
                amax = v
        s = np.float32(np.nan) if nan else np.float32(amax / np.float32(127.0))
        scale[r] = s
        if not (s > 0) or math.isinf(s):
            for c in range(cols):
                q[r, c] = 0
            continue
        for c in range(cols):
            v = np.rint(np.float32(x[r, c] / s))
            q[r, c] = np.int8(min(127.0, max(-127.0, v)))


@numba.njit(cache=True, nogil=True)
def _gemm(a, b, c):
    m, k = a.shape
    n = b.shape[0]
    for i in range(m):
        for j in range(n):
            s = np.int32(0)
            for p in range(k):
                s += np.int32(a[i, p]) * np.int32(b[j, p])
            c[i, j] = s


def quantize_per_row(x: np.ndarray, q: np.ndarray, scale: np.ndarray) -> None:
    _quantize(x, q, scale)


def int8_gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    _gemm(a, b, c)
