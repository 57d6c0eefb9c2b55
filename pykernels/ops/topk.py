"""Top-k sparsification and its inverse, for model-update compression.

``topk_sparsify`` keeps the k entries of largest magnitude of a flattened
tensor; ``topk_densify`` scatters them back. With a ``residual`` the
selection does error feedback in the same pass over memory. Both are
``torch.library`` custom ops, so they work under ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .. import _layout, backends
from . import _checks

_FLOAT_DTYPES = _checks.FLOAT_DTYPES


def _sparsify_torch(flat: Tensor, code: int, k: int, approx: bool, work, values, indices):  # noqa: ARG001
    from ..backends.torch import topk as tt

    return tt.topk_sparsify(flat, k, work)


def _sparsify_cuda(flat: Tensor, code: int, k: int, approx: bool, work, values, indices):
    stream = torch.cuda.current_stream(flat.device).cuda_stream
    with torch.cuda.device(flat.device):
        backends.native.C_cuda.topk_sparsify(
            flat.data_ptr(),
            code,
            flat.numel(),
            k,
            approx,
            0 if work is None else work.data_ptr(),
            values.data_ptr(),
            indices.data_ptr(),
            stream,
        )
    return values, indices


def _sparsify_cpu(fns, flat: Tensor, code: int, k: int, approx: bool, work, values, indices):
    B = backends.Bits
    backends.host_call(fns.topk_sparsify, B(flat), code, k, approx, work, B(values), indices)
    return values, indices


backends.register(
    "topk", "sparsify", torch=_sparsify_torch, native_cuda=_sparsify_cuda, cpu=_sparsify_cpu
)


def _run(x: Tensor, residual: Tensor | None, k: int, approx: bool) -> tuple[Tensor, Tensor]:
    flat = x.detach().reshape(-1).contiguous()
    values = torch.empty(k, dtype=x.dtype, device=x.device)
    indices = torch.empty(k, dtype=torch.int64, device=x.device)
    # The kernels need a contiguous residual; a strided one is updated through
    # a copy.
    work = None if residual is None else residual.detach().reshape(-1)
    if work is not None and not residual.is_contiguous():
        work = work.contiguous()
    code = _layout.DTYPE_CODES[x.dtype]
    run = backends.impl("topk", "sparsify", x)
    values, indices = run(flat, code, k, approx, work, values, indices)
    if work is not None and work.data_ptr() != residual.data_ptr():
        residual.copy_(work.view(residual.shape))
    return values, indices


@torch.library.custom_op("pykernels::topk_sparsify", mutates_args=())
def _topk_sparsify_op(x: Tensor, k: int, approx: bool) -> tuple[Tensor, Tensor]:
    return _run(x, None, k, approx)


@_topk_sparsify_op.register_fake
def _(x: Tensor, k: int, approx: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(k), x.new_empty(k, dtype=torch.int64)


def _topk_setup(ctx, inputs, output) -> None:
    x = inputs[0]
    ctx.save_for_backward(output[1])
    ctx.shape = x.shape


def _topk_grad(ctx, grad_values, grad_indices):  # noqa: ARG001
    # values = x.flatten()[indices]: the gradient goes back to where each came from.
    (indices,) = ctx.saved_tensors
    gx = grad_values.new_zeros(math.prod(ctx.shape))
    gx.index_add_(0, indices, grad_values)
    return gx.view(ctx.shape), None, None


torch.library.register_autograd("pykernels::topk_sparsify", _topk_grad, setup_context=_topk_setup)


@torch.library.custom_op("pykernels::topk_sparsify_ef", mutates_args=("residual",))
def _topk_sparsify_ef_op(
    x: Tensor, residual: Tensor, k: int, approx: bool
) -> tuple[Tensor, Tensor]:
    return _run(x, residual, k, approx)


@_topk_sparsify_ef_op.register_fake
def _(x: Tensor, residual: Tensor, k: int, approx: bool) -> tuple[Tensor, Tensor]:
    return x.new_empty(k), x.new_empty(k, dtype=torch.int64)


def _resolve_k(x: Tensor, k: int | None, ratio: float | None) -> int:
    n = x.numel()
    if (k is None) == (ratio is None):
        raise ValueError("topk_sparsify: give exactly one of k and ratio")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"topk_sparsify: k must be an int, got {type(k).__name__}")
        if not 0 <= k <= n:
            raise ValueError(f"topk_sparsify: k must be in [0, numel={n}], got {k}")
        return int(k)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)):
        raise TypeError(f"topk_sparsify: ratio must be a float, got {type(ratio).__name__}")
    if not (0.0 <= ratio <= 1.0):  # also rejects NaN
        raise ValueError(f"topk_sparsify: ratio must be in [0, 1], got {ratio}")
    return int(math.floor(ratio * n))


def _check_x(x: Tensor, fn: str) -> None:
    _checks.check_float_input(fn, x)


def topk_sparsify(
    x: Tensor,
    k: int | None = None,
    ratio: float | None = None,
    approx: bool = False,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The k entries of largest magnitude of ``x.flatten()``.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape, on CPU or CUDA;
            non-contiguous views are fine.
        k: how many entries to keep, ``0 <= k <= x.numel()``.
        ratio: alternatively, keep ``floor(ratio * x.numel())`` entries.
        approx: select through a sampled threshold with a tighter safety margin
            (fewer candidates to sort out, 10-25% faster at small k). Returns
            exactly k entries. An unlucky sample falls back to the exact
            selection instead of returning a worse set, so today the result
            equals exact mode; the contract is only that at least 90% of the
            entries belong to the exact top-k. On CUDA it is exact mode.
        residual: error feedback. A float32 tensor of x's shape and device.
            Selection is over ``x + residual``; ``residual`` is overwritten in
            place with what was not sent (entries not selected keep
            ``x + residual``, selected ones keep only the rounding remainder of
            the value to x's dtype, 0 for float32), so that
            ``x + residual_before == topk_densify(values, indices) + residual_after``
            in fp32. The sum is formed in fp32; a selected sum beyond an fp16
            or bf16 value's range is sent saturated (the largest finite value,
            signed) and the excess stays in the residual, never inf. The
            identity is then exact for bf16 and for fp16 sums below 2^29,
            within one fp32 rounding above. A sum that is inf or NaN in fp32
            is sent as it is and leaves 0.

    Returns:
        ``(values, indices)``: values signed, in x's dtype (for error feedback,
        ``x + residual`` rounded to x's dtype); indices int64 into the
        flattened tensor, ascending. Without a residual, values are
        differentiable in x (as ``torch.topk``'s are: the gradient goes back
        to the selected entries); with one, the outputs carry no gradient.

    Exact mode returns the same set as ``torch.topk(x.abs().flatten(), k)`` up
    to ties; entries of equal magnitude are taken lowest index first, so the
    result is deterministic. NaN ranks above every other value, inf included,
    as in ``torch.topk``; ``-0.0`` and ``0.0`` tie.
    """
    _check_x(x, "topk_sparsify")
    k = _resolve_k(x, k, ratio)
    if not isinstance(approx, bool):
        raise TypeError(f"topk_sparsify: approx must be a bool, got {type(approx).__name__}")
    if residual is None:
        if backends.skip_dispatcher(x):  # eager, no gradient wanted: skip the dispatcher
            return _run(x, None, k, approx)
        return torch.ops.pykernels.topk_sparsify(x, k, approx)
    if not isinstance(residual, Tensor):
        raise TypeError(f"topk_sparsify: residual must be a torch.Tensor, got {type(residual)}")
    if residual.dtype != torch.float32:
        raise TypeError(f"topk_sparsify: residual must be float32, got {residual.dtype}")
    if residual.shape != x.shape:
        raise ValueError(
            f"topk_sparsify: residual must have x's shape {tuple(x.shape)}, "
            f"got {tuple(residual.shape)}"
        )
    if residual.device != x.device:
        raise ValueError(
            f"topk_sparsify: residual must be on x's device {x.device}, got {residual.device}"
        )
    _checks.check_writable("topk_sparsify", "residual", residual)
    # Error feedback is state, not a function to differentiate: no gradient
    # flows through it (and residual is updated in place whatever it is).
    x, residual = x.detach(), residual.detach()
    if backends.skip_dispatcher(x, residual):
        return _run(x, residual, k, approx)
    return torch.ops.pykernels.topk_sparsify_ef(x, residual, k, approx)


def _check_indices(indices: Tensor, numel: int) -> None:
    if indices.numel():
        lo, hi = torch.aminmax(indices)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= numel:
            raise ValueError(f"topk_densify: indices must be in [0, {numel}), got [{lo}, {hi}]")


@torch.library.custom_op("pykernels::topk_densify", mutates_args=())
def _topk_densify_op(values: Tensor, indices: Tensor, shape: Sequence[int]) -> Tensor:
    _check_indices(indices, math.prod(shape))
    out = values.new_zeros(math.prod(shape))
    out.index_add_(0, indices, values)
    return out.view(shape)


@_topk_densify_op.register_fake
def _(values: Tensor, indices: Tensor, shape: Sequence[int]) -> Tensor:
    return values.new_empty(shape)


@torch.library.custom_op("pykernels::topk_densify_into", mutates_args=("out",))
def _topk_densify_into_op(values: Tensor, indices: Tensor, out: Tensor, accumulate: bool) -> None:
    _check_indices(indices, out.numel())
    flat = out.view(-1) if out.is_contiguous() else out.reshape(-1).clone()
    if not accumulate:
        flat.zero_()
    flat.index_add_(0, indices, values.to(out.dtype))
    if flat.data_ptr() != out.data_ptr():
        out.copy_(flat.view(out.shape))


@_topk_densify_into_op.register_fake
def _(values: Tensor, indices: Tensor, out: Tensor, accumulate: bool) -> None:
    return None


def topk_densify(
    values: Tensor,
    indices: Tensor,
    shape: Sequence[int] | None = None,
    out: Tensor | None = None,
    accumulate: bool = False,
) -> Tensor:
    """Scatters ``(values, indices)`` from :func:`topk_sparsify` into a dense tensor.

    Args:
        values: 1-D float tensor.
        indices: 1-D int64 tensor of the same length, flat indices into ``shape``.
        shape: shape of the dense result (may be omitted when ``out`` is given).
        out: write into this tensor instead of a new one. With
            ``accumulate=True`` the values are added to what ``out`` holds, so
            several workers' updates sum into one dense tensor.
        accumulate: see ``out``; requires ``out``.

    Duplicate indices are summed. Returns the dense tensor (``out`` if given).
    """
    if not isinstance(values, Tensor):
        raise TypeError(f"topk_densify: values must be a torch.Tensor, got {type(values)}")
    if not isinstance(indices, Tensor):
        raise TypeError(f"topk_densify: indices must be a torch.Tensor, got {type(indices)}")
    if values.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"topk_densify: values must be a float tensor, got {values.dtype}")
    if indices.dtype != torch.int64:
        raise TypeError(f"topk_densify: indices must be int64, got {indices.dtype}")
    if values.dim() != 1 or indices.dim() != 1 or values.numel() != indices.numel():
        raise ValueError(
            "topk_densify: values and indices must be 1-D of equal length, got "
            f"{tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if values.device != indices.device:
        raise ValueError("topk_densify: values and indices must be on the same device")
    accumulate = _checks.check_bool("topk_densify", "accumulate", accumulate)
    if out is None:
        if accumulate:
            raise ValueError("topk_densify: accumulate=True needs out")
        if shape is None:
            raise ValueError("topk_densify: give shape or out")
        shape = _checks.check_shape("topk_densify", "shape", shape)
    else:
        if not isinstance(out, Tensor):
            raise TypeError(f"topk_densify: out must be a torch.Tensor, got {type(out)}")
        if shape is not None:
            shape = _checks.check_shape("topk_densify", "shape", shape)
            if shape != tuple(out.shape):
                raise ValueError(f"topk_densify: shape {shape} != out.shape {tuple(out.shape)}")
        if out.device != values.device:
            raise ValueError("topk_densify: out must be on the device of values")
        if out.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"topk_densify: out must be a float tensor, got {out.dtype}")
        _checks.check_writable("topk_densify", "out", out)
    # The indices' range is checked inside the ops, where it is known under
    # torch.compile too.
    if out is None:
        return torch.ops.pykernels.topk_densify(values, indices, list(shape))
    torch.ops.pykernels.topk_densify_into(values, indices, out, accumulate)
    return out
