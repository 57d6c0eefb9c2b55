"""The plain C ABI through cffi, called from inside Numba's @njit."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

import pykernels as pk

cffi_mod = pytest.importorskip("pykernels._cffi")


@pytest.fixture(scope="module")
def lib():
    from pykernels import _native

    if _native.C is None:
        pytest.skip("installed without native code")
    return cffi_mod.load()  # built with _C, so it must be there


def test_njit_calls_the_native_topk(lib):
    ffi = cffi_mod.ffi
    topk = lib.pk_topk_sparsify_f32
    topk_ef = lib.pk_topk_sparsify_ef_f32

    @numba.njit
    def compress(x, values, indices):
        return topk(
            ffi.from_buffer(x),
            x.size,
            values.size,
            0,
            ffi.from_buffer(values),
            ffi.from_buffer(indices),
        )

    @numba.njit
    def compress_ef(x, r, values, indices):
        return topk_ef(
            ffi.from_buffer(x),
            x.size,
            values.size,
            0,
            ffi.from_buffer(r),
            ffi.from_buffer(values),
            ffi.from_buffer(indices),
        )

    rng = np.random.default_rng()
    x = rng.standard_normal(200_003).astype(np.float32)
    values = np.empty(2000, np.float32)
    indices = np.empty(2000, np.int64)
    assert compress(x, values, indices) == 0
    v, i = pk.ops.topk_sparsify(torch.from_numpy(x), k=2000)
    assert np.array_equal(indices, i.numpy()) and np.array_equal(values, v.numpy())

    r = rng.standard_normal(x.size).astype(np.float32)
    r_torch = torch.from_numpy(r.copy())
    assert compress_ef(x, r, values, indices) == 0
    v, i = pk.ops.topk_sparsify(torch.from_numpy(x), k=2000, residual=r_torch)
    assert np.array_equal(indices, i.numpy()) and np.array_equal(r, r_torch.numpy())


def test_errors_are_codes_with_a_message(lib):
    ffi = cffi_mod.ffi
    x = np.ones(10, np.float32)
    out_v, out_i = np.empty(20, np.float32), np.empty(20, np.int64)
    rc = lib.pk_topk_sparsify_f32(
        ffi.from_buffer("float[]", x),
        10,
        20,
        0,
        ffi.from_buffer("float[]", out_v),
        ffi.from_buffer("int64_t[]", out_i),
    )
    assert rc == -1 and "k must satisfy" in cffi_mod.last_error()
    assert lib.pk_topk_sparsify(ffi.from_buffer(x), 9, 10, 1, 1, ffi.NULL, ffi.NULL, ffi.NULL) == -1
    assert "dtype" in cffi_mod.last_error()
    assert ffi.string(lib.pk_version()).decode() == pk.__version__
