"""Codecs: turn a model update into a :class:`~pykernels.comm.wire.Payload` and back.

Every codec has the same interface, stateful per named tensor (error-feedback
residuals, warm-start factors, rounding-noise counters)::

    payload = codec.encode(tensor, key="layer1.weight")
    dense = codec.decode(payload)              # needs no encoder state
    total = codec.aggregate([p1, p2, p3])      # sum of decoded updates
    sd = codec.state_dict(); codec.load_state_dict(sd)

``state_dict`` is flat, ``{"<key>/<field>": Tensor}``, so it fits
``torch.save``, safetensors, or a Flower ``ArrayRecord`` as it is.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import ops
from .wire import Payload

_TOPK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_M64 = (1 << 64) - 1


def _mix(*words: int) -> int:
    """A 63-bit seed from integers (splitmix64 over each), stable across processes."""
    z = 0
    for w in words:
        z = ((z ^ (w & _M64)) + 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        z ^= z >> 31
    return z >> 1


def key_hash(key: str) -> int:
    """A hash of a state key that is the same in every process (unlike ``hash``)."""
    return zlib.crc32(key.encode())


def _check_bool(owner: str, name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(v).__name__}")
    return v


def _check_int(owner: str, name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{owner}: {name} must be {bound}, got {v}")
    return v


def _key(key: str | None) -> str:
    if key is None:
        return ""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    return key


class Codec:
    """Base class: per-key state, the shared decode / aggregate, state_dict."""

    name = "codec"
    #: state fields this codec keeps per key, and their dtypes
    _fields: dict[str, torch.dtype] = {}

    def __init__(self) -> None:
        self._state: dict[str, dict[str, Tensor]] = {}

    # --- interface -------------------------------------------------------------
    def encode(self, tensor: Tensor, key: str | None = None) -> Payload:
        raise NotImplementedError

    def decode(self, payload: Payload) -> Tensor:
        """The dense tensor a payload carries, in its original shape and dtype."""
        return decode(payload)

    def aggregate(self, payloads: Sequence[Payload]) -> Tensor:
        """The sum of the payloads' decoded tensors, computed without a dense copy of each."""
        return aggregate(payloads)

    @property
    def stateful(self) -> bool:
        """Whether encode keeps state per key (then checkpoint it with state_dict)."""
        return False

    def check(self, dtype: torch.dtype, device: torch.device | str) -> None:
        """Raises TypeError / ValueError when this codec cannot encode such tensors."""
        del device
        if dtype not in _TOPK_DTYPES:
            raise TypeError(
                f"{type(self).__name__} encodes float32, float16 or bfloat16 tensors, not {dtype}"
            )

    # --- state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``{"<key>/<field>": tensor}`` of everything encode remembers."""
        return {f"{k}/{f}": t for k, fields in self._state.items() for f, t in fields.items()}

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Replaces the state with one from :meth:`state_dict` (of a codec like this one)."""
        owner = f"{type(self).__name__}.load_state_dict"
        state: dict[str, dict[str, Tensor]] = {}
        for name, t in state_dict.items():
            if not isinstance(name, str) or "/" not in name:
                raise ValueError(f"{owner}: entry {name!r} is not '<key>/<field>'")
            key, field = name.rsplit("/", 1)
            if field not in self._fields:
                raise ValueError(
                    f"{owner}: {type(self).__name__} keeps no {field!r} state "
                    f"(it keeps {sorted(self._fields) or 'none'})"
                )
            if not isinstance(t, Tensor):
                raise TypeError(f"{owner}: {name} must be a tensor, got {type(t).__name__}")
            if t.dtype != self._fields[field]:
                raise TypeError(f"{owner}: {name} must be {self._fields[field]}, got {t.dtype}")
            self._validate_state(owner, name, field, t)
            state.setdefault(key, {})[field] = t.detach().clone()
        self._state = state

    def _validate_state(self, owner: str, name: str, field: str, t: Tensor) -> None:
        """Codec-specific checks of one loaded state tensor."""

    def reset(self, key: str | None = None) -> None:
        """Forgets the state of one key, or of all keys."""
        if key is None:
            self._state.clear()
        else:
            self._state.pop(key, None)

    def keys(self) -> list[str]:
        """The keys this codec holds state for."""
        return list(self._state)

    # --- helpers ---------------------------------------------------------------
    def _residual(self, key: str, t: Tensor) -> Tensor:
        """The fp32 error-feedback residual of `key`, created (zeros) on first use."""
        fields = self._state.setdefault(key, {})
        r = fields.get("residual")
        if r is None:
            r = fields["residual"] = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        elif r.shape != t.shape:
            if r.numel() != t.numel():
                raise ValueError(
                    f"{type(self).__name__}: the state of key {key!r} is for shape "
                    f"{tuple(r.shape)}, got a tensor of shape {tuple(t.shape)}; "
                    "give each tensor its own key="
                )
            r = fields["residual"] = r.view(t.shape)
        if r.device != t.device:
            r = fields["residual"] = r.to(t.device)
        return r

    def _check_tensor(self, t: Any) -> Tensor:
        if not isinstance(t, Tensor):
            raise TypeError(f"{type(self).__name__}.encode: tensor must be a torch.Tensor")
        self.check(t.dtype, t.device)
        return t.detach()


class TopK(Codec):
    """Top-k sparsification by magnitude, with error feedback (Stich et al. 2018).

    Args:
        ratio: keep ``round(ratio * numel)`` entries (at least 1), ``0 < ratio <= 1``.
        k: alternatively, keep this many (``min(k, numel)``), ``k >= 1``.
        approx: the sampled-threshold selection of ``pk.ops.topk_sparsify``.
        error_feedback: add what was not sent last time (the residual, kept per
            key in fp32) before selecting, and keep what is not sent now:
            ``x + residual_before == decode(encode(x)) + residual_after``,
            exactly, in fp32.
        value_dtype: dtype of the values on the wire (fp32, fp16 or bf16);
            fp16 values saturate at +-65504 (error feedback keeps the rest).

    Payload: indices delta-coded and bit-packed (or a bitmap), values in
    ``value_dtype``: about 1.1 bytes of index per kept entry at 1% density.
    """

    name = "topk"
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
            k = _check_int("TopK", "k", k, 1)
        if value_dtype not in _TOPK_DTYPES:
            raise TypeError(
                f"TopK: value_dtype must be torch.float32, float16 or bfloat16, got {value_dtype}"
            )
        self.ratio, self.k = ratio, k
        self.approx = _check_bool("TopK", "approx", approx)
        self.error_feedback = _check_bool("TopK", "error_feedback", error_feedback)
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
        """(values in t's dtype, indices, residual or None), residual updated."""
        k = self.k_for(t.numel())
        r = self._residual(key, t) if self.error_feedback else None
        values, idx = ops.topk_sparsify(t, k=k, approx=self.approx, residual=r)
        return values, idx, r

    def encode(self, tensor: Tensor, key: str | None = None) -> Payload:
        """Selects the largest entries of ``tensor (+ residual of key)``."""
        t = self._check_tensor(tensor)
        key = _key(key)
        values, idx, r = self._select(t, key)
        sent = values
        if self.value_dtype != t.dtype:
            v = values
            if self.value_dtype == torch.float16 and t.dtype != torch.float16:
                v = v.float().clamp(-65504.0, 65504.0)  # in fp32: bf16 cannot hold 65504
            sent = v.to(self.value_dtype)
            lossless = self.value_dtype == torch.float32
            if r is not None and not lossless:
                # What the rounding to value_dtype dropped stays in the residual
                # (exactly representable: the low bits of the value).
                back = sent.to(t.dtype).float()
                diff = values.float() - back
                diff = torch.where(torch.isfinite(diff), diff, torch.zeros_like(diff))
                r.view(-1).index_add_(0, idx, diff)
        params = {
            "k": int(idx.numel()),
            "value_dtype": self.value_dtype,
            "approx": self.approx,
            "error_feedback": self.error_feedback,
        }
        return Payload("topk", t.dtype, tuple(t.shape), params, {"indices": idx, "values": sent})


class Quantize(Codec):
    """Bucketed absmax quantization to 8, 4 or 2 bits (QSGD-like, one scale per bucket).

    Args:
        bits: 8, 4 or 2 (levels -127..127, -7..7, -1..1 times the bucket's scale).
        stochastic: unbiased stochastic rounding (``E[decode(encode(x))] == x``)
            from a counter-based generator; else round to nearest.
        bucket: elements per fp32 scale, ``1 <= bucket <= 2**20``.
        error_feedback: keep the quantization error per key and add it next time.
        seed: base of the rounding noise. Each encode of a key draws a fresh
            seed from (seed, key, the key's call count), so runs are
            reproducible; ``encode(..., seed=s)`` fixes it for one call.

    Payload: ``ceil(numel * bits / 8)`` bytes of codes plus 4 bytes per bucket.
    """

    name = "quantize"
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
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise TypeError(f"Quantize: bits must be an int, got {type(bits).__name__}")
        if bits not in ops.quant.BITS:
            raise ValueError(f"Quantize: bits must be 8, 4 or 2, got {bits}")
        self.bits = bits
        self.stochastic = _check_bool("Quantize", "stochastic", stochastic)
        self.bucket = _check_int("Quantize", "bucket", bucket, 1, ops.quant.MAX_BUCKET)
        self.error_feedback = _check_bool("Quantize", "error_feedback", error_feedback)
        self.seed = _check_int("Quantize", "seed", seed, 0, ops.quant.MAX_SEED)

    def __repr__(self) -> str:
        return (
            f"Quantize(bits={self.bits}, stochastic={self.stochastic}, bucket={self.bucket}, "
            f"error_feedback={self.error_feedback}, seed={self.seed})"
        )

    @property
    def stateful(self) -> bool:
        return self.error_feedback or self.stochastic

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
            seed = _check_int("Quantize.encode", "seed", seed, 0, ops.quant.MAX_SEED)
        r = self._residual(key, t) if self.error_feedback else None
        codes, scales = ops.quantize_buckets(t, self.bits, self.bucket, self.stochastic, seed, r)
        params = {
            "bits": self.bits,
            "bucket": self.bucket,
            "stochastic": self.stochastic,
            "error_feedback": self.error_feedback,
            "seed": seed,
        }
        return Payload(
            "quantize", t.dtype, tuple(t.shape), params, {"codes": codes, "scales": scales}
        )


class Chain(Codec):
    """A sparsifier whose kept values are compressed again: ``Chain(TopK(0.01), Quantize(8))``.

    The first codec must be :class:`TopK`, the second a :class:`Quantize`
    without error feedback of its own: with the first's error feedback on,
    the quantization error of the sent values goes into its residual too.
    """

    name = "chain"

    def __init__(self, first: Codec, second: Codec) -> None:
        super().__init__()
        if not isinstance(first, TopK):
            raise TypeError(f"Chain: first must be a TopK codec, got {type(first).__name__}")
        if not isinstance(second, Quantize):
            raise TypeError(f"Chain: second must be a Quantize codec, got {type(second).__name__}")
        if second.error_feedback:
            raise ValueError(
                "Chain: the second codec must not keep its own error feedback (the kept "
                "entries change every call); the first codec's error feedback covers its error"
            )
        self.first, self.second = first, second

    def __repr__(self) -> str:
        return f"Chain({self.first!r}, {self.second!r})"

    @property
    def stateful(self) -> bool:
        return self.first.stateful or self.second.stateful

    def encode(self, tensor: Tensor, key: str | None = None, seed: int | None = None) -> Payload:
        """TopK's entries of ``tensor``, their values quantized (``seed``: see Quantize.encode)."""
        t = self.first._check_tensor(tensor)
        key = _key(key)
        values, idx, r = self.first._select(t, key)
        q = self.second.encode(values, key=key, seed=seed)
        nested = Payload("quantize", torch.float32, (values.numel(),), q.params, q.parts)
        if r is not None and values.numel():
            sent = decode(nested)
            diff = values.float() - sent
            diff = torch.where(torch.isfinite(diff), diff, torch.zeros_like(diff))
            r.view(-1).index_add_(0, idx, diff)
        params = {
            "k": int(idx.numel()),
            "value_dtype": torch.float32,
            "approx": self.first.approx,
            "error_feedback": self.first.error_feedback,
        }
        return Payload("topk", t.dtype, tuple(t.shape), params, {"indices": idx, "values": nested})

    def state_dict(self) -> dict[str, Tensor]:
        sd = {f"first.{k}": v for k, v in self.first.state_dict().items()}
        sd.update({f"second.{k}": v for k, v in self.second.state_dict().items()})
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        parts: dict[str, dict[str, Tensor]] = {"first": {}, "second": {}}
        for name, t in state_dict.items():
            head, _, rest = str(name).partition(".")
            if head not in parts:
                raise ValueError(
                    f"Chain.load_state_dict: entry {name!r} starts with neither 'first.' "
                    "nor 'second.'"
                )
            parts[head][rest] = t
        self.first.load_state_dict(parts["first"])
        self.second.load_state_dict(parts["second"])

    def reset(self, key: str | None = None) -> None:
        self.first.reset(key)
        self.second.reset(key)

    def keys(self) -> list[str]:
        return list(dict.fromkeys(self.first.keys() + self.second.keys()))

    def check(self, dtype: torch.dtype, device: torch.device | str) -> None:
        self.first.check(dtype, device)


# --- decoding ------------------------------------------------------------------


def _values_f32(v: Tensor | Payload, device: torch.device) -> Tensor:
    if isinstance(v, Payload):
        return ops.dequantize_buckets(
            v.parts["codes"].to(device),
            v.parts["scales"].to(device),
            v.numel,
            v.params["bits"],
            v.params["bucket"],
        )
    return v.to(device).float()


def _device_of(p: Payload) -> torch.device:
    for t in p.parts.values():
        if isinstance(t, Tensor):
            return t.device
        return _device_of(t)
    return torch.device("cpu")


def decode(payload: Payload, device: torch.device | str | None = None) -> Tensor:
    """The dense tensor of a payload (any codec's), in its original shape and dtype.

    ``device``: where to put it (default: where the payload's tensors are).
    """
    if not isinstance(payload, Payload):
        raise TypeError(f"decode: expected a Payload, got {type(payload).__name__}")
    dev = torch.device(device) if device is not None else _device_of(payload)
    p = payload
    if p.codec == "dense":
        return p.parts["data"].to(dev, p.dtype).reshape(p.shape)
    if p.codec == "quantize":
        out = torch.empty(p.shape, dtype=torch.float32, device=dev)
        ops.dequantize_buckets(
            p.parts["codes"].to(dev),
            p.parts["scales"].to(dev),
            bits=p.params["bits"],
            bucket=p.params["bucket"],
            out=out,
        )
        return out.to(p.dtype)
    if p.codec == "topk":
        out = torch.zeros(p.numel, dtype=p.dtype, device=dev)
        v = p.parts["values"]
        values = _values_f32(v, dev) if isinstance(v, Payload) else v.to(dev)
        out[p.parts["indices"].to(dev)] = values.to(p.dtype)
        return out.view(p.shape)
    if p.codec == "lowrank":
        m = p.parts["p"].to(dev).float() @ p.parts["q"].to(dev).float().T
        return m.to(p.dtype).reshape(p.shape)
    raise ValueError(f"decode: unknown codec {p.codec!r}")  # pragma: no cover


def sum_into(
    payloads: Iterable[Payload], out: Tensor, scale: float = 1.0, overwrite: bool = False
) -> Tensor:
    """Adds ``scale`` times each payload's decoded tensor to ``out``, in order.

    ``out``: fp32, flat, the payloads' numel. ``overwrite``: ``out`` holds
    garbage; it is zeroed first, or, when every payload is quantized,
    written by the first one (a pass over memory less).
    """
    payloads = list(payloads)
    dev = out.device
    if overwrite and not (payloads and all(p.codec == "quantize" for p in payloads)):
        out.zero_()
    lowrank: list[Payload] = []
    for j, p in enumerate(payloads):
        if p.codec == "dense":
            out.add_(p.parts["data"].to(dev).reshape(-1).float(), alpha=scale)
        elif p.codec == "quantize":
            scales = p.parts["scales"].to(dev)
            ops.dequantize_buckets(
                p.parts["codes"].to(dev),
                scales if scale == 1.0 else scales * scale,
                bits=p.params["bits"],
                bucket=p.params["bucket"],
                out=out,
                accumulate=not (overwrite and j == 0),
            )
        elif p.codec == "topk":
            idx = p.parts["indices"].to(dev)
            v = p.parts["values"]
            vals = _values_f32(v, dev) if isinstance(v, Payload) else v.to(dev)
            # What decode gives: the values rounded to the tensor's dtype.
            out.index_add_(0, idx, vals.to(p.dtype).float(), alpha=scale)
        elif p.codec == "lowrank":
            lowrank.append(p)
    if lowrank:
        # One product of rank (workers x r): sum_i P_i Q_i^T = [P_1 .. P_w] [Q_1 .. Q_w]^T.
        rows, cols = lowrank[0].params["rows"], lowrank[0].params["cols"]
        if any((q.params["rows"], q.params["cols"]) != (rows, cols) for q in lowrank):
            raise ValueError("aggregate: lowrank payloads of different matrix shapes")
        pc = torch.cat([q.parts["p"].to(dev).float() for q in lowrank], dim=1)
        qc = torch.cat([q.parts["q"].to(dev).float() for q in lowrank], dim=1)
        out.view(rows, cols).addmm_(pc, qc.T, alpha=scale)
    return out


def aggregate(payloads: Sequence[Payload], device: torch.device | str | None = None) -> Tensor:
    """Sum of the decoded tensors of several payloads (e.g. one per worker).

    All must decode to one shape and dtype. The sum is accumulated in fp32,
    payload by payload in the order given (so every process that aggregates
    the same payloads gets the same bits), without a dense tensor per payload:
    sparse values are added at their indices, quantized codes are
    dequantized into the sum, low-rank factors are multiplied once for all.
    """
    payloads = list(payloads)
    if not payloads:
        raise ValueError("aggregate: no payloads")
    for p in payloads:
        if not isinstance(p, Payload):
            raise TypeError(f"aggregate: expected Payloads, got {type(p).__name__}")
    first = payloads[0]
    for p in payloads[1:]:
        if p.shape != first.shape or p.dtype != first.dtype:
            raise ValueError(
                f"aggregate: payloads decode to different tensors: {list(first.shape)} "
                f"{first.dtype} and {list(p.shape)} {p.dtype}"
            )
    dev = torch.device(device) if device is not None else _device_of(first)
    out = torch.zeros(first.numel, dtype=torch.float32, device=dev)
    sum_into(payloads, out)
    return out.to(first.dtype).view(first.shape)
