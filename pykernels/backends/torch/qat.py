"""qat with torch ops on the tensor's device: the arithmetic of ``csrc/qat/qat.h``."""

from __future__ import annotations

import torch
from torch import Tensor


def fake_quant_per_row(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mask uint8, scale fp32) of a 2-D float32 tensor, as ``fake_quant_per_row_cpu``."""
    if x.shape[1] == 0:
        return x.clone(), x.new_empty(x.shape, dtype=torch.uint8), x.new_zeros(x.shape[0])
    scale = x.abs().amax(dim=1) / 127
    scale = torch.where(torch.isnan(x).any(dim=1), torch.full_like(scale, float("nan")), scale)
    usable = torch.isfinite(x).all(dim=1) & (scale > 0)
    safe = torch.where(usable, scale, torch.ones_like(scale))[:, None]
    t = x / safe
    q = torch.round(t).clamp(-127, 127)
    y = torch.where(usable[:, None], q * safe, torch.zeros_like(x) * scale[:, None])
    mask = torch.where(usable[:, None], t.abs() <= 127.5, (scale == 0)[:, None].expand_as(x))
    return y, mask.to(torch.uint8), scale


def fake_quant_backward(grad: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), grad, torch.zeros_like(grad))
