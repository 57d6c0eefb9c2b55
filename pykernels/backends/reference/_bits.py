"""Raw bits <-> float32 through torch's own conversions (the oracle's side:
independent of the kernels' bit manipulation)."""

from __future__ import annotations

import numpy as np
import torch

from ..._layout import TORCH_DTYPE


def bits_to_float32(bits: np.ndarray, dtype: int) -> np.ndarray:
    """Raw bits of `dtype` -> float32 values, through torch's conversion."""
    if dtype == 0:
        return bits.view(np.float32)
    t = torch.from_numpy(bits.view(np.int16)).view(TORCH_DTYPE[dtype])
    return t.float().numpy()


def float32_to_bits(y: np.ndarray, dtype: int) -> np.ndarray:
    """float32 values -> raw bits of `dtype`, rounded to nearest even by torch."""
    if dtype == 0:
        return y.astype(np.float32).view(np.uint32)
    t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(TORCH_DTYPE[dtype])
    return t.view(torch.int16).numpy().view(np.uint16)


# |bits| of inf and of the largest finite value, per 16-bit dtype code
INF_BITS = {1: 0x7C00, 2: 0x7F80}
MAX_BITS = {1: 0x7BFF, 2: 0x7F7F}


def float32_to_bits_saturating(y: np.ndarray, dtype: int) -> np.ndarray:
    """float32_to_bits, but a finite y past the dtype's range becomes its
    largest finite value (signed) instead of inf: what error feedback sends."""
    bits = float32_to_bits(y, dtype)
    if dtype != 0:
        over = np.isfinite(y) & ((bits & 0x7FFF) == INF_BITS[dtype])
        bits = np.where(over, (bits & 0x8000) | MAX_BITS[dtype], bits).astype(bits.dtype)
    return bits
