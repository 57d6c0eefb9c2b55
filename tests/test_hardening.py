"""Regressions of issue 15 (a hostile-user sweep): each bullet's input, on every
backend where it matters, against a plain torch result or its documented error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pykernels as pk
import pykernels._reference  # noqa: F401 - pk._reference below, whatever ran first


def linear(k, n, gen, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


# --- int8: expanded (zero-stride) activations ------------------------------------


@pytest.mark.parametrize("op", ["int8_linear", "int8_weight_linear", "packed"])
@pytest.mark.parametrize(
    "make",
    [
        lambda x: x[:1].expand(7, -1),  # one token broadcast: row stride 0
        lambda x: x[:, :1].expand(-1, 48),  # column stride 0
        lambda x: x[None, :1].expand(3, 5, -1),  # 3-D, both leading strides 0
        lambda x: x.t().contiguous().t(),  # transposed (column-major) rows
    ],
)
def test_int8_linears_take_any_strides(backend, op, make, gen):
    x = make(torch.randn(7, 48, generator=gen))
    w = torch.randint(-127, 128, (9, 48), dtype=torch.int8, generator=gen)
    s = torch.rand(9, generator=gen) / 100
    b = torch.randn(9, generator=gen)
    fn = pk.ops.int8_weight_linear if op == "int8_weight_linear" else pk.ops.int8_linear
    wq = pk.ops.pack_int8_weight(w) if op == "packed" else w
    got = fn(x, wq, s, b)
    assert torch.equal(got, fn(x.contiguous(), wq, s, b))  # the same numbers, not close
    ref = getattr(
        pk._reference, "int8_weight_linear" if op == "int8_weight_linear" else "int8_linear"
    )
    want = ref(x.reshape(-1, 48), w, s, b).view(*x.shape[:-1], 9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# --- a Linear with no outputs (or no inputs), through every layer type -------------


def _layers(lin):
    out = {
        "int8-dynamic": pk.nn.Int8Linear.from_linear(lin, mode="dynamic"),
        "int8-weight_only": pk.nn.Int8Linear.from_linear(lin, mode="weight_only"),
        "sparse-unstructured": pk.nn.SparseLinear.from_linear(lin, 0.5),
        "sparse-block": pk.nn.SparseLinear.from_linear(lin, 0.5, pattern="block"),
        "lowrank-rank": pk.nn.LowRankLinear.from_linear(lin, rank=3),
        "lowrank-energy": pk.nn.LowRankLinear.from_linear(lin, energy=0.9),
        "lowrank-tol": pk.nn.LowRankLinear.from_linear(lin, tol=0.1),
    }
    if lin.in_features % 4 == 0:
        out["sparse-2:4"] = pk.nn.SparseLinear.from_linear(lin, pattern="2:4")
    return out


@pytest.mark.parametrize("kn", [(16, 0), (0, 5), (0, 0)])
def test_empty_linear_through_every_layer(backend, kn, gen):
    k, n = kn
    lin = linear(k, n, gen)
    x = torch.randn(3, 2, k, generator=gen)
    want = lin(x)  # zeros [3, 2, n], plus the bias when K = 0
    for name, layer in _layers(lin).items():
        got = layer(x)
        assert got.shape == (3, 2, n), name
        torch.testing.assert_close(got, want, msg=name)
        # state_dict round trip into a fresh layer of the same kind
        fresh = _layers(linear(k, n, gen))[name]
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(fresh(x), want, msg=name)
    for convert in (
        pk.quantize_int8,
        lambda m: pk.sparsify(m, 0.5),
        lambda m: pk.factorize(m, rank=2),
    ):
        model = nn.Sequential(lin, nn.ReLU())
        torch.testing.assert_close(convert(model)(x), model(x))


# --- sparse -----------------------------------------------------------------------


def test_sparsify_refuses_a_sparsity_the_2_4_pattern_cannot_give(gen):
    model = nn.Sequential(linear(16, 8, gen))
    with pytest.raises(ValueError, match="2:4 pattern has sparsity 0.5, got sparsity=0.9"):
        pk.sparsify(model, 0.9, pattern="2:4")
    with pytest.raises(ValueError, match="sparsity 0.5"):
        pk.nn.SparseLinear.from_linear(model[0], 0.9, pattern="2:4")
    with pytest.raises(TypeError, match="sparsity must be a float"):
        pk.sparsify(model, "0.5", pattern="2:4")
    for s in (0.5, None):
        layer = pk.sparsify(model, s, pattern="2:4")[0]
        assert layer.density() == 0.5


@pytest.mark.parametrize("k", [70001, 262148])  # 17501 block columns (int16), 65537 (int32)
def test_block_sparse_linear_with_k_past_65536(backend, k, gen):
    n = 6
    w = torch.zeros(n, k)
    cols = (
        torch.tensor([0, 5, 65536 * 4 - 1, k - 1])
        if k > 262144
        else torch.tensor([0, 40000, k - 1])
    )
    w[:, cols] = torch.randn(n, cols.numel(), generator=gen)
    sw = pk.ops.to_sparse(w, block=4)
    assert sw.col.dtype == (torch.int16 if -(-k // 4) <= 65536 else torch.int32)
    x = torch.randn(3, k, generator=gen)
    torch.testing.assert_close(pk.ops.sparse_linear(x, sw), x @ w.T, rtol=1e-5, atol=1e-5)
    layer = pk.nn.SparseLinear(sw, None, "block")
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()
    torch.testing.assert_close(xg.grad, w.sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


# --- topk -----------------------------------------------------------------------


V = torch.tensor([1.5, -2.0])
IDX = torch.tensor([0, 3])


@pytest.mark.parametrize(
    "shape, exc, match",
    [
        ("55", TypeError, "shape must be a sequence of ints, got str"),
        (b"55", TypeError, "shape must be a sequence of ints"),
        ((2.7,), TypeError, "got float 2.7"),
        ((2, 2.0), TypeError, "got float"),
        ([True, 4], TypeError, "got bool"),
        (4.0, TypeError, "shape must be a sequence of ints"),
        ({4: 1}, TypeError, "shape must be a sequence of ints"),
        ((2, -3), ValueError, "non-negative"),
        ((2,), ValueError, r"indices must be in \[0, 2\)"),
    ],
)
def test_topk_densify_reads_shape_as_ints_only(shape, exc, match):
    with pytest.raises(exc, match=match):
        pk.ops.topk_densify(V, IDX, shape=shape)


@pytest.mark.parametrize("shape", [4, (4,), [2, 2], torch.Size([1, 4]), (torch.tensor(4).item(),)])
def test_topk_densify_accepts_every_int_shape(shape):
    import numpy as np

    want = torch.tensor([1.5, 0.0, 0.0, -2.0])
    assert torch.equal(pk.ops.topk_densify(V, IDX, shape=shape).reshape(-1), want)
    assert torch.equal(pk.ops.topk_densify(V, IDX, shape=(np.int64(4),)), want)


def test_zero_stride_residual_and_out_are_refused_before_the_kernel(backend, gen):
    x = torch.randn(20, generator=gen)
    base = torch.randn(1, generator=gen)
    r = base.expand(20)
    with pytest.raises(ValueError, match="topk_sparsify: residual is written in place"):
        pk.ops.topk_sparsify(x, k=3, residual=r)
    assert torch.equal(r, base.expand(20))  # untouched
    out = base.expand(5)
    with pytest.raises(ValueError, match="topk_densify: out is written in place"):
        pk.ops.topk_densify(V, IDX, out=out, accumulate=True)
    assert torch.equal(out, base.expand(5))
    # Overlap that strides alone do not reveal (interleaved dimensions) is found too.
    store = torch.zeros(8)
    odd = store.as_strided((2, 3), (3, 2))  # offsets 0 2 4 3 5 7: no two alike
    pk.ops.topk_densify(V, torch.tensor([0, 5]), out=odd)
    assert float(store[0]) == 1.5 and float(store[7]) == -2.0
    clash = store.as_strided((2, 3), (1, 1))  # offsets 0 1 2 1 2 3
    with pytest.raises(ValueError, match="out is written in place"):
        pk.ops.topk_densify(V, torch.tensor([0, 5]), out=clash)
    # A strided residual that does not overlap works, through a copy.
    big = torch.zeros(40)
    r2 = big[::2]
    v, i = pk.ops.topk_sparsify(x, k=3, residual=r2)
    torch.testing.assert_close(pk.ops.topk_densify(v, i, shape=(20,)) + r2, x)


def test_topk_values_are_differentiable_without_residual(backend, gen):
    x = torch.randn(6, 7, generator=gen, requires_grad=True)
    values, indices = pk.ops.topk_sparsify(x, k=9)
    assert values.requires_grad and not indices.requires_grad
    g = torch.randn(9, generator=gen)
    (values * g).sum().backward()
    want = torch.zeros(42)
    want[indices] = g
    assert torch.equal(x.grad.reshape(-1), want)
    h = x.detach().half().requires_grad_()
    v16, i16 = pk.ops.topk_sparsify(h, ratio=0.5)
    v16.float().pow(2).sum().backward()
    want16 = torch.zeros(42, dtype=torch.float16)
    want16[i16] = 2 * v16.detach()
    assert torch.equal(h.grad.reshape(-1), want16)


def test_topk_with_residual_carries_no_gradient(backend, gen):
    x = torch.randn(30, generator=gen, requires_grad=True)
    r = torch.zeros(30)
    values, indices = pk.ops.topk_sparsify(x, k=5, residual=r)
    assert not values.requires_grad and not indices.requires_grad
    torch.testing.assert_close(pk.ops.topk_densify(values, indices, shape=(30,)) + r, x.detach())


# --- svd: exactly low-rank matrices ------------------------------------------------


def exactly_low_rank(gen, dtype):
    """(name, matrix, its rank): the matrices a plain QR of the sketch got wrong."""
    checker = torch.ones(400, 300, dtype=dtype)
    checker[::2] *= -1
    checker[:, ::2] *= -1
    u = torch.randint(-5, 6, (400, 3), generator=gen).to(dtype)
    v = torch.randint(-5, 6, (3, 300), generator=gen).to(dtype)
    rows = torch.randn(400, 1, generator=gen, dtype=dtype).expand(400, 300).contiguous()
    return [
        ("ones", torch.ones(400, 300, dtype=dtype), 1),
        ("row-constant", rows, 1),
        ("checkerboard", checker, 1),
        ("block-diagonal ones", torch.block_diag(*[torch.ones(100, 75, dtype=dtype)] * 4), 4),
        ("integer outer product", u @ v, 3),
        ("wide ones", torch.ones(250, 600, dtype=dtype), 1),
    ]


def assert_exact_factorization(a, u, s, vh, rank):
    tol = 2e-5 if a.dtype == torch.float32 else 1e-12
    err = float(torch.linalg.norm((u * s) @ vh - a) / torch.linalg.norm(a))
    eye = torch.eye(u.shape[1], dtype=a.dtype)
    assert err < tol, err
    assert float((u.T @ u - eye).abs().max()) < 10 * tol
    assert float((vh @ vh.T - eye).abs().max()) < 10 * tol
    assert bool((s[:-1] >= s[1:]).all()) and bool((s[rank:] <= tol * s[0]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randomized_svd_of_exactly_low_rank_matrices(dtype, gen):
    for name, a, r in exactly_low_rank(gen, dtype):
        for rank, n_iter in ((r, 1), (r + 2, 0), (16, 2)):
            seed = int(torch.randint(0, 2**31, (1,), generator=gen))
            u, s, vh = pk.ops.randomized_svd(a, rank, n_iter=n_iter, seed=seed)
            assert_exact_factorization(a, u, s, vh, r)
        rk, u, s, vh = pk.ops.svd_rank(a, tol=1e-4)
        assert rk == r, name
        assert_exact_factorization(a, u, s, vh, r)


def test_ones_at_rank_one_is_exact():
    a = torch.ones(400, 300)
    u, s, vh = pk.ops.randomized_svd(a, 1)
    torch.testing.assert_close(s, torch.tensor([(400 * 300) ** 0.5]))
    torch.testing.assert_close((u * s) @ vh, a)


def test_low_rank_layers_inherit_the_exact_factorization(gen):
    for _, w, r in exactly_low_rank(gen, torch.float32):
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w)
        for layer in (
            pk.nn.LowRankLinear.from_linear(lin, rank=r),
            pk.nn.LowRankLinear.from_linear(lin, tol=1e-4),
            pk.factorize(nn.Sequential(lin), rank=r)[0],
        ):
            assert isinstance(layer, pk.nn.LowRankLinear) and layer.rank == r
            err = float(torch.linalg.norm(layer.to_dense() - w) / torch.linalg.norm(w))
            assert err < 2e-5


# --- batched_svd: rank-deficient and constant matrices, empty ones ------------------


def assert_svd(a, u, s, vh):
    k = min(a.shape[-2:])
    tol = 1e-5 if a.dtype == torch.float32 else 1e-12
    eye = torch.eye(k, dtype=a.dtype)
    scale = max(float(a.abs().max()), 1.0)
    assert float(((u * s[..., None, :]) @ vh - a).abs().max()) <= tol * scale * 10
    assert float((u.mT @ u - eye).abs().max()) <= tol
    assert float((vh @ vh.mT - eye).abs().max()) <= tol
    torch.testing.assert_close(s, torch.linalg.svdvals(a), rtol=tol, atol=tol * scale)


def test_batched_svd_of_every_constant_matrix_up_to_12(backend):
    # 432 constant matrices (12 x 12 shapes, three constants): 70 did not
    # converge natively, 195 with Numba (one raised ZeroDivisionError).
    for m in range(1, 13):
        for n in range(1, 13):
            a = torch.tensor([1.0, -3.7, 0.1])[:, None, None].expand(3, m, n).contiguous()
            assert_svd(a, *pk.ops.batched_svd(a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_svd_of_rank_deficient_matrices(backend, dtype, gen):
    lo = torch.randn(40, 20, 3, generator=gen, dtype=dtype) @ torch.randn(
        40, 3, 15, generator=gen, dtype=dtype
    )
    dup = torch.randn(6, 64, 32, generator=gen, dtype=dtype).repeat(1, 1, 2)  # 32 zero values
    for a in (lo, torch.round(lo), lo.mT.contiguous(), dup, dup.mT.contiguous()):
        assert_svd(a, *pk.ops.batched_svd(a))
    zeros = torch.zeros(2, 7, 5, dtype=dtype)
    u, s, vh = pk.ops.batched_svd(zeros)
    assert torch.equal(s, torch.zeros(2, 5, dtype=dtype))
    assert_svd(zeros, u, s, vh)


@pytest.mark.parametrize("shape", [(4, 0, 3), (4, 3, 0), (0, 3, 3), (2, 0, 5, 0), (2, 3, 0, 4)])
def test_batched_svd_of_empty_matrices(backend, shape):
    a = torch.randn(*shape)
    u, s, vh = pk.ops.batched_svd(a)
    m, n = shape[-2:]
    k = min(m, n)
    assert u.shape == (*shape[:-2], m, k) and s.shape == (*shape[:-2], k)
    assert vh.shape == (*shape[:-2], k, n)


# --- svd ops under torch.compile, and their arguments ---------------------------------


def test_svd_ops_compile_with_fullgraph(gen):
    a = torch.randn(200, 120, generator=gen)
    x = torch.randn(5, 6, 4, generator=gen)

    def rsvd(a):
        u, s, vh = pk.ops.randomized_svd(a, 10, seed=3)
        return (u * s) @ vh

    def rank(a):
        r, u, s, vh = pk.ops.svd_rank(a, tol=0.5)
        return (u * s) @ vh, s

    def batched(x):
        u, s, vh = pk.ops.batched_svd(x)
        return (u * s[..., None, :]) @ vh

    torch._dynamo.reset()
    c_rsvd = torch.compile(rsvd, fullgraph=True)  # inductor once; aot_eager traces the same
    torch.testing.assert_close(c_rsvd(a), rsvd(a))
    c_rank = torch.compile(rank, fullgraph=True, backend="aot_eager")
    (y, s), (y_ref, s_ref) = c_rank(a), rank(a)
    assert s.shape == s_ref.shape  # the rank: a size known only when the op has run
    torch.testing.assert_close(y, y_ref)
    c_batched = torch.compile(batched, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(c_batched(x), x, rtol=1e-5, atol=1e-5)
    # The data-dependent checks run inside the ops, so they hold compiled too.
    with pytest.raises(ValueError, match="batched_svd: a holds NaN or inf"):
        c_batched(torch.full((5, 6, 4), float("nan")))
    with pytest.raises(ValueError, match="randomized_svd: a holds NaN or inf"):
        c_rsvd(a.index_fill(0, torch.tensor([7]), float("inf")))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda a: pk.ops.randomized_svd(a, 3, seed="abc"), TypeError, "seed must be an int"),
        (lambda a: pk.ops.randomized_svd(a, 3, seed=2**64), ValueError, "seed must be an int in"),
        (lambda a: pk.ops.randomized_svd(a, 3, seed=1.5), TypeError, "seed must be an int"),
        (lambda a: pk.ops.randomized_svd(a, "3"), TypeError, "rank must be an int"),
        (
            lambda a: pk.ops.randomized_svd(a, 3, n_iter=-1),
            ValueError,
            "n_iter must be an int >= 0",
        ),
        (lambda a: pk.ops.randomized_svd(a, 3, oversample=2.0), TypeError, "oversample must be"),
        (lambda a: pk.ops.svd_rank(a, tol="0.1"), TypeError, "tol must be a real number"),
        (lambda a: pk.ops.svd_rank(a, tol=float("nan")), ValueError, "tol must be in"),
        (lambda a: pk.ops.svd_rank(a, energy=True), TypeError, "energy must be a real number"),
        (lambda a: pk.ops.svd_rank(a, tol=0.1, block=0), ValueError, "block must be an int >= 1"),
        (lambda a: pk.ops.svd_rank(a, tol=0.1, seed=None), TypeError, "seed must be an int"),
        (lambda a: pk.ops.svd_rank(a.to("meta"), tol=0.1), ValueError, "meta tensor"),
    ],
)
def test_svd_arguments_are_checked(call, exc, match, gen):
    with pytest.raises(exc, match=match):
        call(torch.randn(40, 30, generator=gen))


def test_svd_seeds_cover_torchs_range(gen):
    import numpy as np

    a = torch.randn(60, 40, generator=gen)
    same = [pk.ops.randomized_svd(a, 3, n_iter=0, seed=s)[0] for s in (2**64 - 1, -1)]
    assert torch.equal(*same)  # torch.Generator reads them alike
    assert torch.equal(
        pk.ops.randomized_svd(a, 3, seed=np.int64(7))[1], pk.ops.randomized_svd(a, 3, seed=7)[1]
    )


def test_opcheck_of_the_svd_ops_and_topk_autograd(gen):
    ops = torch.ops.pykernels
    a = torch.randn(80, 50, generator=gen)
    torch.library.opcheck(ops.randomized_svd.default, (a, 4, 1, 8, 0))
    torch.library.opcheck(ops.randomized_svd.default, (a.double(), 40, 1, 8, -5))  # exact path
    torch.library.opcheck(ops.svd_rank.default, (a, 0.25, 8, 0))
    torch.library.opcheck(ops.batched_svd.default, (torch.randn(3, 5, 4, generator=gen),))
    x = torch.randn(30, 20, generator=gen, requires_grad=True)
    torch.library.opcheck(ops.topk_sparsify.default, (x, 17, False))


# --- topk error feedback at the dtype's limits -----------------------------------------


def limit_values(dtype, gen, n=600):
    """x and residual whose sums cross the dtype's range, its subnormals, zero signs."""
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).tiny
    xs = torch.tensor(
        [big, -big, big, 0.5 * big, big, -0.0, 0.0, tiny, -tiny / 4, float("inf"), float("nan")]
    )
    rs = torch.tensor(
        [100.0, -1e6, 3e38, 0.75 * big, 2.0**31, -0.0, -0.0, tiny / 8, tiny, 1.0, 2.0]
    )
    if dtype == torch.float32:
        rs[0], rs[1] = 3e38, -3e38  # the fp32 sum itself overflows to inf
    reps = n // xs.numel() + 1
    x = xs.repeat(reps)[:n] * (1 + torch.rand(n, generator=gen) * (xs.repeat(reps)[:n].abs() < 1))
    r = rs.repeat(reps)[:n] * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    return x.to(dtype), r.float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k_of", [lambda n: 7, lambda n: n // 2, lambda n: n])
def test_error_feedback_identity_at_dtype_limits(backend, dtype, k_of, gen):
    x, r = limit_values(dtype, gen)
    k = k_of(x.numel())
    y = x.float() + r
    r_ref = r.clone()
    for approx in (False, True):
        r_run = r.clone()
        v, i = pk.ops.topk_sparsify(x, k=k, approx=approx, residual=r_run)
        rv, ri = pk._reference.topk_sparsify_tensor(x, k, residual=r_ref.clone())
        assert torch.equal(i, ri)
        vb = v.view(torch.int16 if dtype != torch.float32 else torch.int32)
        rb = rv.view(torch.int16 if dtype != torch.float32 else torch.int32)
        assert bool(((vb == rb) | (v.isnan() & rv.isnan())).all())  # any NaN for a NaN sum
        # Nothing finite is sent as inf: a sum past the range is saturated.
        assert bool((torch.isfinite(v) | ~torch.isfinite(y[i])).all())
        back = pk.ops.topk_densify(v.float(), i, shape=x.shape) + r_run
        same = (back == y) | (torch.isnan(back) & torch.isnan(y))
        # Exact in fp32, except for fp16 sums of 2^29 or more sent as 65504:
        # there within one fp32 rounding (65504 is below y's last place).
        loose = (y.abs() >= 2.0**29) & (dtype == torch.float16) & torch.isfinite(y)
        assert bool((same | loose).all()), (x[~same], r[~same])
        ulp = torch.nextafter(y.abs(), torch.tensor(float("inf"))) - y.abs()
        assert bool(((back - y).abs() <= ulp)[loose].all())


def test_issue_fp16_error_feedback_example():
    r = torch.full((4,), 100.0)
    v, i = pk.ops.topk_sparsify(torch.full((4,), 65504.0).half(), k=2, residual=r)
    assert torch.equal(v, torch.full((2,), 65504.0).half())  # not inf
    assert torch.equal(r, torch.tensor([100.0, 100.0, 65604.0, 65604.0]))  # 100 + what was not sent


def test_error_feedback_limits_on_every_isa(cpu_isa, gen):
    for dtype in (torch.float16, torch.bfloat16):
        x, r = limit_values(dtype, gen, n=70_001)
        r_ref = r.clone()
        got = pk.ops.topk_sparsify(x, k=5000, residual=r)
        want = pk._reference.topk_sparsify_tensor(x, 5000, residual=r_ref)
        assert torch.equal(got[1], want[1])
        same = got[0].view(torch.int16) == want[0].view(torch.int16)
        assert bool((same | (got[0].isnan() & want[0].isnan())).all())
        assert torch.equal(r, r_ref) or bool(((r == r_ref) | (r.isnan() & r_ref.isnan())).all())


# --- small things: threads, -0.0 ---------------------------------------------------------


@pytest.mark.parametrize(
    "n, exc",
    [
        (2**40, ValueError),
        (0, ValueError),
        (-3, ValueError),
        (2.0, TypeError),
        ("4", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_set_num_threads_refuses_what_openmp_cannot_start(n, exc):
    with pytest.raises(exc, match="set_num_threads: n must be a positive int"):
        pk.set_num_threads(n)


def test_set_num_threads_takes_numpy_ints():
    import numpy as np

    from pykernels import _native

    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    before = _native.C.get_num_threads()
    try:
        pk.set_num_threads(np.int64(1))
        assert _native.C.get_num_threads() == 1
    finally:
        pk.set_num_threads(before)


@pytest.mark.parametrize("block", [1, 4])
def test_to_dense_of_to_sparse_keeps_every_stored_bit_and_zeroes_negative_zero(block, gen):
    w = torch.randn(9, 14, generator=gen)
    w[torch.rand(9, 14, generator=gen) < 0.5] = 0.0
    w[0, :3] = -0.0
    w[1, 1] = float("nan")
    w[2, 2] = float("-inf")
    w[3, 3] = 1e-45  # a subnormal
    sw = pk.ops.to_sparse(w, block)
    back = pk.ops.to_dense(sw)
    # Decided (README): -0.0 is a zero and is not stored, so it comes back +0.0;
    # every stored value (for BSR, everything inside a kept block, -0.0
    # included) comes back with its bits.
    bits, back_bits = w.view(torch.int32), back.view(torch.int32)
    nonzero = w != 0
    stored = nonzero
    if block == 4:
        stored = pk.ops.sparse.expand_block_mask(
            torch.nn.functional.pad(nonzero, (0, 2, 0, 3)).view(3, 4, 4, 4).any(3).any(1),
            9,
            14,
        )
    assert torch.equal(bits[stored], back_bits[stored])
    assert bool((back[~stored] == 0).all()) and not bool(back[~stored].signbit().any())
    assert torch.equal(torch.where(w.isnan(), 0, w), torch.where(back.isnan(), 0, back))
    if block == 1:
        assert sw.nnz() == int(nonzero.sum())  # -0.0 costs no storage


# --- conversions of models holding attention ---------------------------------------------


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.mha(h, h, h, need_weights=False)[0])


def transformer(gen, batch_first=True):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    layer = nn.TransformerEncoderLayer(
        64, 4, dim_feedforward=128, batch_first=batch_first, dropout=0.0
    )
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)
    return nn.Sequential(enc, nn.Linear(64, 8)).eval()


CONVERSIONS = {
    "int8": lambda m: pk.quantize_int8(m),
    "int8-weight_only": lambda m: pk.quantize_int8(m, mode="weight_only"),
    "sparsify": lambda m: pk.sparsify(m, 0.5),
    "sparsify-block": lambda m: pk.sparsify(m, 0.5, pattern="block"),
    "factorize": lambda m: pk.factorize(m, rank=8),
}


def dense_twin(model, converted):
    """The original model with each converted Linear's weight replaced by the
    dense weight the converted layer computes with: the reference."""
    twin = __import__("copy").deepcopy(model)
    names = dict(converted.named_modules())
    with torch.no_grad():
        for fqn, m in twin.named_modules():
            c = names[fqn]
            if isinstance(m, nn.Linear) and not isinstance(c, nn.Linear):
                w = c.dequantized_weight() if isinstance(c, pk.nn.Int8Linear) else c.to_dense()
                m.weight.copy_(w)
    return twin


@pytest.mark.parametrize("name", list(CONVERSIONS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_converts_and_runs(name, batch_first, gen):
    model = transformer(gen, batch_first)
    conv = CONVERSIONS[name](model).eval()
    for layer in conv[0].layers:
        # attention reads out_proj.weight itself: left dense
        assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert not isinstance(layer.linear1, nn.Linear) and not isinstance(layer.linear2, nn.Linear)
    assert not isinstance(conv[1], nn.Linear) or name == "factorize"  # 64 -> 8: would grow
    twin = dense_twin(model, conv)
    x = torch.randn(3, 10, 64, generator=gen)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 7:] = True
    if not batch_first:
        x = x.transpose(0, 1)
    keep = ~mask if batch_first else ~mask.T
    tol = 3e-2 if name == "int8" else 1e-4  # W8A8 quantizes the activations too
    # Fused paths (no_grad, inference_mode, padding masks) and the plain one.
    for ctx in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with ctx():
            got = conv[1](conv[0](x, src_key_padding_mask=mask))
            want = twin[1](twin[0](x, src_key_padding_mask=mask))
            scale = float(want[keep].abs().max())
            assert float((got - want)[keep].abs().max()) <= tol * scale, ctx
            torch.testing.assert_close(conv(x), twin(x), rtol=tol, atol=tol * scale)
    if name not in ("int8", "int8-weight_only"):  # the others train
        conv.train()
        conv(x).square().mean().backward()


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_multihead_attention_is_left_alone(name, gen):
    model = Attn().eval()
    conv = CONVERSIONS[name](model).eval()
    assert type(conv.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert torch.equal(conv.mha.out_proj.weight, model.mha.out_proj.weight)
    assert not isinstance(conv.inp, nn.Linear)
    x = torch.randn(2, 5, 32, generator=gen)
    twin = dense_twin(model, conv)
    tol = 3e-2 if name == "int8" else 1e-4
    for ctx in (torch.no_grad, torch.enable_grad):
        with ctx():
            want = twin(x)
            torch.testing.assert_close(conv(x), want, rtol=tol, atol=tol * float(want.abs().max()))
    # An attention module converted on its own is returned unchanged in behaviour.
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    for convert in CONVERSIONS.values():
        same = convert(mha)
        torch.testing.assert_close(same(x, x, x)[0], mha(x, x, x)[0])


# --- meta tensors: shapes without values ---------------------------------------------------


def _meta(t):
    return t.to("meta") if isinstance(t, torch.Tensor) else t


def _like(a, b):
    """Same structure, shapes and dtypes (b on meta)."""
    if isinstance(a, torch.Tensor):
        assert b.device.type == "meta" and b.shape == a.shape and b.dtype == a.dtype, (a, b)
    elif isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=False):
            _like(x, y)


def meta_cases(gen):
    x = torch.randn(3, 5, 16, generator=gen)
    wq = torch.randint(-127, 128, (4, 16), dtype=torch.int8, generator=gen)
    s = torch.rand(4, generator=gen)
    p = pk.ops.pack_int8_weight(wq)
    pm = p._replace(packed=_meta(p.packed), comp=_meta(p.comp))
    sw = pk.ops.to_sparse(pk.prune(torch.randn(4, 16, generator=gen), 0.5))
    swm = sw._replace(values=_meta(sw.values), col=_meta(sw.col), row_ptr=_meta(sw.row_ptr))
    sb = pk.ops.to_sparse(pk.prune(torch.randn(6, 16, generator=gen), 0.5, "block"), 4)
    sbm = sb._replace(values=_meta(sb.values), col=_meta(sb.col), row_ptr=_meta(sb.row_ptr))
    v, i = pk.ops.topk_sparsify(x, k=7)
    a = torch.randn(30, 20, generator=gen)
    return {
        "quantize_per_row": (lambda m: pk.ops.quantize_per_row(m(x.half()))),
        "int8_gemm": (lambda m: pk.ops.int8_gemm(m(wq), m(wq))),
        "int8_linear": (lambda m: pk.ops.int8_linear(m(x), m(wq), m(s), m(s))),
        "int8_linear packed": (lambda m: pk.ops.int8_linear(m(x), p if m is _id else pm, m(s))),
        "int8_weight_linear": (lambda m: pk.ops.int8_weight_linear(m(x.bfloat16()), m(wq), m(s))),
        "pack_int8_weight": (lambda m: tuple(pk.ops.pack_int8_weight(m(wq))[:2])),
        "unpack_int8_weight": (lambda m: pk.ops.unpack_int8_weight(p if m is _id else pm)),
        "topk_sparsify": (lambda m: pk.ops.topk_sparsify(m(x), k=7)),
        "topk_sparsify residual": (
            lambda m: pk.ops.topk_sparsify(m(x), k=7, residual=m(torch.zeros(3, 5, 16)))
        ),
        "topk_densify": (lambda m: pk.ops.topk_densify(m(v), m(i), shape=(3, 5, 16))),
        "topk_densify out": (lambda m: pk.ops.topk_densify(m(v), m(i), out=m(torch.zeros(240)))),
        "to_dense": (lambda m: pk.ops.to_dense(sw if m is _id else swm)),
        "sparse_linear": (lambda m: pk.ops.sparse_linear(m(x), sw if m is _id else swm, m(s))),
        "sparse_linear bsr": (lambda m: pk.ops.sparse_linear(m(x), sb if m is _id else sbm)),
        "randomized_svd": (lambda m: pk.ops.randomized_svd(m(a), 4)),
        "batched_svd": (lambda m: pk.ops.batched_svd(m(a.view(2, 15, 20)))),
    }


def _id(t):
    return t


def test_every_op_runs_on_meta_tensors(gen):
    for name, call in meta_cases(gen).items():
        try:
            _like(call(_id), call(_meta))
        except Exception as e:
            raise AssertionError(f"{name} on meta") from e


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pk.ops.to_sparse(torch.randn(4, 4, device="meta")), "to_sparse: w is a meta"),
        (lambda: pk.prune(torch.randn(4, 4, device="meta"), 0.5), "prune: weight is a meta"),
        (lambda: pk.ops.svd_rank(torch.randn(9, 7, device="meta"), tol=0.1), "svd_rank: a is"),
        (lambda: pk.nn.Int8Linear.from_linear(nn.Linear(4, 4, device="meta")), "linear.weight"),
        (lambda: pk.nn.SparseLinear.from_linear(nn.Linear(4, 4, device="meta"), 0.5), "meta"),
        (lambda: pk.nn.LowRankLinear.from_linear(nn.Linear(4, 4, device="meta"), rank=2), "meta"),
    ],
)
def test_what_needs_values_refuses_meta_clearly(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_every_layer_moves_to_meta_and_runs(gen):
    lin = linear(16, 6, gen)
    x = torch.randn(2, 3, 16, generator=gen)
    layers = _layers(lin)
    layers["tucker"] = pk.nn.TuckerConv2d.from_conv(nn.Conv2d(4, 6, 3), ranks=(2, 2))
    for name, layer in layers.items():
        inp = torch.randn(2, 4, 8, 8, generator=gen) if name == "tucker" else x
        want = layer(inp)
        meta = layer.to("meta")
        got = meta(inp.to("meta"))
        assert got.device.type == "meta" and got.shape == want.shape and got.dtype == want.dtype
        assert meta.nbytes() > 0 and len(repr(meta)) > 0, name


# --- the layers' and conversions' own arguments ----------------------------------------


def _seq():
    return nn.Sequential(nn.Linear(16, 8))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (
            lambda: pk.ops.topk_densify(V, IDX, shape=(4,), accumulate=torch.zeros(3)),
            TypeError,
            "topk_densify: accumulate must be a bool",
        ),
        (
            lambda: pk.nn.Int8Linear(16, 8, bias=torch.zeros(8)),
            TypeError,
            "Int8Linear: bias must be a bool",
        ),
        (lambda: pk.nn.Int8Linear(16.0, 8), TypeError, "Int8Linear: in_features must be an int"),
        (
            lambda: pk.nn.LowRankLinear(16, 8, 2, bias="yes"),
            TypeError,
            "LowRankLinear: bias must be a bool",
        ),
        (
            lambda: pk.quantize_int8(_seq(), inplace=torch.ones(2)),
            TypeError,
            "quantize_int8: inplace must be a bool",
        ),
        (
            lambda: pk.sparsify(_seq(), 0.5, filter_fn="0"),
            TypeError,
            "sparsify: filter_fn must be callable",
        ),
        (
            lambda: pk.sparsify(_seq(), 0.5, inplace=None),
            TypeError,
            "sparsify: inplace must be a bool",
        ),
        (lambda: pk.factorize(_seq(), rank="2"), TypeError, "factorize: rank must be an int"),
        (lambda: pk.factorize(_seq(), rank=0), ValueError, "factorize: rank must be an int >= 1"),
        (lambda: pk.factorize(_seq(), energy=1.5), ValueError, "factorize: energy must be in"),
        (lambda: pk.factorize(_seq(), tol="0.1"), TypeError, "factorize: tol must be a real"),
        (
            lambda: pk.factorize(_seq(), rank=2, filter_fn=3),
            TypeError,
            "factorize: filter_fn must be callable",
        ),
        (
            lambda: pk.nn.SparseLinear.from_linear(nn.Linear(8, 8), "0.5"),
            TypeError,
            "SparseLinear.from_linear: sparsity must be a float",
        ),
        (
            lambda: pk.nn.LowRankLinear.from_linear(nn.Linear(8, 8), energy=0),
            ValueError,
            "LowRankLinear.from_linear: energy must be in",
        ),
        (
            lambda: pk.nn.TuckerConv2d.from_conv(nn.Conv2d(4, 4, 3), ranks=(2, True)),
            TypeError,
            "TuckerConv2d.from_conv: ranks must be an int",
        ),
        (
            lambda: pk.nn.TuckerConv2d.from_conv(nn.Conv2d(4, 4, 3), ranks=3),
            TypeError,
            "TuckerConv2d.from_conv: ranks must be two positive ints",
        ),
        (
            lambda: pk.nn.TuckerConv2d.from_conv(nn.Conv2d(4, 4, 3), energy="x"),
            TypeError,
            "TuckerConv2d.from_conv: energy must be a real number",
        ),
    ],
)
def test_layers_and_conversions_name_their_own_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
