"""The ``torch`` backend: each family written with torch ops that run on the
tensor's own device (CUDA, or any other), so data never leaves it.

Tensor-level functions, one module per family, the same names as the native
and Numba functions they stand in for. It is the default for non-CPU tensors
while the native CUDA kernels are opt-in (see ``pykernels.backends``); tests
force it on CPU tensors and compare it with the reference.
"""
