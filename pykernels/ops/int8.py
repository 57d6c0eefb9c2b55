"""int8 family, first part: per-row quantization and the exact int8 GEMM.

``int8_linear``, weight-only mode, prepacked weights, CUDA kernels and
``pk.nn.Int8Linear`` are still to come (issue 3).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends

MAX_K = 131072  # 128 * 128 * K >= 2^31 from here on: int32 could overflow

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cpu_call(device: torch.device, fn: str, *tensors: Tensor) -> None:
    """Runs `fn` of the chosen CPU backend on the tensors (outputs last)."""
    # No CUDA kernels for int8 yet: for CUDA tensors choose() falls through to
    # the reference backend, which runs on copies in host memory.
    backend = backends.choose("int8", device)
    cpu = [t if t.device.type == "cpu" else t.cpu() for t in tensors]
    backends.cpu_function(backend, "int8", fn)(*[t.numpy() for t in cpu])
    for t, c in zip(tensors, cpu):
        if c is not t:
            t.copy_(c)


@torch.library.custom_op("pykernels::quantize_per_row", mutates_args=())
def _quantize_op(x: Tensor) -> tuple[Tensor, Tensor]:
    x2 = x.detach().float().contiguous()
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.numel():
        _cpu_call(x.device, "quantize_per_row", x2, q, scale)
    else:
        scale.zero_()
    return q, scale


@_quantize_op.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("pykernels::int8_gemm", mutates_args=())
def _int8_gemm_op(a: Tensor, b: Tensor) -> Tensor:
    c = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    if c.numel():
        _cpu_call(a.device, "int8_gemm", a.contiguous(), b.contiguous(), c)
    return c


@_int8_gemm_op.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[0], dtype=torch.int32)


def quantize_per_row(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization of each row (last dimension) of ``x``.

    ``scale = max|row| / 127`` in float32 and ``q = round_half_even(x / scale)``
    in [-127, 127], computed in float32 whatever x's float dtype. Rows of
    zeros get scale 0 and q 0; a row holding NaN gets scale NaN, a row holding
    inf scale inf, and q 0 (so a later dequantization gives NaN in that row
    only). Returns ``(q, scale)``: q int8 of x's shape, scale float32 of
    ``x.shape[:-1]``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"quantize_per_row: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize_per_row: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("quantize_per_row: x must have at least 1 dimension")
    rows = math.prod(x.shape[:-1])
    q, scale = torch.ops.pykernels.quantize_per_row(x.reshape(rows, x.shape[-1]))
    return q.view(x.shape), scale.view(x.shape[:-1])


def int8_gemm(a_q: Tensor, b_q: Tensor) -> Tensor:
    """``a_q @ b_q.T`` for int8 ``a_q [M, K]`` and ``b_q [N, K]``, in int32, exact.

    K >= 131072 is refused: 128 * 128 * K could then overflow int32.
    """
    for name, t in (("a_q", a_q), ("b_q", b_q)):
        if not isinstance(t, Tensor):
            raise TypeError(f"int8_gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int8:
            raise TypeError(f"int8_gemm: {name} must be int8, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"int8_gemm: {name} must be 2-D, got shape {tuple(t.shape)}")
    if a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"int8_gemm: K of a_q ({a_q.shape[1]}) and b_q ({b_q.shape[1]}) differ")
    if a_q.device != b_q.device:
        raise ValueError(
            f"int8_gemm: a_q and b_q must be on one device, got {a_q.device} and {b_q.device}"
        )
    if a_q.shape[1] >= MAX_K:
        raise ValueError(
            f"int8_gemm: K = {a_q.shape[1]} could overflow int32 accumulation (limit {MAX_K})"
        )
    return torch.ops.pykernels.int8_gemm(a_q, b_q)
