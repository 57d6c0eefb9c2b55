"""qat reference: fake quantization per row."""

from __future__ import annotations

import numpy as np


def fake_quant_per_row(x: np.ndarray, y: np.ndarray, mask: np.ndarray, scale: np.ndarray) -> None:
    """Oracle of ``csrc/qat/qat.h``: y = round_half_even(x / s).clip(+-127) * s per row,
    s = max|row| / 127, mask = (|x / s| <= 127.5); zero rows y 0 mask 1, rows with
    NaN/inf y NaN mask 0."""
    x = x.astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        finite = np.isfinite(x).all(axis=1)
        amax = np.abs(x).max(axis=1, initial=np.float32(0)).astype(np.float32)
        s = (amax / np.float32(127)).astype(np.float32)
        s[np.isnan(x).any(axis=1)] = np.nan
        scale[:] = s
        usable = finite & (s > 0)
        safe = np.where(usable, s, np.float32(1)).astype(np.float32)[:, None]
        t = (x / safe).astype(np.float32)
        q = np.clip(np.rint(t), -127, 127).astype(np.float32)
        yy = np.where(usable[:, None], q * safe, np.float32(0) * s[:, None])
        y[:] = yy.astype(np.float32)
        m = np.where(usable[:, None], np.abs(t) <= np.float32(127.5), (s == 0)[:, None])
        mask[:] = m.astype(np.uint8)


def fake_quant_backward(grad: np.ndarray, mask: np.ndarray, out: np.ndarray) -> None:
    """Oracle of ``fake_quant_backward_cpu``: the gradient where mask, else 0."""
    out[:] = np.where(mask != 0, grad, np.float32(0)).astype(np.float32)
