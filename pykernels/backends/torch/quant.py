"""Bucketed stochastic quantization with torch ops on the tensor's device.

The arithmetic of ``csrc/quant/quant.h`` step by step (each a single fp32
operation, the noise from the same counter-based hash, computed in int64
with the 32-bit products split so nothing overflows), so the codes and
scales equal the native kernels' bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..reference.quant import QUANT_LIMIT, splitmix64

_M32 = 0xFFFFFFFF


def _mul32(h: Tensor, c: int) -> Tensor:
    """(h * c) mod 2^32 for int64 tensors holding 32-bit values, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & _M32


def _lowbias32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul32(h, 0x846CA68B)
    return h ^ (h >> 16)


def noise(seed: int, count: int, device: torch.device) -> Tensor:
    """The rounding noise u in [0, 1) of elements [0, count), float32."""
    key = splitmix64(seed)
    k0, k1 = key & _M32, key >> 32
    i = torch.arange(count, dtype=torch.int64, device=device)
    h = _lowbias32((i & _M32) ^ (k0 ^ _lowbias32((i >> 32) ^ k1)))
    return (h >> 8).to(torch.float32) * (2.0**-24)


def _pack(c: Tensor, bits: int) -> Tensor:
    """uint8 codes, one per element -> `bits` bits each, element i at bit i * bits."""
    if bits == 8:
        return c
    per = 8 // bits
    pad = -c.numel() % per
    c = torch.nn.functional.pad(c.to(torch.int32), (0, pad)).view(-1, per)
    out = c[:, 0]
    for j in range(1, per):
        out = out | (c[:, j] << (j * bits))
    return out.to(torch.uint8)


def _unpack(codes: Tensor, n: int, bits: int) -> Tensor:
    if bits == 8:
        return codes[:n].to(torch.int32)
    per = 8 // bits
    c = codes.to(torch.int32)
    fields = [(c >> (j * bits)) & ((1 << bits) - 1) for j in range(per)]
    return torch.stack(fields, dim=1).reshape(-1)[:n]


def quantize_buckets(
    x: Tensor,
    bits: int,
    bucket: int,
    stochastic: bool,
    seed: int,
    residual: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(codes, scales) of a flat contiguous ``x``; ``residual`` (flat fp32) updated in place."""
    n = x.numel()
    lim = QUANT_LIMIT[bits]
    dev = x.device
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=dev), torch.empty(0, device=dev)
    y = x.float()
    if residual is not None:
        y = y + residual
    nb = -(-n // bucket)
    yb = torch.nn.functional.pad(y, (0, nb * bucket - n)).view(nb, bucket)
    amax_bits = (yb.view(torch.int32) & 0x7FFFFFFF).amax(dim=1)
    amax = amax_bits.view(torch.float32)
    inv = torch.full_like(amax, float(lim)) / amax
    nonfinite = amax_bits >= 0x7F800000
    ok = ~nonfinite & (amax_bits != 0) & torch.isfinite(inv)
    scale = torch.where(ok, amax / float(lim), torch.zeros_like(amax))
    scale = torch.where(nonfinite, torch.full_like(amax, float("nan")), scale)
    v = yb * torch.where(ok, inv, torch.zeros_like(inv))[:, None]
    if stochastic:
        q = torch.floor(v + noise(seed, nb * bucket, dev).view(nb, bucket))
    else:
        q = torch.round(v)  # half to even, as rint
    q = q.clamp(-lim, lim)
    q = torch.where(ok[:, None], q, torch.zeros_like(q))
    c = (q.to(torch.int32) + lim).to(torch.uint8).reshape(-1)[:n]
    if residual is not None:
        r = yb - q * scale[:, None]
        r = torch.where(nonfinite[:, None], torch.zeros_like(r), r)
        residual.copy_(r.reshape(-1)[:n])
    return _pack(c, bits), scale


def dequantize_buckets(
    codes: Tensor, scales: Tensor, n: int, bits: int, bucket: int, out: Tensor, accumulate: bool
) -> None:
    """out (flat fp32) = or += float32(code - L) * scale of the element's bucket."""
    if n == 0:
        return
    q = (_unpack(codes, n, bits) - QUANT_LIMIT[bits]).to(torch.float32)
    values = q * scales.repeat_interleave(bucket)[:n]
    if accumulate:
        out.add_(values)
    else:
        out.copy_(values)
