"""Top-k by magnitude with torch ops on the tensor's device.

Same contract as the native kernel (``csrc/topk/topk.h``): entries ranked by
the magnitude bits (so NaN ranks above inf, and -0.0 ties 0.0), ties broken
towards the lower index, indices ascending. ``torch.topk`` alone does not say
which of several equal magnitudes it keeps, so it only finds the k-th key;
the set is then the keys above it plus the lowest-indexed ones equal to it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def magnitude_keys(x: Tensor) -> Tensor:
    """int32 keys ordered as |x| is, NaN above inf, for a flat float tensor."""
    if x.dtype == torch.float32:
        return x.view(torch.int32) & 0x7FFFFFFF
    return (x.view(torch.int16) & 0x7FFF).to(torch.int32)


def select(keys: Tensor, k: int) -> Tensor:
    """Ascending indices of the k largest keys, ties to the lower index."""
    n = keys.numel()
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=keys.device)
    if k == n:
        return torch.arange(n, device=keys.device)
    kth = torch.topk(keys, k, sorted=False).values.min()
    above = keys > kth
    tied = keys == kth
    need = k - above.sum()
    keep = above | (tied & (torch.cumsum(tied, 0) <= need))
    return keep.nonzero().squeeze(1)


def topk_sparsify(x: Tensor, k: int, residual: Tensor | None) -> tuple[Tensor, Tensor]:
    """(values, indices) of a flat contiguous ``x``; with ``residual`` (flat fp32),
    error feedback: select over x + residual and leave in residual what was not sent."""
    if residual is None:
        idx = select(magnitude_keys(x), k)
        return x[idx], idx
    y = x.float() + residual
    idx = select(magnitude_keys(y), k)
    picked = y[idx]
    values = picked.to(x.dtype)
    if x.dtype != torch.float32:
        # A finite sum past the dtype's range is sent saturated, the excess
        # kept in the residual (csrc/topk/topk.h).
        top = torch.finfo(x.dtype).max
        over = torch.isinf(values) & torch.isfinite(picked)
        values = torch.where(over, torch.where(picked > 0, top, -top).to(x.dtype), values)
    sent = values.float()
    # What rounding to x's dtype left behind stays in the residual; nothing is
    # left where the value or the sum is not finite (inf - inf would be NaN).
    remainder = torch.where(
        torch.isfinite(sent) & torch.isfinite(picked), picked - sent, torch.zeros_like(picked)
    )
    residual.copy_(y)
    residual[idx] = remainder
    return values, idx
