"""int8 family: per-row quantization, the exact int8 GEMM, and the dynamic
(W8A8) and weight-only (W8A16) linear layers over a prepacked weight.

Every function here is a ``torch.library`` custom op with a fake
implementation, so it traces under ``torch.compile`` without a graph break.
CPU runs the native kernels (AVX-512 VNNI, AVX2 or portable, chosen at run
time), else Numba, else the reference; other devices run torch ops there
(``torch._int_mm`` with the scales around it: the torch backend).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import _layout, backends
from ..backends.reference import int8 as _ref
from ..backends.torch import int8 as _ti
from . import _checks

MAX_K = 131072  # 128 * 128 * K >= 2^31 from here on: int32 could overflow

# The fused epilogue's activations, in the order of the native codes
# (csrc/int8/int8.h, Act): y = act(x W^T + b) + residual.
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")
# The row norms that may end the epilogue, in the order of the native codes
# (int8.h, Norm): y = norm(act(x W^T + b) + residual).
NORMS = ("none", "layer", "rms")


def check_activation(fn: str, activation: object, name: str = "activation") -> str:
    """``activation`` as one of :data:`ACTIVATIONS` (None means ``"none"``)."""
    if activation is None:
        return "none"
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: {name} must be one of {ACTIVATIONS} or None, got {activation!r}")
    return activation


def check_norm(
    fn: str,
    norm: object,
    norm_weight: object,
    norm_bias: object,
    eps: object,
    n: int,
    device: torch.device,
) -> str:
    """``norm`` as one of :data:`NORMS` (None means ``"none"``), with its weight,
    bias (``[n]`` float tensors on ``device`` or None; RMSNorm has no bias) and eps."""
    if norm is None:
        norm = "none"
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"{fn}: norm must be one of {NORMS} or None, got {norm!r}")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is None:
            continue
        if norm == "none":
            raise ValueError(f"{fn}: {name} given but norm is None")
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} must be a float tensor, got {t.dtype}")
        if tuple(t.shape) != (n,):
            raise ValueError(f"{fn}: {name} must have shape ({n},), got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {device}")
    if norm == "rms" and norm_bias is not None:
        raise ValueError(f"{fn}: norm_bias is for norm='layer'; RMSNorm has no bias")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{fn}: eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{fn}: eps must be finite and >= 0, got {eps}")
    return norm


def apply_epilogue(
    y: Tensor,
    activation: str,
    residual: Tensor | None,
    norm: str = "none",
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """The unfused epilogue, in float32: ``norm(act(y) + residual)`` (what every
    backend but the native CPU one runs after its linear, and what the tests
    compare with)."""
    if activation == "none" and residual is None and norm == "none":
        return y
    out = y.float()
    if activation == "relu":
        out = torch.relu(out)
    elif activation == "gelu":
        out = torch.nn.functional.gelu(out)
    elif activation == "gelu_tanh":
        out = torch.nn.functional.gelu(out, approximate="tanh")
    elif activation == "silu":
        out = torch.nn.functional.silu(out)
    if residual is not None:
        out = out + residual.float()
    w = None if norm_weight is None else norm_weight.float()
    if norm == "layer":
        b = None if norm_bias is None else norm_bias.float()
        out = torch.nn.functional.layer_norm(out, out.shape[-1:], w, b, eps)
    elif norm == "rms":
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
        out = out if w is None else out * w
    return out.to(y.dtype)


def _quantize_cpu(fns, x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    x2 = x.float().contiguous()
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.numel():
        backends.host_call(fns.quantize_per_row, x2, q, scale, bits)
    else:
        scale.zero_()
    return q, scale


def _gemm_cpu(fns, a: Tensor, b: Tensor) -> Tensor:
    c = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    if c.numel():
        backends.host_call(fns.int8_gemm, a.contiguous(), b.contiguous(), c)
    return c


backends.register("int8", "quantize_per_row", torch=_ti.quantize_per_row, cpu=_quantize_cpu)
backends.register(
    "int8",
    "int8_gemm",
    torch=lambda a, b: _ti.int8_gemm(a.contiguous(), b.contiguous()),
    cpu=_gemm_cpu,
)


@torch.library.custom_op("pykernels::quantize_per_row", mutates_args=())
def _quantize_op(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    bits = check_act_bits("pykernels::quantize_per_row", bits, "bits")  # called directly too
    return backends.impl("int8", "quantize_per_row", x)(x.detach(), bits)


@_quantize_op.register_fake
def _(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("pykernels::int8_gemm", mutates_args=())
def _int8_gemm_op(a: Tensor, b: Tensor) -> Tensor:
    return backends.impl("int8", "int8_gemm", a)(a, b)


@_int8_gemm_op.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[0], dtype=torch.int32)


ACT_BITS = (8, 7)


def check_act_bits(fn: str, act_bits: object, name: str = "act_bits") -> int:
    """act_bits as an int of ACT_BITS, or a ValueError/TypeError naming it."""
    if isinstance(act_bits, bool) or not isinstance(act_bits, int):
        raise TypeError(f"{fn}: {name} must be an int (8 or 7), got {type(act_bits).__name__}")
    if act_bits not in ACT_BITS:
        raise ValueError(f"{fn}: {name} must be 8 or 7, got {act_bits}")
    return int(act_bits)


def quantize_per_row(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """int8 quantization of each row (last dimension) of ``x``; ``x ~ q * scale``.

    ``bits=8`` (symmetric): ``scale = max|row| / 127`` in float32 and ``q =
    round_half_even(x / scale)`` in [-127, 127]. ``bits=7`` (the fast AVX2
    grid of ``act_bits=7``): 128 levels spanning ``[min(row, 0), max(row,
    0)]``: ``scale = hi / 127 - lo / 127``, ``zp = round(-lo / scale)`` in
    [0, 127], ``q = clamp(round_half_even(x / scale), -zp, 127 - zp)``, so
    ``q + zp`` fits 7 unsigned bits; as fine as bits 8 for a one-sided row
    (after ReLU or GELU), twice as coarse for a symmetric one. Computed in
    float32 whatever x's float dtype. Rows of zeros get scale 0 and q 0; a
    row holding NaN gets scale NaN, a row holding inf scale inf, and q 0 (so
    a later dequantization gives NaN in that row only). Returns ``(q,
    scale)``: q int8 of x's shape, scale float32 of ``x.shape[:-1]``.
    """
    _checks.check_float_input("quantize_per_row", x, min_dim=1)
    bits = check_act_bits("quantize_per_row", bits, "bits")
    rows = math.prod(x.shape[:-1])
    q, scale = torch.ops.pykernels.quantize_per_row(x.reshape(rows, x.shape[-1]), bits)
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


# --- packed weights and the linear layers -------------------------------------


class Int8PackedWeight(NamedTuple):
    """An int8 [N, K] weight in the layout the CPU kernels read.

    ``packed`` (int8, ``packed_n(N) * packed_k(K)`` bytes) holds the weight in
    blocks of 16 output channels x 4 k (layout in ``csrc/int8/int8.h``);
    ``comp`` (int32, ``packed_n(N)``) holds ``128 * sum_k w[n, k]``, the
    correction the VNNI kernel needs. Build it with :func:`pack_int8_weight`;
    :func:`unpack_int8_weight` gives the [N, K] weight back exactly.
    """

    packed: Tensor
    comp: Tensor
    n: int
    k: int


def _fbuf(t: Tensor) -> np.ndarray:
    """NumPy view of a CPU float tensor for the bindings (16-bit floats as uint16)."""
    if t.dtype == torch.float32:
        return t.numpy()
    return t.view(torch.int16).numpy().view(np.uint16)


def _pack_native(w: Tensor) -> tuple[Tensor, Tensor]:
    if not w.numel():
        return _pack_reference(w)
    np_, kp = _layout.packed_shape(*w.shape)
    packed = torch.empty(np_ * kp, dtype=torch.int8)
    comp = torch.empty(np_, dtype=torch.int32)
    backends.host_call(backends.native.C.int8_pack_weight, w, packed, comp)
    return packed, comp


def _pack_reference(w: Tensor) -> tuple[Tensor, Tensor]:
    """The packed layout by index arithmetic, in torch on w's device (Numba and
    reference backends, and the check of a packed weight)."""
    n, k = w.shape
    np_, kp = _layout.packed_shape(n, k)
    off = torch.from_numpy(_layout.packed_offsets(n, k)).to(w.device)
    packed = torch.zeros(np_ * kp, dtype=torch.int8, device=w.device)
    packed[off.reshape(-1)] = w.reshape(-1)
    comp = torch.zeros(np_, dtype=torch.int32, device=w.device)
    comp[:n] = 128 * w.sum(dim=1, dtype=torch.int32)
    return packed, comp


backends.register("int8", "pack_weight", native_cpu=_pack_native, any=_pack_reference)


@torch.library.custom_op("pykernels::int8_pack_weight", mutates_args=())
def _pack_op(w: Tensor) -> tuple[Tensor, Tensor]:
    w = w.contiguous()
    return backends.impl("int8", "pack_weight", w)(w)


@_pack_op.register_fake
def _(w: Tensor) -> tuple[Tensor, Tensor]:
    np_, kp = _layout.packed_shape(*w.shape)
    return w.new_empty(np_ * kp, dtype=torch.int8), w.new_empty(np_, dtype=torch.int32)


def _no_backward(name: str):
    def backward(ctx, grad):  # noqa: ARG001
        raise RuntimeError(
            f"pykernels.ops.{name} is inference-only: it has no backward (the int8 rounding "
            "has no useful gradient). Call it under torch.no_grad() or torch.inference_mode(), "
            "or keep the float layer for training; quantization-aware training will come with "
            "a straight-through estimator in a later release."
        )

    return backward


def _linear_native(
    kind: str, x: Tensor, native_weight, rowmajor_weight, w_scale, bias, *extra, epilogue=None
) -> Tensor:  # noqa: ARG001 - one signature for every backend
    code = _layout.DTYPE_CODES[x.dtype]
    if epilogue is not None:
        # The fused epilogue works on fp32 y (int8.h); other dtypes are
        # converted once at the end, as the unfused path's last op would.
        activation, residual, *nrm = epilogue
        y = torch.empty(x.shape[0], w_scale.shape[0], dtype=torch.float32)
        res = None if residual is None else residual.float().contiguous().numpy()
        fused = (ACTIVATIONS.index(activation), res)
        if nrm and nrm[0] != "none":
            norm, nw, nb, eps = nrm
            f32 = [None if t is None else t.float().contiguous().numpy() for t in (nw, nb)]
            fused += (NORMS.index(norm), *f32, float(eps))
    else:
        y = torch.empty(x.shape[0], w_scale.shape[0], dtype=x.dtype)
        fused = ()
    getattr(backends.native.C, kind)(
        _fbuf(x),
        code,
        *[t.numpy() for t in native_weight()],
        w_scale.numpy(),
        None if bias is None else bias.numpy(),
        _fbuf(y),
        _layout.DTYPE_CODES[y.dtype],
        *extra,
        *fused,
    )
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _linear_numba(
    kind: str, x: Tensor, native_weight, rowmajor_weight, w_scale, bias, *extra, epilogue=None
):  # noqa: ARG001
    from ..backends.numba import int8 as nb

    y = torch.empty(x.shape[0], w_scale.shape[0], dtype=torch.float32)
    getattr(nb, kind)(
        x.float().numpy(),
        rowmajor_weight().numpy(),
        w_scale.numpy(),
        None if bias is None else bias.numpy(),
        y.numpy(),
        *extra,
    )
    return _unfused_epilogue(y.to(x.dtype), epilogue)


def _unfused_epilogue(y: Tensor, epilogue: tuple | None) -> Tensor:
    return y if epilogue is None else apply_epilogue(y, *epilogue)


def _linear_with(mod):
    """An implementation that runs `mod`'s tensor-level function on the row-major weight."""

    def run(
        kind: str, x: Tensor, native_weight, rowmajor_weight, w_scale, bias, *extra, epilogue=None
    ):  # noqa: ARG001
        y = getattr(mod, kind)(x, rowmajor_weight(), w_scale, bias, *extra)
        return _unfused_epilogue(y, epilogue)

    return run


backends.register(
    "int8",
    "linear",
    native_cpu=_linear_native,
    torch=_linear_with(_ti),
    numba=_linear_numba,
    reference=_linear_with(_ref),
)


def _run_linear(
    kind: str,
    x: Tensor,
    native_weight: Callable[[], tuple[Tensor, ...]],
    rowmajor_weight: Callable[[], Tensor],
    w_scale: Tensor,
    bias: Tensor | None,
    act_bits: int = 8,
    activation: str = "none",
    residual: Tensor | None = None,
    norm: tuple = ("none", None, None, 1e-5),
) -> Tensor:
    """int8_linear or int8_weight_linear (`kind`) on the chosen backend.

    The native kernel takes `native_weight()` (packed weight and
    compensation, or the row-major weight); the other backends take the
    row-major int8 weight. Each is built only when the backend that needs it
    runs. Every backend takes the epilogue (`activation`, `residual`): the
    native kernel fuses it, the others apply it after the linear.
    """
    extra = (act_bits,) if kind == "int8_linear" else ()  # weight-only has no activation grid
    run = backends.impl("int8", "linear", x)
    fused = activation != "none" or residual is not None or norm[0] != "none"
    epilogue = (activation, residual, *norm) if fused else None
    return run(kind, x, native_weight, rowmajor_weight, w_scale, bias, *extra, epilogue=epilogue)


def _linear_impl(
    x: Tensor,
    packed: Tensor,
    comp: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    act_bits: int,
    activation: str = "none",
    residual: Tensor | None = None,
    norm: str = "none",
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    fn = "pykernels::int8_linear"  # called directly too
    act_bits = check_act_bits(fn, act_bits)
    activation = check_activation(fn, activation)
    _check_residual(fn, residual, x, w_scale.shape[0])
    norm = check_norm(fn, norm, norm_weight, norm_bias, eps, w_scale.shape[0], x.device)

    def unpack() -> Tensor:
        return _layout.int8_unpack_weight(packed, w_scale.shape[0], x.shape[1])

    return _run_linear(
        "int8_linear",
        x,
        lambda: (packed, comp),
        unpack,
        w_scale,
        bias,
        act_bits,
        activation,
        residual,
        (norm, norm_weight, norm_bias, eps),
    )


@torch.library.custom_op("pykernels::int8_linear", mutates_args=())
def _linear_op(
    x: Tensor,
    packed: Tensor,
    comp: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    act_bits: int = 8,
    activation: str = "none",
    residual: Tensor | None = None,
    norm: str = "none",
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    return _linear_impl(
        x,
        packed,
        comp,
        w_scale,
        bias,
        act_bits,
        activation,
        residual,
        norm,
        norm_weight,
        norm_bias,
        eps,
    )


@_linear_op.register_fake
def _(
    x: Tensor,
    packed: Tensor,
    comp: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    act_bits: int = 8,
    activation: str = "none",
    residual: Tensor | None = None,
    norm: str = "none",
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    return x.new_empty(x.shape[0], w_scale.shape[0])


def _linear_rowmajor_impl(
    x: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    act_bits: int,
    activation: str = "none",
    residual: Tensor | None = None,
    norm: str = "none",
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    fn = "pykernels::int8_linear_rowmajor"
    act_bits = check_act_bits(fn, act_bits)
    activation = check_activation(fn, activation)
    _check_residual(fn, residual, x, w_scale.shape[0])
    norm = check_norm(fn, norm, norm_weight, norm_bias, eps, w_scale.shape[0], x.device)

    def pack() -> tuple[Tensor, Tensor]:
        return _pack_op(w)

    return _run_linear(
        "int8_linear",
        x,
        pack,
        lambda: w,
        w_scale,
        bias,
        act_bits,
        activation,
        residual,
        (norm, norm_weight, norm_bias, eps),
    )


@torch.library.custom_op("pykernels::int8_linear_rowmajor", mutates_args=())
def _linear_rowmajor_op(
    x: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    act_bits: int = 8,
    activation: str = "none",
    residual: Tensor | None = None,
    norm: str = "none",
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    return _linear_rowmajor_impl(
        x, w, w_scale, bias, act_bits, activation, residual, norm, norm_weight, norm_bias, eps
    )


@_linear_rowmajor_op.register_fake
def _(
    x: Tensor,
    w: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    act_bits: int = 8,
    activation: str = "none",
    residual: Tensor | None = None,
    norm: str = "none",
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def _weight_linear_impl(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    return _run_linear("int8_weight_linear", x, lambda: (w,), lambda: w, w_scale, bias)


@torch.library.custom_op("pykernels::int8_weight_linear", mutates_args=())
def _weight_linear_op(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    return _weight_linear_impl(x, w, w_scale, bias)


@_weight_linear_op.register_fake
def _(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def _setup(ctx, inputs, output) -> None:  # noqa: ARG001
    pass


torch.library.register_autograd(
    "pykernels::int8_linear", _no_backward("int8_linear"), setup_context=_setup
)
torch.library.register_autograd(
    "pykernels::int8_weight_linear", _no_backward("int8_weight_linear"), setup_context=_setup
)
torch.library.register_autograd(
    "pykernels::int8_linear_rowmajor", _no_backward("int8_linear"), setup_context=_setup
)


def _check_packed(fn: str, w: Int8PackedWeight, name: str = "w_q") -> None:
    """Checks a packed weight: shapes, dtypes and devices always, and (once per
    weight, while its tensors are unchanged) that it is the packing of some
    int8 [n, k] weight: zero padding and the matching compensation, which the
    native kernel relies on and the other backends ignore, so a mismatch would
    give each backend a different answer."""
    if (
        not torch.compiler.is_compiling()  # data pointers do not trace
        and type(w.n) is int  # noqa: E721 - exactly int: a float 20.0 would pass ==
        and type(w.k) is int  # noqa: E721
        and _checks.is_checked((w.packed, w.comp), ("int8-packed", w.n, w.k))
    ):
        return  # this weight passed in full and has not changed since
    n = _checks.check_int(fn, f"{name}.n", w.n, 0)
    k = _checks.check_int(fn, f"{name}.k", w.k, 0, MAX_K - 1)
    np_, kp = _layout.packed_shape(n, k)
    for field, t in (("packed", w.packed), ("comp", w.comp)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name}.{field} must be a torch.Tensor, got {type(t).__name__}")
    if w.packed.dtype != torch.int8:
        raise TypeError(f"{fn}: {name}.packed must be int8, got {w.packed.dtype}")
    if w.comp.dtype != torch.int32:
        raise TypeError(f"{fn}: {name}.comp must be int32, got {w.comp.dtype}")
    if w.packed.shape != (np_ * kp,):
        raise ValueError(
            f"{fn}: {name}.packed must be 1-D of {np_ * kp} elements for [{n}, {k}], "
            f"got shape {tuple(w.packed.shape)}"
        )
    if w.comp.shape != (np_,):
        raise ValueError(f"{fn}: {name}.comp must have shape ({np_},), got {tuple(w.comp.shape)}")
    if w.comp.device != w.packed.device:
        raise ValueError(
            f"{fn}: {name}.comp is on {w.comp.device} but {name}.packed is on {w.packed.device}"
        )
    if not _checks.has_data(w.packed, w.comp) or w.packed.numel() == 0:
        return
    key = ("int8-packed", n, k)
    if _checks.is_checked((w.packed, w.comp), key):
        return
    packed, comp = _pack_reference(_layout.int8_unpack_weight(w.packed, n, k))
    if not torch.equal(packed, w.packed):
        raise ValueError(
            f"{fn}: {name}.packed is not a packed [{n}, {k}] weight (its padding must be zero): "
            "build it with pack_int8_weight"
        )
    if not torch.equal(comp, w.comp):
        raise ValueError(
            f"{fn}: {name}.comp does not match {name}.packed (it must hold 128 * the sum of "
            "each weight row): build it with pack_int8_weight"
        )
    _checks.mark_checked((w.packed, w.comp), key)


def _check_weight(fn: str, w_q: Tensor) -> None:
    if not isinstance(w_q, Tensor):
        raise TypeError(f"{fn}: w_q must be a torch.Tensor, got {type(w_q).__name__}")
    if w_q.dtype != torch.int8:
        raise TypeError(f"{fn}: w_q must be int8, got {w_q.dtype}")
    if w_q.dim() != 2:
        raise ValueError(f"{fn}: w_q must be 2-D [N, K], got shape {tuple(w_q.shape)}")
    if w_q.shape[1] >= MAX_K:
        raise ValueError(
            f"{fn}: K = {w_q.shape[1]} could overflow int32 accumulation (limit {MAX_K})"
        )


def pack_int8_weight(w_q: Tensor) -> Int8PackedWeight:
    """Packs an int8 [N, K] weight once for :func:`int8_linear` (see Int8PackedWeight)."""
    _check_weight("pack_int8_weight", w_q)
    packed, comp = torch.ops.pykernels.int8_pack_weight(w_q)
    n, k = int(w_q.shape[0]), int(w_q.shape[1])
    if _checks.has_data(packed, comp):  # made here: nothing to check
        _checks.mark_checked((packed, comp), ("int8-packed", n, k))
    return Int8PackedWeight(packed, comp, n, k)


def unpack_int8_weight(w: Int8PackedWeight) -> Tensor:
    """The int8 [N, K] weight of a packed weight, exactly as it was packed."""
    if not isinstance(w, Int8PackedWeight):
        raise TypeError(
            f"unpack_int8_weight: w must be an Int8PackedWeight, got {type(w).__name__}"
        )
    _check_packed("unpack_int8_weight", w, "w")
    return _layout.int8_unpack_weight(w.packed, w.n, w.k)


def _check_residual(fn: str, residual: object, x: Tensor, n: int) -> None:
    """residual: None, or a float tensor of the output's shape on x's device."""
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(
            f"{fn}: residual must be a torch.Tensor or None, got {type(residual).__name__}"
        )
    if residual.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{fn}: residual must be a float tensor, got {residual.dtype}")
    want = (*x.shape[:-1], n)
    if tuple(residual.shape) != want:
        raise ValueError(
            f"{fn}: residual must have the output's shape {want}, got {tuple(residual.shape)}"
        )
    if residual.device != x.device:
        raise ValueError(f"{fn}: residual is on {residual.device} but x is on {x.device}")


def _check_linear_args(
    fn: str, x: Tensor, n: int, k: int, device: torch.device, w_scale: Tensor, bias: Tensor | None
) -> Tensor | None:
    """Validates x, w_scale and bias against a weight of shape [n, k]; returns bias as fp32."""
    _checks.check_float_input(fn, x)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{fn}: x must have K = {k} in its last dimension, got {tuple(x.shape)}")
    if not isinstance(w_scale, Tensor):
        raise TypeError(f"{fn}: w_scale must be a torch.Tensor, got {type(w_scale).__name__}")
    if w_scale.dtype != torch.float32:
        raise TypeError(f"{fn}: w_scale must be float32, got {w_scale.dtype}")
    if w_scale.shape != (n,):
        raise ValueError(f"{fn}: w_scale must have shape ({n},), got {tuple(w_scale.shape)}")
    _checks.check_bias(fn, bias, n)
    for name, t in (("x", x), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and t.device != device:
            raise ValueError(f"{fn}: {name} is on {t.device} but the weight is on {device}")
    return None if bias is None else bias.float().contiguous()


def _rows(
    x: Tensor, n: int, k: int, bias32: Tensor | None
) -> tuple[Tensor, tuple[int, ...], Tensor | None]:
    """x as [M, K] with contiguous rows, its leading shape, and the result when
    there is nothing to compute (M = 0 or N = 0; K = 0: an empty sum, so the bias)."""
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(math.prod(lead), k)
    if x2.shape[0] == 0 or n == 0 or k == 0:
        y = x.new_zeros(*lead, n)
        return x2, lead, (y if bias32 is None or k else (y + bias32).to(x.dtype))
    # The kernels read rows of unit stride, one after another: an expanded
    # (zero-stride) or interleaved x is copied first.
    rows_ok = (k <= 1 or x2.stride(1) == 1) and (x2.shape[0] <= 1 or x2.stride(0) >= k)
    return (x2 if rows_ok else x2.contiguous()), lead, None


def int8_linear(
    x: Tensor,
    w_q: Tensor | Int8PackedWeight,
    w_scale: Tensor,
    bias: Tensor | None = None,
    *,
    act_bits: int = 8,
    activation: str | None = None,
    residual: Tensor | None = None,
    norm: str | None = None,
    norm_weight: Tensor | None = None,
    norm_bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Dynamic W8A8 linear: ``norm(act(x @ (w_q * w_scale[:, None]).T + bias) + residual)``
    with x quantized.

    Each row (token) of x is quantized as :func:`quantize_per_row` does, the
    int8 GEMM accumulates exactly in int32, and the result is dequantized by
    ``x_scale[m] * w_scale[n]`` and biased, in one call. ``x``: float32,
    float16 or bfloat16 ``[..., K]``; ``w_q``: int8 ``[N, K]`` or, faster when
    called repeatedly, an :class:`Int8PackedWeight` from
    :func:`pack_int8_weight`; ``w_scale``: float32 ``[N]``; ``bias``: ``[N]``
    or None. Returns ``[..., N]`` in x's dtype. A row of x holding NaN or inf
    gives NaN in that row of the output only. Inference only: no backward.

    ``act_bits=7`` quantizes x on the 7-bit grid of ``quantize_per_row(x,
    bits=7)`` instead: on AVX2 (no VNNI) a multiply-add then takes three
    instructions rather than four, as the peers' 7-bit ``reduce_range`` does,
    for about one bit less on rows that are not one-sided. Same integers and
    results on every backend; elsewhere it is neither faster nor slower.

    ``activation`` (one of :data:`ACTIVATIONS`: ``"relu"``, ``"gelu"`` (exact,
    erf), ``"gelu_tanh"``, ``"silu"``) and ``residual`` (``[..., N]``, added
    after the activation) make the fused epilogue of a transformer block: the
    native CPU kernel applies them to each block of the output while it is in
    cache, in float32, equal to :func:`apply_epilogue` of the unfused result
    up to float rounding (GELU's erf to about 4e-7); other backends run the
    unfused epilogue. Either way it is computed in float32 and rounded once to
    x's dtype.

    ``norm`` (``"layer"`` or ``"rms"``, with ``norm_weight``, ``norm_bias``
    (LayerNorm only) and ``eps``) ends the epilogue where a transformer block
    ends: ``LayerNorm(x W^T + b + residual)`` of a BERT block's output
    projection in one call. The native kernel normalizes each row in a pass
    right after the GEMM (a row is complete only when all its blocks are), in
    float32 with two-pass statistics, equal to ``torch.nn.functional.layer_norm``
    / RMSNorm of the unfused result up to float rounding.
    """
    fn = "int8_linear"
    act_bits = check_act_bits(fn, act_bits)
    activation = check_activation(fn, activation)
    if isinstance(w_q, Int8PackedWeight):
        _check_packed(fn, w_q)
        n, k, device = int(w_q.n), int(w_q.k), w_q.packed.device
    else:
        _check_weight(fn, w_q)
        n, k = w_q.shape
        device = w_q.device
    bias32 = _check_linear_args(fn, x, n, k, device, w_scale, bias)
    _check_residual(fn, residual, x, n)
    norm = check_norm(fn, norm, norm_weight, norm_bias, eps, n, x.device)
    nrm = (norm, norm_weight, norm_bias, float(eps))
    x2, lead, done = _rows(x, n, k, bias32)
    if done is not None:
        return apply_epilogue(done, activation, residual, *nrm)
    r2 = None if residual is None else residual.reshape(x2.shape[0], n)
    skip = backends.skip_dispatcher(x2)
    if isinstance(w_q, Int8PackedWeight):
        op = _linear_impl if skip else torch.ops.pykernels.int8_linear
        y = op(
            x2, w_q.packed, w_q.comp, w_scale.contiguous(), bias32, act_bits, activation, r2, *nrm
        )
    else:
        # Packed inside, and only for the native CPU kernel: other backends
        # (torch ops on a GPU) read the row-major weight as it is.
        op = _linear_rowmajor_impl if skip else torch.ops.pykernels.int8_linear_rowmajor
        y = op(x2, w_q.contiguous(), w_scale.contiguous(), bias32, act_bits, activation, r2, *nrm)
    return y.view(*lead, n)


def int8_weight_linear(
    x: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Weight-only (W8A16) linear: ``x @ (w_q * w_scale[:, None]).T + bias``.

    Activations stay in float; the int8 ``[N, K]`` weight is dequantized in
    registers, so memory traffic is a quarter of fp32's. This is the path for
    one to a few rows (token-by-token decoding); for larger batches the
    dynamic :func:`int8_linear` is much faster. Output in x's dtype.
    Inference only: no backward.
    """
    fn = "int8_weight_linear"
    _check_weight(fn, w_q)
    n, k = w_q.shape
    bias32 = _check_linear_args(fn, x, n, k, w_q.device, w_scale, bias)
    x2, lead, done = _rows(x, n, k, bias32)
    if done is not None:
        return done
    op = (
        _weight_linear_impl
        if backends.skip_dispatcher(x2)
        else torch.ops.pykernels.int8_weight_linear
    )
    y = op(x2, w_q.contiguous(), w_scale.contiguous(), bias32)
    return y.view(*lead, n)


# --- the quantized hand-off between two linears ---------------------------------
# A linear whose only reader is another dynamic int8 linear need not store its
# float output: int8_linear_quantized_out quantizes it per row where it is
# computed, and int8_linear_prequantized consumes (q, scale) as int8_linear
# would have after quantizing that output itself.


def _q8out_native(x, packed, comp, w_scale, bias, act_bits, activation):
    n = w_scale.shape[0]
    q = torch.empty(x.shape[0], n, dtype=torch.int8)
    scale = torch.empty(x.shape[0], dtype=torch.float32)
    backends.native.C.int8_linear_q8out(
        _fbuf(x),
        _layout.DTYPE_CODES[x.dtype],
        packed.numpy(),
        comp.numpy(),
        w_scale.numpy(),
        None if bias is None else bias.numpy(),
        act_bits,
        ACTIVATIONS.index(activation),
        q.numpy(),
        scale.numpy(),
    )
    return q, scale


def _q8out_any(x, packed, comp, w_scale, bias, act_bits, activation):
    y = _linear_impl(x, packed, comp, w_scale, bias, act_bits, activation, None)
    return quantize_per_row(y.float())


def _check_q_range(q: Tensor) -> None:
    if q.numel() and bool((q == -128).any()):
        raise ValueError(
            "int8_linear_prequantized: q: values must lie in [-127, 127] (quantize_per_row's range)"
        )


def _prequantized_native(q, x_scale, packed, comp, w_scale, bias, activation, residual, out_dtype):
    n = w_scale.shape[0]
    fused = activation != "none" or residual is not None
    y = torch.empty(q.shape[0], n, dtype=torch.float32 if fused else out_dtype)
    backends.native.C.int8_linear_prequantized(
        q.numpy(),
        x_scale.numpy(),
        packed.numpy(),
        comp.numpy(),
        w_scale.numpy(),
        None if bias is None else bias.numpy(),
        _fbuf(y),
        _layout.DTYPE_CODES[y.dtype],
        ACTIVATIONS.index(activation),
        None if residual is None else residual.float().contiguous().numpy(),
    )
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _prequantized_any(q, x_scale, packed, comp, w_scale, bias, activation, residual, out_dtype):
    _check_q_range(q)
    w = _layout.int8_unpack_weight(packed, w_scale.shape[0], q.shape[1]).to(q.device)
    acc = int8_gemm(q, w).double()
    y = acc * x_scale.double()[:, None] * w_scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return apply_epilogue(y.float(), activation, residual).to(out_dtype)


backends.register("int8", "linear_q8out", native_cpu=_q8out_native, any=_q8out_any)
backends.register(
    "int8", "linear_prequantized", native_cpu=_prequantized_native, any=_prequantized_any
)


@torch.library.custom_op("pykernels::int8_linear_q8out", mutates_args=())
def _q8out_op(
    x: Tensor,
    packed: Tensor,
    comp: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    act_bits: int = 8,
    activation: str = "none",
) -> tuple[Tensor, Tensor]:
    run = backends.impl("int8", "linear_q8out", x)
    return run(x, packed, comp, w_scale, bias, act_bits, activation)


@_q8out_op.register_fake
def _(x, packed, comp, w_scale, bias, act_bits=8, activation="none"):
    m = x.shape[0]
    return x.new_empty(m, w_scale.shape[0], dtype=torch.int8), x.new_empty(m, dtype=torch.float32)


@torch.library.custom_op("pykernels::int8_linear_prequantized", mutates_args=())
def _prequantized_op(
    q: Tensor,
    x_scale: Tensor,
    packed: Tensor,
    comp: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    activation: str = "none",
    residual: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    run = backends.impl("int8", "linear_prequantized", q)
    return run(q, x_scale, packed, comp, w_scale, bias, activation, residual, out_dtype)


@_prequantized_op.register_fake
def _(q, x_scale, packed, comp, w_scale, bias, activation="none", residual=None, out_dtype=None):
    return q.new_empty(q.shape[0], w_scale.shape[0], dtype=out_dtype or torch.float32)


torch.library.register_autograd(
    "pykernels::int8_linear_q8out", _no_backward("int8_linear_quantized_out"), setup_context=_setup
)
torch.library.register_autograd(
    "pykernels::int8_linear_prequantized",
    _no_backward("int8_linear_prequantized"),
    setup_context=_setup,
)


def int8_linear_quantized_out(
    x: Tensor,
    w_q: Int8PackedWeight,
    w_scale: Tensor,
    bias: Tensor | None = None,
    *,
    act_bits: int = 8,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``quantize_per_row(int8_linear(x, w_q, w_scale, bias, activation=...))`` without
    the float output: ``(q int8 [..., N], scale float32 [...])``.

    For a linear whose output only feeds another dynamic int8 linear (the
    first feed-forward GEMM of a transformer block): the native CPU kernel
    computes a chunk of rows over all of N in per-thread scratch, applies the
    activation and quantizes each row there, so the float activation is never
    written to memory and read back. The integers and scales equal
    :func:`quantize_per_row` of :func:`int8_linear`'s float32 output with the
    same activation. ``w_q`` must be an :class:`Int8PackedWeight`. Pass the
    result to :func:`int8_linear_prequantized`. Inference only.
    """
    fn = "int8_linear_quantized_out"
    act_bits = check_act_bits(fn, act_bits)
    activation = check_activation(fn, activation)
    if not isinstance(w_q, Int8PackedWeight):
        raise TypeError(f"{fn}: w_q must be an Int8PackedWeight (pack_int8_weight)")
    _check_packed(fn, w_q)
    n, k = int(w_q.n), int(w_q.k)
    bias32 = _check_linear_args(fn, x, n, k, w_q.packed.device, w_scale, bias)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(math.prod(lead), k)
    if x2.shape[0] == 0 or n == 0 or k == 0:
        y = int8_linear(x, w_q, w_scale, bias, act_bits=act_bits, activation=activation)
        q, s = quantize_per_row(y.reshape(-1, n).float())
        return q.view(*lead, n), s.view(lead)
    if not ((k <= 1 or x2.stride(1) == 1) and (x2.shape[0] <= 1 or x2.stride(0) >= k)):
        x2 = x2.contiguous()
    op = _q8out_op if backends.skip_dispatcher(x2) else torch.ops.pykernels.int8_linear_q8out
    q, s = op(x2, w_q.packed, w_q.comp, w_scale.contiguous(), bias32, act_bits, activation)
    return q.view(*lead, n), s.view(lead)


def int8_linear_prequantized(
    q: Tensor,
    x_scale: Tensor,
    w_q: Int8PackedWeight,
    w_scale: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = None,
    residual: Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """:func:`int8_linear` of activations already quantized per row: ``q`` int8
    ``[..., K]`` in [-127, 127] and ``x_scale`` float32 ``[...]`` (as
    :func:`quantize_per_row` or :func:`int8_linear_quantized_out` return them).
    ``act(q W^T * x_scale * w_scale + bias) + residual`` in ``out_dtype``; exact
    int32 products as :func:`int8_linear`. Inference only.
    """
    fn = "int8_linear_prequantized"
    activation = check_activation(fn, activation)
    if not isinstance(w_q, Int8PackedWeight):
        raise TypeError(f"{fn}: w_q must be an Int8PackedWeight (pack_int8_weight)")
    _check_packed(fn, w_q)
    n, k = int(w_q.n), int(w_q.k)
    if not isinstance(q, Tensor) or q.dtype != torch.int8:
        raise TypeError(f"{fn}: q must be an int8 tensor, got {getattr(q, 'dtype', type(q))}")
    if q.dim() < 1 or q.shape[-1] != k:
        raise ValueError(f"{fn}: q must have K = {k} in its last dimension, got {tuple(q.shape)}")
    lead = tuple(q.shape[:-1])
    if not isinstance(x_scale, Tensor) or x_scale.dtype != torch.float32:
        raise TypeError(f"{fn}: x_scale must be a float32 tensor")
    if tuple(x_scale.shape) != lead:
        raise ValueError(f"{fn}: x_scale must have shape {lead}, got {tuple(x_scale.shape)}")
    if out_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{fn}: out_dtype must be a float dtype, got {out_dtype}")
    bias32 = _check_linear_args(fn, x_scale.new_empty(0, k), n, k, w_q.packed.device, w_scale, bias)
    _check_residual(fn, residual, q, n)
    q2 = q.reshape(-1, k)
    if q2.shape[0] == 0 or n == 0:
        y = torch.zeros(*lead, n, dtype=out_dtype, device=q.device)
        y = y + (0 if bias32 is None or k else bias32)
        return apply_epilogue(y, activation, residual).to(out_dtype)
    q2 = q2.contiguous()
    r2 = None if residual is None else residual.reshape(q2.shape[0], n)
    op = (
        _prequantized_op
        if backends.skip_dispatcher(q2)
        else torch.ops.pykernels.int8_linear_prequantized
    )
    y = op(
        q2,
        x_scale.reshape(-1).contiguous(),
        w_q.packed,
        w_q.comp,
        w_scale.contiguous(),
        bias32,
        activation,
        r2,
        out_dtype,
    )
    return y.view(*lead, n)


# --- the gated linear of Llama-style MLPs ---------------------------------------
# act(x W_g^T + b_g) * (x W_u^T + b_u): one GEMM over gate and up rows
# interleaved in blocks of 32 (gated_rows(N) rows, zero rows past N), so that
# each 64-column block of its output holds both halves of 32 outputs and the
# native kernel forms the product while the block is in L1 (int8.h,
# linear_dynamic_gated_cpu).

GATE_BLOCK = 32


def gated_rows(n: int) -> int:
    """Rows of the interleaved gate/up weight for ``n`` gated outputs."""
    return (n + GATE_BLOCK - 1) // GATE_BLOCK * 2 * GATE_BLOCK


def _gated_order(n: int) -> Tensor:
    """For each interleaved row, the row of ``cat([W_g, W_u])`` it holds (-1: zero row)."""
    r = torch.arange(gated_rows(n))
    blk, j = r // (2 * GATE_BLOCK), r % (2 * GATE_BLOCK)
    col = blk * GATE_BLOCK + j % GATE_BLOCK
    src = torch.where(j < GATE_BLOCK, col, n + col)
    return torch.where(col < n, src, torch.full_like(src, -1))


class Int8GatedWeight(NamedTuple):
    """Gate and up int8 weights (``[N, K]`` each) interleaved and packed for
    :func:`int8_linear_gated`, with their scales and biases in the same order.
    Build it with :func:`pack_int8_gated_weight`."""

    packed: Tensor
    comp: Tensor
    w_scale: Tensor  # float32 [gated_rows(N)]
    bias: Tensor | None  # float32 [gated_rows(N)] or None
    n: int
    k: int


def pack_int8_gated_weight(
    w_q: Tensor, w_scale: Tensor, bias: Tensor | None = None
) -> Int8GatedWeight:
    """Packs ``w_q = cat([W_g, W_u])`` (int8 ``[2N, K]``, gate rows first), its
    per-row ``w_scale`` (float32 ``[2N]``) and ``bias`` (``[2N]`` or None) for
    :func:`int8_linear_gated`."""
    fn = "pack_int8_gated_weight"
    _check_weight(fn, w_q)
    rows, k = w_q.shape
    if rows % 2:
        raise ValueError(f"{fn}: w_q must stack gate and up rows ([2N, K]), got {rows} rows")
    bias32 = _check_linear_args(fn, w_q.new_empty(0, k).float(), rows, k, w_q.device, w_scale, bias)
    n = rows // 2
    order = _gated_order(n).to(w_q.device)
    keep = order >= 0
    w_i = torch.zeros(gated_rows(n), k, dtype=torch.int8, device=w_q.device)
    s_i = torch.zeros(gated_rows(n), dtype=torch.float32, device=w_q.device)
    w_i[keep] = w_q[order[keep]]
    s_i[keep] = w_scale[order[keep]]
    b_i = None
    if bias32 is not None:
        b_i = torch.zeros(gated_rows(n), dtype=torch.float32, device=w_q.device)
        b_i[keep] = bias32[order[keep]]
    p = pack_int8_weight(w_i)
    return Int8GatedWeight(p.packed, p.comp, s_i, b_i, n, k)


def _gated_native(x, packed, comp, w_scale, bias, n, act_bits, activation):
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    backends.native.C.int8_linear_gated(
        _fbuf(x),
        _layout.DTYPE_CODES[x.dtype],
        packed.numpy(),
        comp.numpy(),
        w_scale.numpy(),
        None if bias is None else bias.numpy(),
        out.numpy(),
        act_bits,
        ACTIVATIONS.index(activation),
    )
    return out


def _gated_product(y: Tensor, n: int, activation: str) -> Tensor:
    """``act(gate) * up`` in float32 from the interleaved linear's ``[M, gated_rows(n)]``
    output (blocks of 32 gate columns, then the 32 up columns of the same outputs)."""
    y = y.float().view(y.shape[0], -1, 2, GATE_BLOCK)
    gate = y[:, :, 0].reshape(y.shape[0], -1)[:, :n]
    up = y[:, :, 1].reshape(y.shape[0], -1)[:, :n]
    return apply_epilogue(gate, activation, None) * up


def _gated_any(x, packed, comp, w_scale, bias, n, act_bits, activation):
    """The unfused gated linear: the interleaved linear on the chosen linear backend,
    then gate and up split apart, the activation and the product in float32."""
    rows, k = w_scale.shape[0], x.shape[1]

    def unpack() -> Tensor:
        return _layout.int8_unpack_weight(packed, rows, k)

    y = _run_linear("int8_linear", x, lambda: (packed, comp), unpack, w_scale, bias, act_bits)
    return _gated_product(y, n, activation)


backends.register("int8", "linear_gated", native_cpu=_gated_native, any=_gated_any)


@torch.library.custom_op("pykernels::int8_linear_gated", mutates_args=())
def _gated_op(
    x: Tensor,
    packed: Tensor,
    comp: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    n: int,
    act_bits: int = 8,
    activation: str = "silu",
) -> Tensor:
    run = backends.impl("int8", "linear_gated", x)
    y = run(x, packed, comp, w_scale, bias, n, act_bits, activation)
    return y if y.dtype == x.dtype else y.to(x.dtype)


@_gated_op.register_fake
def _(x, packed, comp, w_scale, bias, n, act_bits=8, activation="silu"):
    return x.new_empty(x.shape[0], n)


torch.library.register_autograd(
    "pykernels::int8_linear_gated", _no_backward("int8_linear_gated"), setup_context=_setup
)


def int8_linear_gated(
    x: Tensor, w: Int8GatedWeight, *, activation: str = "silu", act_bits: int = 8
) -> Tensor:
    """The gated first half of a Llama-style MLP in one dynamic W8A8 GEMM:
    ``act(x W_g^T + b_g) * (x W_u^T + b_u)``, ``[..., N]`` in x's dtype.

    ``w`` comes from :func:`pack_int8_gated_weight`. x is quantized per row
    once for both halves (as :func:`int8_linear` would quantize it for
    each); the native CPU kernel forms the product in the GEMM's epilogue,
    so the two ``[M, N]`` float intermediates of the unfused path are never
    written. Equal to ``act(int8_linear(x, W_g)) * int8_linear(x, W_u)`` up to
    float rounding (the activation as :func:`apply_epilogue` computes it).
    Inference only.
    """
    fn = "int8_linear_gated"
    act_bits = check_act_bits(fn, act_bits)
    activation = check_activation(fn, activation)
    if not isinstance(w, Int8GatedWeight):
        raise TypeError(
            f"{fn}: w must be an Int8GatedWeight (pack_int8_gated_weight), got {type(w).__name__}"
        )
    n = _checks.check_int(fn, "w.n", w.n, 0)
    k = _checks.check_int(fn, "w.k", w.k, 0, MAX_K - 1)
    rows = gated_rows(n)
    _check_packed(fn, Int8PackedWeight(w.packed, w.comp, rows, k), "w")
    bias32 = _check_linear_args(fn, x, rows, k, w.packed.device, w.w_scale, w.bias)
    x2, lead, done = _rows(x, rows, k, bias32)
    if done is not None:
        if k == 0 and x2.shape[0]:  # an empty sum: the biases alone
            y = _gated_product(done.reshape(-1, rows), n, activation)
            return y.to(x.dtype).view(*lead, n)
        return x.new_zeros(*lead, n)
    op = _gated_op if backends.skip_dispatcher(x2) else torch.ops.pykernels.int8_linear_gated
    y = op(x2, w.packed, w.comp, w.w_scale, bias32, n, act_bits, activation)
    return y.view(*lead, n)
