"""The AMX-INT8 tile kernel: bit-exact against the int64 reference and the AVX-512 VNNI path.

Every test here runs only where the OS granted this process AMX tile permission
(``info()["amx_kernels"]`` says so), with packed GEMMs of every row count sent to
the tiles (``set_int8_amx_min_rows(1)``; by default a few rows run VNNI).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels import _native
from pykernels.ops.int8 import MAX_K

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _amx_runs() -> bool:
    return _native.C is not None and _native.C.cpu_info()["isa_detected"] == "amx"


pytestmark = pytest.mark.skipif(not _amx_runs(), reason="no AMX tiles here (see info())")


@pytest.fixture
def tiles(monkeypatch):
    """Native backend, capped at amx, every packed GEMM on tiles; restores both."""
    monkeypatch.setenv("PYKERNELS_BACKEND", "native")
    cap = _native.C.cpu_info()["isa_cap"]
    rows = _native.C.set_int8_amx_min_rows(1)
    _native.C.set_cpu_isa("amx")
    yield
    _native.C.set_cpu_isa(cap)
    _native.C.set_int8_amx_min_rows(rows)


def on_isa(isa: str, fn):
    previous = _native.C.cpu_info()["isa_cap"]
    _native.C.set_cpu_isa(isa)
    try:
        return fn()
    finally:
        _native.C.set_cpu_isa(previous)


def ref_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.long() @ b.long().T).int()


def rand_i8(shape, gen):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)


# With K a multiple of 64 and M < 512, int8_gemm on AMX reads b in place and
# packs a (c^T = b a^T); otherwise from 24 rows of a it packs b. M, N over the
# 32-row tile block and its 16-row halves and the 16-column panel, K around
# the 64-byte tile step (the packed path's tail runs on VNNI).
GEMM_SHAPES = [
    (1, 64, 1),
    (1, 4096, 33),
    (5, 128, 100),
    (16, 256, 32),
    (17, 64, 47),
    (24, 1, 1),
    (24, 64, 16),
    (25, 3, 17),
    (31, 65, 33),
    (32, 128, 64),
    (33, 127, 65),
    (47, 192, 31),
    (64, 1000, 48),
    (100, 4096, 130),
    (257, 320, 513),
    (600, 128, 40),
]


@pytest.mark.parametrize("mkn", GEMM_SHAPES)
def test_gemm_bit_exact(tiles, mkn, gen):
    m, k, n = mkn
    a, b = rand_i8((m, k), gen), rand_i8((n, k), gen)
    # -128 in whole rows and columns, and scattered.
    a[m // 2] = -128
    b[n // 2] = -128
    a[:, k // 2] = -128
    c = pk.ops.int8_gemm(a, b)
    assert torch.equal(c, ref_gemm(a, b))
    assert torch.equal(c, on_isa("avx512", lambda: pk.ops.int8_gemm(a, b)))


@pytest.mark.parametrize("m", [1, 24])
@pytest.mark.parametrize("k", [MAX_K - 1, MAX_K // 64 * 64 - 64])
def test_gemm_all_minus_128_at_the_int32_limit(tiles, m, k):
    """128 * 128 * k still fits in int32; k a multiple of 64 takes the b-in-place path."""
    a = torch.full((m, k), -128, dtype=torch.int8)
    b = torch.full((3, k), -128, dtype=torch.int8)
    b[1] = 127
    c = pk.ops.int8_gemm(a, b)
    assert torch.equal(c, ref_gemm(a, b))
    assert int(c[0, 0]) == 128 * 128 * k


def make(m, k, n, dtype, gen):
    x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
    w = rand_i8((n, k), gen)
    w[0] = -128
    ws = torch.rand(n, generator=gen) * 0.02 + 1e-3
    b = torch.randn(n, generator=gen)
    return x, w, ws, b


LINEAR_SHAPES = [
    (1, 1, 1),
    (1, 4096, 64),
    (3, 63, 17),
    (16, 64, 16),
    (17, 65, 33),
    (32, 200, 70),
    (33, 768, 100),
    (100, 1000, 48),
    (130, 3072, 96),
]


@pytest.mark.parametrize("mkn", LINEAR_SHAPES)
def test_linear_equals_the_avx512_path(tiles, mkn, gen):
    """Same integers and the same epilogue: the outputs are identical, not just close."""
    m, k, n = mkn
    for dtype in DTYPES:
        x, w, ws, b = make(m, k, n, dtype, gen)
        p = pk.ops.pack_int8_weight(w)
        for bias in (b, None):
            y = pk.ops.int8_linear(x, p, ws, bias)
            expected = on_isa("avx512", lambda: pk.ops.int8_linear(x, p, ws, bias))  # noqa: B023
            assert y.dtype == dtype and torch.equal(y, expected)


@pytest.mark.parametrize("m", [1, 7, 16, 33])
def test_linear_integers_are_exact(tiles, m, gen):
    """With unit scales the dequantized output is the int32 GEMM of the integers."""
    k, n = 259, 40
    x = torch.randint(-127, 128, (m, k), generator=gen).float()
    x[:, 0] = 127  # every row's max is 127, so its scale is exactly 1
    w = rand_i8((n, k), gen)
    w[3] = -128
    y = pk.ops.int8_linear(x, w, torch.ones(n))
    assert torch.equal(y, (x.long() @ w.long().T).float())


def test_nonfinite_rows_stay_in_their_row(tiles, gen):
    x, w, ws, b = make(40, 130, 50, torch.float32, gen)
    x[5, 7] = float("nan")
    x[20, 0] = float("inf")
    y = pk.ops.int8_linear(x, w, ws, b)
    assert torch.isnan(y[5]).all() and torch.isnan(y[20]).all()
    ok = [i for i in range(40) if i not in (5, 20)]
    assert torch.isfinite(y[ok]).all()
    assert torch.equal(y[ok], on_isa("avx512", lambda: pk.ops.int8_linear(x, w, ws, b))[ok])


def test_int8_linear_layer_equals_the_avx512_path(tiles, gen):
    lin = nn.Linear(300, 90)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(90, 300, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(90, generator=gen))
    q = pk.nn.Int8Linear.from_linear(lin)
    x = torch.randn(4, 13, 300, generator=gen)
    with torch.no_grad():
        y = q(x)
        expected = on_isa("avx512", lambda: q(x))
        ref = lin(x)
    assert torch.equal(y, expected)
    assert float((y - ref).norm() / ref.norm()) < 2e-2


def test_default_threshold_keeps_results(gen):
    """Rows below int8_amx_min_rows run VNNI, the rest tiles: one answer either way."""
    rows = _native.C.cpu_info()["int8_amx_min_rows"]
    assert rows >= 1
    x, w, ws, b = make(max(rows - 1, 1) + rows, 512, 70, torch.float32, gen)
    p = pk.ops.pack_int8_weight(w)
    for m in (1, max(rows - 1, 1), rows, rows + 1):
        y = pk.ops.int8_linear(x[:m], p, ws, b)
        assert torch.equal(y, on_isa("avx512", lambda: pk.ops.int8_linear(x[:m], p, ws, b)))  # noqa: B023


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_split_blocks_or_rows(tiles, threads, gen):
    """N = 48 is one block of panels, so threads split M (in 32-row steps); N = 700, blocks."""
    previous = _native.C.get_num_threads()
    _native.C.set_num_threads(threads)
    try:
        for n, k in ((48, 2000), (700, 2000), (48, 1024), (700, 1024)):
            a, b = rand_i8((150, k), gen), rand_i8((n, k), gen)
            assert torch.equal(pk.ops.int8_gemm(a, b), ref_gemm(a, b))
    finally:
        _native.C.set_num_threads(previous)


@pytest.mark.parametrize("n", [2000, 2001])
def test_large_fp32_outputs_streamed_past_the_caches(tiles, n, gen):
    """From 8 MiB of fp32 output the tiles write whole lines with streaming stores
    (rows that are not 64-byte aligned, N = 2001, and the column tail fall back)."""
    x, w, ws, b = make(1100, 64, n, torch.float32, gen)
    p = pk.ops.pack_int8_weight(w)
    y = pk.ops.int8_linear(x, p, ws, b)
    assert torch.equal(y, on_isa("avx512", lambda: pk.ops.int8_linear(x, p, ws, b)))
