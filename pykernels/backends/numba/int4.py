"""Numba int4: the weight-only and W4A8 linears over the group-wise format
(pykernels.ops.int4), with the arithmetic of the native kernels: weight-only
sums x * (q - zero) per group in float32 and then scales; W4A8 quantizes
each row of x as int8's per-row quantization does and sums each group
exactly in integers."""

from __future__ import annotations

import numba
import numpy as np

from .int8 import _quantize


@numba.njit(cache=True, nogil=True)
def _weight_only(x, packed, scales, zeros, group, bias, has_bias, y):
    m, k = x.shape
    n = packed.shape[0]
    groups = k // group
    for i in range(m):
        for j in range(n):
            total = np.float32(0.0)
            for g in range(groups):
                z = np.float32(zeros[j, g])
                acc = np.float32(0.0)
                for b in range(g * group // 2, (g + 1) * group // 2):
                    v = packed[j, b]
                    acc += x[i, 2 * b] * (np.float32(v & 15) - z)
                    acc += x[i, 2 * b + 1] * (np.float32(v >> 4) - z)
                total += acc * scales[j, g]
            y[i, j] = total + bias[j] if has_bias else total


@numba.njit(cache=True, nogil=True)
def _dynamic(q, xs, packed, scales, zeros, group, bias, has_bias, y):
    m, k = q.shape
    n = packed.shape[0]
    groups = k // group
    for i in range(m):
        for j in range(n):
            acc = np.float32(0.0)
            for g in range(groups):
                z = np.int32(zeros[j, g])
                isum = np.int32(0)
                for b in range(g * group // 2, (g + 1) * group // 2):
                    v = np.int32(packed[j, b])
                    isum += np.int32(q[i, 2 * b]) * ((v & 15) - z)
                    isum += np.int32(q[i, 2 * b + 1]) * ((v >> 4) - z)
                acc += np.float32(isum) * scales[j, g]
            v = acc * xs[i]
            y[i, j] = v + bias[j] if has_bias else v


def _bias(bias, n):
    return (np.zeros(n, np.float32), False) if bias is None else (bias, True)


def linear_weight_only(x, packed, scales, zeros, group, bias, y) -> None:
    b, has = _bias(bias, packed.shape[0])
    _weight_only(x, packed, scales, zeros, group, b, has, y)


def linear_dynamic(x, packed, scales, zeros, group, bias, y) -> None:
    q = np.empty(x.shape, np.int8)
    xs = np.empty(x.shape[0], np.float32)
    _quantize(x, q, xs)
    b, has = _bias(bias, packed.shape[0])
    _dynamic(q, xs, packed, scales, zeros, group, b, has, y)
