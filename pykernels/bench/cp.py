"""CPConv2d against the convolution it replaces and TuckerConv2d, at equal
relative error of the weight.

A 3x3, 256 -> 256 convolution on 8 x 256 x 32 x 32. Its weight is synthetic
(no pretrained CNN is available offline here): Gaussian, with each channel
mode scaled by singular values decaying as (1 + i)^-1/2, a spectrum shaped like
trained convolutions' and favouring neither decomposition. Tucker takes
ranks (128, 128); CP takes the smallest rank (bisection, CP-ALS each) whose
relative error is at most Tucker's. ``summary`` lists parameters and errors.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn import CPConv2d, TuckerConv2d
from ..nn.cp import cp_als
from . import Case, Result, inference

CIN = COUT = 256
HW, BATCH, TUCKER_RANK = 32, 8, 128

_INFO: dict[str, str] = {}


def synthetic_conv(gen: torch.Generator) -> nn.Conv2d:
    conv = nn.Conv2d(CIN, COUT, 3, padding=1)
    g = torch.randn(COUT, CIN, 3, 3, generator=gen)
    decay = (1.0 + torch.arange(CIN, dtype=torch.float32)) ** -0.5
    u = torch.linalg.qr(torch.randn(COUT, COUT, generator=gen)).Q * decay
    v = torch.linalg.qr(torch.randn(CIN, CIN, generator=gen)).Q * decay
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("oikl,po,qi->pqkl", g, u, v) / 0.05)
    return conv


def _rel(w_hat: torch.Tensor, w: torch.Tensor) -> float:
    return float((w_hat - w).norm() / w.norm())


def _cp_at_error(conv: nn.Conv2d, target: float, iters: int) -> CPConv2d:
    """The smallest-rank CPConv2d with relative error <= target (bisection)."""
    w = conv.weight.detach()
    lo, hi, best = 1, 384, None
    while lo <= hi:
        mid = (lo + hi) // 2
        weights, factors, err = cp_als(w, mid, iters)
        if err <= target:
            best, hi = (weights, factors, err), mid - 1
        else:
            lo = mid + 1
    if best is None:
        best = cp_als(w, 384, iters)
    layer = CPConv2d._build(conv, best[0], best[1])
    layer.rel_error = best[2]
    return layer


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []
    gen = torch.Generator().manual_seed(0)
    conv = synthetic_conv(gen).eval()
    tucker = TuckerConv2d.from_conv(conv, ranks=(TUCKER_RANK, TUCKER_RANK)).eval()
    w = conv.weight.detach()
    with torch.no_grad():
        t_err = _rel(
            torch.einsum(
                "or,rskl,si->oikl",
                tucker.last.weight[:, :, 0, 0],
                tucker.core.weight,
                tucker.first.weight[:, :, 0, 0],
            ),
            w,
        )
    cp = _cp_at_error(conv, t_err, 10 if quick else 25).eval()
    x = torch.randn(BATCH, CIN, HW, HW, generator=gen)

    def params(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    _INFO.update(
        {
            "conv params": str(params(conv)),
            "tucker params": str(params(tucker)),
            "tucker rel error": f"{t_err:.4f}",
            "cp rank": str(cp.rank),
            "cp params": str(params(cp)),
            "cp rel error": f"{cp.rel_error:.4f}",
        }
    )
    impls = {
        "nn.Conv2d": lambda: conv(x),
        f"pk TuckerConv2d ({TUCKER_RANK},{TUCKER_RANK})": lambda: tucker(x),
        f"pk CPConv2d rank {cp.rank}": lambda: cp(x),
    }
    return [
        Case(
            family="cp",
            name=f"conv3x3 {CIN}->{COUT} {BATCH}x{HW}x{HW}",
            device=device,
            impls={name: inference(fn) for name, fn in impls.items()},
            baseline="nn.Conv2d",
            reps=5 if quick else 9,
            notes=dict(_INFO),
        )
    ]


def summary(results: list[Result]) -> str:  # noqa: ARG001
    return "cp: " + ", ".join(f"{k} {v}" for k, v in _INFO.items())
