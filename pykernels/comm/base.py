"""The codec base class, and decode / aggregate over any registered codec's payloads.

A codec class owns one kind of payload end to end: ``encode`` makes it,
``write_body`` / ``read_body`` put it on the wire and back, ``decode_payload``
and ``add_payloads`` turn it into a dense tensor or add it into a sum. Setting
``name`` and ``wire_id`` on the class registers it (:func:`.wire.register`), so
:func:`decode`, :func:`aggregate` and :meth:`.wire.Payload.from_bytes` find it
by the payload's codec name or the blob's codec byte. What the DDP hook needs
to know (``fixed_size``, ``exchange``, ``keeps_tensor_state``, ``noise_seed``)
is said by the class too.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..ops._checks import FLOAT_DTYPES
from . import wire
from .wire import Payload

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


def _key(key: str | None) -> str:
    if key is None:
        return ""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {type(key).__name__}")
    return key


# The exponent bits of each 16-bit float; all ones is inf or NaN.
_EXP16 = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def all_finite(t: Tensor) -> bool:
    """Whether every entry of float tensor `t` is finite.

    One fp32 sum is a cheaper pass than ``isfinite(t).all()`` (no bool
    temporary): it is finite exactly when no entry is NaN or inf, unless
    finite entries overflow it, which the exact check then sorts out. On
    the host it runs in NumPy: a torch reduction wakes torch's OpenMP
    threads, whose spinning then slowed the native kernel that runs next
    (TopK's encode of 6.5M floats went from 26 to 118 ms on 2 cores).
    """
    if t.numel() == 0:
        return True
    if t.device.type != "cpu":
        if bool(torch.isfinite(t.sum(dtype=torch.float32))):
            return True
        return bool(torch.isfinite(t).all())
    t = t.detach()
    if t.dtype in _EXP16:
        bits = t.view(torch.int16).numpy().view(np.uint16)
        exp = _EXP16[t.dtype]
        return not bool(((bits & exp) == exp).any())
    a = t.numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(a.sum(dtype=a.dtype)):
            return True
    return bool(np.isfinite(a).all())


def _largest(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def to_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """`x` in `dtype`, a finite value beyond its range saturated to its largest one.

    A plain ``.to(float16)`` turns 65520 into inf: a decode must not make a
    non-finite value out of a finite one (error feedback keeps the excess).
    NaN and inf stay what they are, so a non-finite step is still seen.
    """
    if x.dtype == dtype or dtype in (torch.float32, torch.float64):
        return x.to(dtype)
    if x.dtype != torch.float32:  # fp16 <-> bf16: each holds values the other cannot
        x = x.float()
    m = _largest(dtype)
    y = x.clamp(-m, m)
    return torch.where(torch.isinf(x), x, y).to(dtype)


def _dtype_words(dtypes: Sequence[torch.dtype]) -> str:
    if set(wire.DTYPES) <= set(dtypes):
        return "floating-point"
    names = [str(d).replace("torch.", "") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


class Codec:
    """Base class: per-key state, the shared decode / aggregate, state_dict.

    Class attributes a codec sets:

    - ``name``, ``wire_id``: the payload kind it owns and its byte on the
      wire; a class that sets ``wire_id`` is registered when it is defined.
      A codec that only composes others (:class:`~pykernels.comm.Chain`)
      sets neither: its payloads are another codec's.
    - ``dtypes``: the tensor dtypes ``encode`` takes and its payloads decode to.
    - ``fixed_size``: every payload of one shape and one configuration has
      the same length (the DDP hook then skips gathering the sizes).
    - ``exchange``: how the DDP hook exchanges it: ``"gather"`` (all-gather
      the blobs, then sum them with :func:`sum_into`) or ``"powersgd"``
      (:class:`~pykernels.comm.LowRank`'s two allreduces of factors).
    - ``batch_sum``: :func:`sum_into` hands all payloads of this kind to
      ``add_payloads`` at once, after the others, even in a mixed list.
    """

    name: ClassVar[str] = "codec"
    wire_id: ClassVar[int | None] = None
    dtypes: ClassVar[tuple[torch.dtype, ...]] = FLOAT_DTYPES
    fixed_size: ClassVar[bool] = False
    exchange: ClassVar[str] = "gather"
    batch_sum: ClassVar[bool] = False
    #: state fields this codec keeps per key, and their dtypes
    _fields: ClassVar[dict[str, torch.dtype]] = {}
    #: the params and parts a payload of this kind must carry (checked by Payload)
    payload_params: ClassVar[tuple[str, ...]] = ()
    payload_parts: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Only a class that names its own id: a subclass of TopK tweaking
        # encode still makes "topk" payloads, read and decoded by TopK.
        if cls.__dict__.get("wire_id") is not None:
            wire.register(cls)

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

    @property
    def keeps_tensor_state(self) -> bool:
        """Whether encode carries tensors shaped like its input from call to call
        (error-feedback residuals, warm-start factors), which a change of DDP's
        bucket layout would misplace."""
        return bool(getattr(self, "error_feedback", False))

    def residual_codec(self) -> Codec | None:
        """The codec (this one or a part) whose ``"residual"`` state is laid out
        like the encoded tensor, for the DDP hook to move when buckets change."""
        return self if getattr(self, "error_feedback", False) else None

    @property
    def noise_seed(self) -> int | None:
        """The seed encode draws its rounding noise from, None when encode takes
        no ``seed=``. The DDP hook and the Flower mod derive a seed per rank or
        node from it, so workers do not share noise."""
        return None

    @noise_seed.setter
    def noise_seed(self, seed: int) -> None:
        raise AttributeError(f"{type(self).__name__} draws no rounding noise")

    def check(self, dtype: torch.dtype, device: torch.device | str) -> None:
        """Raises TypeError / ValueError when this codec cannot encode such tensors."""
        del device
        if dtype not in self.dtypes:
            raise TypeError(
                f"{type(self).__name__} encodes {_dtype_words(self.dtypes)} tensors, not {dtype}"
            )

    # --- the payload kind this class owns (when it has a wire_id) ----------------
    @classmethod
    def write_body(cls, payload: Payload, out: list) -> None:
        """Appends the body of `payload` to `out`, as buffers (bytes, NumPy arrays)."""
        raise NotImplementedError(f"{cls.__name__} writes no payloads")

    @classmethod
    def read_body(
        cls, reader: wire.Reader, dtype: torch.dtype, numel: int
    ) -> tuple[dict[str, Any], dict[str, wire.Part]]:
        """(params, parts) of a body written by :meth:`write_body`; ValueError on a bad one.

        Take every section from `reader` (which checks its length) before
        building anything the size of a count read from the blob.
        """
        raise NotImplementedError(f"{cls.__name__} reads no payloads")

    @classmethod
    def decode_payload(cls, payload: Payload, device: torch.device) -> Tensor:
        """The dense tensor of a payload of this kind, on `device`."""
        raise NotImplementedError(f"{cls.__name__} decodes no payloads")

    @classmethod
    def add_payloads(
        cls, payloads: Sequence[Payload], out: Tensor, scale: float, overwrite: bool
    ) -> None:
        """Adds ``scale`` times each payload's decoded tensor (in its dtype) to ``out``.

        ``out``: fp32, flat. ``overwrite``: ``out`` holds garbage. This one
        decodes each payload densely; codecs override it to add without that.
        """
        if overwrite:
            out.zero_()
        for p in payloads:
            out.add_(cls.decode_payload(p, out.device).reshape(-1).float(), alpha=scale)

    # --- state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``{"<key>/<field>": tensor}`` of everything encode remembers."""
        return {f"{k}/{f}": t for k, fields in self._state.items() for f, t in fields.items()}

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Replaces the state with one from :meth:`state_dict` (of a codec like this one)."""
        owner = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"{owner}: state_dict must be a mapping of '<key>/<field>' to tensors, "
                f"got {type(state_dict).__name__}"
            )
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
        """Checks of one loaded state tensor (a codec adds its own fields' checks)."""
        if field == "residual" and not all_finite(t):
            # A residual is added to every later step of its key: one NaN in it
            # would make every payload of that key non-finite from then on.
            raise ValueError(f"{owner}: {name} holds NaN or inf; a residual must be finite")
        if field == "step" and (t.numel() != 1 or int(t.reshape(())) < 0):
            raise ValueError(
                f"{owner}: {name} must be one non-negative count, got shape {tuple(t.shape)}"
                + (f" = {int(t.reshape(()))}" if t.numel() == 1 else "")
            )

    def take_back(self, payload: Payload, key: str | None = None) -> None:
        """Puts what `payload`, this codec's latest encode of `key`, took out of the
        residual back into it: for a step that nobody applied.

        Afterwards ``residual == x + residual_before`` (for TopK exactly, for the
        others within an fp32 rounding): the step's update is kept for later
        instead of lost. The DDP hook calls it when some rank's payload was
        not finite (so AMP's GradScaler skips the step). Nothing happens for
        a payload made without error feedback (``params["error_feedback"]``
        false: no error feedback configured, or a non-finite step).
        """
        if not isinstance(payload, Payload):
            raise TypeError(f"take_back: payload must be a Payload, got {type(payload).__name__}")
        holder = self.residual_codec()
        if holder is None or not payload.params.get("error_feedback"):
            return
        r = holder._state.get(_key(key), {}).get("residual")
        if r is None:
            return
        _check_same_size(payload, r, key)
        sent = decode(payload, device=r.device).float().reshape(r.shape)
        r.add_(torch.where(torch.isfinite(sent), sent, torch.zeros_like(sent)))

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


# --- decoding ------------------------------------------------------------------


def _device_of(p: Payload) -> torch.device:
    for t in p.parts.values():
        if isinstance(t, Tensor):
            return t.device
        return _device_of(t)
    return torch.device("cpu")


def _check_same_size(payload: Payload, r: Tensor, key: str | None) -> None:
    if not isinstance(payload, Payload):
        raise TypeError(f"take_back: payload must be a Payload, got {type(payload).__name__}")
    if payload.numel != r.numel():
        raise ValueError(
            f"take_back: the payload decodes to {payload.numel} elements, the residual of "
            f"key {key!r} has {r.numel()}: not this key's payload"
        )


def payload_finite(payload: Payload) -> bool:
    """Whether every float part of a payload (nested ones included) is finite.

    Cheap for the compressed kinds (TopK's k values, Quantize's scales, the
    low-rank factors), and enough to know whether the payload decodes to
    finite values: codes and indices are integers.
    """
    for part in payload.parts.values():
        if isinstance(part, Payload):
            if not payload_finite(part):
                return False
        elif isinstance(part, Tensor) and part.is_floating_point() and not all_finite(part):
            return False
    return True


def decode(payload: Payload, device: torch.device | str | None = None) -> Tensor:
    """The dense tensor of a payload (any codec's), in its original shape and dtype.

    ``device``: where to put it (default: where the payload's tensors are).
    """
    if not isinstance(payload, Payload):
        raise TypeError(f"decode: expected a Payload, got {type(payload).__name__}")
    dev = torch.device(device) if device is not None else _device_of(payload)
    return wire.codec_class(payload.codec).decode_payload(payload, dev)


def sum_into(
    payloads: Iterable[Payload], out: Tensor, scale: float = 1.0, overwrite: bool = False
) -> Tensor:
    """Adds ``scale`` times each payload's decoded tensor to ``out``, in order.

    ``out``: fp32, flat, the payloads' numel. ``overwrite``: ``out`` holds
    garbage; it is zeroed first, or, when every payload is quantized,
    written by the first one (a pass over memory less).
    """
    payloads = list(payloads)
    kinds = [wire.codec_class(p.codec) for p in payloads]
    if kinds and all(k is kinds[0] for k in kinds):
        kinds[0].add_payloads(payloads, out, scale, overwrite)
        return out
    if overwrite:
        out.zero_()
    # A mixed list: one payload at a time in order (the same sums, bit for
    # bit, wherever the list is aggregated), batched kinds at the end.
    batches: dict[type[Codec], list[Payload]] = {}
    for kind, p in zip(kinds, payloads, strict=True):
        if kind.batch_sum:
            batches.setdefault(kind, []).append(p)
        else:
            kind.add_payloads([p], out, scale, False)
    for kind, batch in batches.items():
        kind.add_payloads(batch, out, scale, False)
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
