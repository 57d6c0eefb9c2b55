"""int4 against its peers (Y = X W^T, X: M x K, W: N x K; group size 128).

* ``read bandwidth``: the ceiling of the weight-only decode case, measured in
  the same run: ``torch.sum`` over a 256 MiB float32 buffer (8x the L3 here),
  whose GB/s is the memory read rate two threads reach.
* ``weight_only cold MxKxN``: M = 1, 4, 16 (token-by-token decoding) with as
  many weight copies rotated per call as exceed 72 MiB (over twice a 32 MiB
  L3), so every call streams its weight from DRAM: ``pk.nn.Int4Linear``
  weight-only (the row's GB/s counts its int4 weight, scales and zero points)
  against ``pk.nn.Int8Linear`` weight-only and torch's CPU int4 kernel
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (bf16 activations, weight
  packed by ``_convert_weight_to_int4pack_for_cpu``; the baseline), with
  ``Int4Linear`` dynamic (W4A8) alongside.
* ``dynamic MxKxN``: M >= 128, W4A8 ``Int4Linear`` against ``Int8Linear``
  dynamic (the baseline) and the aten kernel; one weight (the arithmetic,
  not the stream, is the cost).
"""

from __future__ import annotations

import math

import torch

from ..nn import Int4Linear, Int8Linear
from . import Case, inference

GROUP = 128
COLD_BYTES = 72 << 20  # over 2x the 32 MiB L3 of the machines measured
# (N, K): a square projection and a 4096 -> 11008 MLP up-projection (N = 11008).
COLD_SHAPES = [(4096, 4096), (11008, 4096)]
COLD_M = (1, 4, 16)
DYNAMIC_SHAPES = [(128, 4096, 4096), (512, 4096, 4096)]


def _copies(nbytes: int) -> int:
    return max(1, math.ceil(COLD_BYTES / nbytes))


def _rotating(calls):
    state = {"i": 0}

    def run():
        i = state["i"]
        state["i"] = (i + 1) % len(calls)
        return calls[i]()

    return run


def _int4_layers(n: int, k: int, copies: int, mode: str, gen) -> list[Int4Linear]:
    # Random codes, scales and zero points: the kernels' speed does not depend
    # on the values, and quantizing copies of fp32 weights would take longer
    # than the measurement.
    out = []
    for _ in range(copies):
        packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
        scales = torch.rand(n, k // GROUP, generator=gen) * 1e-3
        zeros = torch.randint(0, 16, (n, k // GROUP), dtype=torch.uint8, generator=gen)
        out.append(Int4Linear.from_quantized(packed, scales, zeros, GROUP, mode=mode))
    return out


def _int8_layers(n: int, k: int, copies: int, mode: str, gen) -> list[Int8Linear]:
    out = []
    for _ in range(copies):
        lin = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
        out.append(Int8Linear.from_linear(lin, mode=mode))
    return out


def _aten_weights(n: int, k: int, copies: int, gen) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(copies):
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        scale_zero = (torch.rand(k // GROUP, n, 2, generator=gen) * 1e-3).bfloat16()
        out.append((packed, scale_zero))
    return out


def _aten_call(x: torch.Tensor, w):
    packed, scale_zero = w
    return lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scale_zero)


def _int4_bytes(n: int, k: int) -> int:
    return n * k // 2 + n * (k // GROUP) * 5


def _read_bandwidth_case(reps: int) -> Case:
    buf = torch.rand(64 << 20)  # 256 MiB
    return Case(
        family="int4",
        name="read bandwidth 256 MiB",
        device="cpu",
        impls={"torch.sum fp32": inference(lambda: buf.sum())},
        baseline="torch.sum fp32",
        bytes_moved=buf.numel() * 4,
        reps=reps,
    )


def _cold_cases(n: int, k: int, reps: int, gen, ms: tuple[int, ...]) -> list[Case]:
    c4 = _copies(_int4_bytes(n, k))
    c8 = _copies(n * k)
    wo4 = _int4_layers(n, k, c4, "weight_only", gen)
    dyn4 = _int4_layers(n, k, c4, "dynamic", gen)
    wo8 = _int8_layers(n, k, c8, "weight_only", gen)
    aten = _aten_weights(n, k, c4, gen)
    out = []
    for m in ms:
        x = torch.randn(m, k, generator=gen)
        xb = x.bfloat16()
        impls = {
            "aten _weight_int4pack_mm_for_cpu bf16": _rotating([_aten_call(xb, w) for w in aten]),
            "pk Int8Linear weight_only": _rotating([lambda q=q, x=x: q(x) for q in wo8]),
            "pk Int4Linear weight_only": _rotating([lambda q=q, x=x: q(x) for q in wo4]),
            "pk Int4Linear weight_only bf16": _rotating([lambda q=q, xb=xb: q(xb) for q in wo4]),
            "pk Int4Linear dynamic": _rotating([lambda q=q, x=x: q(x) for q in dyn4]),
        }
        out.append(
            Case(
                family="int4",
                name=f"weight_only cold {m}x{k}x{n}",
                device="cpu",
                impls={name: inference(fn) for name, fn in impls.items()},
                baseline="aten _weight_int4pack_mm_for_cpu bf16",
                bytes_moved=_int4_bytes(n, k),
                reps=reps,
                notes={"copies int4": str(c4), "copies int8": str(c8)},
            )
        )
    return out


def _dynamic_case(m: int, k: int, n: int, reps: int, gen) -> Case:
    (dyn4,) = _int4_layers(n, k, 1, "dynamic", gen)
    (dyn8,) = _int8_layers(n, k, 1, "dynamic", gen)
    (aten,) = _aten_weights(n, k, 1, gen)
    x = torch.randn(m, k, generator=gen)
    impls = {
        "pk Int8Linear dynamic": lambda: dyn8(x),
        "pk Int4Linear dynamic": lambda: dyn4(x),
        "aten _weight_int4pack_mm_for_cpu bf16": _aten_call(x.bfloat16(), aten),
    }
    return Case(
        family="int4",
        name=f"dynamic {m}x{k}x{n}",
        device="cpu",
        impls={name: inference(fn) for name, fn in impls.items()},
        baseline="pk Int8Linear dynamic",
        bytes_moved=_int4_bytes(n, k) + m * k * 4 + m * n * 4,
        reps=reps,
    )


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []  # CPU kernels only
    gen = torch.Generator().manual_seed(0)
    reps = 5 if quick else 15
    out = [_read_bandwidth_case(reps)]
    shapes = COLD_SHAPES[:1] if quick else COLD_SHAPES
    for n, k in shapes:
        out.extend(_cold_cases(n, k, reps, gen, (1,) if quick else COLD_M))
    for m, k, n in DYNAMIC_SHAPES[:1] if quick else DYNAMIC_SHAPES:
        out.append(_dynamic_case(m, k, n, reps, gen))
    out.append(_read_bandwidth_case(reps))  # again after: the host's load drifts
    return out
