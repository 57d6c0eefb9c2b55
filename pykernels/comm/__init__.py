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
``import pykernels`` does not import torch.distributed).
"""

from __future__ import annotations

import importlib
from typing import Any

from .codecs import Chain, Codec, Quantize, TopK, aggregate, decode
from .lowrank import LowRank
from .wire import Payload

__all__ = ["Chain", "Codec", "LowRank", "Payload", "Quantize", "TopK", "aggregate", "decode", "ddp"]


def __getattr__(name: str) -> Any:
    if name == "ddp":
        return importlib.import_module(".ddp", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
