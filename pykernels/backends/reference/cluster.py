"""cluster reference: codebook lookups in float64, or the exact int8 sum."""

from __future__ import annotations

import numpy as np

from ..._layout import cluster_code_offsets
from .int8 import quantize_per_row


def cluster_unpack_codes(codes: np.ndarray, k: int, bits: int) -> np.ndarray:
    """The [N, K] codes (int64) of packed rows of codes."""
    byte, shift = cluster_code_offsets(k, bits)
    mask = 0xFF if bits == 8 else 0xF
    return (codes[:, byte].astype(np.int64) >> shift) & mask


def cluster_linear(
    x: np.ndarray,
    codes: np.ndarray,
    codebook: np.ndarray,
    bias: np.ndarray | None,
    bits: int,
    dynamic: bool,
    y: np.ndarray,
) -> None:
    """y = x @ W.T + bias, W[n, k] = codebook[n or 0, code[n, k]]: in float64, or
    (dynamic) from int8 x and codebooks as quantize_per_row makes them, the
    integer sum exact and the fp32 epilogue float(acc) * (xs * cs) + bias."""
    k = x.shape[1]
    idx = cluster_unpack_codes(codes, k, bits)
    n = idx.shape[0]
    rows = np.arange(n)[:, None] if codebook.shape[0] == n else np.zeros((n, 1), dtype=np.int64)
    if dynamic:
        xq = np.empty(x.shape, np.int8)
        xs = np.empty(x.shape[0], np.float32)
        quantize_per_row(x, xq, xs)
        cq = np.empty(codebook.shape, np.int8)
        cs = np.empty(codebook.shape[0], np.float32)
        quantize_per_row(codebook, cq, cs)
        acc = xq.astype(np.int64) @ cq[rows, idx].astype(np.int64).T
        with np.errstate(invalid="ignore", over="ignore"):
            out = acc.astype(np.float32) * (xs[:, None] * cs[rows[:, 0]][None, :])
            if bias is not None:
                out = out + bias.astype(np.float32)
        y[:] = out
        return
    w = codebook.astype(np.float64)[rows, idx]
    out = x.astype(np.float64) @ w.T
    if bias is not None:
        out = out + bias.astype(np.float64)
    y[:] = out.astype(np.float32)
