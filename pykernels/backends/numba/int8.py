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
def _quantize7(x, q, scale):
    # The 7-bit grid of csrc/int8/int8_grid7.h, in float32 throughout.
    rows, cols = x.shape
    f127 = np.float32(127.0)
    for r in range(rows):
        lo = np.float32(0.0)
        hi = np.float32(0.0)
        nan = False
        for c in range(cols):
            v = x[r, c]
            if math.isnan(v):
                nan = True
            elif v < lo:
                lo = v
            elif v > hi:
                hi = v
        s = np.float32(np.nan) if nan else np.float32(np.float32(hi / f127) - np.float32(lo / f127))
        scale[r] = s
        if not (s > 0) or math.isinf(s):
            for c in range(cols):
                q[r, c] = 0
            continue
        zp = min(np.float32(127.0), max(np.float32(0.0), np.rint(np.float32(-lo / s))))
        for c in range(cols):
            v = np.rint(np.float32(x[r, c] / s))
            q[r, c] = np.int8(min(f127 - zp, max(-zp, v)))


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


def quantize_per_row(x: np.ndarray, q: np.ndarray, scale: np.ndarray, bits: int = 8) -> None:
    (_quantize7 if bits == 7 else _quantize)(x, q, scale)


def int8_gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    _gemm(a, b, c)


@numba.njit(cache=True, nogil=True)
def _linear_epilogue(acc, xs, ws, bias, has_bias, y):
    m, n = acc.shape
    for i in range(m):
        for j in range(n):
            v = np.float32(acc[i, j]) * (xs[i] * ws[j])
            if has_bias:
                v += bias[j]
            y[i, j] = v


@numba.njit(cache=True, nogil=True)
def _weight_only(x, w, ws, bias, has_bias, y):
    m, k = x.shape
    n = w.shape[0]
    for i in range(m):
        for j in range(n):
            s = np.float32(0.0)
            for p in range(k):
                s += x[i, p] * np.float32(w[j, p])
            v = s * ws[j]
            if has_bias:
                v += bias[j]
            y[i, j] = v


def int8_linear(
    x: np.ndarray,
    w: np.ndarray,
    w_scale: np.ndarray,
    bias: np.ndarray | None,
    y: np.ndarray,
    act_bits: int = 8,
) -> None:
    """Dynamic W8A8 on float32 x and a row-major int8 weight into float32 y."""
    m, k = x.shape
    q = np.empty((m, k), dtype=np.int8)
    xs = np.empty(m, dtype=np.float32)
    (_quantize7 if act_bits == 7 else _quantize)(x, q, xs)
    acc = np.empty((m, w.shape[0]), dtype=np.int32)
    _gemm(q, w, acc)
    b = bias if bias is not None else w_scale
    _linear_epilogue(acc, xs, w_scale, b, bias is not None, y)


def int8_weight_linear(
    x: np.ndarray, w: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None, y: np.ndarray
) -> None:
    """Weight-only linear on float32 x and a row-major int8 weight into float32 y."""
    b = bias if bias is not None else w_scale
    _weight_only(x, w, w_scale, b, bias is not None, y)
