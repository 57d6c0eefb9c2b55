"""int8 reference: per-row quantization, the GEMM in int64, the linears in float64."""

from __future__ import annotations

import numpy as np
import torch

from ..._layout import packed_offsets


def quantize_per_row(x: np.ndarray, q: np.ndarray, scale: np.ndarray, bits: int = 8) -> None:
    """Per-row int8: symmetric (bits 8: scale = max|row| / 127, q = rint(x / scale)) or
    the 7-bit grid (bits 7, see ``_quantize7``)."""
    x = np.asarray(x, dtype=np.float32)
    if bits == 7:
        qf, s = _quantize7(x)
        q[:] = qf.astype(np.int8)
        scale[:] = s
        return
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        amax = np.abs(x).max(axis=1, initial=np.float32(0))
        s = (amax / np.float32(127)).astype(np.float32)
        s[np.isnan(x).any(axis=1)] = np.nan
        usable = (s > 0) & np.isfinite(s)
        ratio = np.where(usable[:, None], x / np.where(usable, s, 1)[:, None], 0)
    q[:] = np.clip(np.rint(ratio), -127, 127).astype(np.int8)
    scale[:] = s


def _quantize7(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 7-bit grid of csrc/int8/int8.h in NumPy float32: (q as float32, scale).

    lo = min(row, 0), hi = max(row, 0); scale = hi / 127 - lo / 127;
    zp = rint(-lo / scale) in [0, 127]; q = clip(rint(x / scale), -zp, 127 - zp).
    """
    f127 = np.float32(127)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lo = np.minimum(x.min(axis=1, initial=np.float32(0)), np.float32(0))
        hi = np.maximum(x.max(axis=1, initial=np.float32(0)), np.float32(0))
        s = ((hi / f127).astype(np.float32) - (lo / f127).astype(np.float32)).astype(np.float32)
        s[np.isnan(x).any(axis=1)] = np.nan
        usable = (s > 0) & np.isfinite(s)
        safe = np.where(usable, s, np.float32(1)).astype(np.float32)
        zp = np.where(usable, np.clip(np.rint(-lo / safe), 0, 127), 0).astype(np.float32)
        ratio = np.rint(x / safe[:, None])
    q = np.clip(ratio, -zp[:, None], (127 - zp)[:, None])
    q = np.where(usable[:, None], q, 0).astype(np.float32)
    return q, s.astype(np.float32)


def int8_gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    """c = a @ b.T, computed in int64 and checked to fit int32."""
    full = a.astype(np.int64) @ b.astype(np.int64).T
    c[:] = full.astype(np.int32)


def int8_pack_weight(w: np.ndarray, packed: np.ndarray, comp: np.ndarray) -> None:
    """The packed layout by index arithmetic, independent of the C++ loops."""
    n, k = w.shape
    packed[:] = 0
    packed[packed_offsets(n, k).ravel()] = w.ravel()
    comp[:] = 0
    comp[:n] = 128 * w.astype(np.int64).sum(axis=1)


def quantize_rows_tensor(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_row in torch on any device: (q as float32, scale float32)."""
    xf = x.float()
    if bits == 7:
        q, s = _quantize7(xf.cpu().numpy())
        return torch.from_numpy(q).to(x.device), torch.from_numpy(s).to(x.device)
    # A tensor divisor: on CUDA a Python scalar divisor becomes a multiplication.
    s = xf.abs().amax(dim=1) / xf.new_full((), 127.0) if xf.shape[1] else xf.new_zeros(xf.shape[0])
    s = torch.where(torch.isnan(xf).any(dim=1), torch.full_like(s, float("nan")), s)
    usable = (s > 0) & torch.isfinite(s)
    ratio = xf / torch.where(usable, s, torch.ones_like(s))[:, None]
    q = torch.where(usable[:, None], torch.round(ratio).clamp(-127, 127), torch.zeros_like(xf))
    return q, s


def int8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_bits: int = 8,
) -> torch.Tensor:
    """Dynamic W8A8 linear in float64 from the same integers and scales."""
    q, s = quantize_rows_tensor(x, act_bits)
    acc = q.double() @ w_q.double().T
    y = acc * s.double()[:, None] * w_scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def int8_weight_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Weight-only linear in float64: x @ (w_q * w_scale[:, None]).T + bias."""
    y = x.double() @ (w_q.double() * w_scale.double()[:, None]).T
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)
