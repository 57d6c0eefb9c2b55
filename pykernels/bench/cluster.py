"""cluster (weight sharing) against its peers, Y = X W^T for a 4096 x 4096 Linear.

``pk ClusteredLinear`` (16 clusters per output channel, 4-bit codes) in both
modes, dynamic (int8 activations, as Int8Linear's default) and weight-only
(float activations), against fp32 ``F.linear`` (the baseline), bf16
``F.linear`` and ``pk Int8Linear`` in both of its modes. ``summary`` gives
the ratios the issue's targets name and the bytes each layer holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn import ClusteredLinear, Int8Linear
from . import Case, Result, inference

SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096)]
N_CLUSTERS = 16


def _layers(k: int, n: int, gen: torch.Generator):
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    # Two Lloyd steps: the clustering's quality does not change the speed.
    cl = ClusteredLinear.from_linear(lin, N_CLUSTERS, iters=2)
    clw = ClusteredLinear(k, n, N_CLUSTERS, mode="weight_only")
    clw.load_state_dict(cl.state_dict())
    return lin, cl, clw


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []
    gen = torch.Generator().manual_seed(0)
    reps = 5 if quick else 15
    out = []
    k, n = SHAPES[0][1:]
    lin, cl, clw = _layers(k, n, gen)
    i8 = Int8Linear.from_linear(lin)
    i8w = Int8Linear.from_linear(lin, mode="weight_only")
    w, b = lin.weight.detach(), lin.bias.detach()
    wb, bb = w.bfloat16(), b.bfloat16()
    for m, _, _ in SHAPES[:2] if quick else SHAPES:
        x = torch.randn(m, k, generator=gen)
        xb = x.bfloat16()
        impls = {
            "fp32 F.linear": lambda x=x: F.linear(x, w, b),
            "bf16 F.linear": lambda xb=xb: F.linear(xb, wb, bb),
            "pk Int8Linear": lambda x=x: i8(x),
            "pk Int8Linear weight_only": lambda x=x: i8w(x),
            "pk ClusteredLinear": lambda x=x: cl(x),
            "pk ClusteredLinear weight_only": lambda x=x: clw(x),
        }
        out.append(
            Case(
                family="cluster",
                name=f"linear {m}x{k}x{n}",
                device=device,
                impls={name: inference(fn) for name, fn in impls.items()},
                baseline="fp32 F.linear",
                bytes_moved=m * k * 4 + n * k // 2 + m * n * 4,
                reps=reps,
                notes={
                    "nbytes fp32": str(k * n * 4 + n * 4),
                    "nbytes int8": str(i8.nbytes()),
                    "nbytes cluster": str(cl.nbytes()),
                },
            )
        )
    return out


def summary(results: list[Result]) -> str:
    """ClusteredLinear against fp32 F.linear and Int8Linear, per shape."""
    lines = ["cluster: pk ClusteredLinear (16 clusters/row, 4-bit codes) ratios (>1: faster)"]
    by_case: dict[str, dict[str, float]] = {}
    for r in results:
        if r.family == "cluster":
            by_case.setdefault(r.case, {})[r.impl] = r.median_ms
    for case, t in by_case.items():
        dyn, wo = t["pk ClusteredLinear"], t["pk ClusteredLinear weight_only"]
        lines.append(
            f"  {case}: dynamic x fp32 {t['fp32 F.linear'] / dyn:.2f}, "
            f"x Int8Linear {t['pk Int8Linear'] / dyn:.2f}; "
            f"weight_only x fp32 {t['fp32 F.linear'] / wo:.2f}, "
            f"x Int8Linear weight_only {t['pk Int8Linear weight_only'] / wo:.2f}"
        )
    return "\n".join(lines)
