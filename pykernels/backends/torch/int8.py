"""int8 with torch ops on the tensor's device: ``torch._int_mm`` for the exact
int32 GEMM, the per-row quantization and the dequantizing epilogue around it.

The arithmetic is the native kernels' (``csrc/int8/int8.h``): scale =
max|row| / 127 in fp32, q = round_half_even(x / scale) in [-127, 127], and
``float(acc) * (x_scale * w_scale) + bias``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def quantize_per_row(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """(q int8, scale fp32) of a 2-D float tensor, as ``quantize_per_row_cpu``
    (bits 8) or ``quantize_per_row7_cpu`` (bits 7)."""
    xf = x.float()
    if xf.shape[1] == 0:
        return xf.to(torch.int8), xf.new_zeros(xf.shape[0])
    if bits == 7:
        return _quantize7(xf)
    # A tensor divisor: CUDA turns division by a Python scalar into a
    # multiplication by its rounded reciprocal, which can differ in the last
    # bit from the IEEE division every other backend does.
    scale = xf.abs().amax(dim=1) / xf.new_full((), 127.0)
    scale = torch.where(torch.isnan(xf).any(dim=1), torch.full_like(scale, float("nan")), scale)
    usable = (scale > 0) & torch.isfinite(scale)
    ratio = xf / torch.where(usable, scale, torch.ones_like(scale))[:, None]
    q = torch.where(usable[:, None], torch.round(ratio).clamp(-127, 127), torch.zeros_like(xf))
    return q.to(torch.int8), scale


def _quantize7(xf: Tensor) -> tuple[Tensor, Tensor]:
    # The 7-bit grid of csrc/int8/int8_grid7.h, every step in float32.
    zero, d127 = xf.new_zeros(()), xf.new_full((), 127.0)  # tensor divisor: see above
    lo = torch.minimum(xf.amin(dim=1), zero)
    hi = torch.maximum(xf.amax(dim=1), zero)
    scale = hi / d127 - lo / d127
    scale = torch.where(torch.isnan(xf).any(dim=1), torch.full_like(scale, float("nan")), scale)
    usable = (scale > 0) & torch.isfinite(scale)
    safe = torch.where(usable, scale, torch.ones_like(scale))
    zp = torch.where(usable, torch.round(-lo / safe).clamp(0, 127), torch.zeros_like(scale))
    q = torch.round(xf / safe[:, None])
    q = torch.minimum(torch.maximum(q, -zp[:, None]), 127 - zp[:, None])
    q = torch.where(usable[:, None], q, torch.zeros_like(q))
    return q.to(torch.int8), scale


def _pad_to(t: Tensor, rows: int, cols: int) -> Tensor:
    if t.shape == (rows, cols):
        return t
    out = t.new_zeros(rows, cols)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def int8_gemm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` in int32, exact, for int8 a [M, K] and b [N, K]."""
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, dtype=torch.int32, device=a.device)
    if a.device.type == "cuda":
        return int_mm_padded(a, b)
    if k == 1:
        # torch 2.13's CPU _int_mm misreads b.t() when K = 1 (its strides are
        # (1, 1)) and returns garbage; the product is an outer product, exact
        # in int32.
        return a.to(torch.int32) * b.to(torch.int32).t()
    return torch._int_mm(a, b.t())


def int_mm_padded(a: Tensor, b: Tensor) -> Tensor:
    """``_int_mm`` within CUDA's limits (M > 16, K and N multiples of 8).

    Zero rows and columns add nothing, so padding keeps the product exact;
    only what falls short is copied (real layers' K and N already divide by 8).
    """
    m, k = a.shape
    n = b.shape[0]
    mp, kp, np_ = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
    return torch._int_mm(_pad_to(a, mp, kp), _pad_to(b, np_, kp).t())[:m, :n]


def int8_linear(
    x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, act_bits: int = 8
) -> Tensor:
    """Dynamic W8A8 linear: x [M, K] float, w [N, K] int8 row-major; out in x's dtype."""
    q, s = quantize_per_row(x, act_bits)
    acc = int8_gemm(q, w)
    y = acc.float() * (s[:, None] * w_scale[None, :])
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def int8_weight_linear(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """Weight-only linear: x @ (w * w_scale[:, None]).T + bias, computed in fp32."""
    y = (x.float() @ w.float().T) * w_scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)
