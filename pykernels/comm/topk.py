"""Top-k sparsification with error feedback: the TopK codec and its payloads.

Wire body (codec id 1)::

    k u64 | flags u8 | value_dtype u8 | value_codec u8 | index_coding u8
    | width u8 | exceptions u64
    indices: index_coding 0 (gaps): k gaps (index - previous index - 1,
             the first from -1), low `width` bits of each packed
             little-endian, then `exceptions` x u32 positions (ascending)
             and `exceptions` x u32 high parts (gap >> width);
             index_coding 1 (bitmap): ceil(numel / 8) bytes, bit i = index i
    values:  value_codec 0: k values of value_dtype;
             value_codec 1: a quantize body over k float32 values (Chain)

The encoder picks the gap width that minimises the index bytes (exceptions
cost 8 bytes each) and a bitmap where that is smaller.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import ops
from ..ops._checks import FLOAT_DTYPES, check_bool, check_int, check_range
from . import wire
from .base import Codec, _check_same_size, _key, _largest, all_finite, to_dtype
from .quantize import Quantize, dequantize_values
from .wire import Payload

# flag bits
TOPK_APPROX, TOPK_EF = 1, 2

_TOPK = struct.Struct("<QBBBBBQ")

#: dtypes the kept values may travel in (``value_dtype``)
VALUE_DTYPES = FLOAT_DTYPES


class TopK(Codec):
    """Top-k sparsification by magnitude, with error feedback (Stich et al. 2018).

    Args:
        ratio: keep ``round(ratio * numel)`` entries (at least 1), ``0 < ratio <= 1``.
        k: alternatively, keep this many (``min(k, numel)``), ``k >= 1``.
        approx: the sampled-threshold selection of ``pk.ops.topk_sparsify``.
        error_feedback: add what was not sent last time (the residual, kept per
            key in fp32) before selecting, and keep what is not sent now:
            ``x + residual_before == decode(encode(x)) + residual_after``,
            exactly, in fp32, for every tensor dtype and ``value_dtype``.
            A step whose input holds NaN or inf is encoded without it: the
            residual is neither read nor written, and the payload carries
            the step's own largest entries, the non-finite ones first (so the
            receiver's sum is not finite and AMP's GradScaler skips the step).
            An entry whose sum with the residual overflows fp32 is sent as
            inf and leaves 0.
        value_dtype: dtype of the values on the wire (fp32, fp16 or bf16). A
            value beyond what ``value_dtype`` holds, or beyond what decodes to a
            finite value of the tensor's dtype (bf16 values of an fp16 tensor:
            +-65280), is sent saturated and error feedback keeps the rest.

    Payload: indices delta-coded and bit-packed (or a bitmap), values in
    ``value_dtype``: about 1.1 bytes of index per kept entry at 1% density.
    """

    name = "topk"
    wire_id = 1
    payload_params = ("k", "value_dtype", "approx", "error_feedback")
    payload_parts = ("indices", "values")
    _fields = {"residual": torch.float32}

    def __init__(
        self,
        ratio: float | None = None,
        *,
        k: int | None = None,
        approx: bool = False,
        error_feedback: bool = True,
        value_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if (ratio is None) == (k is None):
            raise ValueError("TopK: give exactly one of ratio and k")
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise TypeError(f"TopK: ratio must be a float, got {type(ratio).__name__}")
            if not 0.0 < ratio <= 1.0:  # also rejects NaN
                raise ValueError(f"TopK: ratio must be in (0, 1], got {ratio}")
            ratio = float(ratio)
        if k is not None:
            k = check_range("TopK", "k", check_int("TopK", "k", k), 1)
        if value_dtype not in VALUE_DTYPES:
            raise TypeError(
                f"TopK: value_dtype must be torch.float32, float16 or bfloat16, got {value_dtype}"
            )
        self.ratio, self.k = ratio, k
        self.approx = check_bool("TopK", "approx", approx)
        self.error_feedback = check_bool("TopK", "error_feedback", error_feedback)
        self.value_dtype = value_dtype

    def __repr__(self) -> str:
        size = f"ratio={self.ratio}" if self.ratio is not None else f"k={self.k}"
        vd = str(self.value_dtype).replace("torch.", "")
        return (
            f"TopK({size}, approx={self.approx}, error_feedback={self.error_feedback}, "
            f"value_dtype={vd})"
        )

    @property
    def stateful(self) -> bool:
        return self.error_feedback

    def k_for(self, numel: int) -> int:
        """Entries kept of a tensor of `numel` elements."""
        if numel == 0:
            return 0
        if self.k is not None:
            return min(self.k, numel)
        return min(numel, max(1, round(self.ratio * numel)))

    def _select(self, t: Tensor, key: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """(values in t's dtype, indices, residual or None), residual updated.

        The residual is None when error feedback is off, and for a step whose
        input is not finite, which then leaves it as it was.
        """
        k = self.k_for(t.numel())
        r = None
        if self.error_feedback and all_finite(t):
            r = self._residual(key, t)
        values, idx = ops.topk_sparsify(t, k=k, approx=self.approx, residual=r)
        if r is not None and not all_finite(values):
            # A finite input whose sum with the residual overflowed fp32: those
            # sums rank first, so they are among the values (sent as inf); any
            # not selected must not stay behind either.
            r.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return values, idx, r

    def _wire_values(self, values: Tensor, dtype: torch.dtype) -> Tensor:
        """The kept values (in the tensor's `dtype`) as they travel, in value_dtype."""
        vd = self.value_dtype
        if vd == values.dtype or vd == torch.float32:
            return values.to(vd)
        lim = send_limit(dtype, vd)
        v = values.float()
        # Saturate finite values only: an inf of a non-finite step stays inf.
        return torch.where(torch.isinf(v), v, v.clamp(-lim, lim)).to(vd)

    def encode(self, tensor: Tensor, key: str | None = None) -> Payload:
        """Selects the largest entries of ``tensor (+ residual of key)``."""
        t = self._check_tensor(tensor)
        key = _key(key)
        values, idx, r = self._select(t, key)
        sent = self._wire_values(values, t.dtype)
        if r is not None and sent.dtype not in (t.dtype, torch.float32):
            # What decode does not give back (the rounding to value_dtype, the
            # saturation) stays in the residual: measured against what decode
            # returns, in the tensor's dtype.
            diff = values.float() - to_dtype(sent, t.dtype).float()
            diff = torch.where(torch.isfinite(diff), diff, torch.zeros_like(diff))
            r.view(-1).index_add_(0, idx, diff)
        params = {
            "k": int(idx.numel()),
            "value_dtype": self.value_dtype,
            "approx": self.approx,
            # False for a step encoded without it (a non-finite input).
            "error_feedback": r is not None,
        }
        return Payload("topk", t.dtype, tuple(t.shape), params, {"indices": idx, "values": sent})

    def take_back(self, payload: Payload, key: str | None = None) -> None:
        if not isinstance(payload, Payload):
            raise TypeError(f"take_back: payload must be a Payload, got {type(payload).__name__}")
        if not payload.params.get("error_feedback"):
            return
        r = self._state.get(_key(key), {}).get("residual")
        if r is None:
            return
        _check_same_size(payload, r, key)
        # Only the k sent entries changed: add back what decode gives for them.
        vals = to_dtype(_kept_values(payload.parts["values"], r.device), payload.dtype).float()
        vals = torch.where(torch.isfinite(vals), vals, torch.zeros_like(vals))
        r.view(-1).index_add_(0, payload.parts["indices"].to(r.device), vals)

    # --- payloads ----------------------------------------------------------------
    @classmethod
    def write_body(cls, payload: Payload, out: list) -> None:
        p, q = payload, payload.params
        idx = p.parts["indices"].detach().cpu().numpy().astype(np.int64, copy=False)
        values = p.parts["values"]
        coding, width, gaps = index_plan(idx, p.numel)
        exc_pos = np.flatnonzero(gaps >> width) if coding == 0 else np.zeros(0, dtype=np.int64)
        flags = (TOPK_APPROX if q["approx"] else 0) | (TOPK_EF if q["error_feedback"] else 0)
        nested = isinstance(values, Payload)
        out.append(
            _TOPK.pack(
                q["k"],
                flags,
                wire.DTYPES[q["value_dtype"]],
                int(nested),
                coding,
                width,
                exc_pos.size,
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
            Quantize.write_body(values, out)
        else:
            out.append(wire.raw_bytes(values.to(q["value_dtype"])))

    @classmethod
    def read_body(
        cls, reader: wire.Reader, dtype: torch.dtype, numel: int
    ) -> tuple[dict[str, Any], dict[str, wire.Part]]:
        k, flags, vdt, vcodec, coding, width, n_exc = reader.unpack(_TOPK.format)
        if k > numel:
            raise ValueError(f"payload: topk k = {k} exceeds numel = {numel}")
        if vdt not in wire.DTYPE_OF or wire.DTYPE_OF[vdt] not in VALUE_DTYPES:
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
            raw = reader.array((numel + 7) // 8, "u1", "topk bitmap")
        elif coding == 0:
            if width > 32:
                raise ValueError(f"payload: topk gap width {width} > 32")
            if n_exc > k:
                raise ValueError(f"payload: {n_exc} topk exceptions for k = {k}")
            low = reader.take((k * width + 7) // 8, "topk gaps")
            pos = reader.array(n_exc, "<u4", "topk exception positions")
            high = reader.array(n_exc, "<u4", "topk exception values")
        else:
            raise ValueError(f"payload: unknown topk index coding {coding}")
        value_dtype = wire.DTYPE_OF[vdt]
        if vcodec == 1:
            qp, qparts = Quantize.read_body(reader, torch.float32, k)
            values = Payload("quantize", torch.float32, (k,), qp, qparts)
        else:
            values = wire.host_tensor(reader.values(k, value_dtype, "topk values"), value_dtype)
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
            gaps = wire.unpack_bits(low, k, width).astype(np.int64)
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

    @classmethod
    def decode_payload(cls, payload: Payload, device: torch.device) -> Tensor:
        p = payload
        out = torch.zeros(p.numel, dtype=p.dtype, device=device)
        values = _kept_values(p.parts["values"], device)
        out[p.parts["indices"].to(device)] = to_dtype(values, p.dtype)
        return out.view(p.shape)

    @classmethod
    def add_payloads(
        cls, payloads: Sequence[Payload], out: Tensor, scale: float, overwrite: bool
    ) -> None:
        if overwrite:
            out.zero_()
        dev = out.device
        for p in payloads:
            idx = p.parts["indices"].to(dev)
            vals = _kept_values(p.parts["values"], dev)
            # What decode gives: the values rounded to the tensor's dtype.
            out.index_add_(0, idx, to_dtype(vals, p.dtype).float(), alpha=scale)


@functools.cache
def send_limit(dtype: torch.dtype, value_dtype: torch.dtype) -> float:
    """The largest value of `value_dtype` that decodes to a finite value of `dtype`.

    fp16 values of an fp32 tensor: 65504; bf16 values of an fp16 tensor:
    65280 (bf16's 65536, nearest to 65504, would decode to inf).
    """
    w = torch.tensor(min(_largest(dtype), _largest(value_dtype)), dtype=torch.float64)
    w = w.to(value_dtype)
    while not (bool(torch.isfinite(w)) and bool(torch.isfinite(w.to(dtype)))):
        # One step towards zero: the next smaller 16-bit float's bits.
        w = (w.view(torch.int16) - 1).view(value_dtype)
    return float(w)


def _kept_values(v: wire.Part, device: torch.device) -> Tensor:
    """The kept values on `device`: as sent, or dequantized to fp32 when chained."""
    return dequantize_values(v, device) if isinstance(v, Payload) else v.to(device)


def _bit_length(g: np.ndarray) -> np.ndarray:
    """Exact bit length of non-negative int64 values."""
    with np.errstate(divide="ignore"):
        e = np.frexp(g.astype(np.float64))[1].astype(np.int64)
    # float64 rounding can round g up to the next power of two.
    over = (e > 0) & (np.left_shift(np.int64(1), np.maximum(e - 1, 0)) > g)
    return e - over


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
