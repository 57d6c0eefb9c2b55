"""The payload of a compressed update and its self-describing wire format.

A :class:`Payload` is what a codec's ``encode`` returns: which codec made it,
the original dtype and shape, the codec's parameters, and its parts (tensors,
or for :class:`~pykernels.comm.Chain` a nested payload). ``to_bytes`` gives
the blob for the wire; ``Payload.from_bytes`` needs nothing else to rebuild
it, and ``decode`` needs no encoder state.

Format, version 1 (all integers little-endian)::

    magic "PKCM" | version u8 | codec u8 | dtype u8 | ndim u8 | shape: ndim x u64
    body (by codec)
    CRC-32 (zlib) of everything before it: u32

The codec byte is a registered codec class's ``wire_id`` (:data:`CODECS`:
dense 0, topk 1, quantize 2, lowrank 3), the dtype byte a code of
:data:`DTYPES`. Each codec's body is laid out in its own module
(:mod:`~pykernels.comm.dense`, :mod:`~pykernels.comm.topk`,
:mod:`~pykernels.comm.quantize`, :mod:`~pykernels.comm.lowrank`), next to
the code that writes and reads it. Parsing checks the CRC, then every count
against the bytes actually present before it allocates anything; a shape may
claim at most ``max_numel`` elements.
"""

from __future__ import annotations

import importlib
import math
import struct
import sys
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import Tensor

from .. import _layout, ops

if TYPE_CHECKING:
    from .base import Codec

MAGIC = b"PKCM"
VERSION = 1
MAX_NDIM = 32
DEFAULT_MAX_NUMEL = 1 << 31

# Filled in as codec classes are defined (see register): name <-> wire id.
CODECS: dict[str, int] = {}
CODEC_NAMES: dict[int, str] = {}
_CLASSES: dict[str, type[Codec]] = {}

# The package's one dtype table: the header's dtype byte is the kernels' code.
DTYPES = _layout.DTYPE_CODES
DTYPE_OF = _layout.TORCH_DTYPE
_NP_OF = {torch.float32: "<f4", torch.float16: "<u2", torch.bfloat16: "<u2", torch.float64: "<f8"}
_VIEW_OF = {
    torch.float32: torch.float32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.float64,
}
_SHORT = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}

_HEAD = struct.Struct("<4sBBBB")

if sys.byteorder != "little":  # pragma: no cover - every supported platform is
    raise ImportError("pykernels.comm's wire format assumes a little-endian host")

Part = Union[Tensor, "Payload"]


class Payload:
    """One compressed tensor: codec, parameters, original dtype and shape, and parts.

    Attributes:
        codec: the name of a registered codec class (``"dense"``, ``"topk"``,
            ``"quantize"``, ``"lowrank"``, or one registered since), whose
            class writes, reads, decodes and sums payloads of this kind.
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
        if isinstance(shape, (str, bytes)) or not isinstance(shape, (tuple, list, torch.Size)):
            raise TypeError(f"Payload: shape must be a tuple of ints, got {type(shape).__name__}")
        for d in shape:
            if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
                raise ValueError(f"Payload: shape must hold non-negative ints, got {tuple(shape)}")
        for what, m in (("params", params), ("parts", parts)):
            if not isinstance(m, Mapping):
                raise TypeError(f"Payload: {what} must be a mapping, got {type(m).__name__}")
        # Checked here, where a payload is made, rather than as a KeyError deep
        # in to_bytes or decode: the codec class says what its payloads carry.
        kind = _CLASSES[codec]
        for what, names, m in (
            ("params", kind.payload_params, params),
            ("parts", kind.payload_parts, parts),
        ):
            lacking = [n for n in names if n not in m]
            if lacking:
                raise ValueError(
                    f"Payload: a {codec} payload needs {what} {list(names)}; missing {lacking}"
                )
        for name, part in parts.items():
            if not isinstance(part, (Tensor, Payload)):
                raise TypeError(
                    f"Payload: part {name!r} must be a tensor (or a nested Payload), "
                    f"got {type(part).__name__}"
                )
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
            codec_class(self.codec).write_body(self, chunks)
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
        of more than ``max_numel`` elements (counting only the non-zero
        dimensions of an empty shape). TypeError for a `max_numel` that is not
        an int.
        """
        if isinstance(max_numel, bool) or not isinstance(max_numel, (int, np.integer)):
            raise TypeError(
                f"Payload.from_bytes: max_numel must be an int, got {type(max_numel).__name__}"
            )
        if max_numel < 0:
            raise ValueError(f"Payload.from_bytes: max_numel must be >= 0, got {max_numel}")
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
        r = Reader(buf, _HEAD.size, len(buf) - 4)
        shape = r.unpack(f"<{ndim}Q")
        # A 0 in the shape makes numel 0 whatever the other dimensions are, but
        # torch still multiplies them (and fails past int64): so the non-zero
        # dimensions must fit the limit too.
        extent = math.prod(d for d in shape if d)
        if extent > max_numel:
            numel = math.prod(shape)
            claim = f"{numel} elements" if numel else f"{extent} in its non-zero dimensions"
            raise ValueError(
                f"payload: shape {tuple(shape)} claims {claim}, more than max_numel={max_numel}"
            )
        numel = math.prod(shape)
        name = CODEC_NAMES[codec]
        kind, dt = codec_class(name), DTYPE_OF[dtype]
        if dt not in kind.dtypes:
            raise ValueError(
                f"payload: {name} payloads decode to {_words(kind.dtypes)}, not {_SHORT[dt]}"
            )
        params, parts = kind.read_body(r, dt, numel)
        if r.pos != r.end:
            raise ValueError(f"payload: {r.end - r.pos} unexpected bytes after the {name} body")
        payload = cls(name, dt, tuple(shape), params, parts)
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


def _words(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [_SHORT.get(d, str(d)) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


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


class Reader:
    """Bounds-checked cursor over the body of a blob, handed to a codec's ``read_body``.

    A reader takes every section (checking its length against the bytes
    present) before it builds any tensor from them, so that a forged count
    fails before it allocates.
    """

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
        """`count` values of NumPy `dtype` (``"<f4"``, ``"u1"``), a view of the blob."""
        size = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(count * size, what), dtype=dtype, count=count)

    def values(self, count: int, dtype: torch.dtype, what: str) -> np.ndarray:
        """`count` values of a wire dtype (a key of DTYPES), for :func:`host_tensor`."""
        return self.array(count, _NP_OF[dtype], what)


def host_tensor(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A CPU tensor of `dtype` from little-endian data (16-bit floats as uint16)."""
    t = torch.from_numpy(np.array(a, dtype=a.dtype.newbyteorder("="), copy=True))
    if dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).view(dtype)
    return t


def raw_bytes(t: Tensor) -> np.ndarray:
    """A host array of the tensor's bytes (16-bit floats as int16), no copy on the host."""
    t = t.detach().contiguous().cpu()
    return t.view(_VIEW_OF.get(t.dtype, t.dtype)).numpy().reshape(-1).view(np.uint8)


def pack_bits(v: np.ndarray, width: int) -> bytes:
    """The low `width` bits (<= 32) of each value, little-endian, packed."""
    return ops.quant.pack_bits(np.ascontiguousarray(v, dtype=np.uint32), width).tobytes()


def unpack_bits(buf: Any, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: `count` values as uint32."""
    return ops.quant.unpack_bits(buf, count, width)


# --- the registry ------------------------------------------------------------


def register(cls: type[Codec]) -> type[Codec]:
    """Makes `cls` the codec that writes, reads, decodes and sums payloads named ``cls.name``.

    Called for every :class:`~pykernels.comm.Codec` subclass that sets its
    own ``wire_id``, when the class is defined. A name or id already taken by
    another class is refused: blobs already written would change meaning. A
    class of the same module and name replaces its earlier definition (a
    reloaded module, a notebook cell run again).
    """
    name, wid = cls.__dict__.get("name"), cls.__dict__.get("wire_id")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__}: a codec with a wire_id needs its own name (a str)")
    if isinstance(wid, bool) or not isinstance(wid, int) or not 0 <= wid <= 255:
        raise ValueError(f"{cls.__qualname__}: wire_id must be an int in [0, 255], got {wid!r}")
    for other in (_CLASSES.get(name), _CLASSES.get(CODEC_NAMES.get(wid, ""))):
        if other is not None and not _same(other, cls):
            raise ValueError(
                f"{cls.__qualname__}: codec {name!r} / wire id {wid} is taken by "
                f"{other.__module__}.{other.__qualname__} ({other.name!r}, id {other.wire_id})"
            )
    for old in [n for n, c in _CLASSES.items() if _same(c, cls)]:
        CODEC_NAMES.pop(CODECS.pop(old))
        del _CLASSES[old]
    CODECS[name], CODEC_NAMES[wid], _CLASSES[name] = wid, name, cls
    return cls


def _same(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def codec_class(name: str) -> type[Codec]:
    """The registered codec class for a payload's ``codec`` name."""
    try:
        return _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r} (registered: {sorted(CODECS)})") from None


# Names this module had before each codec's body moved into the codec's own
# module; resolved on first use, since those modules import this one.
_MOVED = {
    "index_plan": "topk",
    "TOPK_APPROX": "topk",
    "TOPK_EF": "topk",
    "QUANT_STOCHASTIC": "quantize",
    "QUANT_EF": "quantize",
    "LOWRANK_WARM": "lowrank",
    "LOWRANK_EF": "lowrank",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
