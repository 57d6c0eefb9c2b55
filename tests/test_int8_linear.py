"""Packed weights, int8_linear and int8_weight_linear against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pykernels as pk
from pykernels import _reference
from pykernels.ops.int8 import MAX_K

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# M, K, N: single tokens, every leftover of the 6-row x 64-column register
# tile, K not a multiple of 4 (packing pads it) or at a power of two (the
# padded scratch stride), N not a multiple of 16.
SHAPES = [(1, 1, 1), (1, 256, 64), (5, 3, 17), (6, 130, 70), (13, 255, 65), (64, 1024, 48)]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def assert_matches(y: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor | None = None) -> None:
    """Equal to float rounding: 1e-5 relative in fp32, one output ulp in 16-bit.

    ``mag`` (same shape) is the size of the terms summed into each output; a
    bias cancelling the product leaves an output much smaller than its terms,
    and fp32 rounding is relative to the terms.
    """
    assert y.dtype == ref.dtype and y.shape == ref.shape
    slack = 0.0 if mag is None else 1e-5 * mag.double()
    if y.dtype == torch.float32:
        if mag is None:
            assert rel_err(y, ref) <= 1e-5
        err = (y.double() - ref.double()).abs()
        bound = 1e-5 * ref.double().abs() + 1e-5 * float(ref.abs().max()) + slack
        assert bool((err <= bound).all()), float((err - bound).max())
    else:
        eps = torch.finfo(y.dtype).eps
        err = (y.double() - ref.double()).abs()
        bound = eps * ref.double().abs() + eps * float(ref.float().abs().max()) + slack
        assert bool((err <= bound).all()), float((err - bound).max())


def magnitude(x, w, ws, b):
    """Per output, the sum of the magnitudes of its terms (as the kernels form them)."""
    return _reference.int8_linear(
        x.float().abs(), w.abs(), ws, None if b is None else b.abs()
    ).double()


def make(m, k, n, dtype, gen, bias=True):
    x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    ws = torch.rand(n, generator=gen) * 0.02 + 1e-3
    b = torch.randn(n, generator=gen) if bias else None
    return x, w, ws, b


@pytest.mark.parametrize("nk", [(1, 1), (16, 4), (17, 5), (70, 130), (130, 1027)])
def test_pack_matches_reference_and_unpacks(backend, nk, gen):
    n, k = nk
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    p = pk.ops.pack_int8_weight(w)
    packed = np.empty(p.packed.numel(), np.int8)
    comp = np.empty(p.comp.numel(), np.int32)
    _reference.int8_pack_weight(w.numpy(), packed, comp)
    assert np.array_equal(p.packed.numpy(), packed)
    assert np.array_equal(p.comp.numpy(), comp)
    assert torch.equal(pk.ops.unpack_int8_weight(p), w)


def test_pack_every_isa(cpu_isa, gen):
    w = torch.randint(-128, 128, (100, 333), dtype=torch.int8, generator=gen)[:, 7:300]
    p = pk.ops.pack_int8_weight(w)  # a strided view: rows 333 bytes apart
    packed = np.empty(p.packed.numel(), np.int8)
    comp = np.empty(p.comp.numel(), np.int32)
    _reference.int8_pack_weight(w.contiguous().numpy(), packed, comp)
    assert np.array_equal(p.packed.numpy(), packed) and np.array_equal(p.comp.numpy(), comp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", SHAPES)
def test_linear_matches_reference(backend, dtype, mkn, gen):
    m, k, n = mkn
    x, w, ws, b = make(m, k, n, dtype, gen)
    ref = _reference.int8_linear(x, w, ws, b)
    mag = magnitude(x, w, ws, b)
    assert_matches(pk.ops.int8_linear(x, w, ws, b), ref, mag)
    assert_matches(pk.ops.int8_linear(x, pk.ops.pack_int8_weight(w), ws, b), ref, mag)
    assert_matches(pk.ops.int8_linear(x, w, ws), _reference.int8_linear(x, w, ws, None))


@pytest.mark.parametrize("mkn", [(1, 64, 64), (7, 100, 33), (12, 512, 128), (31, 260, 200)])
def test_linear_every_isa(cpu_isa, mkn, gen):
    m, k, n = mkn
    for dtype in DTYPES:
        x, w, ws, b = make(m, k, n, dtype, gen)
        assert_matches(pk.ops.int8_linear(x, w, ws, b), _reference.int8_linear(x, w, ws, b))
        assert_matches(
            pk.ops.int8_weight_linear(x, w, ws, b), _reference.int8_weight_linear(x, w, ws, b)
        )


def test_linear_integers_are_exact(cpu_isa, gen):
    """With unit scales the dequantized output is the int32 GEMM of the integers."""
    m, k, n = 9, 300, 40
    x = torch.randint(-127, 128, (m, k), generator=gen).float()
    x[:, 0] = 127  # every row's max is 127, so its scale is exactly 1
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    y = pk.ops.int8_linear(x, w, torch.ones(n))
    exact = (x.long() @ w.long().T).float()
    assert torch.equal(y, exact)


def test_linear_at_the_int32_limit(cpu_isa):
    k = MAX_K - 1
    x = torch.full((8, k), 127.0)
    w = torch.full((3, k), -128, dtype=torch.int8)
    y = pk.ops.int8_linear(x, w, torch.ones(3))
    assert float(y[0, 0]) == float(-127 * 128 * k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", [(1, 4096, 64), (3, 129, 70), (16, 64, 5)])
def test_weight_linear_matches_reference(backend, dtype, mkn, gen):
    m, k, n = mkn
    x, w, ws, b = make(m, k, n, dtype, gen)
    ref = _reference.int8_weight_linear(x, w, ws, b)
    y = pk.ops.int8_weight_linear(x, w, ws, b)
    assert y.dtype == dtype
    if dtype == torch.float32:
        assert rel_err(y, ref) <= 1e-5
    else:
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(
            y.float(), ref.float(), rtol=eps, atol=eps * float(ref.float().abs().max())
        )


def test_batches_views_and_empty(gen):
    x, w, ws, b = make(24, 40, 12, torch.float32, gen)
    xb = x.view(2, 3, 4, 40)
    for fn, ref in (
        (pk.ops.int8_linear, _reference.int8_linear),
        (pk.ops.int8_weight_linear, _reference.int8_weight_linear),
    ):
        y = fn(xb, w, ws, b)
        assert y.shape == (2, 3, 4, 12)
        assert_matches(y.reshape(24, 12), ref(x, w, ws, b))
        wide = torch.randn(24, 60, generator=gen)
        view = wide[:, 10:50]  # rows 60 apart
        assert_matches(fn(view, w, ws, b), ref(view.contiguous(), w, ws, b))
        assert fn(x[:0], w, ws, b).shape == (0, 12)
        assert fn(xb[:, :0], w, ws, b).shape == (2, 0, 4, 12)
        empty_k = fn(torch.randn(3, 0), w[:, :0], ws, b)
        assert torch.equal(empty_k, b.expand(3, 12))  # an empty sum leaves the bias


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_rows_stay_in_their_row(backend, bad, gen):
    x, w, ws, b = make(6, 50, 20, torch.float32, gen)
    x[2, 11] = bad
    y = pk.ops.int8_linear(x, w, ws, b)
    assert torch.isnan(y[2]).all()  # documented: NaN across the whole row
    others = [0, 1, 3, 4, 5]
    assert_matches(y[others], _reference.int8_linear(x[others], w, ws, b))
    yw = pk.ops.int8_weight_linear(x, w, ws, b)
    assert not torch.isfinite(yw[2]).all()
    assert torch.isfinite(yw[others]).all()


def test_opcheck_and_compile(gen):
    x, w, ws, b = make(7, 40, 20, torch.float32, gen)
    p = pk.ops.pack_int8_weight(w)
    torch.library.opcheck(torch.ops.pykernels.int8_pack_weight.default, (w,))
    torch.library.opcheck(
        torch.ops.pykernels.int8_linear.default,
        (x, p.packed, p.comp, ws, b),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
    torch.library.opcheck(
        torch.ops.pykernels.int8_weight_linear.default,
        (x, w, ws, None),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )

    def f(x):
        return torch.relu(pk.ops.int8_linear(x, p, ws, b)) + pk.ops.int8_weight_linear(x, w, ws)

    assert torch.allclose(torch.compile(f, fullgraph=True)(x), f(x), rtol=1e-6, atol=1e-6)


def test_backward_raises(gen):
    x, w, ws, b = make(3, 16, 4, torch.float32, gen)
    x.requires_grad_()
    for fn in (pk.ops.int8_linear, pk.ops.int8_weight_linear):
        with pytest.raises(RuntimeError, match="inference-only"):
            fn(x, w, ws, b).sum().backward()


W = torch.zeros(4, 8, dtype=torch.int8)
S = torch.ones(4)
X = torch.ones(2, 8)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((X.int(), W, S), TypeError, "x must be float32"),
        (([1.0], W, S), TypeError, "x must be a torch.Tensor"),
        ((X, W.float(), S), TypeError, "w_q must be int8"),
        ((X, W[0], S), ValueError, "w_q must be 2-D"),
        ((torch.ones(2, 7), W, S), ValueError, "K = 8"),
        ((X, W, torch.ones(5)), ValueError, "w_scale must have shape"),
        ((X, W, S.double()), TypeError, "w_scale must be float32"),
        ((X, W, S, torch.ones(3)), ValueError, "bias must have shape"),
        ((X, W, S, torch.ones(4, dtype=torch.int32)), TypeError, "bias must be a float"),
        ((X.to("meta"), W, S), ValueError, "x is on meta"),
        ((X, W, S.to("meta")), ValueError, "w_scale is on meta"),
        (
            (torch.ones(1, MAX_K), torch.zeros(1, MAX_K, dtype=torch.int8), S[:1]),
            ValueError,
            "overflow",
        ),
    ],
)
def test_bad_arguments(args, exc, match):
    for fn in (pk.ops.int8_linear, pk.ops.int8_weight_linear):
        with pytest.raises(exc, match=match):
            fn(*args)


def test_bad_packed_weight():
    p = pk.ops.pack_int8_weight(W)
    with pytest.raises(ValueError, match="w_q.comp"):
        pk.ops.int8_linear(X, p._replace(comp=p.comp[:-1]), S)
    with pytest.raises(TypeError, match="w_q.packed must be int8"):  # a dtype: TypeError
        pk.ops.int8_linear(X, p._replace(packed=p.packed.int()), S)
    with pytest.raises(TypeError, match="Int8PackedWeight"):
        pk.ops.unpack_int8_weight(W)


def per_tensor_error(x, wf):
    """Relative error of int8_linear with one scale for the whole weight."""
    s = wf.abs().max() / 127
    w_q = torch.round(wf / s).clamp(-127, 127).to(torch.int8)
    y = pk.ops.int8_linear(x, w_q, torch.full((wf.shape[0],), float(s)))
    return rel_err(y, x.double() @ wf.double().T)


def test_per_channel_beats_per_tensor_on_outlier_rows(gen):
    x = torch.randn(64, 512, generator=gen)
    wf = torch.randn(256, 512, generator=gen) * 0.05
    wf[torch.randperm(256, generator=gen)[:4]] *= 40  # a few outlier output channels
    w_q, ws = pk.ops.quantize_per_row(wf)
    per_channel = rel_err(pk.ops.int8_linear(x, w_q, ws), x.double() @ wf.double().T)
    per_tensor = per_tensor_error(x, wf)
    assert per_channel < per_tensor / 3, (per_channel, per_tensor)


def test_accuracy_no_worse_than_quantize_dynamic(gen):
    from pykernels.bench.int8 import engines, quantize_dynamic_layer

    lin = torch.nn.Linear(512, 256)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(256, 512, generator=gen) * 0.05)
        lin.bias.copy_(torch.randn(256, generator=gen) * 0.1)
    x = torch.randn(64, 512, generator=gen)
    with torch.no_grad():
        ref = lin(x).double()
        ours = rel_err(pk.nn.Int8Linear.from_linear(lin)(x), ref)
        theirs = min(rel_err(quantize_dynamic_layer(lin, engine)(x), ref) for engine in engines())
    assert ours <= theirs, (ours, theirs)


# --- act_bits=7: activations on the 7-bit grid --------------------------------

# Every path of the AVX2 kernel for 7-bit activations: one row (the streaming
# tile), up to 32 rows with K over 256 (K in ranges, row by row), more rows
# (whole-K tiles), partial blocks of panels (N not a multiple of 64), K not a
# multiple of 4 or 32.
ACT7_SHAPES = [(1, 1, 1), (1, 1000, 70), (5, 3, 17), (16, 1030, 200), (32, 300, 33), (40, 777, 48)]


def make7(m, k, n, dtype, gen):
    x, w, ws, b = make(m, k, n, dtype, gen)
    x = x.float()
    x[::2] = torch.nn.functional.gelu(x[::2])  # one-sided-ish rows as after an activation
    return x.to(dtype), w, ws, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", ACT7_SHAPES)
def test_linear_act7_matches_reference(backend, dtype, mkn, gen):
    m, k, n = mkn
    x, w, ws, b = make7(m, k, n, dtype, gen)
    ref = _reference.int8_linear(x, w, ws, b, 7)
    mag = magnitude(x, w, ws, b)
    assert_matches(pk.ops.int8_linear(x, w, ws, b, act_bits=7), ref, mag)
    assert_matches(pk.ops.int8_linear(x, pk.ops.pack_int8_weight(w), ws, b, act_bits=7), ref, mag)


@pytest.mark.parametrize("mkn", ACT7_SHAPES)
def test_linear_act7_integers_are_exact(cpu_isa, mkn, gen):
    """With unit weight scales and no bias the output is float(acc) * x_scale, acc the
    exact int32 product of quantize_per_row(x, bits=7)'s integers (zero points of 0 to
    127 and weights of -128 included)."""
    m, k, n = mkn
    x = torch.randn(m, k, generator=gen) * 3
    x[::3] = x[::3].abs()
    x[1::3] -= 2.5
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    q, s = pk.ops.quantize_per_row(x, bits=7)
    exact = (q.long() @ w.long().T).float() * s[:, None]
    for wq in (w, pk.ops.pack_int8_weight(w)):
        assert torch.equal(pk.ops.int8_linear(x, wq, torch.ones(n), act_bits=7), exact)


def test_linear_act7_at_the_int32_limit(cpu_isa):
    k = MAX_K - 1
    w = torch.full((3, k), -128, dtype=torch.int8)
    for v in (127.0, -127.0):  # zero point 0, and 127 (every activation byte then 0)
        y = pk.ops.int8_linear(torch.full((2, k), v), w, torch.ones(3), act_bits=7)
        assert float(y[1, 2]) == float(int(v) * -128 * k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_linear_act7_nonfinite_rows_stay_in_their_row(backend, bad, gen):
    x, w, ws, b = make7(6, 50, 20, torch.float32, gen)
    x[2, 11] = bad
    y = pk.ops.int8_linear(x, w, ws, b, act_bits=7)
    assert torch.isnan(y[2]).all()
    others = [0, 1, 3, 4, 5]
    assert_matches(y[others], _reference.int8_linear(x[others], w, ws, b, 7))


def test_linear_act7_bad_arguments():
    for bits, exc in ((6, ValueError), (8.0, TypeError), ("7", TypeError), (None, TypeError)):
        with pytest.raises(exc, match="act_bits"):
            pk.ops.int8_linear(X, W, S, act_bits=bits)


def test_linear_act7_native_refuses_bad_bits():
    from pykernels import _native

    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    p = pk.ops.pack_int8_weight(W)
    y = np.empty((2, 4), np.float32)
    with pytest.raises(ValueError, match="act_bits"):
        _native.C.int8_linear(
            X.numpy(), 0, p.packed.numpy(), p.comp.numpy(), S.numpy(), None, y, 0, 5
        )


def test_linear_act7_opcheck_and_compile(gen):
    x, w, ws, b = make7(7, 40, 20, torch.float32, gen)
    p = pk.ops.pack_int8_weight(w)
    torch.library.opcheck(
        torch.ops.pykernels.int8_linear.default,
        (x, p.packed, p.comp, ws, b, 7),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )

    def f(x):
        return pk.ops.int8_linear(x, p, ws, b, act_bits=7)

    assert torch.equal(torch.compile(f, fullgraph=True)(x), f(x))


def test_act7_one_sided_inputs_as_accurate_as_8_bits(gen):
    """After a GELU the 7-bit grid spans [min, max] with 127 steps, as fine as the
    symmetric 8-bit one spanning [-max, max] with 254; and per token it beats
    quantize_dynamic's per-tensor 7-bit activations."""
    from pykernels.bench.int8 import engines, quantize_dynamic_layer

    lin = torch.nn.Linear(512, 256)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(256, 512, generator=gen) * 0.05)
    x = torch.nn.functional.gelu(torch.randn(64, 512, generator=gen) * 2)
    x = x * torch.rand(64, 1, generator=gen) * 4  # tokens of different sizes
    with torch.no_grad():
        ref = lin(x).double()
        e8 = rel_err(pk.nn.Int8Linear.from_linear(lin)(x), ref)
        e7 = rel_err(pk.nn.Int8Linear.from_linear(lin, act_bits=7)(x), ref)
        theirs = min(rel_err(quantize_dynamic_layer(lin, e)(x), ref) for e in engines())
    assert e7 <= 1.15 * e8, (e7, e8)
    assert e7 <= theirs, (e7, theirs)


def test_act_bits_checked_when_the_custom_ops_are_called_directly(backend, gen):
    """Every backend refuses a grid it does not have (none may quietly run 8 bits)."""
    x, w, ws, b = make7(3, 20, 5, torch.float32, gen)
    p = pk.ops.pack_int8_weight(w)
    with pytest.raises(ValueError, match="act_bits must be 8 or 7"):
        torch.ops.pykernels.int8_linear(x, p.packed, p.comp, ws, b, 5)
    with pytest.raises(ValueError, match="act_bits must be 8 or 7"):
        torch.ops.pykernels.int8_linear_rowmajor(x, w, ws, b, 6)
    with pytest.raises(ValueError, match="bits must be 8 or 7"):
        torch.ops.pykernels.quantize_per_row(x, 4)
