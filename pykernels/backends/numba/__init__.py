"""Numba fallbacks, one module per family, same signatures as the C++ family."""
