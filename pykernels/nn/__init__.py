"""Drop-in compressed layers."""

from .int8 import Int8Linear, quantize_int8
from .sparse import SparseLinear, sparsify

__all__ = ["Int8Linear", "SparseLinear", "quantize_int8", "sparsify"]
