"""cluster with torch ops on the tensor's device: the weight gathered from the
codebooks by the unpacked codes, then one matmul (the arithmetic of
``csrc/cluster/cluster.h``, without its promise never to form the weight)."""

from __future__ import annotations

import torch
from torch import Tensor


def unpack_codes(codes: Tensor, k: int, bits: int) -> Tensor:
    """The [N, K] codes (int64) of packed rows, by reshapes (layout in cluster.h)."""
    n = codes.shape[0]
    if bits == 8:
        return codes[:, :k].long()
    groups = codes.shape[1] // 64
    b = codes.reshape(n, groups, 16, 4).long()  # [.., lane i, byte of the lane]
    nib = torch.stack((b & 15, b >> 4), dim=-1).reshape(n, groups, 16, 8)  # [.., i, j]
    return nib.transpose(2, 3).reshape(n, groups * 128)[:, :k]


def pack_codes(idx: Tensor, bits: int) -> Tensor:
    """Packed rows of codes from [N, K] integer codes (the inverse of unpack_codes)."""
    n, k = idx.shape
    if bits == 8:
        return idx.to(torch.uint8).contiguous()
    kp = -(-k // 128) * 128
    full = idx.new_zeros(n, kp, dtype=torch.uint8)
    full[:, :k] = idx.to(torch.uint8)
    nib = full.reshape(n, kp // 128, 8, 16).transpose(2, 3)  # [.., i, j]
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).reshape(n, kp // 2).contiguous()


def dense_weight(codes: Tensor, codebook: Tensor, k: int, bits: int) -> Tensor:
    """W[n, k] = codebook[n or 0, code[n, k]] (float32)."""
    idx = unpack_codes(codes, k, bits)
    cb = codebook.float()
    if cb.shape[0] != idx.shape[0]:
        cb = cb.expand(idx.shape[0], -1)
    return torch.gather(cb, 1, idx)


def cluster_linear(
    x: Tensor, codes: Tensor, codebook: Tensor, bias: Tensor | None, bits: int, dynamic: bool
) -> Tensor:
    """y = x @ W.T + bias in float32 for x [M, K] (dynamic: from int8 x and codebooks)."""
    if dynamic:
        from .int8 import quantize_per_row

        xq, xs = quantize_per_row(x)
        cq, cs = quantize_per_row(codebook)
        idx = unpack_codes(codes, x.shape[1], bits)
        rows = cq if cq.shape[0] == idx.shape[0] else cq.expand(idx.shape[0], -1)
        wq = torch.gather(rows, 1, idx)
        # integers below 2^53: the float64 product is the exact int32 sum
        acc = (xq.double() @ wq.double().T).float()
        cs_n = cs if cs.shape[0] == idx.shape[0] else cs.expand(idx.shape[0])
        y = acc * (xs[:, None] * cs_n[None, :])
        return y if bias is None else y + bias
    w = dense_weight(codes, codebook, x.shape[1], bits)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias
    return y
