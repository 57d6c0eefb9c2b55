"""Bucketed absmax quantization (QSGD-like): the Quantize codec and its payloads.

Wire body (codec id 2; also TopK's values when chained)::

    bits u8 | flags u8 | bucket u32 | seed u64
    | scales: ceil(numel / bucket) x f32 | codes: ceil(numel * bits / 8) bytes
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import ops
from ..ops._checks import check_bool, check_int, check_range
from . import wire
from .base import Codec, _key, _mix, all_finite, key_hash, to_dtype
from .wire import Payload

# flag bits
QUANT_STOCHASTIC, QUANT_EF = 1, 2

_QUANT = struct.Struct("<BBIQ")
_QUANT_LIMIT = {8: 127, 4: 7, 2: 1}


def _seed(owner: str, seed: Any) -> int:
    return check_range(owner, "seed", check_int(owner, "seed", seed), 0, ops.quant.MAX_SEED)


class Quantize(Codec):
    """Bucketed absmax quantization to 8, 4 or 2 bits (QSGD-like, one scale per bucket).

    Args:
        bits: 8, 4 or 2 (levels -127..127, -7..7, -1..1 times the bucket's scale).
        stochastic: unbiased stochastic rounding (``E[decode(encode(x))] == x``)
            from a counter-based generator; else round to nearest.
        bucket: elements per fp32 scale, ``1 <= bucket <= 2**20``.
        error_feedback: keep the quantization error per key and add it next time:
            ``x + residual_before == decode(encode(x)) + residual_after`` within
            one fp32 rounding, measured against what decode returns in the
            tensor's dtype. A step whose input holds NaN or inf is quantized
            without it (the residual is left as it was; its buckets decode to
            NaN, so AMP's GradScaler sees the step); a finite input whose sum
            with the residual overflows gets NaN for that bucket and leaves 0.
        seed: base of the rounding noise. Each encode of a key draws a fresh
            seed from (seed, key, the key's call count), so runs are
            reproducible; ``encode(..., seed=s)`` fixes it for one call.

    Payload: ``ceil(numel * bits / 8)`` bytes of codes plus 4 bytes per bucket.
    """

    name = "quantize"
    wire_id = 2
    payload_params = ("bits", "bucket", "stochastic", "error_feedback", "seed")
    payload_parts = ("codes", "scales")
    fixed_size = True  # a function of the shape and the bucket size only
    _fields = {"residual": torch.float32, "step": torch.int64}

    def __init__(
        self,
        bits: int = 8,
        *,
        stochastic: bool = True,
        bucket: int = 512,
        error_feedback: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        bits = check_int("Quantize", "bits", bits)
        if bits not in ops.quant.BITS:
            raise ValueError(f"Quantize: bits must be 8, 4 or 2, got {bits}")
        self.bits = bits
        self.stochastic = check_bool("Quantize", "stochastic", stochastic)
        bucket = check_int("Quantize", "bucket", bucket)
        self.bucket = check_range("Quantize", "bucket", bucket, 1, ops.quant.MAX_BUCKET)
        self.error_feedback = check_bool("Quantize", "error_feedback", error_feedback)
        self.seed = _seed("Quantize", seed)

    def __repr__(self) -> str:
        return (
            f"Quantize(bits={self.bits}, stochastic={self.stochastic}, bucket={self.bucket}, "
            f"error_feedback={self.error_feedback}, seed={self.seed})"
        )

    @property
    def stateful(self) -> bool:
        return self.error_feedback or self.stochastic

    @property
    def noise_seed(self) -> int | None:
        return self.seed

    @noise_seed.setter
    def noise_seed(self, seed: int) -> None:
        self.seed = _seed("Quantize", seed)

    def nbytes_for(self, numel: int, ndim: int = 1) -> int:
        """Exact payload bytes of a tensor of `numel` elements and `ndim` dimensions."""
        return (
            8
            + 8 * ndim
            + 14
            + 4 * ops.quant.num_buckets(numel, self.bucket)
            + (ops.quant.packed_bytes(numel, self.bits))
            + 4
        )

    def _next_seed(self, key: str) -> int:
        fields = self._state.setdefault(key, {})
        step = fields.get("step")
        n = 0 if step is None else int(step)
        fields["step"] = torch.tensor(n + 1, dtype=torch.int64)
        return _mix(self.seed, key_hash(key), n)

    def encode(self, tensor: Tensor, key: str | None = None, seed: int | None = None) -> Payload:
        """Quantizes ``tensor (+ residual of key)``; ``seed`` overrides the drawn one."""
        t = self._check_tensor(tensor)
        key = _key(key)
        if seed is None:
            seed = self._next_seed(key) if self.stochastic else 0
        else:
            seed = _seed("Quantize.encode", seed)
        # A non-finite input is quantized without the residual, which it leaves
        # as it was (the kernel would zero the residual of its buckets).
        r = self._residual(key, t) if self.error_feedback and all_finite(t) else None
        codes, scales = ops.quantize_buckets(t, self.bits, self.bucket, self.stochastic, seed, r)
        if r is not None:
            self._settle(r, codes, scales, t.dtype)
        params = {
            "bits": self.bits,
            "bucket": self.bucket,
            "stochastic": self.stochastic,
            "error_feedback": r is not None,
            "seed": seed,
        }
        return Payload(
            "quantize", t.dtype, tuple(t.shape), params, {"codes": codes, "scales": scales}
        )

    def _settle(self, r: Tensor, codes: Tensor, scales: Tensor, dtype: torch.dtype) -> None:
        """Makes the kernel's residual ``x + r - decode(payload)`` for what decode returns.

        The kernel leaves ``x + r`` minus the fp32 dequantized values; decode
        rounds those to the tensor's dtype, so for fp16 and bf16 the rounding
        goes into the residual too.
        """
        lim = _QUANT_LIMIT[self.bits]
        top = float(scales.max()) * lim if scales.numel() else 0.0
        if dtype != torch.float32 or not math.isfinite(top):
            dq = ops.dequantize_buckets(codes, scales, r.numel(), self.bits, self.bucket)
            diff = dq - to_dtype(dq, dtype).float()
            r.view(-1).add_(torch.where(torch.isfinite(diff), diff, torch.zeros_like(diff)))
        if not math.isfinite(top):
            # Levels of a bucket whose absmax is near fp32's limit can round to
            # inf (x + r - inf); a residual must stay finite.
            r.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    # --- payloads ----------------------------------------------------------------
    @classmethod
    def write_body(cls, payload: Payload, out: list) -> None:
        q = payload.params
        flags = (QUANT_STOCHASTIC if q["stochastic"] else 0) | (
            QUANT_EF if q["error_feedback"] else 0
        )
        out.append(_QUANT.pack(q["bits"], flags, q["bucket"], q["seed"]))
        out.append(wire.raw_bytes(payload.parts["scales"].float()))
        out.append(wire.raw_bytes(payload.parts["codes"]))

    @classmethod
    def read_body(
        cls, reader: wire.Reader, dtype: torch.dtype, numel: int
    ) -> tuple[dict[str, Any], dict[str, wire.Part]]:
        bits, flags, bucket, seed = reader.unpack(_QUANT.format)
        if bits not in _QUANT_LIMIT:
            raise ValueError(f"payload: quantize bits must be 8, 4 or 2, got {bits}")
        if not 1 <= bucket <= (1 << 20):
            raise ValueError(f"payload: quantize bucket must be in [1, 2^20], got {bucket}")
        if flags & ~(QUANT_STOCHASTIC | QUANT_EF):
            raise ValueError(f"payload: unknown quantize flags {flags:#x}")
        nb = -(-numel // bucket)
        scales = reader.array(nb, "<f4", "quantize scales")
        codes = reader.array((numel * bits + 7) // 8, "u1", "quantize codes")
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
        parts = {
            "codes": wire.host_tensor(codes, torch.uint8),
            "scales": wire.host_tensor(scales, torch.float32),
        }
        return params, parts

    @classmethod
    def decode_payload(cls, payload: Payload, device: torch.device) -> Tensor:
        p = payload
        out = torch.empty(p.shape, dtype=torch.float32, device=device)
        ops.dequantize_buckets(
            p.parts["codes"].to(device),
            p.parts["scales"].to(device),
            bits=p.params["bits"],
            bucket=p.params["bucket"],
            out=out,
        )
        return to_dtype(out, p.dtype)

    @classmethod
    def add_payloads(
        cls, payloads: Sequence[Payload], out: Tensor, scale: float, overwrite: bool
    ) -> None:
        dev = out.device
        for j, p in enumerate(payloads):
            scales = p.parts["scales"].to(dev)
            ops.dequantize_buckets(
                p.parts["codes"].to(dev),
                scales if scale == 1.0 else scales * scale,
                bits=p.params["bits"],
                bucket=p.params["bucket"],
                out=out,
                # The first payload writes over what `out` held: a pass over memory less.
                accumulate=not (overwrite and j == 0),
            )


def dequantize_values(p: Payload, device: torch.device) -> Tensor:
    """The flat fp32 values of a quantize payload (TopK's values when chained)."""
    return ops.dequantize_buckets(
        p.parts["codes"].to(device),
        p.parts["scales"].to(device),
        p.numel,
        p.params["bits"],
        p.params["bucket"],
    )


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
