"""Model-update compression: codecs, a self-describing wire format, DDP hooks.

Codecs turn a model update (a gradient or a weight delta) into a few bytes
and back, with per-tensor state (error feedback, warm start)::

    from pykernels import comm
    codec = comm.TopK(ratio=0.01)          # or comm.Quantize(bits=8), comm.LowRank(rank=4),
                                            # comm.Chain(comm.TopK(0.01), comm.Quantize(8))
    payload = codec.encode(grad, key="layer1.weight")
    blob = payload.to_bytes()              # self-describing, CRC-checked
    dense = codec.decode(comm.Payload.from_bytes(blob))
    total = codec.aggregate([p1, p2, p3])  # sum over workers, no dense copy of each

``comm.ddp`` holds the DDP communication hook (imported on first use, so
``import pykernels`` does not import torch.distributed); ``comm.flower`` the
Flower client mod and strategy wrapper (imported on first use; needs
``flwr``, the ``federated`` extra).
"""

from __future__ import annotations

import importlib
from typing import Any

from .codecs import Chain, Codec, Quantize, TopK, aggregate, decode
from .lowrank import LowRank
from .wire import Payload

__all__ = [
    "Chain",
    "Codec",
    "LowRank",
    "Payload",
    "Quantize",
    "TopK",
    "aggregate",
    "decode",
    "ddp",
    "flower",
]


def __getattr__(name: str) -> Any:
    if name in ("ddp", "flower"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
