"""Numba qat: fused fake quantization per row and its straight-through backward.

Same signatures as ``pykernels._C.fake_quant_per_row`` / ``fake_quant_backward``.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _fake_quant(x, y, mask, scale):
    rows, cols = x.shape
    for r in range(rows):
        amax = np.float32(0.0)
        nan = False
        finite = True
        for c in range(cols):
            v = x[r, c]
            if math.isnan(v):
                nan = True
                finite = False
            elif math.isinf(v):
                finite = False
            a = abs(v)
            if a > amax:
                amax = a
        s = np.float32(np.nan) if nan else np.float32(amax / np.float32(127.0))
        scale[r] = s
        if not finite:
            for c in range(cols):
                y[r, c] = np.float32(np.nan)
                mask[r, c] = 0
            continue
        if not (s > 0):
            for c in range(cols):
                y[r, c] = np.float32(0.0)
                mask[r, c] = 1
            continue
        for c in range(cols):
            t = np.float32(x[r, c] / s)
            q = min(np.float32(127.0), max(np.float32(-127.0), np.rint(t)))
            y[r, c] = np.float32(q * s)
            mask[r, c] = 1 if abs(t) <= np.float32(127.5) else 0


@numba.njit(cache=True, nogil=True)
def _backward(grad, mask, out):
    for i in range(grad.shape[0]):
        out[i] = grad[i] if mask[i] != 0 else np.float32(0.0)


def fake_quant_per_row(x: np.ndarray, y: np.ndarray, mask: np.ndarray, scale: np.ndarray) -> None:
    _fake_quant(x, y, mask, scale)


def fake_quant_backward(grad: np.ndarray, mask: np.ndarray, out: np.ndarray) -> None:
    _backward(grad, mask, out)
