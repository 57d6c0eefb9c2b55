"""int8 GEMM against torch._int_mm (PERFORMANCE.md shapes, M x K x N).

The baseline is ``torch._int_mm(a, b.T)``; both compute int32 exactly.
``Int8Linear`` against quantize_dynamic and bf16 arrives with the layer.
"""

from __future__ import annotations

import torch

from .. import ops
from . import Case

SHAPES = [
    (1, 4096, 4096),
    (16, 4096, 4096),
    (128, 4096, 4096),
    (512, 1024, 1024),
    (2048, 768, 3072),
]


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []  # no CUDA int8 kernels yet
    gen = torch.Generator().manual_seed(0)
    out = []
    for m, k, n in SHAPES[:3] if quick else SHAPES:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        bt = b.t()
        out.append(
            Case(
                family="int8",
                name=f"gemm {m}x{k}x{n}",
                device=device,
                impls={
                    "torch._int_mm": lambda a=a, bt=bt: torch._int_mm(a, bt),
                    "pk int8_gemm": lambda a=a, b=b: ops.int8_gemm(a, b),
                },
                baseline="torch._int_mm",
                bytes_moved=m * k + n * k + 4 * m * n,
                reps=3 if quick else 5,
            )
        )
    return out
