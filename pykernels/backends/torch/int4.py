"""int4 with torch ops on the tensor's device: the group-wise quantization, the
dequantized weight-only linear in float32, and W4A8 by per-group integer sums.

The W4A8 group sums are computed as float32 matmuls, which are exact here:
every product a * (q - z) is an integer of magnitude <= 127 * 15 and a group
sums at most 128 of them, 243840 < 2^24, so every partial sum in any order is
an integer float32 holds exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import int8 as _ti


def quantize_weight(w: Tensor, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(packed uint8 [N, K/2], scales float32 [N, G], zeros uint8 [N, G]); float32 steps."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    one = groups.new_ones(())
    if symmetric:
        # Tensor divisors: CUDA turns division by a Python scalar into a
        # multiplication by its reciprocal (see torch/int8.py).
        scale = groups.abs().amax(dim=2) / groups.new_full((), 7.0)
        scale = torch.where(scale > 0, scale, one)
        zero = torch.full_like(scale, 8.0)
        q = torch.round(groups / scale[..., None]).clamp(-8, 7) + 8
    else:
        # The range includes 0: see the reference.
        lo, hi = groups.amin(dim=2).clamp(max=0), groups.amax(dim=2).clamp(min=0)
        scale = (hi - lo) / groups.new_full((), 15.0)
        scale = torch.where(scale > 0, scale, one)
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, 15)
    q = q.to(torch.uint8).reshape(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scale.contiguous(), zero.to(torch.uint8).contiguous()


def unpack_codes(packed: Tensor) -> Tensor:
    """uint8 codes [N, K] of packed [N, K // 2]."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=2).reshape(packed.shape[0], -1)


def dequantize_weight(packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    q = unpack_codes(packed).float()
    z = zeros.float().repeat_interleave(group_size, dim=1)
    s = scales.float().repeat_interleave(group_size, dim=1)
    return (q - z) * s


def linear_weight_only(x, packed, scales, zeros, group_size, bias) -> Tensor:
    y = x.float() @ dequantize_weight(packed, scales, zeros, group_size).T
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def linear_dynamic(x, packed, scales, zeros, group_size, bias) -> Tensor:
    a, xs = _ti.quantize_per_row(x)
    m, k = a.shape
    n, groups = zeros.shape
    wq = unpack_codes(packed).float() - zeros.float().repeat_interleave(group_size, dim=1)
    isum = torch.einsum(
        "gmk,gnk->gmn",
        a.float().view(m, groups, group_size).transpose(0, 1),
        wq.view(n, groups, group_size).transpose(0, 1),
    )
    y = (isum * scales.t()[:, None, :]).sum(dim=0) * xs[:, None]
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)
