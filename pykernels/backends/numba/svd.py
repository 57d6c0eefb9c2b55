"""Numba svd: the one-sided Jacobi of csrc/svd/svd_cpu.cpp, same signature as
``pykernels._C.batched_svd`` (computed in float64, returns the sweeps needed)."""

from __future__ import annotations

import math

import numba
import numpy as np

MAX_SWEEPS = 60
TOL = 1e-13
EPS = np.finfo(np.float64).eps
NOISE = 8.0  # csrc/svd/svd_cpu.cpp kNoise: see there


@numba.njit(cache=True, nogil=True)
def _dot(x, y):
    # A loop, not np.dot: Numba's np.dot needs scipy for BLAS.
    s = 0.0
    for i in range(x.shape[0]):
        s += x[i] * y[i]
    return s


@numba.njit(cache=True, nogil=True)
def _jacobi(w, v):
    cols, rows = w.shape
    for j in range(cols):
        for i in range(cols):
            v[j, i] = 1.0 if i == j else 0.0
    norm2 = np.empty(cols)
    noise = (NOISE * EPS * math.sqrt(rows)) ** 2
    for sweep in range(1, MAX_SWEEPS + 1):
        for j in range(cols):
            norm2[j] = _dot(w[j], w[j])
        rotated = False
        for p in range(cols - 1):
            for q in range(p + 1, cols):
                alpha, beta = norm2[p], norm2[q]
                if alpha == 0.0 or beta == 0.0:
                    continue
                gamma = _dot(w[p], w[q])
                if abs(gamma) <= TOL * math.sqrt(alpha) * math.sqrt(beta):
                    continue
                rotated = True
                zeta = (beta - alpha) / (2.0 * gamma)
                az = abs(zeta)
                root = math.sqrt(1.0 + az * az) if az < 1e150 else az
                t = math.copysign(1.0, zeta) / (az + root)
                c = 1.0 / math.sqrt(1.0 + t * t)
                s = c * t
                for i in range(rows):
                    a, b = w[p, i], w[q, i]
                    w[p, i] = c * a - s * b
                    w[q, i] = s * a + c * b
                for i in range(cols):
                    a, b = v[p, i], v[q, i]
                    v[p, i] = c * a - s * b
                    v[q, i] = s * a + c * b
                np_ = alpha - t * gamma
                nq = beta + t * gamma
                if np_ < 0.25 * alpha:
                    np_ = _dot(w[p], w[p])
                if nq < 0.25 * beta:
                    nq = _dot(w[q], w[q])
                floor = noise * (alpha + beta)
                if np_ <= floor:
                    w[p, :] = 0.0
                    np_ = 0.0
                if nq <= floor:
                    w[q, :] = 0.0
                    nq = 0.0
                norm2[p] = np_
                norm2[q] = nq
        if not rotated:
            return sweep
    return MAX_SWEEPS + 1


@numba.njit(cache=True, nogil=True)
def _one(a, u, s, vh):
    m, n = a.shape
    k = min(m, n)
    wide = m < n
    w = np.ascontiguousarray(a.astype(np.float64) if wide else a.T.astype(np.float64))
    rows = w.shape[1]
    v = np.empty((k, k))
    sweeps = _jacobi(w, v)
    sv = np.sqrt(np.sum(w * w, axis=1))
    order = np.argsort(-sv, kind="mergesort")
    left = np.zeros((k, rows))
    for r in range(k):
        j = order[r]
        if sv[j] > 0.0:
            left[r] = w[j] / sv[j]
        else:  # complete: see csrc/svd/svd_cpu.cpp
            best, best_left = 0, -1.0
            for e in range(rows):
                rest = 1.0
                for q in range(r):
                    rest -= left[q, e] * left[q, e]
                if rest > best_left:
                    best, best_left = e, rest
            d = np.zeros(rows)
            d[best] = 1.0
            for _ in range(2):
                for q in range(r):
                    d -= _dot(left[q], d) * left[q]
            left[r] = d / math.sqrt(_dot(d, d))
    for r in range(k):
        j = order[r]
        s[r] = sv[j]
        if not wide:
            u[:, r] = left[r]
            vh[r, :] = v[j]
        else:
            u[:, r] = v[j]
            vh[r, :] = left[r]
    return sweeps


def batched_svd(a: np.ndarray, u: np.ndarray, s: np.ndarray, vh: np.ndarray) -> int:
    worst = 0
    for b in range(a.shape[0]):
        worst = max(worst, _one(a[b], u[b], s[b], vh[b]))
    return worst
