"""The uncompressed payload: the tensor itself (what LowRank sends for small tensors).

Wire body (codec id 0)::

    data: numel values of the payload's dtype
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import wire
from .base import Codec, _key
from .wire import Payload


class Dense(Codec):
    """Sends the tensor as it is; the reference the other codecs' bytes are measured against."""

    name = "dense"
    wire_id = 0
    payload_parts = ("data",)
    dtypes = tuple(wire.DTYPES)
    fixed_size = True

    def __repr__(self) -> str:
        return "Dense()"

    def encode(self, tensor: Tensor, key: str | None = None) -> Payload:
        t = self._check_tensor(tensor)
        _key(key)  # no state to key, but a bad key fails here as with every codec
        return Payload("dense", t.dtype, tuple(t.shape), {}, {"data": t.clone()})

    @classmethod
    def write_body(cls, payload: Payload, out: list) -> None:
        out.append(wire.raw_bytes(payload.parts["data"].to(payload.dtype)))

    @classmethod
    def read_body(
        cls, reader: wire.Reader, dtype: torch.dtype, numel: int
    ) -> tuple[dict[str, Any], dict[str, wire.Part]]:
        data = wire.host_tensor(reader.values(numel, dtype, "dense data"), dtype)
        return {}, {"data": data}

    @classmethod
    def decode_payload(cls, payload: Payload, device: torch.device) -> Tensor:
        return payload.parts["data"].to(device, payload.dtype).reshape(payload.shape)

    @classmethod
    def add_payloads(
        cls, payloads: Sequence[Payload], out: Tensor, scale: float, overwrite: bool
    ) -> None:
        if overwrite:
            out.zero_()
        for p in payloads:
            out.add_(p.parts["data"].to(out.device).reshape(-1).float(), alpha=scale)
