"""Codecs: turn a model update into a :class:`~pykernels.comm.wire.Payload` and back.

Every codec has the same interface, stateful per named tensor (error-feedback
residuals, warm-start factors, rounding-noise counters)::

    payload = codec.encode(tensor, key="layer1.weight")
    dense = codec.decode(payload)              # needs no encoder state
    total = codec.aggregate([p1, p2, p3])      # sum of decoded updates
    sd = codec.state_dict(); codec.load_state_dict(sd)

``state_dict`` is flat, ``{"<key>/<field>": Tensor}``, so it fits
``torch.save``, safetensors, or a Flower ``ArrayRecord`` as it is.

Each codec lives in its own module (:mod:`.topk`, :mod:`.quantize`,
:mod:`.lowrank`, :mod:`.chain`, :mod:`.dense`) with its wire body; the base
class, the registry hook and decode / aggregate are in :mod:`.base`. This
module gathers them, as it did when they all lived here, and importing it
registers every built-in codec.
"""

from __future__ import annotations

# The private helpers too (_TOPK_DTYPES, _check_*, _key, _mix): other modules
# imported them from here while they were defined here.
from ..ops._checks import FLOAT_DTYPES as _TOPK_DTYPES  # noqa: F401
from ..ops._checks import check_bool as _check_bool  # noqa: F401
from ..ops._checks import check_int as _check_int  # noqa: F401
from .base import Codec, _key, _mix, aggregate, decode, key_hash, sum_into  # noqa: F401
from .chain import Chain
from .dense import Dense
from .lowrank import LowRank
from .quantize import Quantize
from .topk import TopK
from .wire import Payload

__all__ = [
    "Chain",
    "Codec",
    "Dense",
    "LowRank",
    "Payload",
    "Quantize",
    "TopK",
    "aggregate",
    "decode",
    "key_hash",
    "sum_into",
]
