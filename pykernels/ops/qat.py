"""qat family: fused int8 fake quantization with a straight-through gradient.

``fake_quantize_per_row(x)`` rounds each row (last dimension) of x to the
int8 grid that :func:`pykernels.ops.quantize_per_row` (and so ``Int8Linear``)
uses, and returns it dequantized, in one pass: per-row absmax, round half to
even, dequantize, and the mask of the straight-through estimator. Its
backward passes the gradient where the value was inside the clipping range.
Both directions are ``torch.library`` custom ops (native CPU kernel, Numba,
reference; torch ops on other devices), so they trace under ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends
from ..backends.torch import qat as _tq
from . import _checks


def _fq_cpu(fns, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    mask = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scale = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    if x.numel():
        backends.host_call(fns.fake_quant_per_row, x, y, mask, scale)
    return y, mask, scale


def _fq_backward_cpu(fns, grad: Tensor, mask: Tensor) -> Tensor:
    out = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    if grad.numel():
        backends.host_call(
            fns.fake_quant_backward, grad.reshape(-1), mask.reshape(-1), out.view(-1)
        )
    return out


backends.register("qat", "fake_quant", torch=_tq.fake_quant_per_row, cpu=_fq_cpu)
backends.register("qat", "fake_quant_backward", torch=_tq.fake_quant_backward, cpu=_fq_backward_cpu)


def _fq_impl(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return backends.impl("qat", "fake_quant", x)(x)


@torch.library.custom_op("pykernels::fake_quant_per_row", mutates_args=())
def _fq_op(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _fq_impl(x)


@_fq_op.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return (
        x.new_empty(x.shape, dtype=torch.float32),
        x.new_empty(x.shape, dtype=torch.uint8),
        x.new_empty(x.shape[0], dtype=torch.float32),
    )


def _fq_backward_impl(grad: Tensor, mask: Tensor) -> Tensor:
    return backends.impl("qat", "fake_quant_backward", grad)(grad, mask)


@torch.library.custom_op("pykernels::fake_quant_backward", mutates_args=())
def _fq_backward_op(grad: Tensor, mask: Tensor) -> Tensor:
    return _fq_backward_impl(grad.contiguous(), mask.contiguous())


@_fq_backward_op.register_fake
def _(grad: Tensor, mask: Tensor) -> Tensor:
    return grad.new_empty(grad.shape, dtype=torch.float32)


def _setup(ctx, inputs, output) -> None:  # noqa: ARG001
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1])
    # With absmax scales every finite value lies inside the clipping range, so
    # the mask is all ones exactly when every row is finite (the kernel's
    # mask says so; tests check it). Then the straight-through gradient is
    # the incoming one as it is: no pass over it, no new buffer (a fresh
    # 64 MiB tensor costs more here than the pass itself). Traced code
    # (fake or functional tensors) keeps the general path: no data-dependent branch.
    s = output[2]
    eager = type(s) is torch.Tensor and not torch.compiler.is_compiling()  # not fake/functional
    ctx.all_pass = eager and bool(torch.isfinite(s).all())


def _backward(ctx, gy: Tensor, gmask, gscale):  # noqa: ARG001
    if ctx.all_pass:
        return gy.float()
    (mask,) = ctx.saved_tensors
    return torch.ops.pykernels.fake_quant_backward(gy.float(), mask)


torch.library.register_autograd("pykernels::fake_quant_per_row", _backward, setup_context=_setup)


def fake_quantize_per_row(
    x: Tensor, *, return_scale: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """int8 fake quantization of each row (last dimension) of ``x``, differentiable.

    ``scale = max|row| / 127`` (float32) and ``y = clamp(round_half_even(x /
    scale), -127, 127) * scale``: exactly the values :func:`quantize_per_row`
    gives back after dequantization, so a layer trained on ``y`` computes
    what ``Int8Linear`` will. The backward is the straight-through estimator:
    the gradient passes unchanged where ``|x / scale| <= 127.5`` (inside the
    clipping range; with absmax scales that is every finite value) and is
    zero elsewhere; the scale itself is treated as a constant. A row of zeros
    gives zeros (gradient passing); a row holding NaN or inf gives NaN (no
    gradient). Computed in float32, returned in x's dtype (float32, float16 or
    bfloat16). ``return_scale=True`` also returns the float32 scales of
    shape ``x.shape[:-1]``.
    """
    fn = "fake_quantize_per_row"
    _checks.check_float_input(fn, x, min_dim=1)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    if x2.dtype != torch.float32:
        x2 = x2.float()
    if x2.shape[1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if backends.skip_dispatcher(x2):
        y, _, scale = _fq_impl(x2)
    else:
        y, _, scale = torch.ops.pykernels.fake_quant_per_row(x2)
    y = y.view(x.shape).to(x.dtype)
    if return_scale:
        return y, scale.view(lead)
    return y
