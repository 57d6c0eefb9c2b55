"""topk_sparsify / topk_densify: every backend and ISA against the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pykernels as pk
from pykernels import _reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 63, 64, 65, 1000, 40_000, 100_003]


def ks_for(n: int) -> list[int]:
    return sorted({0, 1, min(n, 3), n // 100, n // 10, n // 3, n} & set(range(n + 1)))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def assert_same(got, want):
    (v, i), (rv, ri) = got, want
    assert v.dtype == rv.dtype and i.dtype == torch.int64
    assert torch.equal(i, ri)
    assert torch.equal(bits(v), bits(rv))  # bit-exact, NaN payloads included


def randn(n, dtype, gen, scale=1.0):
    return (torch.randn(n, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_exact_matches_reference(backend, dtype, n, gen):
    x = randn(n, dtype, gen)
    for k in ks_for(n):
        assert_same(pk.ops.topk_sparsify(x, k=k), _reference.topk_sparsify_tensor(x, k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [65, 70_001, 1 << 20])
def test_every_isa_matches_reference(cpu_isa, dtype, n, gen):
    x = randn(n, dtype, gen)
    for k in ks_for(n):
        assert_same(pk.ops.topk_sparsify(x, k=k), _reference.topk_sparsify_tensor(x, k))
        r = torch.randn(n, generator=gen)
        r_ref = r.clone()
        got = pk.ops.topk_sparsify(x, k=k, residual=r)
        assert_same(got, _reference.topk_sparsify_tensor(x, k, residual=r_ref))
        assert torch.equal(r, r_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 64, 999, 50_000])
def test_error_feedback_matches_reference(backend, dtype, n, gen):
    x = randn(n, dtype, gen)
    for k in ks_for(n):
        r = torch.randn(n, generator=gen) * 0.5
        r_ref = r.clone()
        assert_same(
            pk.ops.topk_sparsify(x, k=k, residual=r),
            _reference.topk_sparsify_tensor(x, k, residual=r_ref),
        )
        assert torch.equal(r, r_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_error_feedback_conserves_the_update(dtype, gen):
    """x + residual_before == densify(values) + residual_after, exactly."""
    x = randn(300_001, dtype, gen, scale=3.0)
    r = torch.randn(x.shape, generator=gen)
    y = x.float() + r
    v, i = pk.ops.topk_sparsify(x, ratio=0.01, residual=r)
    sent = pk.ops.topk_densify(v.float(), i, x.shape)
    assert torch.equal(sent + r, y)
    kept = torch.ones_like(r, dtype=torch.bool)
    kept[i] = False
    assert torch.equal(r[kept], y[kept])  # unselected entries keep everything
    if dtype == torch.float32:
        assert torch.all(r[i] == 0)


def test_error_feedback_k0_adds_x_and_kn_clears(gen):
    x = torch.randn(5000, generator=gen)
    r = torch.randn(5000, generator=gen)
    expect = x + r
    v, i = pk.ops.topk_sparsify(x, k=0, residual=r)
    assert v.numel() == 0 and i.numel() == 0 and torch.equal(r, expect)
    v, i = pk.ops.topk_sparsify(x, k=x.numel(), residual=r)
    assert torch.equal(i, torch.arange(5000)) and torch.equal(v, expect + x)
    assert torch.all(r == 0)


def test_same_set_as_torch_topk(gen):
    x = torch.randn(3, 500, 701, generator=gen)  # float32: ties are vanishingly rare
    for k in (1, 1000, 25_000):
        v, i = pk.ops.topk_sparsify(x, k=k)
        ref = torch.topk(x.abs().flatten(), k).indices
        assert torch.equal(i, ref.sort().values)
        assert torch.equal(v, x.flatten()[i])
        assert bool((i[1:] > i[:-1]).all())


def test_ties_go_to_lower_index_deterministically(backend, gen):
    x = torch.randint(-3, 4, (200_000,), generator=gen).float()  # many equal magnitudes
    k = 50_000
    first = pk.ops.topk_sparsify(x, k=k)
    assert_same(first, _reference.topk_sparsify_tensor(x, k))
    assert_same(pk.ops.topk_sparsify(x, k=k), first)
    # -0.0 and 0.0 tie as well
    z = torch.tensor([0.0, -0.0, 0.0, -0.0])
    assert torch.equal(pk.ops.topk_sparsify(z, k=2)[1], torch.tensor([0, 1]))


def test_all_equal_takes_the_first_k(backend):
    # Every entry ties: the sampled threshold admits all of them, which
    # overflows the candidate buffers and exercises the exact fallback.
    x = torch.full((1 << 17,), -1.5)
    v, i = pk.ops.topk_sparsify(x, k=1000)
    assert torch.equal(i, torch.arange(1000)) and torch.all(v == -1.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_ranks_above_inf(backend, dtype, gen):
    x = randn(100_000, dtype, gen)
    x[[5, 70_000]] = float("nan")
    x[[10, 99_999]] = float("inf")
    x[[20]] = float("-inf")
    v, i = pk.ops.topk_sparsify(x, k=2)
    assert i.tolist() == [5, 70_000] and torch.isnan(v).all()
    v, i = pk.ops.topk_sparsify(x, k=5)
    assert i.tolist() == [5, 10, 20, 70_000, 99_999]
    assert_same((v, i), _reference.topk_sparsify_tensor(x, 5))
    big = pk.ops.topk_sparsify(x, k=500)
    assert_same(big, _reference.topk_sparsify_tensor(x, 500))


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(400, 600, generator=g)[:, ::3],  # strided
        lambda g: torch.randn(500_000, generator=g)[17:200_017],  # offset
        lambda g: torch.randn(300, 500, generator=g).t(),  # transposed
        lambda g: torch.randn(2, 3, 40, 50, generator=g).permute(3, 1, 0, 2),
        lambda g: torch.randn((), generator=g),  # 0-d
    ],
)
def test_views_and_shapes(backend, make, gen):
    x = make(gen)
    for k in {0, 1, x.numel() // 7, x.numel()}:
        assert_same(
            pk.ops.topk_sparsify(x, k=k), _reference.topk_sparsify_tensor(x.contiguous(), k)
        )


def test_noncontiguous_residual_is_updated_in_place(gen):
    x = torch.randn(200, 300, generator=gen)
    base = torch.randn(300, 200, generator=gen)
    r = base.t()  # non-contiguous view of base
    r_ref = r.clone()
    got = pk.ops.topk_sparsify(x, k=600, residual=r)
    assert_same(got, _reference.topk_sparsify_tensor(x, 600, residual=r_ref))
    assert torch.equal(base.t(), r_ref)


def _overlap(i: torch.Tensor, x: torch.Tensor, k: int) -> float:
    exact = _reference.topk_sparsify_tensor(x, k)[1]
    return np.intersect1d(i.numpy(), exact.numpy()).size / max(k, 1)


def _gradient_like(n: int, g: torch.Generator) -> torch.Tensor:
    # Layers of different scales, heavy tails, and correlated neighbours.
    parts = []
    for scale in (1e-4, 3e-3, 1e-2, 5e-1):
        t = torch.distributions.StudentT(3.0).sample((n // 4,)) * scale
        parts.append(t + 0.5 * torch.roll(t, 1))
    return torch.cat(parts)


@pytest.mark.parametrize("dist", ["gaussian", "laplace", "gradient"])
@pytest.mark.parametrize("ratio", [0.1, 0.01, 0.001])
def test_approx_is_fixed_size_and_mostly_exact(backend, dist, ratio, gen):
    n = 1 << 20
    torch.manual_seed(gen.initial_seed())
    if dist == "gaussian":
        x = torch.randn(n, generator=gen)
    elif dist == "laplace":
        x = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    else:
        x = _gradient_like(n, gen)
    k = int(n * ratio)
    v, i = pk.ops.topk_sparsify(x, k=k, approx=True)
    assert v.numel() == k and i.numel() == k
    assert bool((i[1:] > i[:-1]).all())
    assert torch.equal(v, x[i])
    assert _overlap(i, x, k) >= 0.9
    r = torch.randn(n, generator=gen) * x.std()
    y = x + r
    v, i = pk.ops.topk_sparsify(x, k=k, approx=True, residual=r)
    assert v.numel() == k and torch.equal(v, y[i])
    assert _overlap(i, y, k) >= 0.9


def test_ratio_gives_floor(gen):
    x = torch.randn(1001, generator=gen)
    for ratio in (0.0, 0.0999, 0.5, 1.0):
        v, i = pk.ops.topk_sparsify(x, ratio=ratio)
        assert i.numel() == math.floor(ratio * 1001)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(), ValueError, "exactly one of k and ratio"),
        (dict(k=3, ratio=0.1), ValueError, "exactly one of k and ratio"),
        (dict(k=-1), ValueError, "k must be in"),
        (dict(k=101), ValueError, "k must be in"),
        (dict(k=2.0), TypeError, "k must be an int"),
        (dict(k=True), TypeError, "k must be an int"),
        (dict(ratio=1.5), ValueError, "ratio must be in"),
        (dict(ratio=-0.1), ValueError, "ratio must be in"),
        (dict(ratio=float("nan")), ValueError, "ratio must be in"),
        (dict(ratio="x"), TypeError, "ratio must be a float"),
        (dict(k=3, approx=1), TypeError, "approx must be a bool"),
        (dict(k=3, residual=torch.zeros(100, dtype=torch.float16)), TypeError, "residual"),
        (dict(k=3, residual=torch.zeros(101)), ValueError, "residual must have x's shape"),
        (dict(k=3, residual=torch.zeros(10, 10)), ValueError, "residual must have x's shape"),
        (dict(k=3, residual=[0.0] * 100), TypeError, "residual must be a torch.Tensor"),
        (dict(k=3, residual=torch.zeros(100, device="meta")), ValueError, "device"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pk.ops.topk_sparsify(torch.randn(100), **kwargs)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.float64])
def test_bad_dtype(dtype):
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        pk.ops.topk_sparsify(torch.ones(10, dtype=dtype), k=1)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pk.ops.topk_sparsify(np.ones(10, dtype=np.float32), k=1)


def test_empty_and_k0(backend):
    v, i = pk.ops.topk_sparsify(torch.empty(0, 3), k=0)
    assert v.shape == (0,) and i.shape == (0,) and i.dtype == torch.int64
    v, i = pk.ops.topk_sparsify(torch.randn(10), ratio=0.05)
    assert v.numel() == 0


def test_native_rejects_bad_buffers_with_value_error():
    from pykernels import _native

    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    x = np.ones(10, np.uint32)
    with pytest.raises(ValueError, match="k must satisfy"):
        _native.C.topk_sparsify(
            x, 0, 11, False, None, np.empty(11, np.uint32), np.empty(11, np.int64)
        )
    with pytest.raises(ValueError, match="indices"):
        _native.C.topk_sparsify(x, 0, 2, False, None, np.empty(2, np.uint32), np.empty(3, np.int64))
    with pytest.raises(ValueError, match="values"):
        _native.C.topk_sparsify(x, 0, 2, False, None, np.empty(2, np.uint16), np.empty(2, np.int64))
    with pytest.raises(ValueError, match="dtype"):
        _native.C.topk_sparsify(x, 7, 2, False, None, np.empty(2, np.uint16), np.empty(2, np.int64))


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.sampled_from(
            [
                0.0,
                -0.0,
                1.0,
                -1.0,
                2.5,
                -2.5,
                1e-30,
                float("inf"),
                -float("inf"),
                float("nan"),
                65504.0,
                3e38,
            ]
        ),
        min_size=0,
        max_size=300,
    ),
    k_frac=st.floats(0, 1),
    backend_kind=st.sampled_from(["native", "numba", "reference"]),
)
def test_property_special_values(data, k_frac, backend_kind):
    import os

    x = torch.tensor(data, dtype=torch.float32)
    k = int(k_frac * x.numel())
    old = os.environ.get("PYKERNELS_BACKEND")
    os.environ["PYKERNELS_BACKEND"] = backend_kind
    try:
        got = pk.ops.topk_sparsify(x, k=k)
    except pk.backends.BackendUnavailable:
        return
    finally:
        if old is None:
            os.environ.pop("PYKERNELS_BACKEND", None)
        else:
            os.environ["PYKERNELS_BACKEND"] = old
    assert_same(got, _reference.topk_sparsify_tensor(x, k))


# --- densify ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_densify_round_trip(dtype, gen):
    x = torch.randn(37, 41, generator=gen).to(dtype)
    v, i = pk.ops.topk_sparsify(x, k=300)
    d = pk.ops.topk_densify(v, i, x.shape)
    assert d.shape == x.shape and d.dtype == dtype
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[i] = True
    assert torch.equal(d.flatten()[mask], x.flatten()[mask])
    assert torch.all(d.flatten()[~mask] == 0)


def test_densify_accumulates_workers(gen):
    shape = (64, 33)
    out = torch.randn(shape, generator=gen)
    expect = out.double().clone()
    for _ in range(4):
        x = torch.randn(shape, generator=gen)
        v, i = pk.ops.topk_sparsify(x, k=200)
        pk.ops.topk_densify(v, i, out=out, accumulate=True)
        expect += pk.ops.topk_densify(v, i, shape).double()
    torch.testing.assert_close(out.double(), expect, rtol=1e-6, atol=1e-6)
    # duplicate indices are summed
    out = torch.zeros(5)
    pk.ops.topk_densify(
        torch.tensor([1.0, 2.0, 4.0]), torch.tensor([3, 3, 0]), out=out, accumulate=True
    )
    assert out.tolist() == [4.0, 0.0, 0.0, 3.0, 0.0]
    # without accumulate, out is overwritten
    pk.ops.topk_densify(torch.tensor([1.0]), torch.tensor([2]), out=out)
    assert out.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    # non-contiguous out
    base = torch.zeros(4, 6)
    pk.ops.topk_densify(
        torch.tensor([1.0, 2.0]), torch.tensor([1, 5]), out=base.t(), accumulate=True
    )
    assert base.t().flatten()[1] == 1.0 and base.t().flatten()[5] == 2.0


def test_densify_matches_reference(gen):
    v = torch.randn(1000, generator=gen)
    i = torch.randint(0, 500, (1000,), generator=gen)
    torch.testing.assert_close(
        pk.ops.topk_densify(v, i, (20, 25)), _reference.topk_densify(v, i, (20, 25))
    )


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: pk.ops.topk_densify([1.0], torch.tensor([0]), (3,)), TypeError, "values"),
        (lambda: pk.ops.topk_densify(torch.ones(1), [0], (3,)), TypeError, "indices"),
        (
            lambda: pk.ops.topk_densify(torch.ones(1), torch.tensor([0], dtype=torch.int32), (3,)),
            TypeError,
            "int64",
        ),
        (lambda: pk.ops.topk_densify(torch.ones(2), torch.tensor([0]), (3,)), ValueError, "equal"),
        (
            lambda: pk.ops.topk_densify(torch.ones(1), torch.tensor([3]), (3,)),
            ValueError,
            "indices must be in",
        ),
        (
            lambda: pk.ops.topk_densify(torch.ones(1), torch.tensor([-1]), (3,)),
            ValueError,
            "indices must be in",
        ),
        (lambda: pk.ops.topk_densify(torch.ones(1), torch.tensor([0])), ValueError, "shape or out"),
        (
            lambda: pk.ops.topk_densify(torch.ones(1), torch.tensor([0]), (3,), accumulate=True),
            ValueError,
            "accumulate=True needs out",
        ),
        (
            lambda: pk.ops.topk_densify(torch.ones(1), torch.tensor([0]), (4,), out=torch.zeros(3)),
            ValueError,
            "shape",
        ),
        (
            lambda: pk.ops.topk_densify(
                torch.ones(1), torch.tensor([0]), out=torch.zeros(3, dtype=torch.int64)
            ),
            TypeError,
            "out must be a float",
        ),
    ],
)
def test_densify_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- torch.library / torch.compile ----------------------------------------------


def test_opcheck(gen):
    x = torch.randn(4000, generator=gen)
    ops = torch.ops.pykernels
    torch.library.opcheck(ops.topk_sparsify.default, (x, 40, False))
    torch.library.opcheck(ops.topk_sparsify.default, (x.half(), 40, True))
    torch.library.opcheck(
        ops.topk_sparsify_ef.default, (x, torch.randn(4000, generator=gen), 40, False)
    )
    v, i = pk.ops.topk_sparsify(x, k=40)
    torch.library.opcheck(ops.topk_densify.default, (v, i, [40, 100]))
    torch.library.opcheck(ops.topk_densify_into.default, (v, i, torch.zeros(4000), True))


def test_torch_compile_fullgraph_matches_eager(gen):
    def step(grad, residual):
        v, i = pk.ops.topk_sparsify(grad, ratio=0.01, residual=residual)
        return pk.ops.topk_densify(v, i, grad.shape) * 2.0, v.sum()

    compiled = torch.compile(step, fullgraph=True)
    x = torch.randn(100, 300, generator=gen)
    r1 = torch.randn(100, 300, generator=gen)
    r2 = r1.clone()
    eager = step(x, r1)
    comp = compiled(x, r2)
    assert torch.equal(eager[0], comp[0])
    # inductor may sum in another order
    torch.testing.assert_close(eager[1], comp[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(r1, r2)

    plain = torch.compile(lambda t: pk.ops.topk_sparsify(t, k=77), fullgraph=True)
    assert_same(plain(x), pk.ops.topk_sparsify(x, k=77))


# --- big inputs -----------------------------------------------------------------


@pytest.mark.bigmem
def test_more_than_2_31_elements(monkeypatch):
    """Indices past 2^31 come back right (int64 throughout)."""
    from pykernels import _native

    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    monkeypatch.setenv("PYKERNELS_BACKEND", "native")
    n = (1 << 31) + 1000
    try:
        x = torch.full((n,), 0.5, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("not enough memory")
    planted = torch.tensor([3, (1 << 31) - 1, 1 << 31, n - 1])
    x[planted] = torch.tensor([-4.0, 5.0, -6.0, 7.0], dtype=torch.bfloat16)
    v, i = pk.ops.topk_sparsify(x, k=4)
    assert torch.equal(i, planted) and v.tolist() == [-4.0, 5.0, -6.0, 7.0]
    v, i = pk.ops.topk_sparsify(x, k=6)  # two ties at 0.5: the lowest indices
    assert i.tolist() == [0, 1, 3, (1 << 31) - 1, 1 << 31, n - 1]


# --- CUDA -------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 65, 4097, 100_003, 1 << 22])
def test_cuda_matches_reference(dtype, n, gen):
    x = randn(n, dtype, gen).cuda()
    for k in ks_for(n):
        got = pk.ops.topk_sparsify(x, k=k)
        assert got[0].is_cuda
        want = _reference.topk_sparsify_tensor(x.cpu(), k)
        assert_same((got[0].cpu(), got[1].cpu()), want)
        r = torch.randn(n, generator=gen)
        r_ref = r.clone()
        r_cuda = r.cuda()
        got = pk.ops.topk_sparsify(x, k=k, residual=r_cuda)
        want = _reference.topk_sparsify_tensor(x.cpu(), k, residual=r_ref)
        assert_same((got[0].cpu(), got[1].cpu()), want)
        assert torch.equal(r_cuda.cpu(), r_ref)


@pytest.mark.cuda
def test_cuda_ties_nan_and_approx(gen):
    x = torch.randint(-3, 4, (300_000,), generator=gen).float()
    x[[7, 100]] = float("nan")
    xc = x.cuda()
    for k in (1, 2, 5, 1000, 100_000):
        got = pk.ops.topk_sparsify(xc, k=k)
        assert_same((got[0].cpu(), got[1].cpu()), _reference.topk_sparsify_tensor(x, k))
    y = torch.randn(1 << 20, generator=gen)
    v, i = pk.ops.topk_sparsify(y.cuda(), k=10_000, approx=True)
    assert v.numel() == 10_000 and _overlap(i.cpu(), y, 10_000) >= 0.9
