"""Top-k sparsification against torch.topk, torch.kthvalue and numpy.argpartition.

CPU: n = 16e6 fp32 (PERFORMANCE.md), k = 1% and 0.1%. GPU: n = 2^26, k = 1%.
The baseline is ``torch.topk(x.abs(), k, sorted=False)`` + gather.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from . import Case


def _torch_topk(x: torch.Tensor, k: int):
    idx = torch.topk(x.abs(), k, sorted=False).indices
    return x[idx], idx


def _kthvalue(x: torch.Tensor, k: int):
    a = x.abs()
    t = torch.kthvalue(a, a.numel() - k + 1).values
    idx = (a >= t).nonzero().squeeze(1)
    return x[idx], idx


def _argpartition(a: np.ndarray, k: int):
    idx = np.argpartition(np.abs(a), a.size - k)[a.size - k :]
    return a[idx], idx


def cases(device: str, quick: bool = False) -> list[Case]:
    gen = torch.Generator(device=device).manual_seed(0)
    if device == "cuda":
        n, fracs = 1 << 26, (0.01,)
    else:
        n, fracs = (4_000_000 if quick else 16_000_000), (0.01, 0.001)
    x = torch.randn(n, generator=gen, device=device)
    residual = torch.randn(n, generator=gen, device=device) * 0.1
    out = []
    for frac in fracs:
        k = int(n * frac)
        impls = {
            "torch.topk": lambda k=k: _torch_topk(x, k),
            "torch.kthvalue": lambda k=k: _kthvalue(x, k),
        }
        if device == "cpu":
            a = x.numpy()
            impls["numpy.argpartition"] = lambda k=k, a=a: _argpartition(a, k)
        # Memory floors on this machine: one read of x (what selection needs),
        # and read x + read/write r (what error feedback needs).
        impls["floor: read x"] = lambda: torch.sum(x)
        impls["floor: r += x"] = lambda: residual.add_(x, alpha=0.0)
        impls["pk exact"] = lambda k=k: ops.topk_sparsify(x, k=k)
        impls["pk approx"] = lambda k=k: ops.topk_sparsify(x, k=k, approx=True)
        impls["pk exact+EF"] = lambda k=k: ops.topk_sparsify(x, k=k, residual=residual)
        # What error feedback costs without fusion: add, select, zero.
        impls["pk exact+EF unfused"] = lambda k=k: _unfused_ef(x, residual, k)
        out.append(
            Case(
                family="topk",
                name=f"n={n} k={frac:.1%}",
                device=device,
                impls=impls,
                baseline="torch.topk",
                bytes_moved=x.numel() * x.element_size(),  # read x once
                reps=3 if quick else 5,
            )
        )
    return out


def _unfused_ef(x: torch.Tensor, residual: torch.Tensor, k: int):
    residual.add_(x)
    values, idx = ops.topk_sparsify(residual, k=k)
    residual[idx] = 0
    return values, idx
