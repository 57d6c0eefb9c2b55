"""quant reference: bucketed absmax quantization with stochastic rounding."""

from __future__ import annotations

import numpy as np

from ._bits import bits_to_float32

# Bucketed absmax quantization with stochastic rounding (csrc/quant/quant.h
# states the arithmetic). Whole-array NumPy: every step a single fp32
# operation, so the result equals the kernels' bit for bit.

QUANT_LIMIT = {8: 127, 4: 7, 2: 1}
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def splitmix64(seed: int) -> int:
    z = (seed + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _lowbias32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> np.uint32(16))


def quant_noise(seed: int, start: int, count: int) -> np.ndarray:
    """The stochastic-rounding noise u in [0, 1) of elements [start, start + count)."""
    key = splitmix64(seed)
    k0, k1 = np.uint32(key & _M32), np.uint32(key >> 32)
    i = np.arange(start, start + count, dtype=np.uint64)
    lo = (i & np.uint64(_M32)).astype(np.uint32)
    hi = (i >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        key = k0 ^ _lowbias32(hi ^ k1)
        h = _lowbias32(lo ^ key)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (one per uint8) -> their low `bits` bits, element i at bit i * bits."""
    if bits == 8:
        return codes.astype(np.uint8)
    b = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(b.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    if bits == 8:
        return packed[:n].astype(np.uint8)
    b = np.unpackbits(packed, bitorder="little", count=n * bits).reshape(n, bits)
    full = np.zeros((n, 8), dtype=np.uint8)
    full[:, :bits] = b
    return np.packbits(full, axis=1, bitorder="little").reshape(n)


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
    """Fills codes (packed) and scales; with a residual, error feedback in place."""
    n = x.size
    if n == 0:
        return
    lim = QUANT_LIMIT[bits]
    y = bits_to_float32(x, dtype).astype(np.float32)
    if residual is not None:
        y = y + residual
    nb = -(-n // bucket)
    yb = np.zeros(nb * bucket, dtype=np.float32)
    yb[:n] = y
    yb = yb.reshape(nb, bucket)
    amax_bits = (yb.view(np.uint32) & np.uint32(0x7FFFFFFF)).max(axis=1)
    amax = amax_bits.view(np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.float32(lim) / amax
        nonfinite = amax_bits >= 0x7F800000
        ok = ~nonfinite & (amax_bits != 0) & np.isfinite(inv)
        scale = np.where(ok, amax / np.float32(lim), np.float32(0)).astype(np.float32)
        scale[nonfinite] = np.uint32(0x7FC00000).view(np.float32)
        v = yb * np.where(ok, inv, np.float32(0))[:, None]
        if stochastic:
            u = quant_noise(seed, 0, nb * bucket).reshape(nb, bucket)
            q = np.floor(v + u)
        else:
            q = np.rint(v)
    q = np.clip(q, -lim, lim)
    q[~ok] = 0
    c = (q.astype(np.int32) + lim).reshape(-1)[:n]
    codes[:] = pack_codes(c, bits)
    scales[:] = scale
    if residual is not None:
        with np.errstate(invalid="ignore"):
            r = yb - (q.astype(np.float32) * scale[:, None])
        r[nonfinite] = 0
        residual[:] = r.reshape(-1)[:n]


def dequantize_buckets(
    codes: np.ndarray,
    scales: np.ndarray,
    n: int,
    bits: int,
    bucket: int,
    out: np.ndarray,
    accumulate: bool,
) -> None:
    """out = (or +=) float32(code - L) * scale of the element's bucket."""
    if n == 0:
        return
    q = unpack_codes(codes, n, bits).astype(np.int32) - QUANT_LIMIT[bits]
    s = np.repeat(scales, bucket)[:n]
    with np.errstate(invalid="ignore"):
        deq = q.astype(np.float32) * s
    if accumulate:
        out[:] = out + deq
    else:
        out[:] = deq


def pack_bits(values: np.ndarray, width: int, out: np.ndarray) -> None:
    """The low `width` bits of each uint32 value, value i at bit i * width (little-endian)."""
    if width == 0 or values.size == 0:
        return
    b = np.unpackbits(values.astype("<u4").view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    out[:] = np.packbits(b[:, :width].reshape(-1), bitorder="little")


def unpack_bits(data: np.ndarray, n: int, width: int, values: np.ndarray) -> None:
    """Inverse of pack_bits: `n` values into `values` (uint32)."""
    if width == 0 or n == 0:
        values[:] = 0
        return
    bits = np.unpackbits(data, bitorder="little", count=n * width).reshape(n, width)
    full = np.zeros((n, 32), dtype=np.uint8)
    full[:, :width] = bits
    values[:] = np.packbits(full, axis=1, bitorder="little").view("<u4").reshape(n)
