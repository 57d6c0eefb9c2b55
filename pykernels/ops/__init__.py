"""The functional API, one module per kernel family."""

from .topk import topk_densify, topk_sparsify

__all__ = ["topk_densify", "topk_sparsify"]
