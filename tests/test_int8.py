"""quantize_per_row / int8_gemm: every backend and ISA against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pykernels as pk
from pykernels import _reference

SHAPES = [(0, 5), (1, 1), (3, 65), (17, 300), (64, 1024)]
GEMM_SHAPES = [(1, 1, 1), (1, 4096, 37), (3, 65, 5), (17, 300, 9), (33, 129, 70), (5, 0, 3)]


def ref_quantize(x: torch.Tensor):
    x2 = x.float().reshape(-1, x.shape[-1]).numpy()
    q = np.empty(x2.shape, np.int8)
    s = np.empty(x2.shape[0], np.float32)
    _reference.quantize_per_row(x2, q, s)
    return torch.from_numpy(q).view(x.shape), torch.from_numpy(s).view(x.shape[:-1])


def ref_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.long() @ b.long().T).int()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_reference(backend, dtype, shape, gen):
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    q, s = pk.ops.quantize_per_row(x)
    rq, rs = ref_quantize(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, rq) and torch.equal(s, rs)
    if x.numel():
        assert int(q.abs().max()) == 127  # the largest entry maps to +-127
        err = (q.float() * s[:, None] - x.float()).abs()
        assert bool((err <= s[:, None] / 2 + 1e-6).all())  # within half a step


def test_quantize_special_rows(backend, gen):
    x = torch.randn(5, 40, generator=gen)
    x[1] = 0.0
    x[2, 7] = float("nan")
    x[3, 3] = float("inf")
    q, s = pk.ops.quantize_per_row(x)
    assert s[1] == 0 and torch.all(q[1] == 0)
    assert torch.isnan(s[2]) and torch.all(q[2] == 0)
    assert torch.isinf(s[3]) and torch.all(q[3] == 0)
    rq, rs = ref_quantize(x)
    assert torch.equal(q, rq)
    assert torch.equal(s[[0, 1, 3, 4]], rs[[0, 1, 3, 4]]) and torch.isnan(rs[2])


def test_quantize_views_and_batches(gen):
    x = torch.randn(4, 6, 50, generator=gen)[:, ::2, 5:45]
    q, s = pk.ops.quantize_per_row(x)
    rq, rs = ref_quantize(x.contiguous())
    assert q.shape == x.shape and s.shape == x.shape[:-1]
    assert torch.equal(q, rq) and torch.equal(s, rs)


@pytest.mark.parametrize("mkn", GEMM_SHAPES)
def test_gemm_exact(backend, mkn, gen):
    m, k, n = mkn
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    c = pk.ops.int8_gemm(a, b)
    assert c.dtype == torch.int32 and c.shape == (m, n)
    assert torch.equal(c, ref_gemm(a, b))


@pytest.mark.parametrize("mkn", [(1, 64, 4), (4, 64, 4), (5, 63, 7), (9, 1000, 13), (128, 512, 64)])
def test_gemm_every_isa(cpu_isa, mkn, gen):
    m, k, n = mkn
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    assert torch.equal(pk.ops.int8_gemm(a, b), ref_gemm(a, b))
    # strided operands (row views of wider buffers)
    wa = torch.randint(-128, 128, (m, k + 9), dtype=torch.int8, generator=gen)
    assert torch.equal(pk.ops.int8_gemm(wa[:, 3 : 3 + k], b), ref_gemm(wa[:, 3 : 3 + k], b))


def test_gemm_at_the_int32_limit(cpu_isa):
    k = pk.ops.int8.MAX_K - 1  # 128 * 128 * k still fits in int32
    a = torch.full((2, k), -128, dtype=torch.int8)
    b = torch.full((3, k), -128, dtype=torch.int8)
    b[1] = 127
    c = pk.ops.int8_gemm(a, b)
    assert torch.equal(c, ref_gemm(a, b))
    assert int(c[0, 0]) == 128 * 128 * k


@pytest.mark.parametrize(
    "a, b, exc, match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int8), TypeError, "a_q must be int8"),
        (
            torch.zeros(2, 3, dtype=torch.int8),
            torch.zeros(3, dtype=torch.int8),
            ValueError,
            "b_q must be 2-D",
        ),
        (
            torch.zeros(2, 3, dtype=torch.int8),
            torch.zeros(2, 4, dtype=torch.int8),
            ValueError,
            "K of a_q",
        ),
        ([[1]], torch.zeros(2, 4, dtype=torch.int8), TypeError, "a_q must be a torch.Tensor"),
        (
            torch.zeros(1, 131072, dtype=torch.int8),
            torch.zeros(1, 131072, dtype=torch.int8),
            ValueError,
            "overflow",
        ),
        (
            torch.zeros(2, 3, dtype=torch.int8),
            torch.zeros(2, 3, dtype=torch.int8, device="meta"),
            ValueError,
            "device",
        ),
    ],
)
def test_gemm_bad_arguments(a, b, exc, match):
    with pytest.raises(exc, match=match):
        pk.ops.int8_gemm(a, b)


def test_quantize_bad_arguments():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        pk.ops.quantize_per_row(torch.zeros(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        pk.ops.quantize_per_row(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        pk.ops.quantize_per_row(np.zeros((2, 2), np.float32))


def test_native_checks_buffers():
    from pykernels import _native

    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    a = np.zeros((2, 3), np.int8)
    with pytest.raises(ValueError, match="K differs"):
        _native.C.int8_gemm(a, np.zeros((2, 4), np.int8), np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="c: expected"):
        _native.C.int8_gemm(a, a, np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match="rows must be contiguous"):
        _native.C.int8_gemm(np.zeros((3, 2), np.int8).T, a, np.zeros((2, 2), np.int32))


def test_opcheck_and_compile(gen):
    a = torch.randint(-128, 128, (7, 40), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (5, 40), dtype=torch.int8, generator=gen)
    torch.library.opcheck(torch.ops.pykernels.int8_gemm.default, (a, b))
    torch.library.opcheck(
        torch.ops.pykernels.quantize_per_row.default, (torch.randn(6, 33, generator=gen),)
    )

    def f(x, w_q):
        q, s = pk.ops.quantize_per_row(x)
        return pk.ops.int8_gemm(q, w_q).float() * s[:, None]

    x = torch.randn(7, 40, generator=gen)
    assert torch.equal(torch.compile(f, fullgraph=True)(x, b), f(x, b))


# --- the 7-bit grid (bits=7, the activations of act_bits=7) ------------------


def ref_quantize7(x: torch.Tensor):
    x2 = x.float().reshape(-1, x.shape[-1]).numpy()
    q = np.empty(x2.shape, np.int8)
    s = np.empty(x2.shape[0], np.float32)
    _reference.quantize_per_row(x2, q, s, 7)
    return torch.from_numpy(q).view(x.shape), torch.from_numpy(s).view(x.shape[:-1])


def grid7_by_hand(row: list[float]) -> tuple[list[int], float]:
    """The 7-bit grid of one row, written out element by element in float32."""
    f = np.float32
    lo, hi = f(min([0.0, *row])), f(max([0.0, *row]))
    s = f(f(hi / f(127)) - f(lo / f(127)))
    if not (s > 0 and np.isfinite(s)):
        return [0] * len(row), s
    zp = min(127.0, max(0.0, float(np.rint(f(-lo / s)))))
    return [int(min(127 - zp, max(-zp, float(np.rint(f(f(v) / s)))))) for v in row], s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (3, 65), (17, 300), (64, 1027)])
def test_quantize7_matches_reference(backend, dtype, shape, gen):
    x = torch.randn(shape, generator=gen) * 3
    if x.numel():
        x[::3] = x[::3].abs()  # one-sided rows (after a ReLU) ...
        x[1::3] = x[1::3] - 2  # ... and rows mostly below zero
    x = x.to(dtype)
    q, s = pk.ops.quantize_per_row(x, bits=7)
    rq, rs = ref_quantize7(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, rq) and torch.equal(s, rs)
    if x.numel():
        span = q.int().amax(dim=1) - q.int().amin(dim=1)
        assert bool((span <= 127).all())  # q + zp fits 7 unsigned bits
        assert bool((q[::3] >= 0).all()) and bool((q[::3].amax(dim=1) == 127).all())
        err = (q.float() * s[:, None] - x.float()).abs()
        assert bool((err <= s[:, None] * 0.5001 + 1e-6).all())  # within half a step


def test_quantize7_by_hand(gen):
    x = torch.randn(6, 37, generator=gen) * 5
    x[0] = x[0].abs()
    x[1] = -x[1].abs()
    x[2, :] = 0.0
    x[2, 5] = -1e-3
    for r in range(x.shape[0]):
        q, s = pk.ops.quantize_per_row(x[r : r + 1], bits=7)
        hq, hs = grid7_by_hand(x[r].tolist())
        assert q[0].tolist() == hq and float(s[0]) == float(hs)


def test_quantize7_special_rows(backend, gen):
    x = torch.randn(7, 40, generator=gen)
    x[1] = 0.0
    x[2, 7] = float("nan")
    x[3, 3] = float("inf")
    x[4, 9] = float("-inf")
    x[5, :20] = 3.0e38  # hi - lo would overflow float32: hi / 127 - lo / 127 does not
    x[5, 20:] = -3.0e38
    q, s = pk.ops.quantize_per_row(x, bits=7)
    assert s[1] == 0 and torch.all(q[1] == 0)
    assert torch.isnan(s[2]) and torch.all(q[2] == 0)
    assert torch.isinf(s[3]) and torch.all(q[3] == 0)
    assert torch.isinf(s[4]) and torch.all(q[4] == 0)
    assert torch.isfinite(s[5]) and int(q[5].max()) - int(q[5].min()) == 127
    rq, rs = ref_quantize7(x)
    assert torch.equal(q, rq)
    keep = [0, 1, 3, 4, 5, 6]
    assert torch.equal(s[keep], rs[keep]) and torch.isnan(rs[2])


def test_quantize7_bad_bits():
    for bits, exc in ((6, ValueError), (9, ValueError), ("7", TypeError), (True, TypeError)):
        with pytest.raises(exc, match="bits"):
            pk.ops.quantize_per_row(torch.ones(2, 3), bits=bits)


def test_quantize7_opcheck(gen):
    torch.library.opcheck(
        torch.ops.pykernels.quantize_per_row.default, (torch.randn(6, 33, generator=gen), 7)
    )
