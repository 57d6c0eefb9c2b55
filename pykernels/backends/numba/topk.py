"""Numba top-k: the exact histogram select of the C++ driver, single-threaded.

Same signature as ``pykernels._C.topk_sparsify``. `approx` is accepted and the
result is exact (a valid approximate answer).
"""

from __future__ import annotations

import numba
import numpy as np

from ..reference._bits import bits_to_float32, float32_to_bits_saturating
from ..reference.topk import KEY_MASK

HIST_BITS = 11


@numba.njit(cache=True, nogil=True)
def _ef_update(xf: np.ndarray, r: np.ndarray) -> None:
    for i in range(r.size):
        r[i] = xf[i] + r[i]


@numba.njit(cache=True, nogil=True)
def _select(bits: np.ndarray, mask: int, kbits: int, k: int) -> np.ndarray:
    """Indices (ascending) of the k largest keys bits & mask, ties to lower index."""
    n = bits.size
    # Level 1: histogram of the top HIST_BITS key bits over everything.
    shift = kbits - HIST_BITS
    hist = np.zeros(1 << HIST_BITS, dtype=np.int64)
    for i in range(n):
        hist[(np.int64(bits[i]) & mask) >> shift] += 1
    greater = 0
    b = (1 << HIST_BITS) - 1
    while b > 0 and greater + hist[b] < k:
        greater += hist[b]
        b -= 1
    t = np.int64(b) << shift
    cand = np.empty(greater + hist[b], dtype=np.int64)
    c = 0
    for i in range(n):
        if (np.int64(bits[i]) & mask) >= t:
            cand[c] = i
            c += 1
    # Remaining digits over the candidates only.
    prefix = np.int64(b)
    remaining = shift
    while remaining > 0:
        d = min(HIST_BITS, remaining)
        s = remaining - d
        h = np.zeros(1 << d, dtype=np.int64)
        for j in range(c):
            key = np.int64(bits[cand[j]]) & mask
            if (key >> (s + d)) == prefix:
                h[(key >> s) & ((1 << d) - 1)] += 1
        b = (1 << d) - 1
        while b > 0 and greater + h[b] < k:
            greater += h[b]
            b -= 1
        prefix = (prefix << d) | b
        remaining = s
    kth = prefix
    ties = k - greater
    out = np.empty(k, dtype=np.int64)
    o = 0
    for j in range(c):
        key = np.int64(bits[cand[j]]) & mask
        if key > kth or (key == kth and ties > 0):
            if key == kth:
                ties -= 1
            out[o] = cand[j]
            o += 1
            if o == k:
                break
    return out


def topk_sparsify(
    x: np.ndarray,
    dtype: int,
    k: int,
    approx: bool,
    residual: np.ndarray | None,
    values: np.ndarray,
    indices: np.ndarray,
) -> None:
    del approx
    if residual is None:
        if k:
            kbits = 31 if dtype == 0 else 15
            sel = _select(x, KEY_MASK[dtype], kbits, k)
            values[:] = x[sel]
            indices[:] = sel
        return
    _ef_update(bits_to_float32(x, dtype), residual)
    if not k:
        return
    y = residual
    sel = _select(y.view(np.uint32), 0x7FFFFFFF, 31, k)
    sent_bits = float32_to_bits_saturating(y[sel], dtype)
    sent = bits_to_float32(sent_bits, dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.isfinite(sent) & np.isfinite(y[sel])
        residual[sel] = np.where(ok, y[sel] - sent, 0.0).astype(np.float32)
    values[:] = sent_bits
    indices[:] = sel
