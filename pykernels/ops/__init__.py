"""The functional API, one module per kernel family."""

from .int8 import int8_gemm, quantize_per_row
from .topk import topk_densify, topk_sparsify

__all__ = ["int8_gemm", "quantize_per_row", "topk_densify", "topk_sparsify"]
