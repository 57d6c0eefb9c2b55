"""Numba quant: the bucket loops of csrc/quant/quant_portable.cpp, single-threaded.

Same signatures as ``pykernels._C.quantize_buckets`` / ``dequantize_buckets``.
Every operation stays in float32 (no float64 literal meets a float32 value),
so the results equal the native kernels' bit for bit.
"""

from __future__ import annotations

import numba
import numpy as np

from ..reference._bits import bits_to_float32
from ..reference.quant import QUANT_LIMIT, splitmix64

_M32 = np.uint64(0xFFFFFFFF)


@numba.njit(cache=True, nogil=True, inline="always")
def _lowbias32(h):
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x7FEB352D)) & _M32
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x846CA68B)) & _M32
    h ^= h >> np.uint64(16)
    return h


@numba.njit(cache=True, nogil=True)
def _quantize(y, ef, lim, bucket, stochastic, k0, k1, c, scales, r):
    """c[i] = code of y[i] (one per byte); with ef, r = y - decoded."""
    n = y.size
    fl = np.float32(lim)
    two_m24 = np.float32(5.9604644775390625e-8)
    bits = y.view(np.uint32)
    nb = (n + bucket - 1) // bucket
    for b in range(nb):
        s = b * bucket
        e = min(n, s + bucket)
        amax_bits = np.uint32(0)
        for j in range(s, e):
            kb = bits[j] & np.uint32(0x7FFFFFFF)
            if kb > amax_bits:
                amax_bits = kb
        amax = np.array([amax_bits], dtype=np.uint32).view(np.float32)[0]
        inv = fl / amax if amax_bits != 0 else np.float32(np.inf)
        if amax_bits >= np.uint32(0x7F800000) or amax_bits == 0 or not (inv < np.float32(3.4e38)):
            if amax_bits >= np.uint32(0x7F800000):
                scales[b] = np.array([0x7FC00000], dtype=np.uint32).view(np.float32)[0]
                if ef:
                    for j in range(s, e):
                        r[j] = np.float32(0)
            else:
                scales[b] = np.float32(0)
                if ef:
                    for j in range(s, e):
                        r[j] = y[j]
            for j in range(s, e):
                c[j] = lim
            continue
        scale = amax / fl
        scales[b] = scale
        for j in range(s, e):
            v = y[j] * inv
            if stochastic:
                i = np.uint64(j)
                key = k0 ^ _lowbias32((i >> np.uint64(32)) ^ k1)
                h = _lowbias32((i & _M32) ^ key)
                u = np.float32(h >> np.uint64(8)) * two_m24
                q = np.float32(np.floor(v + u))
            else:
                q = np.float32(np.rint(v))
            if q < -fl:
                q = -fl
            if q > fl:
                q = fl
            code = np.int32(q) + lim
            c[j] = code
            if ef:
                r[j] = y[j] - np.float32(code - lim) * scale


@numba.njit(cache=True, nogil=True)
def _pack(c, bits, out):
    per = 8 // bits
    for b in range(out.size):
        acc = 0
        for t in range(per):
            i = b * per + t
            if i < c.size:
                acc |= np.int64(c[i]) << (t * bits)
        out[b] = acc


@numba.njit(cache=True, nogil=True)
def _dequantize(codes, scales, n, bits, bucket, out, accumulate):
    lim = (1 << (bits - 1)) - 1
    per = 8 // bits
    mask = (1 << bits) - 1
    for i in range(n):
        code = (np.int64(codes[i // per]) >> ((i % per) * bits)) & mask
        v = np.float32(code - lim) * scales[i // bucket]
        if accumulate:
            out[i] = out[i] + v
        else:
            out[i] = v


def quantize_buckets(
    x: np.ndarray,
    dtype: int,
    bits: int,
    bucket: int,
    stochastic: bool,
    seed: int,
    residual: np.ndarray | None,
    codes: np.ndarray,
    scales: np.ndarray,
) -> None:
    n = x.size
    if n == 0:
        return
    y = bits_to_float32(x, dtype).astype(np.float32)
    if residual is not None:
        y = y + residual
    key = splitmix64(seed)
    c = np.empty(n, dtype=np.uint8)
    r = residual if residual is not None else np.empty(0, dtype=np.float32)
    _quantize(
        y,
        residual is not None,
        QUANT_LIMIT[bits],
        bucket,
        stochastic,
        np.uint64(key & 0xFFFFFFFF),
        np.uint64(key >> 32),
        c,
        scales,
        r,
    )
    if bits == 8:
        codes[:] = c
    else:
        _pack(c, bits, codes)


def dequantize_buckets(
    codes: np.ndarray,
    scales: np.ndarray,
    n: int,
    bits: int,
    bucket: int,
    out: np.ndarray,
    accumulate: bool,
) -> None:
    if n == 0:
        return
    _dequantize(codes, scales, n, bits, bucket, out, accumulate)


@numba.njit(cache=True, nogil=True)
def _pack_bits(v, width, out):
    mask = (np.uint64(1) << np.uint64(width)) - np.uint64(1)
    acc = np.uint64(0)
    bits = 0
    o = 0
    for i in range(v.size):
        acc |= (np.uint64(v[i]) & mask) << np.uint64(bits)
        bits += width
        while bits >= 8:
            out[o] = acc & np.uint64(255)
            o += 1
            acc >>= np.uint64(8)
            bits -= 8
    if bits > 0:
        out[o] = acc & np.uint64(255)


@numba.njit(cache=True, nogil=True)
def _unpack_bits(data, n, width, v):
    mask = (np.uint64(1) << np.uint64(width)) - np.uint64(1)
    acc = np.uint64(0)
    bits = 0
    p = 0
    for i in range(n):
        while bits < width:
            acc |= np.uint64(data[p]) << np.uint64(bits)
            p += 1
            bits += 8
        v[i] = acc & mask
        acc >>= np.uint64(width)
        bits -= width


def pack_bits(values: np.ndarray, width: int, out: np.ndarray) -> None:
    _pack_bits(values, width, out)


def unpack_bits(data: np.ndarray, n: int, width: int, values: np.ndarray) -> None:
    _unpack_bits(data, n, width, values)
