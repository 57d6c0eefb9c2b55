"""Drop-in compressed layers."""

from .int8 import Int8Linear, quantize_int8

__all__ = ["Int8Linear", "quantize_int8"]
