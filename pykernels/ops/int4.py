"""int4 family: group-wise 4-bit weights and the linear layers over them.

The weight format (shared by every backend, the layers' ``state_dict`` and
code that quantizes elsewhere, e.g. GPTQ):

- ``packed``: uint8 ``[N, K // 2]``; byte ``j`` of row ``n`` holds column
  ``2j`` in its low nibble and ``2j + 1`` in its high nibble. Codes ``q`` are
  unsigned, 0..15.
- ``scales``: float32 ``[N, K // g]``; ``zeros``: uint8 ``[N, K // g]``, integer
  zero points in 0..15, for groups of ``g`` in {32, 64, 128} consecutive
  columns.
- ``w_hat[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]``.

Two linears read it: weight-only (W4A16, :func:`int4_linear` with
``mode="weight_only"``: activations stay float, the weight is dequantized in
registers; the decode case of one to a few rows) and dynamic W4A8
(``mode="dynamic"``: each row of x is quantized to int8 as
:func:`pykernels.ops.quantize_per_row` does, the sums over each group are
exact in int32, then scaled by the group's scale: llama.cpp's Q4_0 x Q8_0
arithmetic with per-token activation scales). ``mode="auto"`` picks one of the
two per call by the number of rows of x: weight-only up to
:data:`AUTO_WEIGHT_ONLY_ROWS` rows (decode: the weight's bytes are the time,
and the float activations are the more accurate mode), W4A8 above (prefill and
batches: the int8 dot products are the time). A call in ``auto`` has exactly
the numerics of the mode it ran, so its error bound is W4A8's, the looser of
the two.

Every function here is a ``torch.library`` custom op with a fake
implementation; arguments are checked in one place (here) whatever backend
runs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .. import backends
from ..backends.reference import int4 as _ref
from ..backends.torch import int4 as _ti
from . import _checks

GROUP_SIZES = (32, 64, 128)
MODES = ("auto", "dynamic", "weight_only")
#: ``mode="auto"`` runs weight-only for calls of at most this many rows of x and
#: W4A8 above. Measured on Zen 5, AVX-512, 1 thread (benchmarks/RESULTS.md,
#: "int4 ... second pass"): at one row from DRAM weight-only is 1.4x W4A8
#: (4096x4096) and decodes a 0.54 B Llama 1.7x faster; at two rows the two
#: tie; from three rows W4A8 is 1.7x and more (4096x1024, in cache).
AUTO_WEIGHT_ONLY_ROWS = 2


def resolve_mode(mode: str, rows: int) -> str:
    """The mode a call over ``rows`` rows of x runs: ``mode`` itself, or for
    ``"auto"`` ``"weight_only"`` up to :data:`AUTO_WEIGHT_ONLY_ROWS` rows and
    ``"dynamic"`` above."""
    if mode != "auto":
        return mode
    return "weight_only" if rows <= AUTO_WEIGHT_ONLY_ROWS else "dynamic"


# --- argument checks: the one validation path of every backend ------------------


def check_group_size(fn: str, group_size: object, k: int | None = None) -> int:
    """``group_size`` as one of :data:`GROUP_SIZES` (dividing ``k`` when given)."""
    if isinstance(group_size, bool) or not _checks.is_int(group_size):
        raise TypeError(
            f"{fn}: group_size must be an int in {GROUP_SIZES}, got {type(group_size).__name__}"
        )
    if int(group_size) not in GROUP_SIZES:
        raise ValueError(f"{fn}: group_size must be one of {GROUP_SIZES}, got {group_size}")
    g = int(group_size)
    if k is not None and k % g:
        raise ValueError(
            f"{fn}: group_size = {g} must divide K = {k} (the input features; K must be a "
            f"multiple of {g})"
        )
    return g


def check_mode(fn: str, mode: object) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"{fn}: mode must be one of {MODES}, got {mode!r}")
    return mode


def check_quantized(
    fn: str, packed: object, scales: object, zeros: object, group_size: object
) -> tuple[int, int, int]:
    """Checks an int4 weight in the format above; returns ``(N, K, group_size)``.

    Dtypes, shapes and devices always; that every zero point lies in 0..15
    once per weight while its tensors are unchanged (a zero of 16 or more
    would give each backend a different answer).
    """
    for name, t in (("packed", packed), ("scales", scales), ("zeros", zeros)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D, got shape {tuple(t.shape)}")
    assert isinstance(packed, Tensor) and isinstance(scales, Tensor) and isinstance(zeros, Tensor)
    if packed.dtype != torch.uint8:
        raise TypeError(f"{fn}: packed must be uint8 (two 4-bit codes a byte), got {packed.dtype}")
    if scales.dtype != torch.float32:
        raise TypeError(f"{fn}: scales must be float32, got {scales.dtype}")
    if zeros.dtype != torch.uint8:
        raise TypeError(f"{fn}: zeros must be uint8, got {zeros.dtype}")
    n, k = int(packed.shape[0]), 2 * int(packed.shape[1])
    g = check_group_size(fn, group_size, k)
    want = (n, k // g)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != want:
            raise ValueError(
                f"{fn}: {name} must have shape {want} for packed {tuple(packed.shape)} "
                f"(K = {k}) and group_size = {g}, got {tuple(t.shape)}"
            )
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.device != packed.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but packed is on {packed.device}")
    if zeros.numel() and _checks.has_data(zeros):
        key = ("int4-zeros",)
        if not _checks.is_checked((zeros,), key):
            if bool((zeros > 15).any()):
                raise ValueError(f"{fn}: zeros must lie in 0..15, got max {int(zeros.max())}")
            _checks.mark_checked((zeros,), key)
    return n, k, g


def _check_weight_input(fn: str, w: object) -> Tensor:
    _checks.check_float_input(fn, w, name="w")
    assert isinstance(w, Tensor)
    if w.dim() != 2:
        raise ValueError(f"{fn}: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if _checks.has_data(w) and w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{fn}: w holds NaN or inf, which no scale represents")
    return w


# --- quantize / dequantize -----------------------------------------------------


def _quantize_reference(w: Tensor, group_size: int, symmetric: bool):
    p, s, z = _ref.quantize_weight(w.detach().float().cpu().numpy(), group_size, symmetric)
    return tuple(torch.from_numpy(t).to(w.device) for t in (p, s, z))


def _dequantize_reference(packed, scales, zeros, group_size):
    w = _ref.dequantize_weight(
        packed.cpu().numpy(), scales.cpu().numpy(), zeros.cpu().numpy(), group_size
    )
    return torch.from_numpy(w).to(packed.device)


backends.register("int4", "quantize_weight", reference=_quantize_reference, any=_ti.quantize_weight)
backends.register(
    "int4", "dequantize_weight", reference=_dequantize_reference, any=_ti.dequantize_weight
)


@torch.library.custom_op("pykernels::int4_quantize_weight", mutates_args=())
def _quantize_op(w: Tensor, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    g = check_group_size("pykernels::int4_quantize_weight", group_size, w.shape[1])
    return backends.impl("int4", "quantize_weight", w)(w.detach().contiguous(), g, symmetric)


@_quantize_op.register_fake
def _(w: Tensor, group_size: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    n, k = w.shape
    groups = k // group_size
    return (
        w.new_empty(n, k // 2, dtype=torch.uint8),
        w.new_empty(n, groups, dtype=torch.float32),
        w.new_empty(n, groups, dtype=torch.uint8),
    )


@torch.library.custom_op("pykernels::int4_dequantize_weight", mutates_args=())
def _dequantize_op(packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    return backends.impl("int4", "dequantize_weight", packed)(packed, scales, zeros, group_size)


@_dequantize_op.register_fake
def _(packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    return packed.new_empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.float32)


def int4_quantize_weight(
    w: Tensor, group_size: int = 128, symmetric: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest group-wise int4 of a float ``[N, K]`` weight: ``(packed,
    scales, zeros)`` in the format of this module.

    Each group of ``group_size`` consecutive columns of a row gets one scale,
    computed in float32. ``symmetric=True``: ``scale = max|w| / 7``, ``zero =
    8``, ``q = clamp(round(w / scale), -8, 7) + 8`` (codes 1..15 used).
    ``symmetric=False``: ``scale = (max - min) / 15`` over the group's range
    widened to include 0 (``min <= 0 <= max``, as GPTQ's quantizer does, so the
    integer zero point always reaches the group), ``zero = clamp(round(-min /
    scale), 0, 15)``, ``q = clamp(round(w / scale) + zero, 0, 15)``. A group
    of zeros gets scale 1 and codes equal to its zero; a constant group ``c``
    (``max == min``) gets ``scale = |c| / 15``, which holds it exactly.
    Rounding is half to even. ``K % group_size != 0`` raises ValueError naming
    ``group_size``; NaN or inf in ``w`` raises ValueError.
    """
    fn = "int4_quantize_weight"
    w = _check_weight_input(fn, w)
    g = check_group_size(fn, group_size, int(w.shape[1]))
    symmetric = _checks.check_bool(fn, "symmetric", symmetric)
    return torch.ops.pykernels.int4_quantize_weight(w, g, symmetric)


def int4_dequantize_weight(
    packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int
) -> Tensor:
    """The float32 ``[N, K]`` weight ``(q - zeros) * scales`` (one rounding each)."""
    check_quantized("int4_dequantize_weight", packed, scales, zeros, group_size)
    return torch.ops.pykernels.int4_dequantize_weight(packed, scales, zeros, int(group_size))


# --- the linears ---------------------------------------------------------------


def _linear_with(mod):
    def run(mode, x, packed, scales, zeros, group_size, bias):
        f = mod.linear_weight_only if mode == "weight_only" else mod.linear_dynamic
        return f(x, packed, scales, zeros, group_size, bias)

    return run


def _linear_native(mode, x, packed, scales, zeros, group_size, bias):
    from .._layout import DTYPE_CODES

    y = torch.empty(x.shape[0], packed.shape[0], dtype=x.dtype)
    fn = "int4_weight_linear" if mode == "weight_only" else "int4_dynamic_linear"
    getattr(backends.native.C, fn)(
        _fbuf(x),
        DTYPE_CODES[x.dtype],
        packed.numpy(),
        scales.numpy(),
        zeros.numpy(),
        group_size,
        None if bias is None else bias.numpy(),
        _fbuf(y),
        DTYPE_CODES[y.dtype],
    )
    return y


def _linear_numba(mode, x, packed, scales, zeros, group_size, bias):
    from ..backends.numba import int4 as nb

    y = torch.empty(x.shape[0], packed.shape[0], dtype=torch.float32)
    fn = nb.linear_weight_only if mode == "weight_only" else nb.linear_dynamic
    fn(
        x.float().numpy(),
        packed.numpy(),
        scales.numpy(),
        zeros.numpy(),
        group_size,
        None if bias is None else bias.numpy(),
        y.numpy(),
    )
    return y.to(x.dtype)


backends.register(
    "int4",
    "linear",
    native_cpu=_linear_native,
    numba=_linear_numba,
    reference=_linear_with(_ref),
    any=_linear_with(_ti),
)


def _linear_impl(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None,
    mode: str,
) -> Tensor:
    mode = resolve_mode(check_mode("pykernels::int4_linear", mode), int(x.shape[0]))
    return backends.impl("int4", "linear", x)(mode, x, packed, scales, zeros, group_size, bias)


@torch.library.custom_op("pykernels::int4_linear", mutates_args=())
def _linear_op(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None,
    mode: str = "dynamic",
) -> Tensor:
    return _linear_impl(x, packed, scales, zeros, group_size, bias, mode)


@_linear_op.register_fake
def _(x, packed, scales, zeros, group_size, bias, mode="dynamic"):
    return x.new_empty(x.shape[0], packed.shape[0])


def _setup(ctx, inputs, output) -> None:  # noqa: ARG001
    x, packed, scales, zeros, group_size, bias, mode = inputs
    ctx.mode = mode
    ctx.group_size = group_size
    ctx.x_dtype = x.dtype
    ctx.bias_grad = bias is not None and bias.requires_grad
    ctx.save_for_backward(packed, scales, zeros)


def _backward(ctx, grad):
    if ctx.mode != "weight_only":
        raise RuntimeError(
            f"pykernels.ops.int4_linear with mode={ctx.mode!r} is inference-only: the int8 "
            "rounding of x (which 'auto' uses from "
            f"{AUTO_WEIGHT_ONLY_ROWS + 1} rows up) has no useful gradient. Use "
            "mode='weight_only' (differentiable in "
            "x and bias, e.g. for adapters trained over a frozen int4 weight), or call it "
            "under torch.no_grad()."
        )
    packed, scales, zeros = ctx.saved_tensors
    w = torch.ops.pykernels.int4_dequantize_weight(packed, scales, zeros, ctx.group_size)
    gx = (grad.float() @ w).to(ctx.x_dtype)
    gb = grad.float().sum(dim=0) if ctx.bias_grad else None
    return gx, None, None, None, None, gb, None


torch.library.register_autograd("pykernels::int4_linear", _backward, setup_context=_setup)


def _rows(x: Tensor, n: int, k: int, bias32: Tensor | None):
    """x as [M, K] with unit-stride rows, its leading shape, and the result when
    there is nothing to compute (M = 0, N = 0, or K = 0: the bias)."""
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(math.prod(lead), k)
    if x2.shape[0] == 0 or n == 0 or k == 0:
        y = x.new_zeros(*lead, n)
        return x2, lead, (y if bias32 is None else (y + bias32).to(x.dtype))
    rows_ok = x2.stride(1) == 1 and (x2.shape[0] <= 1 or x2.stride(0) >= k)
    return (x2 if rows_ok else x2.contiguous()), lead, None


def int4_linear(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    bias: Tensor | None = None,
    mode: str = "dynamic",
) -> Tensor:
    """``x @ w_hat.T + bias`` over an int4 weight (format in this module's docstring).

    ``x``: float32, float16 or bfloat16 ``[..., K]``; returns ``[..., N]`` in
    x's dtype. ``mode="weight_only"`` (W4A16): x stays in float, the weight is
    dequantized exactly as :func:`int4_dequantize_weight` does and the
    products accumulate in float32; differentiable in x and bias.
    ``mode="dynamic"`` (W4A8): each row of x is quantized to int8 as
    :func:`pykernels.ops.quantize_per_row` does (``a, x_scale``), each group's
    ``sum_k a[m, k] * (q[n, k] - zeros[n, g])`` is computed exactly in int32,
    and ``y = x_scale[m] * sum_g scales[n, g] * isum[m, n, g] + bias`` in
    float32; inference only (backward raises). ``mode="auto"``: weight-only
    for at most :data:`AUTO_WEIGHT_ONLY_ROWS` rows of x (all leading dimensions
    together), dynamic above, each call with exactly the numerics of the mode it
    ran (so a row's result can depend on how many rows share the call, within
    W4A8's error); inference only, as dynamic. A row of x holding NaN or inf
    gives NaN in that row only (dynamic) or wherever float arithmetic puts it
    (weight-only).
    """
    fn = "int4_linear"
    n, k, g = check_quantized(fn, packed, scales, zeros, group_size)
    mode = check_mode(fn, mode)
    _checks.check_float_input(fn, x)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{fn}: x must have K = {k} in its last dimension, got {tuple(x.shape)}")
    _checks.check_bias(fn, bias, n)
    for name, t in (("x", x), ("bias", bias)):
        if t is not None and t.device != packed.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but packed is on {packed.device}")
    bias32 = None if bias is None else (bias if bias.dtype == torch.float32 else bias.float())
    x2, lead, done = _rows(x, n, k, bias32)
    if done is not None:
        return done
    op = _linear_impl if backends.skip_dispatcher(x2, bias32) else torch.ops.pykernels.int4_linear
    y = op(
        x2,
        packed.contiguous(),
        scales.contiguous(),
        zeros.contiguous(),
        g,
        None if bias32 is None else bias32.contiguous(),
        mode,
    )
    return y.view(*lead, n)


def _fbuf(t: Tensor) -> np.ndarray:
    """NumPy view of a CPU float tensor for the bindings (16-bit floats as uint16)."""
    if t.dtype == torch.float32:
        return t.numpy()
    return t.view(torch.int16).numpy().view(np.uint16)
