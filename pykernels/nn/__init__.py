"""Drop-in compressed layers (Int8Linear, SparseLinear, LowRankLinear) arrive
with their kernel families; see DESIGN.md."""

__all__: list[str] = []
