"""int4 reference: group-wise weight quantization in NumPy float32, the linears in
float64 from the same codes (the test oracle).

Format (shared by every backend, see :mod:`pykernels.ops.int4`): ``packed`` uint8
``[N, K // 2]`` with column ``2j`` in the low nibble of byte ``j`` and ``2j + 1`` in
the high one; ``scales`` float32 and ``zeros`` uint8 ``[N, K // g]``;
``w_hat[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]``.
"""

from __future__ import annotations

import numpy as np
import torch

from . import int8 as _int8


def quantize_weight(
    w: np.ndarray, group_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed, scales, zeros) of a float [N, K] weight, every step in float32."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)
    with np.errstate(invalid="ignore", divide="ignore"):
        if symmetric:
            scale = (np.abs(groups).max(axis=2) / np.float32(7)).astype(np.float32)
            scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
            zero = np.full(scale.shape, 8, dtype=np.float32)
            q = np.clip(np.rint(groups / scale[..., None]), -8, 7) + 8
        else:
            # The range always includes 0 (as GPTQ's quantizer does): the zero
            # point is an integer in 0..15, so a group entirely above or below 0
            # could not be reached from it otherwise. A constant group c is then
            # exact (15 steps of |c| / 15); a group of zeros gets scale 1.
            lo = np.minimum(groups.min(axis=2), np.float32(0))
            hi = np.maximum(groups.max(axis=2), np.float32(0))
            scale = ((hi - lo) / np.float32(15)).astype(np.float32)
            scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
            zero = np.clip(np.rint(-lo / scale), 0, 15).astype(np.float32)
            q = np.clip(np.rint(groups / scale[..., None]) + zero[..., None], 0, 15)
    q = q.astype(np.uint8).reshape(n, k)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale.astype(np.float32), zero.astype(np.uint8)


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    """The uint8 codes [N, K] of a packed [N, K // 2] array."""
    n, half = packed.shape
    q = np.empty((n, 2 * half), dtype=np.uint8)
    q[:, 0::2] = packed & 0x0F
    q[:, 1::2] = packed >> 4
    return q


def dequantize_weight(
    packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int
) -> np.ndarray:
    """w_hat [N, K] float32: (q - zero) * scale, one float32 rounding."""
    q = unpack_codes(np.asarray(packed)).astype(np.float32)
    z = np.repeat(np.asarray(zeros, dtype=np.float32), group_size, axis=1)
    s = np.repeat(np.asarray(scales, dtype=np.float32), group_size, axis=1)
    return ((q - z) * s).astype(np.float32)


def _codes(packed: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(unpack_codes(packed.cpu().numpy()))


def linear_weight_only(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x @ w_hat.T + bias in float64, w_hat exactly as :func:`dequantize_weight`."""
    w = dequantize_weight(
        packed.cpu().numpy(), scales.cpu().numpy(), zeros.cpu().numpy(), group_size
    )
    y = x.cpu().double() @ torch.from_numpy(w).double().T
    if bias is not None:
        y = y + bias.cpu().double()
    return y.to(x.dtype).to(x.device)


def group_sums(
    x: torch.Tensor, packed: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """W4A8's integers: (isum int64 [M, N, G], x_scale float32 [M]) where
    ``isum[m, n, g] = sum_{k in g} a[m, k] * (q[n, k] - zeros[n, g])`` and
    ``a, x_scale = quantize_per_row(x)`` (int8's per-token grid)."""
    a, xs = _int8.quantize_rows_tensor(x.cpu())
    a = a.to(torch.int64)
    m, k = a.shape
    n, groups = zeros.shape
    wq = _codes(packed).to(torch.int64) - zeros.cpu().to(torch.int64).repeat_interleave(
        group_size, dim=1
    )
    isum = torch.einsum(
        "mgk,ngk->mng", a.view(m, groups, group_size), wq.view(n, groups, group_size)
    )
    return isum, xs


def linear_dynamic(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """W4A8 in float64: x_scale[m] * sum_g scales[n, g] * isum[m, n, g] + bias."""
    isum, xs = group_sums(x, packed, zeros, group_size)
    y = (isum.double() * scales.cpu().double()[None]).sum(dim=2) * xs.double()[:, None]
    if bias is not None:
        y = y + bias.cpu().double()
    return y.to(x.dtype).to(x.device)
