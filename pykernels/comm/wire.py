"""The payload of a compressed update and its self-describing wire format.

A :class:`Payload` is what a codec's ``encode`` returns: which codec made it,
the original dtype and shape, the codec's parameters, and its parts (tensors,
or for :class:`~pykernels.comm.Chain` a nested payload). ``to_bytes`` gives
the blob for the wire; ``Payload.from_bytes`` needs nothing else to rebuild
it, and ``decode`` needs no encoder state.

Format, version 1 (all integers little-endian)::

    magic "PKCM" | version u8 | codec u8 | dtype u8 | ndim u8 | shape: ndim x u64
    body (by codec, below)
    CRC-32 (zlib) of everything before it: u32

    dense    data: numel values of dtype
    topk     k u64 | flags u8 | value_dtype u8 | value_codec u8 | index_coding u8
             | width u8 | exceptions u64
             indices: index_coding 0 (gaps): k gaps (index - previous index - 1,
                      the first from -1), low `width` bits of each packed
                      little-endian, then `exceptions` x u32 positions (ascending)
                      and `exceptions` x u32 high parts (gap >> width);
                      index_coding 1 (bitmap): ceil(numel / 8) bytes, bit i = index i
             values:  value_codec 0: k values of value_dtype;
                      value_codec 1: a quantize body over k float32 values
    quantize bits u8 | flags u8 | bucket u32 | seed u64
             | scales: ceil(numel / bucket) x f32 | codes: ceil(numel * bits / 8) bytes
    lowrank  flags u8 | rank u32 | rows u64 | cols u64 | P: rows x rank f32 | Q: cols x rank f32
             (decoded: P @ Q.T, rows * cols == numel)

The encoder picks the gap width that minimises the index bytes (exceptions
cost 8 bytes each) and a bitmap where that is smaller. Parsing checks the
CRC, then every count against the bytes actually present before it
allocates anything; a shape may claim at most ``max_numel`` elements.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from .. import ops

MAGIC = b"PKCM"
VERSION = 1
MAX_NDIM = 32
DEFAULT_MAX_NUMEL = 1 << 31

CODECS = {"dense": 0, "topk": 1, "quantize": 2, "lowrank": 3}
CODEC_NAMES = {v: k for k, v in CODECS.items()}
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
DTYPE_OF = {v: k for k, v in DTYPES.items()}
_NP_OF = {torch.float32: "<f4", torch.float16: "<u2", torch.bfloat16: "<u2", torch.float64: "<f8"}
_VIEW_OF = {
    torch.float32: torch.float32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.float64,
}

# flag bits
TOPK_APPROX, TOPK_EF = 1, 2
QUANT_STOCHASTIC, QUANT_EF = 1, 2
LOWRANK_WARM, LOWRANK_EF = 1, 2

_HEAD = struct.Struct("<4sBBBB")
_TOPK = struct.Struct("<QBBBBBQ")
_QUANT = struct.Struct("<BBIQ")
_LOWRANK = struct.Struct("<BIQQ")

if sys.byteorder != "little":  # pragma: no cover - every supported platform is
    raise ImportError("pykernels.comm's wire format assumes a little-endian host")

Part = Union[Tensor, "Payload"]


class Payload:
    """One compressed tensor: codec, parameters, original dtype and shape, and parts.

    Attributes:
        codec: ``"dense"``, ``"topk"``, ``"quantize"`` or ``"lowrank"``.
        dtype, shape: of the tensor it decodes to.
        params: the codec's parameters that travel on the wire (ints, bools,
            dtypes), e.g. ``{"k": 10000, "value_dtype": torch.float16, ...}``.
        parts: tensors (``indices``, ``values``, ``codes``, ``scales``, ``p``,
            ``q``, ``data``); TopK's ``values`` may be a nested quantize payload.

    ``nbytes`` is the exact length of ``to_bytes()``. A payload is immutable
    once made: its bytes are computed once and cached.
    """

    __slots__ = ("codec", "dtype", "shape", "params", "parts", "_blob")

    def __init__(
        self,
        codec: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        params: Mapping[str, Any],
        parts: Mapping[str, Part],
    ) -> None:
        if codec not in CODECS:
            raise ValueError(f"Payload: codec must be one of {sorted(CODECS)}, got {codec!r}")
        if dtype not in DTYPES:
            raise TypeError(f"Payload: dtype must be a float dtype, got {dtype}")
        self.codec = codec
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)
        self.params = dict(params)
        self.parts = dict(parts)
        self._blob: bytes | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Exact size of :meth:`to_bytes`."""
        return len(self.to_bytes())

    def to_bytes(self) -> bytes:
        """The self-describing blob (format in this module's docstring)."""
        if self._blob is None:
            if len(self.shape) > MAX_NDIM:
                raise ValueError(f"Payload: at most {MAX_NDIM} dimensions, got {len(self.shape)}")
            # The sections as buffers, checksummed in turn and joined once: one
            # allocation and one copy of the data, however large.
            chunks: list = [
                _HEAD.pack(MAGIC, VERSION, CODECS[self.codec], DTYPES[self.dtype], len(self.shape)),
                struct.pack(f"<{len(self.shape)}Q", *self.shape),
            ]
            _WRITERS[self.codec](self, chunks)
            crc = 0
            for c in chunks:
                crc = zlib.crc32(c, crc)
            chunks.append(struct.pack("<I", crc))
            self._blob = b"".join(chunks)
        return self._blob

    @classmethod
    def from_bytes(cls, data: Any, *, max_numel: int = DEFAULT_MAX_NUMEL) -> Payload:
        """Parses and validates a blob from :meth:`to_bytes`.

        ``data``: bytes, bytearray, memoryview, a uint8 NumPy array or a uint8
        CPU tensor. Raises ValueError (before any allocation larger than the
        blob) on a wrong magic number or version, a failed checksum, counts
        that do not match the bytes present, indices out of range, or a shape
        of more than ``max_numel`` elements.
        """
        buf = _as_bytes(data)
        if len(buf) < _HEAD.size + 4:
            raise ValueError(f"payload: {len(buf)} bytes is too short to be a payload")
        magic, version, codec, dtype, ndim = _HEAD.unpack_from(buf, 0)
        if magic != MAGIC:
            raise ValueError(f"payload: bad magic {bytes(magic)!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise ValueError(
                f"payload: format version {version} is not supported (this build reads {VERSION})"
            )
        (crc,) = struct.unpack_from("<I", buf, len(buf) - 4)
        if zlib.crc32(buf[:-4]) != crc:
            raise ValueError("payload: checksum mismatch (truncated or corrupted)")
        if codec not in CODEC_NAMES:
            raise ValueError(f"payload: unknown codec id {codec}")
        if dtype not in DTYPE_OF:
            raise ValueError(f"payload: unknown dtype id {dtype}")
        if ndim > MAX_NDIM:
            raise ValueError(f"payload: {ndim} dimensions (at most {MAX_NDIM})")
        r = _Reader(buf, _HEAD.size, len(buf) - 4)
        shape = r.unpack(f"<{ndim}Q")
        numel = math.prod(shape)
        if numel > max_numel:
            raise ValueError(
                f"payload: shape {tuple(shape)} claims {numel} elements, more than "
                f"max_numel={max_numel}"
            )
        name = CODEC_NAMES[codec]
        p = _READERS[name](r, DTYPE_OF[dtype], numel)
        if r.pos != r.end:
            raise ValueError(f"payload: {r.end - r.pos} unexpected bytes after the {name} body")
        payload = cls(name, DTYPE_OF[dtype], tuple(shape), p[0], p[1])
        # Kept when it cannot change under us; else to_bytes() rebuilds it (the
        # same bytes: every encoding choice is a function of the parts).
        payload._blob = data if isinstance(data, bytes) else None
        return payload

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        dt = str(self.dtype).replace("torch.", "")
        return (
            f"Payload({self.codec}, shape={list(self.shape)}, dtype={dt}"
            + (f", {params}" if params else "")
            + f", nbytes={self.nbytes})"
        )


def _fmt(v: Any) -> str:
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else repr(v)


def _as_bytes(data: Any) -> bytes | memoryview:
    if isinstance(data, (bytes, bytearray)):
        return memoryview(data)
    if isinstance(data, memoryview):
        return data.cast("B")
    if isinstance(data, Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise TypeError(f"payload: a tensor blob must be 1-D uint8, got {data.dtype}")
        data = data.detach().cpu().contiguous().numpy()
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise TypeError(f"payload: an array blob must be 1-D uint8, got {data.dtype}")
        return memoryview(np.ascontiguousarray(data)).cast("B")
    raise TypeError(f"payload: expected bytes, got {type(data).__name__}")


class _Reader:
    """Bounds-checked cursor over the body of a blob."""

    def __init__(self, buf: Any, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise ValueError(
                f"payload: {what} needs {n} bytes, only {self.end - self.pos} remain "
                "(counts inconsistent with the length)"
            )
        out = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size, "header"))

    def array(self, count: int, dtype: str, what: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(count * size, what), dtype=dtype, count=count)


def _tensor(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A CPU tensor of `dtype` from little-endian data (16-bit floats as uint16)."""
    t = torch.from_numpy(np.array(a, dtype=a.dtype.newbyteorder("="), copy=True))
    if dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).view(dtype)
    return t


def _raw(t: Tensor) -> np.ndarray:
    """A host array of the tensor's bytes (16-bit floats as int16), no copy on the host."""
    t = t.detach().contiguous().cpu()
    return t.view(_VIEW_OF.get(t.dtype, t.dtype)).numpy().reshape(-1).view(np.uint8)


# --- dense -------------------------------------------------------------------


def _write_dense(p: Payload, out: list) -> None:
    out.append(_raw(p.parts["data"].to(p.dtype)))


def _read_dense(r: _Reader, dtype: torch.dtype, numel: int):
    data = _tensor(r.array(numel, _NP_OF[dtype], "dense data"), dtype)
    return {}, {"data": data}


# --- quantize ----------------------------------------------------------------

_QUANT_LIMIT = {8: 127, 4: 7, 2: 1}


def _write_quant_body(p: Payload, out: list) -> None:
    q = p.params
    flags = (QUANT_STOCHASTIC if q["stochastic"] else 0) | (QUANT_EF if q["error_feedback"] else 0)
    out.append(_QUANT.pack(q["bits"], flags, q["bucket"], q["seed"]))
    out.append(_raw(p.parts["scales"].float()))
    out.append(_raw(p.parts["codes"]))


def _read_quant_body(r: _Reader, numel: int) -> tuple[dict, dict]:
    bits, flags, bucket, seed = r.unpack(_QUANT.format)
    if bits not in _QUANT_LIMIT:
        raise ValueError(f"payload: quantize bits must be 8, 4 or 2, got {bits}")
    if not 1 <= bucket <= (1 << 20):
        raise ValueError(f"payload: quantize bucket must be in [1, 2^20], got {bucket}")
    if flags & ~(QUANT_STOCHASTIC | QUANT_EF):
        raise ValueError(f"payload: unknown quantize flags {flags:#x}")
    nb = -(-numel // bucket)
    scales = r.array(nb, "<f4", "quantize scales")
    codes = r.array((numel * bits + 7) // 8, "u1", "quantize codes")
    with np.errstate(invalid="ignore"):
        if np.any(scales < 0):
            raise ValueError("payload: negative quantize scale")
    lim = _QUANT_LIMIT[bits]
    per, mask = 8 // bits, (1 << bits) - 1
    full = numel // per
    if _bad_codes(codes[:full], bits):
        raise ValueError(f"payload: quantize code out of range [0, {2 * lim}]")
    if numel % per:
        last = int(codes[full])
        for j in range(per):
            c = (last >> (j * bits)) & mask
            if (j < numel % per and c > 2 * lim) or (j >= numel % per and c):
                raise ValueError("payload: bad quantize code in the last byte")
    params = {
        "bits": bits,
        "bucket": bucket,
        "stochastic": bool(flags & QUANT_STOCHASTIC),
        "error_feedback": bool(flags & QUANT_EF),
        "seed": seed,
    }
    return params, {"codes": _tensor(codes, torch.uint8), "scales": _tensor(scales, torch.float32)}


# The one code each width never uses (2L + 1 = all ones) marks a forged blob.
_ALL_ONES = {8: 0x0101010101010101, 4: 0x1111111111111111, 2: 0x5555555555555555}


def _bad_codes(codes: np.ndarray, bits: int) -> bool:
    """Whether any `bits`-wide field of these bytes is all ones."""
    if bits == 8:
        return bool(codes.size) and int(codes.max()) == 255
    words = codes[: codes.size // 8 * 8].view("<u8")
    ones = np.uint64(_ALL_ONES[bits])
    # In blocks that stay in cache, 8 bytes per element: a field is all ones
    # when its bits ANDed together (shifted onto its lowest bit) are 1.
    for start in range(0, words.size, 1 << 16):
        t = words[start : start + (1 << 16)]
        t = t & (t >> np.uint64(1))
        if bits == 4:
            np.bitwise_and(t, t >> np.uint64(2), out=t)
        if (t & ones).any():
            return True
    tail = codes[codes.size // 8 * 8 :].astype(np.int64)
    mask = (1 << bits) - 1
    return any(((tail >> j) & mask == mask).any() for j in range(0, 8, bits))


def _write_quantize(p: Payload, out: list) -> None:
    _write_quant_body(p, out)


def _read_quantize(r: _Reader, dtype: torch.dtype, numel: int):
    if dtype == torch.float64:
        raise ValueError("payload: quantize payloads decode to fp32, fp16 or bf16, not fp64")
    return _read_quant_body(r, numel)


# --- topk --------------------------------------------------------------------


def _bit_length(g: np.ndarray) -> np.ndarray:
    """Exact bit length of non-negative int64 values."""
    with np.errstate(divide="ignore"):
        e = np.frexp(g.astype(np.float64))[1].astype(np.int64)
    # float64 rounding can round g up to the next power of two.
    over = (e > 0) & (np.left_shift(np.int64(1), np.maximum(e - 1, 0)) > g)
    return e - over


def pack_bits(v: np.ndarray, width: int) -> bytes:
    """The low `width` bits (<= 32) of each value, little-endian, packed."""
    return ops.quant.pack_bits(np.ascontiguousarray(v, dtype=np.uint32), width).tobytes()


def unpack_bits(buf: Any, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: `count` values as uint32."""
    return ops.quant.unpack_bits(buf, count, width)


def index_plan(idx: np.ndarray, numel: int) -> tuple[int, int, np.ndarray]:
    """(coding, width, gaps): the cheapest coding of ascending unique indices."""
    k = idx.size
    gaps = np.diff(idx, prepend=np.int64(-1)) - 1
    if k == 0:
        return 0, 0, gaps
    bl = _bit_length(gaps)
    hist = np.bincount(bl, minlength=65)
    above = np.concatenate([np.cumsum(hist[::-1])[::-1][1:], [0]])  # above[w]: bl > w
    w_min = max(0, int(bl.max()) - 32)  # high parts must fit u32
    costs = [((k * w + 7) // 8 + 8 * int(above[w]), w) for w in range(w_min, 33)]
    cost, width = min(costs)
    if (numel + 7) // 8 < cost:
        return 1, 0, gaps
    return 0, width, gaps


def _write_topk(p: Payload, out: list) -> None:
    q = p.params
    idx = p.parts["indices"].detach().cpu().numpy().astype(np.int64, copy=False)
    values = p.parts["values"]
    coding, width, gaps = index_plan(idx, p.numel)
    exc_pos = np.flatnonzero(gaps >> width) if coding == 0 else np.zeros(0, dtype=np.int64)
    flags = (TOPK_APPROX if q["approx"] else 0) | (TOPK_EF if q["error_feedback"] else 0)
    nested = isinstance(values, Payload)
    out.append(
        _TOPK.pack(
            q["k"], flags, DTYPES[q["value_dtype"]], int(nested), coding, width, exc_pos.size
        )
    )
    if coding == 1:
        bitmap = np.zeros(p.numel, dtype=np.uint8)
        bitmap[idx] = 1
        out.append(np.packbits(bitmap, bitorder="little"))
    else:
        out.append(ops.quant.pack_bits((gaps & ((1 << width) - 1)).astype(np.uint32), width))
        out.append(exc_pos.astype("<u4"))
        out.append((gaps[exc_pos] >> width).astype("<u4"))
    if nested:
        _write_quant_body(values, out)
    else:
        out.append(_raw(values.to(q["value_dtype"])))


def _read_topk(r: _Reader, dtype: torch.dtype, numel: int):
    if dtype == torch.float64:
        raise ValueError("payload: topk payloads decode to fp32, fp16 or bf16, not fp64")
    k, flags, vdt, vcodec, coding, width, n_exc = r.unpack(_TOPK.format)
    if k > numel:
        raise ValueError(f"payload: topk k = {k} exceeds numel = {numel}")
    if vdt not in DTYPE_OF or DTYPE_OF[vdt] == torch.float64:
        raise ValueError(f"payload: bad topk value dtype id {vdt}")
    if vcodec not in (0, 1):
        raise ValueError(f"payload: bad topk value codec {vcodec}")
    if flags & ~(TOPK_APPROX | TOPK_EF):
        raise ValueError(f"payload: unknown topk flags {flags:#x}")
    # Every section is taken (and its length checked) before anything the
    # size of k is allocated.
    if coding == 1:
        if width or n_exc:
            raise ValueError("payload: a topk bitmap has no width or exceptions")
        raw = r.array((numel + 7) // 8, "u1", "topk bitmap")
    elif coding == 0:
        if width > 32:
            raise ValueError(f"payload: topk gap width {width} > 32")
        if n_exc > k:
            raise ValueError(f"payload: {n_exc} topk exceptions for k = {k}")
        low = r.take((k * width + 7) // 8, "topk gaps")
        pos = r.array(n_exc, "<u4", "topk exception positions")
        high = r.array(n_exc, "<u4", "topk exception values")
    else:
        raise ValueError(f"payload: unknown topk index coding {coding}")
    value_dtype = DTYPE_OF[vdt]
    if vcodec == 1:
        qp, qparts = _read_quant_body(r, k)
        values = Payload("quantize", torch.float32, (k,), qp, qparts)
    else:
        values = _tensor(r.array(k, _NP_OF[value_dtype], "topk values"), value_dtype)
    if coding == 1:
        bits = np.unpackbits(raw, bitorder="little")
        if bits[numel:].any():
            raise ValueError("payload: topk bitmap has bits set past the end")
        idx = np.flatnonzero(bits[:numel]).astype(np.int64)
        if idx.size != k:
            raise ValueError(f"payload: topk bitmap holds {idx.size} indices, header says {k}")
    else:
        pos, high = pos.astype(np.int64), high.astype(np.int64)
        if n_exc and (np.any(np.diff(pos) <= 0) or pos[-1] >= k):
            raise ValueError("payload: topk exception positions out of order or range")
        gaps = unpack_bits(low, k, width).astype(np.int64)
        if n_exc:
            if int(high.max()) > (numel >> width):
                raise ValueError("payload: topk index past the end")
            gaps[pos] += high << width
        if k and int(gaps.max()) >= numel:
            raise ValueError("payload: topk index past the end")
        idx = np.cumsum(gaps + 1) - 1
        if k and (idx[-1] >= numel or np.any(np.diff(idx) <= 0)):
            raise ValueError("payload: topk index past the end")
    params = {
        "k": k,
        "value_dtype": value_dtype,
        "approx": bool(flags & TOPK_APPROX),
        "error_feedback": bool(flags & TOPK_EF),
    }
    return params, {"indices": torch.from_numpy(idx), "values": values}


# --- lowrank -----------------------------------------------------------------


def _write_lowrank(p: Payload, out: list) -> None:
    q = p.params
    flags = (LOWRANK_WARM if q["warm_start"] else 0) | (LOWRANK_EF if q["error_feedback"] else 0)
    out.append(_LOWRANK.pack(flags, q["rank"], q["rows"], q["cols"]))
    out.append(_raw(p.parts["p"].float()))
    out.append(_raw(p.parts["q"].float()))


def _read_lowrank(r: _Reader, dtype: torch.dtype, numel: int):
    flags, rank, rows, cols = r.unpack(_LOWRANK.format)
    if rows * cols != numel:
        raise ValueError(f"payload: lowrank {rows} x {cols} does not match numel {numel}")
    if not 1 <= rank <= min(rows, cols):
        raise ValueError(f"payload: lowrank rank {rank} not in [1, min({rows}, {cols})]")
    if flags & ~(LOWRANK_WARM | LOWRANK_EF):
        raise ValueError(f"payload: unknown lowrank flags {flags:#x}")
    pm = r.array(rows * rank, "<f4", "lowrank P")
    qm = r.array(cols * rank, "<f4", "lowrank Q")
    params = {
        "rank": rank,
        "rows": rows,
        "cols": cols,
        "warm_start": bool(flags & LOWRANK_WARM),
        "error_feedback": bool(flags & LOWRANK_EF),
    }
    parts = {
        "p": _tensor(pm, torch.float32).view(rows, rank),
        "q": _tensor(qm, torch.float32).view(cols, rank),
    }
    return params, parts


_WRITERS = {
    "dense": _write_dense,
    "topk": _write_topk,
    "quantize": _write_quantize,
    "lowrank": _write_lowrank,
}
_READERS = {
    "dense": _read_dense,
    "topk": _read_topk,
    "quantize": _read_quantize,
    "lowrank": _read_lowrank,
}
