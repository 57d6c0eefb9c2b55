"""cffi binding of the plain C ABI (``libpykernels.so``, csrc/include/pykernels.h).

Numba-compiled code can call these functions from inside ``@njit``: Numba
understands cffi functions of an ``ffi.dlopen`` library and
``ffi.from_buffer(array)``::

    from pykernels.backends.cffi import ffi, load
    lib = load()
    topk = lib.pk_topk_sparsify_f32

    @numba.njit
    def step(x, values, indices):
        return topk(ffi.from_buffer(x), x.size, values.size, 0,
                    ffi.from_buffer(values), ffi.from_buffer(indices))
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import cffi

CDEF = """
int pk_topk_sparsify(const void* x, int dtype, int64_t n, int64_t k, int approx,
                     float* residual, void* values, int64_t* indices);
int pk_topk_sparsify_f32(const float* x, int64_t n, int64_t k, int approx,
                         float* values, int64_t* indices);
int pk_topk_sparsify_ef_f32(const float* x, int64_t n, int64_t k, int approx,
                            float* residual, float* values, int64_t* indices);
const char* pk_last_error(void);
const char* pk_version(void);
"""

ffi = cffi.FFI()
ffi.cdef(CDEF)


def library_path() -> Path:
    return Path(__file__).resolve().parents[1] / "libpykernels.so"


@functools.cache
def load() -> Any:
    """The loaded C library; raises OSError if the package was built without it."""
    path = library_path()
    if not path.exists():
        raise OSError(f"{path} is missing: pykernels was installed without native code")
    return ffi.dlopen(str(path))


def last_error() -> str:
    return ffi.string(load().pk_last_error()).decode()
