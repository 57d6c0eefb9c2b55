"""sparse family: formats, pruning, sparse_linear forward/backward, every backend and ISA."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels import _native, _reference
from pykernels.ops import sparse as sp

SHAPES = [(1, 1, 1), (3, 5, 7), (17, 130, 70), (40, 64, 33)]  # M, K, N


def random_sparse(n, k, density, gen, block=1):
    w = torch.randn(n, k, generator=gen)
    if block == 1:
        w[torch.rand(n, k, generator=gen) >= density] = 0
    else:
        keep = torch.rand(-(-n // 4), -(-k // 4), generator=gen) < density
        w = w * sp.expand_block_mask(keep, n, k)
    return w


def dense_grads(x, w, b, g):
    """x, W, b gradients of F.linear by dense autograd (W's restricted to the mask later)."""
    xr = x.detach().clone().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    br = None if b is None else b.detach().clone().requires_grad_()
    torch.nn.functional.linear(xr, wr, br).backward(g)
    return xr.grad, wr.grad, None if br is None else br.grad


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("nk", [(1, 1), (5, 7), (70, 130), (64, 64)])
def test_to_sparse_round_trip_is_exact(block, nk, gen):
    n, k = nk
    w = random_sparse(n, k, 0.3, gen, block)
    sw = pk.ops.to_sparse(w, block)
    assert torch.equal(sw.to_dense(), w)
    assert sw.col.dtype == torch.int16 and sw.values.dtype == torch.float32
    if block == 1:
        assert sw.nnz() == int((w != 0).sum())
    ref = w.to_sparse_csr() if block == 1 else None
    if ref is not None:
        assert torch.equal(sw.row_ptr, ref.crow_indices())
        assert torch.equal(sp.col_as_int64(sw.col), ref.col_indices())


def test_wide_k_uses_32_bit_columns_and_unsigned_16(gen):
    w = torch.zeros(3, 70000)
    w[0, 69999] = 2.0
    w[1, 40000] = -1.0  # above 32767: read back as unsigned
    w[2, 5] = 3.0
    sw = pk.ops.to_sparse(w)
    assert sw.col.dtype == torch.int32
    assert torch.equal(sw.to_dense(), w)
    x = torch.randn(2, 70000, generator=gen)
    torch.testing.assert_close(pk.ops.sparse_linear(x, sw), x @ w.T)
    w16 = torch.zeros(2, 65536)
    w16[0, 65535] = 1.5
    w16[1, 40000] = 2.5
    s16 = pk.ops.to_sparse(w16)
    assert s16.col.dtype == torch.int16
    x16 = torch.randn(3, 65536, generator=gen)
    torch.testing.assert_close(pk.ops.sparse_linear(x16, s16), x16 @ w16.T)


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("mkn", SHAPES)
def test_forward_and_backward_match_dense(backend, block, mkn, gen):
    m, k, n = mkn
    w = random_sparse(n, k, 0.3, gen, block)
    sw = pk.ops.to_sparse(w, block)
    x = torch.randn(m, k, generator=gen, requires_grad=True)
    b = torch.randn(n, generator=gen, requires_grad=True)
    values = sw.values.clone().requires_grad_()
    y = pk.ops.sparse_linear(x, sw._replace(values=values), b)
    torch.testing.assert_close(y, x.detach().double().matmul(w.double().T).add(b.detach()).float())
    g = torch.randn(m, n, generator=gen)
    y.backward(g)
    gx, gw, gb = dense_grads(x, w, b, g)
    torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, gb)
    stored = sw._replace(values=torch.ones_like(values)).to_dense() != 0
    got = sw._replace(values=values.grad).to_dense()
    torch.testing.assert_close(got, gw * stored, rtol=1e-5, atol=1e-5)


# --- the native kernels at every ISA cap --------------------------------------
# Chunk edges of the kernels: widths 8, 16 and 32 columns of M (a ragged last
# chunk takes the narrowest that holds it; a lone last row the one-token
# path), 8-row output tiles, 4x4 blocks past N and K.
CHUNK_MS = [1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 40, 48, 65, 70]


def ragged_sparse(n, k, gen, block=1):
    """A weight whose rows (or block rows) hold anything from nothing to most of K."""
    rows = -(-n // block)
    dens = torch.rand(rows, 1, generator=gen) * 0.7
    dens[torch.randperm(rows, generator=gen)[: max(1, rows // 6)]] = 0.0  # empty rows
    keep = torch.rand(rows, -(-k // block), generator=gen) < dens
    if block != 1:
        keep = sp.expand_block_mask(keep, n, k)
    return torch.randn(n, k, generator=gen) * keep


def with_int32_cols(sw):
    """The same weight with 32-bit column indices (the kernels' other index path)."""
    return sw._replace(col=sp.col_as_int64(sw.col).to(torch.int32))


def assert_sums_close(got, ref, abs_terms):
    """Equal up to float32 rounding of sums: error <= 1e-5 * (sum of |terms|) per element."""
    assert got.shape == ref.shape and got.dtype == torch.float32
    err = (got.double() - ref.double()).abs()
    bound = 1e-5 * abs_terms.double() + 1e-6
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max()):.3g}"


def check_against_reference(x, sw, bias, gen):
    """sparse_linear's output, dX and d(values) against _reference (float64 sums)."""
    csr, perm = sp.bsr_to_csr(sw) if sw.block != 1 else (sw, None)
    cols = sp.col_as_int64(csr.col)
    rows = torch.repeat_interleave(torch.arange(sw.n), csr.row_ptr[1:] - csr.row_ptr[:-1])
    w_abs = sw.to_dense().abs()
    y_ref = _reference.sparse_linear(x, csr.row_ptr, cols, csr.values, sw.n, bias)
    xg = x.clone().requires_grad_()
    values = sw.values.clone().requires_grad_()
    y = pk.ops.sparse_linear(xg, sw._replace(values=values), bias)
    assert_sums_close(y, y_ref, x.abs() @ w_abs.T + (0 if bias is None else bias.abs()))
    g = torch.randn(y.shape, generator=gen)
    y.backward(g)
    dx_ref, dv_ref = _reference.sparse_linear_backward(g, x, sw.to_dense(), csr.row_ptr, cols)
    assert_sums_close(xg.grad, dx_ref, g.abs() @ w_abs)
    dv_abs = (g.abs().T @ x.abs())[rows, cols]
    if perm is not None:  # stored entries past N or K get no gradient
        dv_ref = torch.zeros(values.numel()).index_put_((perm,), dv_ref).view(values.shape)
        dv_abs = torch.zeros(values.numel()).index_put_((perm,), dv_abs).view(values.shape)
    assert_sums_close(values.grad, dv_ref, dv_abs)


@pytest.mark.parametrize("col32", [False, True], ids=["col16", "col32"])
@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("m", CHUNK_MS)
def test_every_isa_and_chunk_width(cpu_isa, block, m, col32, gen):
    n, k = 203, 131  # neither a multiple of 4 nor of 8
    sw = pk.ops.to_sparse(ragged_sparse(n, k, gen, block), block)
    if col32:
        sw = with_int32_cols(sw)
    x = torch.randn(m, k, generator=gen)
    check_against_reference(x, sw, torch.randn(n, generator=gen), gen)


@pytest.fixture
def two_threads():
    before = _native.C.get_num_threads()
    pk.set_num_threads(2)
    yield
    pk.set_num_threads(before)


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("m", [1, 9, 33])
def test_every_isa_two_threads(cpu_isa, two_threads, block, m, gen):
    """Large enough that the driver splits the rows (by stored values) between threads."""
    n, k = 1003, 618
    sw = pk.ops.to_sparse(ragged_sparse(n, k, gen, block), block)
    x = torch.randn(m, k, generator=gen)
    check_against_reference(x, sw, None, gen)


@pytest.mark.parametrize("nk", [(1, 1), (3, 2), (5, 4), (9, 13), (10, 14), (11, 15), (12, 16)])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_every_isa_block_edges(cpu_isa, nk, m, gen):
    n, k = nk
    w = torch.randn(n, k, generator=gen)  # every block stored, the edge ones padded
    sw = pk.ops.to_sparse(w, 4)
    check_against_reference(
        torch.randn(m, k, generator=gen), sw, torch.randn(n, generator=gen), gen
    )


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("m", [1, 9, 33])
def test_every_isa_empty_weight(cpu_isa, block, m, gen):
    n, k = 21, 18
    sw = pk.ops.to_sparse(torch.zeros(n, k), block)
    assert sw.values.numel() == 0
    check_against_reference(
        torch.randn(m, k, generator=gen), sw, torch.randn(n, generator=gen), gen
    )


@pytest.mark.parametrize("k, dtype", [(65536, torch.int16), (70001, torch.int32)])
@pytest.mark.parametrize("m", [1, 9, 17])
def test_every_isa_wide_k(cpu_isa, k, dtype, m, gen):
    """Column indices past 32767 (read as unsigned 16-bit) and past 65535 (32-bit)."""
    n = 12
    w = torch.zeros(n, k)
    for r in range(n):
        idx = torch.randint(0, k, (r * 3,), generator=gen)
        w[r, idx] = torch.randn(idx.numel(), generator=gen)
    w[0, k - 1] = 1.5
    w[1, 40000] = -2.0
    sw = pk.ops.to_sparse(w)
    assert sw.col.dtype == dtype
    check_against_reference(torch.randn(m, k, generator=gen), sw, None, gen)


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("m", [1, 5, 17, 40])
def test_every_isa_nan_stays_in_its_token(cpu_isa, block, m, gen):
    """A NaN in x reaches only its own token's outputs from rows storing its column."""
    n, k = 45, 37
    sw = pk.ops.to_sparse(ragged_sparse(n, k, gen, block), block)
    x = torch.randn(m, k, generator=gen)
    x[m // 2, 7] = float("nan")
    x[m - 1, k - 1] = float("inf")
    csr = sp.bsr_to_csr(sw)[0] if block != 1 else sw
    ref = _reference.sparse_linear(x, csr.row_ptr, sp.col_as_int64(csr.col), csr.values, n, None)
    y = pk.ops.sparse_linear(x, sw)
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    ok = torch.isfinite(ref)
    bound = x.nan_to_num(0, 0, 0).abs() @ sw.to_dense().abs().T
    assert_sums_close(y[ok], ref[ok], bound[ok])


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("m", [1, 3, 9, 33])
def test_every_isa_strided_rows_read_nothing_past_k(cpu_isa, block, m, gen):
    """The native kernel takes x with a row stride; what lies past K is never read."""
    n, k = 19, 13  # the last block column covers K = 12 only
    sw = pk.ops.to_sparse(ragged_sparse(n, k, gen, block), block)
    base = torch.full((m, k + 3), float("nan"))
    base[:, :k] = torch.randn(m, k, generator=gen)
    view = base[:, :k]
    y = torch.empty(m, n)
    _native.C.sparse_linear(
        view.numpy(),
        sw.row_ptr.numpy(),
        sw.col.numpy().view(np.uint16),
        sw.values.reshape(-1).numpy(),
        block,
        n,
        None,
        y.numpy(),
    )
    w = sw.to_dense().double()
    assert_sums_close(y, (view.double() @ w.T).float(), view.abs().double() @ w.abs().T)
    assert torch.equal(pk.ops.sparse_linear(view, sw), y)


def test_batches_views_dtypes_and_empty(gen):
    w = random_sparse(20, 48, 0.2, gen)
    sw = pk.ops.to_sparse(w)
    x = torch.randn(2, 3, 48, generator=gen)
    torch.testing.assert_close(pk.ops.sparse_linear(x, sw), x @ w.T)
    wide = torch.randn(6, 60, generator=gen)
    torch.testing.assert_close(pk.ops.sparse_linear(wide[:, 5:53], sw), wide[:, 5:53] @ w.T)
    for dtype in (torch.float16, torch.bfloat16):
        y = pk.ops.sparse_linear(x.to(dtype), sw)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), x.to(dtype).float() @ w.T, rtol=1e-2, atol=1e-2)
    assert pk.ops.sparse_linear(x[:, :0], sw).shape == (2, 0, 20)
    zero = pk.ops.to_sparse(torch.zeros(20, 48))
    assert zero.nnz() == 0
    b = torch.randn(20, generator=gen)
    torch.testing.assert_close(pk.ops.sparse_linear(x, zero, b), b.expand(2, 3, 20))


def test_nan_reaches_only_the_outputs_it_touches(backend, gen):
    w = torch.zeros(6, 10)
    w[0, 3] = 1.0
    w[2, 3] = -2.0
    w[4, 7] = 1.0
    x = torch.randn(3, 10, generator=gen)
    x[1, 3] = float("nan")
    y = pk.ops.sparse_linear(x, pk.ops.to_sparse(w))
    assert torch.isnan(y[1, [0, 2]]).all()
    assert torch.isfinite(y[[0, 2]]).all() and torch.isfinite(y[1, [1, 3, 4, 5]]).all()


def test_prune_unstructured_is_exact_magnitude(gen):
    w = torch.randn(64, 100, generator=gen)
    p = pk.prune(w, 0.9)
    keep = int((p != 0).sum())
    assert keep == 6400 - int(0.9 * 6400)
    kept = w[p != 0].abs()
    dropped = w[p == 0].abs()
    assert float(kept.min()) >= float(dropped.max())
    assert torch.equal(p[p != 0], w[p != 0])


def test_prune_block_and_2_4(gen):
    w = torch.randn(30, 42, generator=gen)
    p = pk.prune(w, 0.75, "block")
    norms = sp.block_norms(w)
    kept_blocks = sp.block_norms(p) != 0
    assert int(kept_blocks.sum()) == norms.numel() - int(0.75 * norms.numel())
    assert float(norms[kept_blocks].min()) >= float(norms[~kept_blocks].max())
    w4 = torch.randn(8, 16, generator=gen)
    p4 = pk.prune(w4, pattern="2:4")
    groups = (p4 != 0).view(8, 4, 4).sum(dim=2)
    assert torch.all(groups == 2)
    top2 = w4.abs().view(8, 4, 4).topk(2, dim=2).values.sum(dim=2)
    torch.testing.assert_close(p4.abs().view(8, 4, 4).sum(dim=2), top2)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((torch.randn(4, 4), 1.0), ValueError, r"\[0, 1\)"),
        ((torch.randn(4, 4), -0.1), ValueError, r"\[0, 1\)"),
        ((torch.randn(4, 4), "half"), TypeError, "sparsity must be a float"),
        ((torch.randn(4, 6), None, "2:4"), ValueError, "divisible by 4"),
        ((torch.randn(4, 8), 0.7, "2:4"), ValueError, "sparsity 0.5"),
        ((torch.randn(4, 4), 0.5, "3:4"), ValueError, "pattern must be one of"),
        ((torch.randn(4), 0.5), ValueError, "2-D float"),
        ((torch.randn(4, 4), None), ValueError, "needs a sparsity"),
    ],
)
def test_prune_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        pk.prune(*args)


def test_sparse_linear_bad_arguments(gen):
    sw = pk.ops.to_sparse(random_sparse(8, 12, 0.5, gen))
    x = torch.randn(3, 12, generator=gen)
    with pytest.raises(ValueError, match="K = 12"):
        pk.ops.sparse_linear(torch.randn(3, 11), sw)
    with pytest.raises(TypeError, match="x must be float32"):
        pk.ops.sparse_linear(x.int(), sw)
    with pytest.raises(TypeError, match="SparseWeight"):
        pk.ops.sparse_linear(x, torch.randn(8, 12))
    with pytest.raises(ValueError, match="bias must have shape"):
        pk.ops.sparse_linear(x, sw, torch.randn(7))
    with pytest.raises(ValueError, match="x is on meta"):
        pk.ops.sparse_linear(x.to("meta"), sw)
    with pytest.raises(ValueError, match="row_ptr"):
        pk.ops.sparse_linear(x, sw._replace(row_ptr=sw.row_ptr[:-1]))
    bad_col = sw.col.clone()
    bad_col[0] = 12  # past K: the native binding refuses it instead of reading out of bounds
    with pytest.raises(ValueError, match="out of range"):
        pk.ops.sparse_linear(x, sw._replace(col=bad_col))
    with pytest.raises(ValueError, match="block must be"):
        pk.ops.to_sparse(torch.randn(4, 4), block=2)


def test_opcheck_and_compile(gen):
    sw = pk.ops.to_sparse(random_sparse(20, 36, 0.3, gen))
    x = torch.randn(5, 36, generator=gen)
    b = torch.randn(20, generator=gen)
    torch.library.opcheck(
        torch.ops.pykernels.sparse_linear.default,
        (x, sw.values, sw.col, sw.row_ptr, b, 20, 1),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
    layer = pk.nn.SparseLinear(sw, b, "unstructured")
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    xg = x.clone().requires_grad_()
    compiled(xg).sum().backward()
    torch.testing.assert_close(xg.grad, torch.ones(5, 20) @ sw.to_dense())


# --- the layer ---------------------------------------------------------------


def linear(k, n, gen):
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
        lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


@pytest.mark.parametrize(
    "pattern, sparsity", [("unstructured", 0.9), ("block", 0.75), ("2:4", None)]
)
def test_layer_forward_backward_state_dict(pattern, sparsity, gen):
    lin = linear(64, 40, gen)
    layer = pk.nn.SparseLinear.from_linear(lin, sparsity, pattern)
    dense = layer.to_dense()
    assert torch.equal(dense, pk.prune(lin.weight.detach(), sparsity, pattern))
    x = torch.randn(9, 64, generator=gen, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, dense, lin.bias))
    y.sum().backward()
    assert layer.values.grad is not None and layer.bias.grad is not None
    r = repr(layer)
    assert f"pattern={pattern}" in r and "density=" in r
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = pk.nn.SparseLinear.from_linear(linear(64, 40, gen), sparsity, pattern)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_state_dict_resizes_when_counts_differ(gen):
    a = pk.nn.SparseLinear.from_linear(linear(32, 16, gen))  # keeps zeros: dense here
    lin = linear(32, 16, gen)
    with torch.no_grad():
        lin.weight[lin.weight.abs() < 1] = 0
    b = pk.nn.SparseLinear.from_linear(lin)
    assert a.values.shape != b.values.shape
    a.load_state_dict(b.state_dict())
    x = torch.randn(4, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_optimizer_keeps_the_pattern(gen):
    layer = pk.nn.SparseLinear.from_linear(linear(48, 24, gen), 0.8)
    stored = layer.sparse_weight()._replace(values=torch.ones_like(layer.values)).to_dense() != 0
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(16, 48, generator=gen)
    target = torch.randn(16, 24, generator=gen)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert not bool((layer.to_dense() != 0)[~stored].any())


def test_nbytes_at_90_percent(gen):
    layer = pk.nn.SparseLinear.from_linear(linear(1024, 1024, gen), 0.9)
    dense_bytes = 4 * 1024 * 1024 + 4 * 1024
    assert layer.nbytes() <= 0.2 * dense_bytes


def test_sparsify_layer_and_global_scope(gen):
    model = nn.Sequential(linear(64, 64, gen), nn.ReLU(), nn.Sequential(linear(64, 32, gen)))
    with torch.no_grad():
        model[2][0].weight.mul_(10)  # a layer of larger weights: global scope prunes it less
    per_layer = pk.sparsify(model, 0.8)
    assert isinstance(model[0], nn.Linear)  # a copy by default
    densities = [m.density() for m in per_layer.modules() if isinstance(m, pk.nn.SparseLinear)]
    assert all(abs(d - 0.2) < 1e-3 for d in densities)
    glob = pk.sparsify(model, 0.8, scope="global")
    layers = [m for m in glob.modules() if isinstance(m, pk.nn.SparseLinear)]
    kept = sum(int((m.to_dense() != 0).sum()) for m in layers)
    total = 64 * 64 + 64 * 32
    assert kept == total - int(0.8 * total)
    assert layers[1].density() > layers[0].density()
    only_first = pk.sparsify(model, 0.5, filter_fn=lambda m, fqn: fqn == "0", inplace=True)
    assert only_first is model and isinstance(model[0], pk.nn.SparseLinear)
    assert isinstance(model[2][0], nn.Linear)
    with pytest.raises(ValueError, match="scope"):
        pk.sparsify(model, 0.5, scope="model")


@pytest.mark.cuda
def test_layer_to_cuda(gen):
    layer = pk.nn.SparseLinear.from_linear(linear(64, 32, gen), 0.9)
    x = torch.randn(5, 64, generator=gen)
    ref = layer(x)
    g = layer.to("cuda")
    torch.testing.assert_close(g(x.cuda()).cpu(), ref, rtol=1e-5, atol=1e-5)


def test_block_structure_expansion_is_remembered_until_the_structure_changes(gen):
    """bsr_to_csr reuses its expansion for the same col/row_ptr, and rebuilds it
    after an in-place change or for other tensors: gradients stay right."""
    w = random_sparse(37, 50, 0.3, gen, block=4)
    sw = sp.to_sparse(w, block=4)
    csr1, perm1 = sp.bsr_to_csr(sw)
    csr2, perm2 = sp.bsr_to_csr(sw)
    assert perm2 is perm1 and csr2.row_ptr is csr1.row_ptr
    # the values are gathered per call, never remembered
    sw2 = sw._replace(values=sw.values * 2)
    assert torch.equal(sp.bsr_to_csr(sw2)[0].values, csr1.values * 2)
    # another weight's structure written in place into the same tensors
    other = sp.to_sparse(random_sparse(37, 50, 0.3, gen, block=4), block=4)
    nblk = min(other.col.numel(), sw.col.numel())
    sw.col[:nblk].copy_(other.col[:nblk])
    fresh = sp._expand_structure(sw)
    got = sp.bsr_to_csr(sw)
    assert got[1] is not perm1
    assert torch.equal(got[1], fresh[2]) and torch.equal(got[0].row_ptr, fresh[1])
    # a copy of the tensors is a different structure object: no stale hit
    sw3 = sw._replace(col=sw.col.clone(), row_ptr=sw.row_ptr.clone())
    assert sp.bsr_to_csr(sw3)[1] is not got[1]
    # and training through the layer matches the dense reference
    x = torch.randn(5, 50, generator=gen)
    check_against_reference(x, sp.to_sparse(w, block=4), None, gen)
    check_against_reference(x, sp.to_sparse(w, block=4), None, gen)


# --- issue 20: what the thread count may change (the documented part only) ------------------


@pytest.mark.skipif(_native.C is None, reason="native CPU kernels not built")
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_thread_count_changes_only_the_last_bits_of_the_input_gradient(pattern, gen, monkeypatch):
    monkeypatch.setenv("PYKERNELS_BACKEND", "native")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    layer = pk.nn.SparseLinear.from_linear(nn.Linear(512, 384), 0.8 if pattern != "2:4" else None,
                                           pattern)  # fmt: skip
    x = torch.randn(64, 512, generator=gen)
    gy = torch.randn(64, 384, generator=gen)
    before = _native.C.get_num_threads()
    runs = []
    try:
        for t in (1, 2, 3, 4):
            pk.set_num_threads(t)
            xi = x.clone().requires_grad_(True)
            layer.zero_grad()
            y = layer(xi)
            y.backward(gy)
            runs.append((y.detach(), layer.values.grad.clone(), xi.grad))
    finally:
        pk.set_num_threads(before)
    dense = layer.to_dense().double()
    want_dx = gy.double() @ dense
    for y, dv, dx in runs:
        assert torch.equal(y, runs[0][0]) and torch.equal(dv, runs[0][1])
        # dx: the same sum in another order, so within float32 rounding of it
        torch.testing.assert_close(dx.double(), want_dx, rtol=1e-5, atol=1e-5)


def test_bench_block_cases_run_with_or_without_torch_bsr(monkeypatch):
    """torch without MKL (its aarch64 wheels) cannot multiply BSR on the CPU: the
    sparse bench then measures the block layer against dense instead of failing."""
    from pykernels.bench import sparse as bench_sparse

    monkeypatch.setattr(bench_sparse, "N", 64)
    monkeypatch.setattr(bench_sparse, "K", 64)
    real = bench_sparse.torch_bsr_runs()
    for runs in (False, True):
        monkeypatch.setattr(bench_sparse, "torch_bsr_runs", lambda runs=runs: runs)
        block = [c for c in bench_sparse.cases("cpu", quick=True) if c.name.startswith("block")]
        assert block
        for c in block:
            assert ("torch.sparse_bsr" in c.impls) == runs
            assert c.baseline == ("torch.sparse_bsr" if runs else "dense F.linear")
            if runs == real:  # what this torch is given runs here
                for fn in c.impls.values():
                    fn()


@pytest.mark.parametrize("mkn", [(1, 10, 9), (5, 64, 33), (33, 70, 40)])
def test_torch_backend_block_without_torch_bsr_product(monkeypatch, mkn, gen):
    """The torch backend where torch has no CPU BSR product (no MKL: its aarch64
    wheels) multiplies block by block: same result, and a NaN in x reaches only
    the rows that store its column's block."""
    from pykernels.backends.torch import sparse as torch_sparse

    monkeypatch.setattr(torch_sparse, "bsr_mm_runs", lambda device_type: False)
    monkeypatch.setenv("PYKERNELS_BACKEND", "torch")
    m, k, n = mkn
    w = random_sparse(n, k, 0.3, gen, 4)
    sw = pk.ops.to_sparse(w, 4)
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen)
    y = pk.ops.sparse_linear(x, sw, b)
    torch.testing.assert_close(y, x.double().matmul(w.double().T).add(b).float())
    x[0, k - 1] = float("nan")
    y = pk.ops.sparse_linear(x, sw, b)
    stores = sw._replace(values=torch.ones_like(sw.values)).to_dense()[:, k - 1] != 0
    assert bool(y[0].isnan().eq(stores).all()) and not y[1:].isnan().any()
