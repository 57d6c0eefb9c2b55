"""topk reference: a full stable sort instead of a selection."""

from __future__ import annotations

import numpy as np
import torch

from ..._layout import BITS_DTYPE, DTYPE_CODES, tensor_bits
from ._bits import bits_to_float32, float32_to_bits_saturating

# |key| bits: the magnitude of each float as an unsigned integer
KEY_MASK = {0: 0x7FFFFFFF, 1: 0x7FFF, 2: 0x7FFF}


def topk_order(keys: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest keys, ties to the lower index, ascending."""
    idx = np.arange(keys.size, dtype=np.int64)
    order = np.lexsort((idx, -keys.astype(np.int64)))  # key descending, then index
    return np.sort(order[:k])


def topk_sparsify(
    x: np.ndarray,
    dtype: int,
    k: int,
    approx: bool,
    residual: np.ndarray | None,
    values: np.ndarray,
    indices: np.ndarray,
) -> None:
    """Fills values (raw bits of dtype) and indices; updates residual in place.

    `approx` is accepted for signature parity; the reference is always exact.
    """
    del approx
    if residual is None:
        keys = x & KEY_MASK[dtype]
        sel = topk_order(keys, k)
        values[:] = x[sel]
        indices[:] = sel
        return
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are data here
        y = (bits_to_float32(x, dtype) + residual).astype(np.float32)
    sel = topk_order(y.view(np.uint32) & 0x7FFFFFFF, k)
    sent_bits = float32_to_bits_saturating(y[sel], dtype)
    sent = bits_to_float32(sent_bits, dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        remainder = np.where(np.isfinite(sent) & np.isfinite(y[sel]), y[sel] - sent, 0.0)
    residual[:] = y
    residual[sel] = remainder.astype(np.float32)
    values[:] = sent_bits
    indices[:] = sel


def topk_sparsify_tensor(
    x: torch.Tensor, k: int, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle on tensors: (values, indices); residual (if given) updated in place."""
    code = DTYPE_CODES[x.dtype]
    bits = tensor_bits(x.detach().reshape(-1).contiguous().cpu())
    values = np.empty(k, dtype=BITS_DTYPE[code])
    indices = np.empty(k, dtype=np.int64)
    r = None if residual is None else residual.detach().reshape(-1).cpu().numpy().copy()
    topk_sparsify(bits, code, k, False, r, values, indices)
    if residual is not None:
        residual.copy_(torch.from_numpy(r).view(residual.shape))
    v = torch.from_numpy(values.view(np.int32 if code == 0 else np.int16)).view(x.dtype)
    return v.to(x.device), torch.from_numpy(indices).to(x.device)


def topk_densify(
    values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """Dense tensor of `shape` with values summed at indices (flat)."""
    numel = int(np.prod(shape)) if len(shape) else 1
    out = np.zeros(numel, dtype=np.float64)
    np.add.at(out, indices.cpu().numpy(), values.detach().cpu().double().numpy())
    return torch.from_numpy(out).to(values.dtype).view(shape)
