"""Batched small SVDs with ``torch.linalg.svd`` on the data's device."""

from __future__ import annotations

import torch
from torch import Tensor


def batched_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(u [B, m, k], s [B, k], vh [B, k, n]) of a [B, m, n]."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u, s, vh
