"""quant family: bucketed absmax quantization to 8, 4 or 2 bits, packed.

``quantize_buckets`` cuts a flattened tensor into buckets of ``bucket``
elements, gives each one fp32 scale (``max|x| / L``, L = 127, 7 or 1) and
rounds ``x / scale`` stochastically (unbiased) or to nearest; the codes are
bit-packed. ``dequantize_buckets`` is its inverse, and can add into an
existing tensor, which is how several workers' updates are summed without a
dense copy of each. The noise comes from a counter-based generator keyed by
``seed`` and the element index, so every backend (native AVX2 or portable,
Numba, torch ops on any device, reference) gives the same bits. The exact
arithmetic is in ``csrc/quant/quant.h``. These are the hot loops of
:class:`pykernels.comm.Quantize`. CPU tensors run the native kernels; other
devices (CUDA) run the torch backend where the data is.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _layout, backends
from ..backends.reference import quant as _ref
from ..backends.torch import quant as _tq
from . import _checks

BITS = (8, 4, 2)
MAX_BUCKET = 1 << 20  # csrc/quant/quant.h kMaxBucket
MAX_SEED = (1 << 63) - 1  # custom-op ints are int64


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of the packed codes of ``numel`` elements at ``bits`` bits."""
    return (numel * bits + 7) // 8


def num_buckets(numel: int, bucket: int) -> int:
    """Scales (buckets) of ``numel`` elements."""
    return -(-numel // bucket)


def _quantize_torch(flat, code, bits, bucket, stochastic, seed, work, codes, scales):  # noqa: ARG001
    return _tq.quantize_buckets(flat, bits, bucket, stochastic, seed, work)


def _quantize_cpu(fns, flat, code, bits, bucket, stochastic, seed, work, codes, scales):
    args = (stochastic, seed, work, codes, scales)
    backends.host_call(fns.quantize_buckets, backends.Bits(flat), code, bits, bucket, *args)
    return codes, scales


def _dequantize_torch(codes, scales, flat, bits, bucket, accumulate) -> None:
    _tq.dequantize_buckets(codes, scales, flat.numel(), bits, bucket, flat, accumulate)


def _dequantize_cpu(fns, codes, scales, flat, bits, bucket, accumulate) -> None:
    c, s = codes.contiguous(), scales.contiguous()
    backends.host_call(fns.dequantize_buckets, c, s, flat.numel(), bits, bucket, flat, accumulate)


def _host_only(name: str):
    """`name` works on host (NumPy) buffers: the torch backend (forced in tests) runs the
    reference's."""

    def cpu(fns, *args):
        return getattr(fns, name)(*args)

    return {"cpu": cpu, "torch": getattr(_ref, name)}


backends.register("quant", "quantize_buckets", torch=_quantize_torch, cpu=_quantize_cpu)
backends.register("quant", "dequantize_buckets", torch=_dequantize_torch, cpu=_dequantize_cpu)
backends.register("quant", "pack_bits", **_host_only("pack_bits"))
backends.register("quant", "unpack_bits", **_host_only("unpack_bits"))


def _quantize_impl(
    x: Tensor, residual: Tensor | None, bits: int, bucket: int, stochastic: bool, seed: int
) -> tuple[Tensor, Tensor]:
    flat = x.detach().reshape(-1).contiguous()
    n = flat.numel()
    codes = torch.empty(packed_bytes(n, bits), dtype=torch.uint8, device=x.device)
    scales = torch.empty(num_buckets(n, bucket), dtype=torch.float32, device=x.device)
    if n == 0:
        return codes, scales
    work = None if residual is None else residual.detach().reshape(-1)
    if work is not None and not residual.is_contiguous():
        work = work.contiguous()
    code = _layout.DTYPE_CODES[x.dtype]
    run = backends.impl("quant", "quantize_buckets", x)
    codes, scales = run(flat, code, bits, bucket, stochastic, seed, work, codes, scales)
    if work is not None and work.data_ptr() != residual.data_ptr():
        residual.copy_(work.view(residual.shape))
    return codes, scales


@torch.library.custom_op("pykernels::quantize_buckets", mutates_args=())
def _quantize_op(
    x: Tensor, bits: int, bucket: int, stochastic: bool, seed: int
) -> tuple[Tensor, Tensor]:
    return _quantize_impl(x, None, bits, bucket, stochastic, seed)


@_quantize_op.register_fake
def _(x: Tensor, bits: int, bucket: int, stochastic: bool, seed: int) -> tuple[Tensor, Tensor]:
    n = x.numel()
    return (
        x.new_empty(packed_bytes(n, bits), dtype=torch.uint8),
        x.new_empty(num_buckets(n, bucket), dtype=torch.float32),
    )


@torch.library.custom_op("pykernels::quantize_buckets_ef", mutates_args=("residual",))
def _quantize_ef_op(
    x: Tensor, residual: Tensor, bits: int, bucket: int, stochastic: bool, seed: int
) -> tuple[Tensor, Tensor]:
    return _quantize_impl(x, residual, bits, bucket, stochastic, seed)


@_quantize_ef_op.register_fake
def _(
    x: Tensor, residual: Tensor, bits: int, bucket: int, stochastic: bool, seed: int
) -> tuple[Tensor, Tensor]:
    n = x.numel()
    return (
        x.new_empty(packed_bytes(n, bits), dtype=torch.uint8),
        x.new_empty(num_buckets(n, bucket), dtype=torch.float32),
    )


def _dequantize_call(
    codes: Tensor, scales: Tensor, flat: Tensor, bits: int, bucket: int, accumulate: bool
) -> None:
    run = backends.impl("quant", "dequantize_buckets", flat)
    run(codes, scales, flat, bits, bucket, accumulate)


def _dequantize_into(
    codes: Tensor, scales: Tensor, out: Tensor, bits: int, bucket: int, accumulate: bool
) -> None:
    if out.numel() == 0:
        return
    flat = out.view(-1) if out.is_contiguous() else out.reshape(-1).clone()
    _dequantize_call(codes, scales, flat, bits, bucket, accumulate)
    if flat.data_ptr() != out.data_ptr():
        out.copy_(flat.view(out.shape))


@torch.library.custom_op("pykernels::dequantize_buckets", mutates_args=())
def _dequantize_op(codes: Tensor, scales: Tensor, numel: int, bits: int, bucket: int) -> Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=codes.device)
    _dequantize_into(codes, scales, out, bits, bucket, False)
    return out


@_dequantize_op.register_fake
def _(codes: Tensor, scales: Tensor, numel: int, bits: int, bucket: int) -> Tensor:
    return codes.new_empty(numel, dtype=torch.float32)


@torch.library.custom_op("pykernels::dequantize_buckets_into", mutates_args=("out",))
def _dequantize_into_op(
    codes: Tensor, scales: Tensor, out: Tensor, bits: int, bucket: int, accumulate: bool
) -> None:
    _dequantize_into(codes, scales, out, bits, bucket, accumulate)


@_dequantize_into_op.register_fake
def _(codes: Tensor, scales: Tensor, out: Tensor, bits: int, bucket: int, accumulate: bool) -> None:
    return None


def _check_int(fn: str, name: str, v: object, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{fn}: {name} must be in [{lo}, {hi}], got {v}")
    return int(v)


def _check_bits(fn: str, bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{fn}: bits must be an int, got {type(bits).__name__}")
    if bits not in BITS:
        raise ValueError(f"{fn}: bits must be 8, 4 or 2, got {bits}")
    return int(bits)


def quantize_buckets(
    x: Tensor,
    bits: int = 8,
    bucket: int = 512,
    stochastic: bool = True,
    seed: int = 0,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantizes ``x.flatten()`` in buckets to packed ``bits``-bit codes.

    Args:
        x: float32, float16 or bfloat16 tensor, any shape (flattened in
            row-major order); CUDA tensors run on host copies.
        bits: 8, 4 or 2. Levels are ``-L..L`` with L = 127, 7 or 1.
        bucket: elements per scale, ``1 <= bucket <= 2**20``.
        stochastic: round ``x / scale`` up or down at random with the
            probabilities that make the result unbiased; else to nearest even.
        seed: key of the rounding noise, ``0 <= seed < 2**63``. The noise of
            element i depends only on (seed, i): reproducible, and the same on
            every backend and thread count.
        residual: error feedback, float32 of x's numel on x's device. ``x +
            residual`` is quantized and ``residual`` is overwritten with what
            the codes do not carry (0 in a bucket holding NaN or inf).

    Returns:
        ``(codes, scales)``: codes uint8 of ``ceil(numel * bits / 8)`` bytes
        (element i at bit offset ``i * bits``, little-endian), scales float32,
        one per bucket. A bucket of zeros gets scale 0; one holding NaN or inf
        gets scale NaN (it decodes to NaN).
    """
    fn = "quantize_buckets"
    _checks.check_float_input(fn, x)
    bits = _check_bits(fn, bits)
    bucket = _check_int(fn, "bucket", bucket, 1, MAX_BUCKET)
    seed = _check_int(fn, "seed", seed, 0, MAX_SEED)
    if not isinstance(stochastic, bool):
        raise TypeError(f"{fn}: stochastic must be a bool, got {type(stochastic).__name__}")
    if residual is None:
        if backends.skip_dispatcher(x):
            return _quantize_impl(x, None, bits, bucket, stochastic, seed)
        return torch.ops.pykernels.quantize_buckets(x, bits, bucket, stochastic, seed)
    if not isinstance(residual, Tensor):
        raise TypeError(f"{fn}: residual must be a torch.Tensor, got {type(residual).__name__}")
    if residual.dtype != torch.float32:
        raise TypeError(f"{fn}: residual must be float32, got {residual.dtype}")
    if residual.numel() != x.numel():
        raise ValueError(f"{fn}: residual must have x's numel {x.numel()}, got {residual.numel()}")
    if residual.device != x.device:
        raise ValueError(f"{fn}: residual must be on x's device {x.device}, got {residual.device}")
    if backends.skip_dispatcher(x, residual):
        return _quantize_impl(x, residual, bits, bucket, stochastic, seed)
    return torch.ops.pykernels.quantize_buckets_ef(x, residual, bits, bucket, stochastic, seed)


def dequantize_buckets(
    codes: Tensor,
    scales: Tensor,
    numel: int | None = None,
    bits: int = 8,
    bucket: int = 512,
    out: Tensor | None = None,
    accumulate: bool = False,
) -> Tensor:
    """Inverse of :func:`quantize_buckets`: float32 values from codes and scales.

    Args:
        codes: uint8, ``ceil(numel * bits / 8)`` bytes, as quantize_buckets made them.
        scales: float32, ``ceil(numel / bucket)`` entries.
        numel: elements to decode (may be omitted when ``out`` is given).
        bits, bucket: as given to quantize_buckets.
        out: float32 tensor of ``numel`` elements to write into (any shape,
            flattened in row-major order); with ``accumulate=True`` the
            decoded values are added to what it holds.
        accumulate: see ``out``; requires ``out``.

    Returns the 1-D float32 result, or ``out``.
    """
    fn = "dequantize_buckets"
    for name, t, dt in (("codes", codes, torch.uint8), ("scales", scales, torch.float32)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dt:
            raise TypeError(f"{fn}: {name} must be {dt}, got {t.dtype}")
    bits = _check_bits(fn, bits)
    bucket = _check_int(fn, "bucket", bucket, 1, MAX_BUCKET)
    if not isinstance(accumulate, bool):
        raise TypeError(f"{fn}: accumulate must be a bool, got {type(accumulate).__name__}")
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"{fn}: out must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype != torch.float32:
            raise TypeError(f"{fn}: out must be float32, got {out.dtype}")
        if numel is not None and numel != out.numel():
            raise ValueError(f"{fn}: numel {numel} != out.numel() {out.numel()}")
        numel = out.numel()
    elif accumulate:
        raise ValueError(f"{fn}: accumulate=True needs out")
    if numel is None:
        raise ValueError(f"{fn}: give numel or out")
    numel = _check_int(fn, "numel", numel, 0, 1 << 56)
    if codes.numel() != packed_bytes(numel, bits):
        raise ValueError(
            f"{fn}: codes must hold {packed_bytes(numel, bits)} bytes for numel={numel} at "
            f"{bits} bits, got {codes.numel()}"
        )
    if scales.numel() != num_buckets(numel, bucket):
        raise ValueError(
            f"{fn}: scales must hold {num_buckets(numel, bucket)} entries for numel={numel}, "
            f"bucket={bucket}, got {scales.numel()}"
        )
    devices = {codes.device, scales.device} | ({out.device} if out is not None else set())
    if len(devices) != 1:
        raise ValueError(f"{fn}: codes, scales and out must be on one device, got {devices}")
    if out is None:
        if backends.skip_dispatcher():
            result = torch.empty(numel, dtype=torch.float32, device=codes.device)
            _dequantize_into(codes, scales, result, bits, bucket, False)
            return result
        return torch.ops.pykernels.dequantize_buckets(codes, scales, numel, bits, bucket)
    if backends.skip_dispatcher():
        _dequantize_into(codes, scales, out, bits, bucket, accumulate)
    else:
        torch.ops.pykernels.dequantize_buckets_into(codes, scales, out, bits, bucket, accumulate)
    return out


# --- bit packing (the wire format's index gaps) ------------------------------------


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """The low ``width`` bits (0..32) of each value, value i at bit ``i * width``.

    ``values``: 1-D uint32 NumPy array. Returns uint8 of ``ceil(n * width / 8)``
    bytes, little-endian bit order, unused high bits of the last byte 0.
    """
    fn = "pack_bits"
    if not isinstance(values, np.ndarray) or values.dtype != np.uint32 or values.ndim != 1:
        raise TypeError(f"{fn}: values must be a 1-D uint32 NumPy array")
    width = _check_int(fn, "width", width, 0, 32)
    out = np.zeros(packed_bytes(values.size, width), dtype=np.uint8)
    if out.size:
        backends.impl("quant", fn, "cpu")(np.ascontiguousarray(values), width, out)
    return out


def unpack_bits(data: np.ndarray | bytes | memoryview, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` uint32 values from exactly their bytes."""
    fn = "unpack_bits"
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise TypeError(f"{fn}: data must be 1-D uint8")
    count = _check_int(fn, "count", count, 0, 1 << 56)
    width = _check_int(fn, "width", width, 0, 32)
    if buf.size != packed_bytes(count, width):
        raise ValueError(
            f"{fn}: {count} values of {width} bits need {packed_bytes(count, width)} bytes, "
            f"got {buf.size}"
        )
    out = np.zeros(count, dtype=np.uint32)
    if count and width:
        backends.impl("quant", fn, "cpu")(np.ascontiguousarray(buf), count, width, out)
    return out
