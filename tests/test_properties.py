"""Property-based and adversarial tests of every public op and layer (hypothesis).

Each property draws shapes (0 and 1 included), dtypes, memory layouts (views,
offsets, strides, transposes, expanded zero-stride views), values (NaN, +-inf,
-0.0, dtype limits, subnormals) and runs on every CPU backend. The result must
match the reference (exactly where the op is exact, within a bound derived from
the inputs where it rounds), or the call must raise a TypeError or ValueError
naming the function and the argument: never a crash, never a RuntimeError from
inside a kernel.

Deterministic for CI: derandomized (the examples are fixed), bounded example
counts, no example database. Values come from a torch generator seeded by the
drawn example, so hypothesis explores and shrinks the structure (shape, dtype,
layout, which special values) rather than thousands of floats one by one.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, _available
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pykernels as pk
from pykernels import _reference
from pykernels.ops import sparse as sp

BACKENDS = [b for b in CPU_BACKENDS if _available(b)]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def profile(examples: int):
    return settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,  # `backend` sets an env var once per test
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ],
    )


# --- tensors: layout and values -------------------------------------------------------

LAYOUTS = ["contiguous", "transposed", "offset", "strided", "expanded"]
SPECIALS = ["nan", "inf", "-inf", "-0.0", "max", "-max", "tiny", "subnormal", "zero", "one"]


def special_value(name: str, dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return {
        "nan": float("nan"),
        "inf": float("inf"),
        "-inf": float("-inf"),
        "-0.0": -0.0,
        "max": fi.max,
        "-max": -fi.max,
        "tiny": fi.tiny,
        "subnormal": fi.tiny / 4,
        "zero": 0.0,
        "one": 1.0,
    }[name]


def make(shape, dtype, layout, seed, specials=(), density=0.0, scale=1.0):
    """A tensor of `shape` in `layout` with random values and some special ones."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    numel = math.prod(shape)

    def fill(s):
        t = torch.randn(s, generator=g, dtype=torch.float64) * scale
        if specials and density > 0 and t.numel():
            where = torch.rand(s, generator=g) < density
            pick = torch.randint(len(specials), s, generator=g)
            for j, name in enumerate(specials):
                t = torch.where(where & (pick == j), special_value(name, dtype), t)
        return t.to(dtype)

    if layout == "transposed" and len(shape) >= 2:
        return fill(shape[::-1]).permute(*reversed(range(len(shape))))
    if layout == "offset" and numel:
        return fill((numel + 7,))[3 : 3 + numel].view(shape)
    if layout == "strided" and shape:
        return fill((*shape[:-1], 2 * shape[-1]))[..., ::2]
    if layout == "expanded" and shape:
        d = max(range(len(shape)), key=lambda i: shape[i])
        base = list(shape)
        base[d] = 1 if shape[d] else 0
        return fill(tuple(base)).expand(shape)
    return fill(shape)


shapes_1d = st.integers(0, 70).map(lambda n: (n,))
sides = st.integers(0, 9)


@st.composite
def float_tensors(draw, min_dims=1, max_dims=3, dtypes=FLOATS, side=sides, specials=True):
    nd = draw(st.integers(min_dims, max_dims))
    shape = tuple(draw(side) for _ in range(nd))
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(LAYOUTS))
    chosen = draw(st.lists(st.sampled_from(SPECIALS), max_size=4, unique=True)) if specials else []
    density = draw(st.sampled_from([0.0, 0.05, 0.3])) if chosen else 0.0
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    seed = draw(st.integers(0, 2**31 - 1))
    return make(shape, dtype, layout, seed, chosen, density, scale)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def same_bits_or_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((bits(a) == bits(b)) | (a.isnan() & b.isnan())).all())


def same_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def within(got, want, bound, dtype):
    """|got - want| <= bound elementwise in float64, NaN where NaN, and where the
    float64 value overflows `dtype`, an inf of its sign or a value near the top."""
    got, want, bound = got.double(), want.double(), bound.double()
    assert torch.equal(got.isnan(), want.isnan()), (got, want)
    top = torch.finfo(dtype).max
    ok = got.isnan() | (got == want) | ((got - want).abs() <= bound)
    big = want.abs() >= 0.99 * top
    ok |= big & ((got.abs() >= 0.99 * top) & (got.sign() == want.sign()))
    assert bool(ok.all()), (got[~ok], want[~ok], bound[~ok])


def refused(exc: BaseException, fn: str) -> None:
    """A clear refusal: TypeError or ValueError, naming the function first."""
    assert isinstance(exc, (TypeError, ValueError)), repr(exc)
    assert str(exc).startswith(f"{fn}: "), str(exc)


# --- top-k ------------------------------------------------------------------------------


@profile(200)
@given(x=float_tensors(max_dims=3, side=st.integers(0, 12)), data=st.data())
def test_topk_sparsify_matches_the_reference(backend, x, data):
    n = x.numel()
    k = data.draw(st.integers(0, n))
    approx = data.draw(st.booleans())
    with_residual = data.draw(st.booleans())
    if not with_residual:
        v, i = pk.ops.topk_sparsify(x, k=k, approx=approx)
        rv, ri = _reference.topk_sparsify_tensor(x, k)
        if approx:  # a valid approximate answer: k distinct ascending indices, values from x
            assert i.numel() == k and bool((i[1:] > i[:-1]).all())
            assert torch.equal(bits(v), bits(x.reshape(-1)[i]))
            return
        assert torch.equal(i, ri) and torch.equal(bits(v), bits(rv))
        return
    r_layout = data.draw(st.sampled_from(LAYOUTS))
    r_scale = data.draw(st.sampled_from([1.0, 1e3, 1e6]))  # past fp16's range, with x's limits
    r_seed = data.draw(st.integers(0, 999))
    r = make(x.shape, torch.float32, r_layout, r_seed, ["max", "nan", "-0.0"], 0.05, r_scale)
    if r.numel() and any(st == 0 and sz > 1 for sz, st in zip(r.shape, r.stride(), strict=False)):
        before = r.clone()
        with pytest.raises(ValueError, match="topk_sparsify: residual is written in place"):
            pk.ops.topk_sparsify(x, k=k, residual=r)
        assert same_or_both_nan(r, before)
        return
    r_ref = r.clone()
    y = x.float() + r
    v, i = pk.ops.topk_sparsify(x, k=k, approx=False, residual=r)
    rv, ri = _reference.topk_sparsify_tensor(x, k, residual=r_ref)
    # Bit-exact, but a NaN sum rounded to fp16/bf16 is any NaN (torch's own
    # conversions differ in the payload they give).
    assert torch.equal(i, ri) and same_bits_or_nan(v, rv)
    assert same_or_both_nan(r, r_ref)
    back = pk.ops.topk_densify(v.float(), i, shape=x.shape) + r
    loose = (y.abs() >= 2.0**29) & (x.dtype == torch.float16)  # topk.h: one fp32 rounding
    assert bool(((back == y) | (back.isnan() & y.isnan()) | loose).all())


BAD_SHAPES = st.one_of(
    st.text(max_size=3),
    st.floats(allow_nan=True),
    st.lists(st.one_of(st.floats(), st.booleans(), st.text(max_size=1)), min_size=1, max_size=3),
    st.lists(st.integers(-5, -1), min_size=1, max_size=2),
    st.just({2: 3}),
    st.just(None),
)


@profile(200)
@given(
    n=st.integers(0, 40),
    dtype=st.sampled_from(FLOATS),
    shape=st.one_of(BAD_SHAPES, st.lists(st.integers(0, 6), max_size=3)),
    seed=st.integers(0, 10**6),
    out_layout=st.sampled_from(LAYOUTS + ["none"]),
    accumulate=st.booleans(),
)
def test_topk_densify_shapes_and_outs(backend, n, dtype, shape, seed, out_layout, accumulate):
    x = make((n,), dtype, "contiguous", seed)
    k = n // 2
    v, i = pk.ops.topk_sparsify(x, k=k)
    if out_layout == "none":
        valid = (
            isinstance(shape, list)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            and (k == 0 or math.prod(shape) > int(i.max()))
        )
        if shape is None or accumulate:
            valid = False
        try:
            got = pk.ops.topk_densify(v, i, shape=shape, accumulate=accumulate)
        except Exception as e:  # noqa: BLE001
            assert not valid, e
            refused(e, "topk_densify")
            return
        assert valid, (shape, got.shape)
        want = _reference.topk_densify(v, i, tuple(shape))
        assert torch.equal(bits(got), bits(want))
        return
    out = make((n,), dtype, out_layout, seed + 1)
    before = out.clone()
    try:
        got = pk.ops.topk_densify(v, i, out=out, accumulate=accumulate)
    except Exception as e:  # noqa: BLE001
        refused(e, "topk_densify")
        assert out_layout == "expanded" and n > 1
        assert same_or_both_nan(out, before)  # refused before writing
        return
    want = _reference.topk_densify(v, i, (n,)).double()
    if accumulate:
        want = want + before.double()
    torch.testing.assert_close(got.double(), want.to(dtype).double(), equal_nan=True)


# --- int8 -------------------------------------------------------------------------------


@profile(200)
@given(x=float_tensors(min_dims=1, max_dims=3, side=st.integers(0, 20)))
def test_quantize_per_row_matches_the_reference(backend, x):
    q, s = pk.ops.quantize_per_row(x)
    rows = math.prod(x.shape[:-1])
    x2 = x.reshape(rows, x.shape[-1]).float().contiguous().numpy()
    rq = np.empty(x2.shape, np.int8)
    rs = np.empty(rows, np.float32)
    if x2.size:
        _reference.quantize_per_row(x2, rq, rs)
    else:
        rs[:] = 0
    assert q.shape == x.shape and s.shape == x.shape[:-1]
    assert torch.equal(q.reshape(rows, x.shape[-1]), torch.from_numpy(rq))
    assert same_or_both_nan(s.reshape(-1), torch.from_numpy(rs))


@st.composite
def int8_tensors(draw, shape):
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-128, 128, shape if layout != "transposed" else shape[::-1], generator=g)
    t = base.to(torch.int8)
    if layout == "transposed":
        return t.t()
    if layout == "strided":
        return torch.randint(-128, 128, (shape[0], 2 * shape[1]), generator=g).to(torch.int8)[
            :, ::2
        ]
    if layout == "expanded" and shape[0]:
        return t[:1].expand(shape)
    return t


@profile(150)
@given(m=st.integers(0, 20), n=st.integers(0, 20), k=st.integers(0, 70), data=st.data())
def test_int8_gemm_is_exact(backend, m, n, k, data):
    a = data.draw(int8_tensors((m, k)))
    b = data.draw(int8_tensors((n, k)))
    got = pk.ops.int8_gemm(a, b)
    assert got.dtype == torch.int32
    assert torch.equal(got, (a.long() @ b.long().T).int())


@profile(125)
@given(n=st.integers(0, 40), k=st.integers(0, 40), data=st.data())
def test_pack_unpack_round_trip(backend, n, k, data):
    w = data.draw(int8_tensors((n, k)))
    p = pk.ops.pack_int8_weight(w)
    assert torch.equal(pk.ops.unpack_int8_weight(p), w)
    ref_packed, ref_comp = pk.ops.int8._pack_reference(w.contiguous())
    assert torch.equal(p.packed, ref_packed) and torch.equal(p.comp, ref_comp)


@st.composite
def linear_case(draw, max_side=40):
    m = draw(st.integers(0, max_side))
    k = draw(st.integers(0, max_side))
    n = draw(st.integers(0, max_side))
    dtype = draw(st.sampled_from(FLOATS))
    lead = draw(st.sampled_from([(), (2,), (1, 3)]))
    chosen = draw(st.lists(st.sampled_from(SPECIALS), max_size=3, unique=True))
    x = make(
        (*lead, m, k) if lead else (m, k),
        dtype,
        draw(st.sampled_from(LAYOUTS)),
        draw(st.integers(0, 2**31 - 1)),
        chosen,
        draw(st.sampled_from([0.0, 0.05])),
        draw(st.sampled_from([1.0, 1e-3, 1e3])),
    )
    w = draw(int8_tensors((n, k)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = torch.rand(n, generator=g) / 64
    bias = torch.randn(n, generator=g) if draw(st.booleans()) else None
    return x, w, scale, bias


def _linear_bound(x2, w, scale, bias, quantized):
    """What fp32 accumulation and rounding to x's dtype may differ by, per output."""
    xs = x2.double()
    if quantized:
        q, s = _reference.quantize_rows_tensor(x2)
        mag = (q.double().abs() @ w.double().abs().T) * s.double()[:, None]
    else:
        mag = xs.abs() @ w.double().abs().T
    mag = torch.nan_to_num(mag * scale.double()[None, :], nan=0.0, posinf=0.0)
    if bias is not None:
        mag = mag + bias.double().abs()
    eps_acc = torch.finfo(torch.float32).eps * (x2.shape[1] + 4)
    return mag * eps_acc


@profile(200)
@given(case=linear_case(), kind=st.sampled_from(["dynamic", "packed", "weight_only"]))
def test_int8_linears_match_the_reference(backend, case, kind):
    x, w, scale, bias = case
    if kind == "weight_only":
        got = pk.ops.int8_weight_linear(x, w, scale, bias)
    else:
        wq = pk.ops.pack_int8_weight(w) if kind == "packed" else w
        got = pk.ops.int8_linear(x, wq, scale, bias)
    n, k = w.shape
    assert got.shape == (*x.shape[:-1], n) and got.dtype == x.dtype
    x2 = x.reshape(math.prod(x.shape[:-1]), k)
    ref = _reference.int8_weight_linear if kind == "weight_only" else _reference.int8_linear
    # The float64 reference, before it rounds to x's dtype.
    want = ref(x2.double(), w, scale, bias).reshape(got.shape)
    if kind != "weight_only":  # quantization happens in fp32 from x's values
        q, s = _reference.quantize_rows_tensor(x2)
        want = (q.double() @ w.double().T) * s.double()[:, None] * scale.double()[None, :]
        if bias is not None:
            want = want + bias.double()
        want = want.reshape(got.shape)
    bound = _linear_bound(x2, w, scale, bias, kind != "weight_only").reshape(got.shape)
    out_eps = torch.finfo(x.dtype).eps
    bound = bound + out_eps * want.abs().nan_to_num(0.0, 0.0, 0.0) + torch.finfo(x.dtype).tiny
    if kind == "weight_only":
        # inf * 0 and inf - inf give NaN in any summation order; a float64 sum
        # past float32's range can differ from fp32's: compare the rest.
        fine = (x2.double().abs() @ w.double().abs().T).reshape(got.shape) < 1e36
        got, want, bound = got[fine], want[fine], bound[fine]
    within(got, want, bound, x.dtype)


# --- sparse -----------------------------------------------------------------------------


@st.composite
def sparse_weights(draw, max_side=20, specials=True):
    n = draw(st.integers(0, max_side))
    k = draw(st.integers(0, max_side))
    block = draw(st.sampled_from([1, 4]))
    seed = draw(st.integers(0, 2**31 - 1))
    density = draw(st.sampled_from([0.0, 0.2, 0.7, 1.0]))
    chosen = []
    if specials:
        chosen = draw(
            st.lists(st.sampled_from(["nan", "inf", "-0.0", "max", "subnormal"]), max_size=2)
        )
    w = make((n, k), torch.float32, draw(st.sampled_from(LAYOUTS)), seed, chosen, 0.05)
    g = torch.Generator().manual_seed(seed + 1)
    if block == 1:
        w = torch.where(torch.rand(n, k, generator=g) < density, w, torch.zeros(()))
    else:
        keep = torch.rand(-(-n // 4), -(-k // 4), generator=g) < density
        w = torch.where(sp.expand_block_mask(keep, n, k), w, torch.zeros(()))
    return w, block


@profile(150)
@given(wb=sparse_weights(), dtype=st.sampled_from(FLOATS))
def test_to_sparse_to_dense_round_trip(wb, dtype):
    w, block = wb
    w = w.to(dtype)
    sw = pk.ops.to_sparse(w, block)
    back = pk.ops.to_dense(sw)
    want = w.float()
    assert back.dtype == torch.float32 and back.shape == w.shape
    stored = want != 0
    assert torch.equal(bits(back)[stored], bits(want)[stored])  # every non-zero, bit for bit
    assert bool((back[~stored] == 0).all())  # zeros (either sign) stay zeros
    if block == 1:
        assert not bool(back[~stored].signbit().any())  # -0.0 is not stored: +0.0
        assert sw.nnz() == int(stored.sum())


@profile(200)
@given(
    wb=sparse_weights(max_side=28),
    m=st.integers(0, 40),
    lead=st.sampled_from([(), (2,)]),
    dtype=st.sampled_from(FLOATS),
    layout=st.sampled_from(LAYOUTS),
    chosen=st.lists(st.sampled_from(SPECIALS), max_size=3, unique=True),
    seed=st.integers(0, 2**31 - 1),
    with_bias=st.booleans(),
)
def test_sparse_linear_matches_the_reference(
    backend, wb, m, lead, dtype, layout, chosen, seed, with_bias
):
    w, block = wb
    n, k = w.shape
    sw = pk.ops.to_sparse(w, block)
    x = make((*lead, m, k), dtype, layout, seed, chosen, 0.05)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seed)) if with_bias else None
    got = pk.ops.sparse_linear(x, sw, bias)
    assert got.shape == (*lead, m, n) and got.dtype == dtype
    csr = sp.bsr_to_csr(sw)[0] if block == 4 else sw
    x2 = x.reshape(math.prod(x.shape[:-1]), k).float()
    want = _reference.sparse_linear(x2, csr.row_ptr, sp.col_as_int64(csr.col), csr.values, n, bias)
    # float32 out of a float64 sum over stored entries; then x's dtype.
    terms = torch.zeros(x2.shape[0], n, dtype=torch.float64)
    if csr.values.numel():
        rows = torch.repeat_interleave(torch.arange(n), csr.row_ptr[1:] - csr.row_ptr[:-1])
        mag = x2.double()[:, sp.col_as_int64(csr.col)].abs() * csr.values.double().abs()
        terms.index_add_(1, rows, mag.nan_to_num(0.0, 0.0, 0.0))
    bound = terms * torch.finfo(torch.float32).eps * (k + 4)
    bound += torch.finfo(dtype).eps * want.double().abs().nan_to_num(0.0, 0.0, 0.0)
    fine = terms < 1e36  # past fp32's range the summation order decides inf or NaN
    got, want = got.reshape(x2.shape[0], n), want.to(dtype)
    within(got[fine], want.double()[fine], bound[fine], dtype)


@profile(150)
@given(
    w=float_tensors(min_dims=2, max_dims=2, dtypes=[torch.float32], side=st.integers(0, 16)),
    pattern=st.sampled_from(sp.PATTERNS),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.9, None]),
)
def test_prune_keeps_exactly_the_largest(w, pattern, sparsity):
    try:
        p = pk.prune(w, sparsity, pattern)
    except Exception as e:  # noqa: BLE001
        refused(e, "prune")
        assert (pattern == "2:4" and (w.shape[1] % 4 or sparsity not in (None, 0.5))) or (
            pattern != "2:4" and sparsity is None
        )
        return
    mask = sp.prune_mask(w, sparsity, pattern)
    assert torch.equal(bits(p)[mask], bits(w.contiguous())[mask])
    assert bool((p[~mask] == 0).all())
    if pattern == "unstructured":
        assert int(mask.sum()) == w.numel() - int(math.floor(sparsity * w.numel()))
        mag = w.abs().reshape(-1).float().view(torch.int32)  # magnitudes as ordered keys
        kept, dropped = mag[mask.reshape(-1)], mag[~mask.reshape(-1)]
        if kept.numel() and dropped.numel():
            assert int(kept.min()) >= int(dropped.max())
    elif pattern == "2:4":
        assert bool((mask.view(w.shape[0], w.shape[1] // 4, 4).sum(-1) == 2).all())


# --- svd --------------------------------------------------------------------------------


@st.composite
def matrices(draw, max_side=40):
    m = draw(st.integers(1, max_side))
    n = draw(st.integers(1, max_side))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    kind = draw(st.sampled_from(["random", "low-rank", "constant", "integer", "graded", "zero"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "random":
        a = torch.randn(m, n, generator=g, dtype=torch.float64)
    elif kind == "low-rank":
        r = draw(st.integers(1, 3))
        a = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(
            r, n, generator=g, dtype=torch.float64
        )
    elif kind == "constant":
        a = torch.full((m, n), draw(st.sampled_from([1.0, -3.7, 1e-30, 1e30])), dtype=torch.float64)
    elif kind == "integer":
        a = (
            torch.randint(-3, 4, (m, 2), generator=g).double()
            @ torch.randint(-3, 4, (2, n), generator=g).double()
        )
    elif kind == "graded":
        a = torch.randn(m, n, generator=g, dtype=torch.float64) * torch.logspace(0, -6, n).double()
    else:
        a = torch.zeros(m, n, dtype=torch.float64)
    a = a.to(dtype)
    if draw(st.booleans()):
        a = a.T.contiguous().T  # column-major
    return a


def _orthonormal(u, tol):
    eye = torch.eye(u.shape[1], dtype=u.dtype)
    return float((u.T @ u - eye).abs().max()) <= tol if u.shape[1] else True


@profile(150)
@given(a=matrices(), data=st.data())
def test_randomized_svd_properties(a, data):
    m, n = a.shape
    rank = data.draw(st.integers(1, min(m, n)))
    n_iter = data.draw(st.integers(0, 2))
    oversample = data.draw(st.integers(0, 10))
    seed = data.draw(st.integers(-(2**63), 2**64 - 1))
    u, s, vh = pk.ops.randomized_svd(a, rank, n_iter=n_iter, oversample=oversample, seed=seed)
    tol = 1e-4 if a.dtype == torch.float32 else 1e-10
    assert u.shape == (m, rank) and s.shape == (rank,) and vh.shape == (rank, n)
    assert _orthonormal(u, tol) and _orthonormal(vh.T, tol)
    assert bool((s[:-1] >= s[1:]).all()) and bool((s >= 0).all())
    sf = torch.linalg.svdvals(a.double())
    opt = float(sf[rank:].pow(2).sum().sqrt())
    err = float(torch.linalg.norm((u * s).double() @ vh.double() - a.double()))
    norm = float(sf.pow(2).sum().sqrt())
    # Randomized: near the optimum, never far from it; exact when the rank is.
    assert err <= 2.0 * opt + 10 * tol * norm, (err, opt, norm)


@profile(125)
@given(a=matrices(), tol=st.sampled_from([0.0, 0.01, 0.3, 0.9]))
def test_svd_rank_meets_its_target(a, tol):
    r, u, s, vh = pk.ops.svd_rank(a, tol=tol)
    norm = float(torch.linalg.norm(a.double()))
    err = float(torch.linalg.norm((u * s).double() @ vh.double() - a.double()))
    slack = 1e-4 if a.dtype == torch.float32 else 1e-10
    assert err <= (tol * 1.01 + slack) * norm
    assert u.shape == (a.shape[0], r) and vh.shape == (r, a.shape[1])
    assert _orthonormal(u, 10 * slack) and _orthonormal(vh.T, 10 * slack)


@profile(150)
@given(
    lead=st.sampled_from([(), (3,), (2, 2)]),
    m=st.integers(0, 12),
    n=st.integers(0, 12),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
    kind=st.sampled_from(["random", "constant", "rank-1", "duplicate", "tiny", "huge"]),
    seed=st.integers(0, 2**31 - 1),
    layout=st.sampled_from(["contiguous", "transposed", "expanded"]),
)
def test_batched_svd_properties(backend, lead, m, n, dtype, kind, seed, layout):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, m, n)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "constant":
        a = torch.full(shape, -2.5, dtype=torch.float64)
    elif kind == "rank-1" and m and n:
        a = torch.randn((*lead, m, 1), generator=g, dtype=torch.float64) * torch.randn(
            (*lead, 1, n), generator=g, dtype=torch.float64
        )
    elif kind == "duplicate" and n > 1:
        a[..., 1] = a[..., 0]
    elif kind == "tiny":
        a = a * 1e-30
    elif kind == "huge":
        a = a * (1e30 if dtype != torch.float16 else 1e3)
    a = a.to(dtype)
    if layout == "transposed" and a.dim() >= 2:
        a = a.mT.contiguous().mT
    elif layout == "expanded" and lead:
        a = a[:1].expand(shape)
    u, s, vh = pk.ops.batched_svd(a)
    k = min(m, n)
    out = torch.float32 if dtype == torch.float16 else dtype
    assert u.shape == (*lead, m, k) and s.shape == (*lead, k) and vh.shape == (*lead, k, n)
    assert u.dtype == out
    if not a.numel() or not k:
        return
    tol = 1e-5 if out == torch.float32 else 1e-12
    ad = a.double()
    scale = ad.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-300)
    rec = (u.double() * s.double()[..., None, :]) @ vh.double()
    assert float(((rec - ad).abs() / scale).max()) <= 10 * tol
    eye = torch.eye(k, dtype=torch.float64)
    assert float((u.double().mT @ u.double() - eye).abs().max()) <= 10 * tol
    assert float((vh.double() @ vh.double().mT - eye).abs().max()) <= 10 * tol
    sref = torch.linalg.svdvals(ad)
    assert float(((s.double() - sref).abs() / scale[..., 0]).max()) <= 10 * tol


# --- layers -----------------------------------------------------------------------------


LAYER_KINDS = {
    "int8": lambda lin: pk.nn.Int8Linear.from_linear(lin),
    "int8-weight_only": lambda lin: pk.nn.Int8Linear.from_linear(lin, mode="weight_only"),
    "sparse": lambda lin: pk.nn.SparseLinear.from_linear(lin, 0.5),
    "sparse-block": lambda lin: pk.nn.SparseLinear.from_linear(lin, 0.5, pattern="block"),
    "sparse-2:4": lambda lin: pk.nn.SparseLinear.from_linear(lin, pattern="2:4"),
    "lowrank": lambda lin: pk.nn.LowRankLinear.from_linear(lin, rank=3),
}


@profile(125)
@given(
    k=st.integers(0, 20),
    n=st.integers(0, 20),
    kind=st.sampled_from(sorted(LAYER_KINDS)),
    x=float_tensors(min_dims=1, max_dims=3, side=st.integers(0, 6), specials=False),
    seed=st.integers(0, 2**31 - 1),
)
def test_layers_match_their_dense_weight(backend, k, n, kind, x, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    if kind == "sparse-2:4" and k % 4:
        with pytest.raises(ValueError, match="divisible by 4"):
            LAYER_KINDS[kind](lin)
        return
    layer = LAYER_KINDS[kind](lin)
    xin = make((*x.shape[:-1], k), x.dtype, "contiguous", seed)
    with torch.no_grad():
        got = layer(xin)
        w = layer.dequantized_weight() if kind.startswith("int8") else layer.to_dense()
        want = torch.nn.functional.linear(xin.double(), w.double(), lin.bias.double())
    assert got.shape == (*xin.shape[:-1], n) and got.dtype == x.dtype
    rtol = 3e-2 if kind == "int8" else torch.finfo(x.dtype).eps * 8
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * scale + 1e-6)
    # A state_dict round trip into a fresh layer (another weight) gives the same outputs.
    fresh = LAYER_KINDS[kind](nn.Linear(k, n))
    fresh.load_state_dict(layer.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(xin), got)


def _outcome(call):
    try:
        return call()
    except Exception as e:  # noqa: BLE001
        return e


@profile(300)
@given(
    wb=sparse_weights(max_side=16, specials=False),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["row_ptr", "col"]),
            st.integers(0, 10**6),
            st.sampled_from([-1, 1, 2**15, 2**16, 10**7, -(2**31), 0]),
            st.sampled_from(["set", "add"]),
        ),
        min_size=1,
        max_size=3,
    ),
    col32=st.booleans(),
)
def test_corrupted_sparse_structures_never_reach_a_kernel(wb, edits, col32, monkeypatch):
    w, block = wb
    sw = pk.ops.to_sparse(w, block)
    parts = {"row_ptr": sw.row_ptr.clone(), "col": sw.col.int() if col32 else sw.col.clone()}
    for field, where, value, how in edits:
        t = parts[field]
        if not t.numel():
            continue
        j = where % t.numel()
        new = value if how == "set" else int(t[j]) + value
        info = torch.iinfo(t.dtype)
        t[j] = min(max(new, info.min), info.max)
    bad = sw._replace(**parts)
    x = torch.randn(5, sw.k, generator=torch.Generator().manual_seed(len(edits)))
    outcomes = {}
    for b in BACKENDS:
        monkeypatch.setenv("PYKERNELS_BACKEND", b)
        outcomes[b] = _outcome(lambda: pk.ops.sparse_linear(x, bad))
    first = outcomes[BACKENDS[0]]
    if isinstance(first, Exception):
        refused(first, "sparse_linear")
        assert all(type(o) is type(first) and str(o) == str(first) for o in outcomes.values())
        return
    # The edits happened to leave a valid structure: every backend agrees with
    # the dense product of what it describes.
    want = x.double() @ pk.ops.to_dense(bad).double().T
    for b, o in outcomes.items():
        assert not isinstance(o, Exception), (b, o)
        torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-4, equal_nan=True)


@profile(200)
@given(
    n=st.integers(1, 20),
    k=st.integers(1, 40),
    edit=st.tuples(st.sampled_from(["packed", "comp"]), st.integers(0, 10**6), st.integers(-9, 9)),
)
def test_corrupted_packed_weights_never_reach_a_kernel(n, k, edit, monkeypatch):
    g = torch.Generator().manual_seed(n * 100 + k)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    p = pk.ops.pack_int8_weight(w)
    field, where, delta = edit
    t = getattr(p, field).clone()
    j = where % t.numel()
    info = torch.iinfo(t.dtype)
    t[j] = min(max(int(t[j]) + delta, info.min), info.max)
    bad = p._replace(**{field: t})
    x = torch.randn(3, k, generator=g)
    s = torch.rand(n, generator=g)
    outcomes = {}
    for b in BACKENDS:
        monkeypatch.setenv("PYKERNELS_BACKEND", b)
        outcomes[b] = _outcome(lambda: pk.ops.int8_linear(x, bad, s))
    first = outcomes[BACKENDS[0]]
    if isinstance(first, Exception):
        refused(first, "int8_linear")
        assert all(str(o) == str(first) for o in outcomes.values())
    else:  # a delta of 0, or a clamp that changed nothing
        assert torch.equal(bad.packed, p.packed) and torch.equal(bad.comp, p.comp)


# --- hostile arguments: a clear error, the same on every backend ---------------------------


def _valid_calls(gen):
    x = torch.randn(4, 16, generator=gen)
    w = torch.randint(-127, 128, (6, 16), dtype=torch.int8, generator=gen)
    s = torch.rand(6, generator=gen)
    sw = pk.ops.to_sparse(pk.prune(torch.randn(6, 16, generator=gen), 0.5))
    v, i = pk.ops.topk_sparsify(x, k=5)
    a = torch.randn(20, 12, generator=gen)
    return {
        "topk_sparsify": (pk.ops.topk_sparsify, dict(x=x, k=5, residual=torch.zeros(4, 16))),
        "topk_densify": (pk.ops.topk_densify, dict(values=v, indices=i, shape=(4, 16))),
        "quantize_per_row": (pk.ops.quantize_per_row, dict(x=x)),
        "int8_gemm": (pk.ops.int8_gemm, dict(a_q=w, b_q=w)),
        "int8_linear": (pk.ops.int8_linear, dict(x=x, w_q=w, w_scale=s, bias=s)),
        "int8_weight_linear": (pk.ops.int8_weight_linear, dict(x=x, w_q=w, w_scale=s, bias=s)),
        "pack_int8_weight": (pk.ops.pack_int8_weight, dict(w_q=w)),
        "to_sparse": (pk.ops.to_sparse, dict(w=x, block=1)),
        "sparse_linear": (pk.ops.sparse_linear, dict(x=x, w_sparse=sw, bias=s)),
        "prune": (pk.prune, dict(weight=x, sparsity=0.5, pattern="unstructured")),
        "randomized_svd": (
            pk.ops.randomized_svd,
            dict(a=a, rank=3, n_iter=1, oversample=4, seed=0),
        ),
        "svd_rank": (pk.ops.svd_rank, dict(a=a, tol=0.1, block=8, seed=0)),
        "batched_svd": (pk.ops.batched_svd, dict(a=a[None])),
    }


BAD_VALUES = [
    None,
    "3",
    1.5,
    float("nan"),
    -1,
    10**12,
    True,
    [1, 2],
    torch.tensor(1.0),
    torch.zeros(3, dtype=torch.int16),
    torch.zeros(2, 2, 2),
    torch.full((4, 16), float("nan")),
]


@profile(300)
@given(
    op=st.sampled_from(sorted(_valid_calls(torch.Generator().manual_seed(0)))),
    data=st.data(),
)
def test_hostile_arguments_give_clear_errors_on_every_backend(op, data, monkeypatch):
    fn, kwargs = _valid_calls(torch.Generator().manual_seed(0))[op]
    arg = data.draw(st.sampled_from(sorted(kwargs)))
    bad = data.draw(st.sampled_from(BAD_VALUES))
    if arg in ("bias", "residual") and bad is None:  # None is their default
        return
    outcomes = {}
    for b in BACKENDS:
        monkeypatch.setenv("PYKERNELS_BACKEND", b)
        call = {**kwargs, arg: bad}
        try:
            fn(**call)
            outcomes[b] = None
        except Exception as e:  # noqa: BLE001
            outcomes[b] = (type(e), str(e))
    first = outcomes[BACKENDS[0]]
    assert all(o == first for o in outcomes.values()), outcomes  # same on every backend
    if first is None:
        return  # a value that is valid here (a NaN tensor where NaN is data, say)
    exc, msg = first
    if exc is RuntimeError and "can't allocate memory" in msg:
        return  # asking for terabytes (shape=10**12): torch's own allocator refuses, as for zeros()
    assert exc in (TypeError, ValueError), outcomes
    assert msg.startswith(f"{op}: "), msg
    # It names the argument, or the one it disagrees with (k past x's numel).
    named = [a for a in kwargs if re.search(r"\b" + re.escape(a) + r"\b", msg)]
    assert named, (arg, msg)
