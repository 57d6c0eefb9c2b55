"""int4 ops: group-wise quantization, dequantization and both linears, every
backend and every CPU ISA against the reference (pykernels/backends/reference/int4.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

import pykernels as pk
from pykernels import backends
from pykernels.backends.reference import int4 as ref

GROUPS = [32, 64, 128]
IMPL_NAMES = {
    "native": "_linear_native",
    "numba": "_linear_numba",
    "torch": "run",
    "reference": "run",
}
# M, K, N, g: one token, M = 0, odd N, K = g (one group), N not a multiple of
# 16 or 64 (the kernels' panels), M past a 6-row tile, several groups.
SHAPES = [
    (1, 32, 1, 32),
    (0, 64, 5, 32),
    (1, 128, 17, 128),
    (3, 256, 70, 64),
    (7, 64, 33, 64),
    (13, 384, 48, 128),
    (17, 96, 65, 32),
]


def weight(n, k, gen, spread=True):
    w = torch.randn(n, k, generator=gen)
    if spread:  # per-row magnitudes that differ, and a few outliers
        w = w * (torch.rand(n, 1, generator=gen) * 2 + 0.1)
        w.view(-1)[torch.randint(0, w.numel(), (max(1, w.numel() // 97),), generator=gen)] *= 8
    return w


def quantized(n, k, g, gen, symmetric=False):
    """Random codes, scales and zeros directly in the format (not via quantization)."""
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = torch.rand(n, k // g, generator=gen) * 0.05 + 1e-3
    zeros = (
        torch.full((n, k // g), 8, dtype=torch.uint8)
        if symmetric
        else torch.randint(0, 16, (n, k // g), dtype=torch.uint8, generator=gen)
    )
    return packed, scales, zeros


def reference(mode, x, p, s, z, g, b):
    f = ref.linear_weight_only if mode == "weight_only" else ref.linear_dynamic
    return f(x, p, s, z, g, b)


def magnitude(mode, x, p, s, z, g, b):
    """Per output, the sum of the magnitudes of the float terms the kernels add."""
    if mode == "weight_only":
        w = torch.from_numpy(ref.dequantize_weight(p.numpy(), s.numpy(), z.numpy(), g))
        m = x.double().abs() @ w.double().abs().T
    else:
        isum, xs = ref.group_sums(x, p, z, g)
        m = (isum.double().abs() * s.double()[None]).sum(dim=2) * xs.double()[:, None]
    return m + (0 if b is None else b.double().abs())


def assert_close(y, expected, mag, k):
    """Equal up to float rounding: fp32 sums of k terms, one output rounding in 16 bits."""
    assert y.shape == expected.shape and y.dtype == expected.dtype
    eps = 1e-6 * (k**0.5 + 4) if y.dtype == torch.float32 else float(torch.finfo(y.dtype).eps)
    err = (y.double() - expected.double()).abs()
    bound = eps * (mag + expected.double().abs()) + 1e-30
    assert bool((err <= bound).all()), float((err / bound).max())


# --- quantization -----------------------------------------------------------------


@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_matches_reference(backend, g, symmetric, gen):
    w = weight(37, 4 * g, gen)
    w[3, :g] = 0  # a group of zeros
    w[5, g : 2 * g] = 0.25  # a constant group
    w[6, :g] = -3.0
    p, s, z = pk.ops.int4_quantize_weight(w, g, symmetric)
    rp, rs, rz = ref.quantize_weight(w.numpy(), g, symmetric)
    assert p.dtype == torch.uint8 and s.dtype == torch.float32 and z.dtype == torch.uint8
    assert np.array_equal(p.numpy(), rp) and np.array_equal(z.numpy(), rz)
    assert np.array_equal(s.numpy(), rs)
    q = ref.unpack_codes(p.numpy())
    assert q.max() <= 15
    if symmetric:
        assert bool((z == 8).all()) and q.min() >= 1
    assert float(s[3, 0]) == 1.0 and bool((q[3, :g] == int(z[3, 0])).all())
    w_hat = pk.ops.int4_dequantize_weight(p, s, z, g)
    # Constant groups are held exactly; everything else within half a step
    # (the asymmetric grid spans [min, max], the symmetric one [-absmax, absmax]).
    assert bool((w_hat[5, g : 2 * g] == 0.25).all()) and bool((w_hat[6, :g] == -3.0).all())
    step = s.repeat_interleave(g, dim=1)
    assert bool(((w_hat - w).abs() <= step * 0.5001 + 1e-7).all())


def test_quantize_error_is_what_4_bits_give(gen):
    w = torch.randn(256, 512, generator=gen)
    for symmetric, limit in ((False, 0.12), (True, 0.16)):
        p, s, z = pk.ops.int4_quantize_weight(w, 128, symmetric)
        err = (pk.ops.int4_dequantize_weight(p, s, z, 128) - w).norm() / w.norm()
        assert 0.03 < float(err) < limit  # 4 bits over a Gaussian group: about 0.1


@pytest.mark.parametrize("g", GROUPS)
def test_dequantize_matches_reference(backend, g, gen):
    p, s, z = quantized(19, 2 * g, g, gen)
    w = pk.ops.int4_dequantize_weight(p, s, z, g)
    assert np.array_equal(w.numpy(), ref.dequantize_weight(p.numpy(), s.numpy(), z.numpy(), g))


def test_quantize_bf16_weight_and_empty(gen):
    w = weight(8, 64, gen).bfloat16()
    p, s, z = pk.ops.int4_quantize_weight(w, 32)
    rp, rs, rz = ref.quantize_weight(w.float().numpy(), 32, False)
    assert np.array_equal(p.numpy(), rp) and np.array_equal(s.numpy(), rs)
    p, s, z = pk.ops.int4_quantize_weight(torch.zeros(0, 64), 64)
    assert p.shape == (0, 32) and s.shape == (0, 1) and z.shape == (0, 1)


# --- the linears ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_reference(backend, mode, shape, gen):
    m, k, n, g = shape
    run = backends.impl("int4", "linear", torch.device("cpu"))
    assert run.__name__ == IMPL_NAMES[backend]  # the forced backend's own kernels ran
    p, s, z = quantized(n, k, g, gen, symmetric=n % 2 == 0)
    x = torch.randn(m, k, generator=gen) * 2
    b = torch.randn(n, generator=gen)
    for bias in (b, None):
        y = pk.ops.int4_linear(x, p, s, z, g, bias, mode)
        assert_close(
            y, reference(mode, x, p, s, z, g, bias), magnitude(mode, x, p, s, z, g, bias), k
        )


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_16bit_inputs(backend, mode, dtype, gen):
    m, k, n, g = 5, 256, 40, 64
    p, s, z = quantized(n, k, g, gen)
    x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
    b = torch.randn(n, generator=gen)
    y = pk.ops.int4_linear(x, p, s, z, g, b, mode)
    assert y.dtype == dtype
    assert_close(y, reference(mode, x, p, s, z, g, b), magnitude(mode, x.float(), p, s, z, g, b), k)


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_linear_views_and_leading_dims(backend, mode, gen):
    k, n, g = 128, 24, 32
    p, s, z = quantized(n, k, g, gen)
    big = torch.randn(6, 2 * k + 3, generator=gen)
    x = big[:, 3 : 3 + k]  # rows 2k + 3 apart, offset
    y = pk.ops.int4_linear(x, p, s, z, g, None, mode)
    expected = reference(mode, x.contiguous(), p, s, z, g, None)
    assert_close(y, expected, magnitude(mode, x.contiguous(), p, s, z, g, None), k)
    xt = torch.randn(k, 4, generator=gen).t()  # column-major
    y = pk.ops.int4_linear(xt, p, s, z, g, None, mode)
    assert_close(
        y,
        reference(mode, xt.contiguous(), p, s, z, g, None),
        magnitude(mode, xt.contiguous(), p, s, z, g, None),
        k,
    )
    x3 = torch.randn(2, 3, k, generator=gen)
    y3 = pk.ops.int4_linear(x3, p, s, z, g, None, mode)
    assert y3.shape == (2, 3, n)
    assert torch.equal(
        y3.reshape(6, n), pk.ops.int4_linear(x3.reshape(6, k), p, s, z, g, None, mode)
    )


def test_dynamic_group_sums_are_exact(backend, gen):
    """W4A8 with a scale of 1 per group and x on the int8 grid: the output is
    the exact integer sum (every product and partial sum representable)."""
    k, n, g = 256, 20, 32
    p, _, z = quantized(n, k, g, gen)
    s = torch.ones(n, k // g)
    a = torch.randint(-127, 128, (3, k), generator=gen).float()
    a[:, 0] = 127  # max |row| = 127, so the activation scale is 1
    y = pk.ops.int4_linear(a, p, s, z, g, None, "dynamic")
    isum, xs = ref.group_sums(a, p, z, g)
    assert bool((xs == 1).all())
    assert torch.equal(y.double(), isum.sum(dim=2).double())


def test_dynamic_nan_row_stays_in_its_row(backend, gen):
    k, n, g = 64, 8, 32
    p, s, z = quantized(n, k, g, gen)
    x = torch.randn(3, k, generator=gen)
    x[1, 5] = float("nan")
    y = pk.ops.int4_linear(x, p, s, z, g, None, "dynamic")
    assert bool(y[1].isnan().all()) and bool(torch.isfinite(y[[0, 2]]).all())


def test_empty_and_k_zero(backend, gen):
    p, s, z = quantized(4, 64, 32, gen)
    y = pk.ops.int4_linear(torch.randn(0, 64), p, s, z, 32)
    assert y.shape == (0, 4)
    y = pk.ops.int4_linear(torch.randn(2, 3, 64), p[:0], s[:0], z[:0], 32)
    assert y.shape == (2, 3, 0)


@settings(max_examples=25, deadline=None)
@given(
    m=hst.integers(0, 9),
    groups=hst.integers(1, 4),
    n=hst.integers(1, 40),
    g=hst.sampled_from(GROUPS),
    mode=hst.sampled_from(["weight_only", "dynamic"]),
    seed=hst.integers(0, 2**31),
)
def test_hypothesis_default_backend(m, groups, n, g, mode, seed):
    gen = torch.Generator().manual_seed(seed)
    k = groups * g
    p, s, z = quantized(n, k, g, gen)
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen)
    y = pk.ops.int4_linear(x, p, s, z, g, b, mode)
    assert_close(y, reference(mode, x, p, s, z, g, b), magnitude(mode, x, p, s, z, g, b), k)


# --- bad arguments ----------------------------------------------------------------


def test_bad_arguments_name_the_argument(backend, gen):
    p, s, z = quantized(4, 64, 32, gen)
    x = torch.randn(2, 64)
    lin = pk.ops.int4_linear
    cases = [
        (TypeError, "packed", lambda: lin(x, p.to(torch.int8), s, z, 32)),
        (TypeError, "scales", lambda: lin(x, p, s.double(), z, 32)),
        (TypeError, "zeros", lambda: lin(x, p, s, z.to(torch.int32), 32)),
        (ValueError, "scales", lambda: lin(x, p, s[:, :1], z, 32)),
        (ValueError, "zeros", lambda: lin(x, p, s, z[:3], 32)),
        (ValueError, "group_size", lambda: lin(x, p, s, z, 48)),
        (ValueError, "group_size", lambda: lin(x, p, s[:, :1], z[:, :1], 128)),
        (TypeError, "group_size", lambda: lin(x, p, s, z, 32.0)),
        (ValueError, "zeros", lambda: lin(x, p, s, torch.full_like(z, 16), 32)),
        (ValueError, "mode", lambda: lin(x, p, s, z, 32, None, "static")),
        (ValueError, "x", lambda: lin(torch.randn(2, 63), p, s, z, 32)),
        (TypeError, "x", lambda: lin(x.double(), p, s, z, 32)),
        (TypeError, "x", lambda: lin(x.numpy(), p, s, z, 32)),
        (ValueError, "bias", lambda: lin(x, p, s, z, 32, torch.zeros(5))),
        (TypeError, "bias", lambda: lin(x, p, s, z, 32, torch.zeros(4, dtype=torch.int32))),
        (ValueError, "packed", lambda: lin(x, p[0], s, z, 32)),
        (ValueError, "group_size", lambda: pk.ops.int4_quantize_weight(torch.randn(4, 33), 32)),
        (ValueError, "group_size", lambda: pk.ops.int4_quantize_weight(torch.randn(4, 96), 64)),
        (ValueError, "group_size", lambda: pk.ops.int4_quantize_weight(torch.randn(4, 64), 16)),
        (TypeError, "w", lambda: pk.ops.int4_quantize_weight(torch.ones(4, 64, dtype=torch.int32))),
        (ValueError, "w", lambda: pk.ops.int4_quantize_weight(torch.randn(64))),
        (
            TypeError,
            "symmetric",
            lambda: pk.ops.int4_quantize_weight(torch.randn(4, 64), 32, "yes"),
        ),
        (TypeError, "packed", lambda: pk.ops.int4_dequantize_weight(p.float(), s, z, 32)),
    ]
    bad = torch.randn(4, 64)
    bad[1, 2] = float("inf")
    cases.append((ValueError, "w", lambda: pk.ops.int4_quantize_weight(bad, 32)))
    for exc, name, call in cases:
        with pytest.raises(exc, match=name):
            call()


# --- torch integration --------------------------------------------------------------


def test_opcheck(gen):
    p, s, z = quantized(6, 64, 32, gen)
    x = torch.randn(3, 64, generator=gen)
    b = torch.randn(6, generator=gen)
    ops = torch.ops.pykernels
    torch.library.opcheck(ops.int4_quantize_weight.default, (torch.randn(5, 64), 32, False))
    torch.library.opcheck(ops.int4_quantize_weight.default, (torch.randn(5, 64), 64, True))
    torch.library.opcheck(ops.int4_dequantize_weight.default, (p, s, z, 32))
    for mode in ("weight_only", "dynamic", "auto"):
        torch.library.opcheck(ops.int4_linear.default, (x, p, s, z, 32, b, mode))
    xg = x.clone().requires_grad_()
    torch.library.opcheck(ops.int4_linear.default, (xg, p, s, z, 32, b, "weight_only"))


def test_weight_only_backward_matches_dequantized_linear(gen):
    p, s, z = quantized(6, 64, 32, gen)
    w = pk.ops.int4_dequantize_weight(p, s, z, 32)
    x = torch.randn(2, 3, 64, generator=gen, requires_grad=True)
    b = torch.randn(6, generator=gen, requires_grad=True)
    gy = torch.randn(2, 3, 6, generator=gen)
    pk.ops.int4_linear(x, p, s, z, 32, b, "weight_only").backward(gy)
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.linear(x2, w, b2).backward(gy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(b.grad, b2.grad)
    xd = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        pk.ops.int4_linear(xd, p, s, z, 32, None, "dynamic").sum().backward()


def test_compile(gen):
    p, s, z = quantized(16, 128, 64, gen)
    x = torch.randn(4, 128, generator=gen)

    def f(x):
        return pk.ops.int4_linear(x, p, s, z, 64, None, "weight_only") + pk.ops.int4_linear(
            x, p, s, z, 64, None, "dynamic"
        )

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), f(x))


# --- every compiled CPU tier --------------------------------------------------------

# K = 32 (4 dwords a row: masked loads), 160 (20: one full transpose and a
# partial one), 1024; N past 32-channel blocks and 16-channel panels; M past
# the 6-row and 2-row tiles and the 4-row weight-only chunks, M >= 256.
ISA_SHAPES = [
    (1, 32, 3, 32),
    (2, 160, 33, 32),
    (7, 192, 50, 64),
    (13, 1024, 96, 128),
    (260, 64, 35, 32),  # rows in two chunks of tasks
]


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
@pytest.mark.parametrize("shape", ISA_SHAPES)
def test_every_isa_matches_reference(cpu_isa, mode, shape, gen):
    m, k, n, g = shape
    assert backends.impl("int4", "linear", torch.device("cpu")).__name__ == "_linear_native"
    p, s, z = quantized(n, k, g, gen)
    x = torch.randn(m, k, generator=gen) * 3
    b = torch.randn(n, generator=gen)
    for bias in (b, None):
        y = pk.ops.int4_linear(x, p, s, z, g, bias, mode)
        assert_close(
            y, reference(mode, x, p, s, z, g, bias), magnitude(mode, x, p, s, z, g, bias), k
        )
    xb = x.bfloat16()
    y = pk.ops.int4_linear(xb, p, s, z, g, b, mode)
    assert y.dtype == torch.bfloat16
    assert_close(
        y, reference(mode, xb, p, s, z, g, b), magnitude(mode, xb.float(), p, s, z, g, b), k
    )


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 8, 9, 16])
@pytest.mark.parametrize("kg", [(96, 32), (320, 64), (384, 128)])
def test_every_isa_weight_only_row_tiles(cpu_isa, m, kg, gen):
    """Every row tile of the weight-only kernels (1..8 rows of x, 8 + a tail,
    16), weight rows past the tile's 1..4 in flight (N = 13), and K ending in a
    32-, 64- or 96-column chunk, in f32 and bf16."""
    k, g = kg
    p, s, z = quantized(13, k, g, gen)
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(13, generator=gen)
    for xx in (x, x.bfloat16()):
        y = pk.ops.int4_linear(xx, p, s, z, g, b, "weight_only")
        want = reference("weight_only", xx, p, s, z, g, b)
        assert_close(y, want, magnitude("weight_only", xx.float(), p, s, z, g, b), k)


def test_every_isa_dynamic_sums_are_exact(cpu_isa, gen):
    """Extreme codes and activations (a = +-127, q - z = +-15) over many groups:
    every group sum is an exact integer, so the result equals the reference's
    to the last bit when every scale is 1."""
    k, n, g = 1024, 40, 128
    p = torch.where(torch.rand(n, k // 2, generator=gen) < 0.5, 0x00, 0xFF).to(torch.uint8)
    z = torch.where(torch.rand(n, k // g, generator=gen) < 0.5, 0, 15).to(torch.uint8)
    s = torch.ones(n, k // g)
    a = torch.where(torch.rand(9, k, generator=gen) < 0.5, -127.0, 127.0)
    y = pk.ops.int4_linear(a, p, s, z, g, None, "dynamic")
    isum, xs = ref.group_sums(a, p, z, g)
    assert bool((xs == 1).all())
    assert torch.equal(y.double(), isum.sum(dim=2).double())


@pytest.mark.parametrize("m", [1, 2, 3, 40])
def test_auto_mode_runs_weight_only_at_decode_sizes(backend, m, gen):
    """mode="auto" gives exactly the numerics of weight-only up to
    AUTO_WEIGHT_ONLY_ROWS rows of x (leading dimensions together) and of W4A8
    above, on every backend; backward refuses (it is W4A8 at larger batches)."""
    from pykernels.ops.int4 import AUTO_WEIGHT_ONLY_ROWS, resolve_mode

    k, n, g = 256, 37, 64
    p, s, z = quantized(n, k, g, gen)
    x = torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen)
    want = "weight_only" if m <= AUTO_WEIGHT_ONLY_ROWS else "dynamic"
    assert resolve_mode("auto", m) == want and resolve_mode("dynamic", 1) == "dynamic"
    y = pk.ops.int4_linear(x.view(1, m, k), p, s, z, g, b, "auto")
    assert torch.equal(y.view(m, n), pk.ops.int4_linear(x, p, s, z, g, b, want))
    assert_close(
        y.view(m, n), reference(want, x, p, s, z, g, b), magnitude(want, x, p, s, z, g, b), k
    )
    with pytest.raises(RuntimeError, match="inference-only"):
        xg = x.clone().requires_grad_()
        pk.ops.int4_linear(xg, p, s, z, g, b, "auto").sum().backward()
    with pytest.raises(ValueError, match="mode"):
        pk.ops.int4_linear(x, p, s, z, g, b, "fast")


def test_native_kernel_refuses_bad_zeros_itself(gen):
    """The C++ entry point checks again (a call from C or cffi skips Python's checks)."""
    from pykernels import _native

    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    p, s, z = quantized(4, 64, 32, gen)
    x = torch.randn(2, 64)
    y = torch.empty(2, 4)
    bad = z.clone()
    bad[1, 1] = 99
    for fn in (_native.C.int4_weight_linear, _native.C.int4_dynamic_linear):
        with pytest.raises(ValueError, match="zeros"):
            fn(x.numpy(), 0, p.numpy(), s.numpy(), bad.numpy(), 32, None, y.numpy(), 0)
        with pytest.raises(ValueError, match="group_size"):
            fn(x.numpy(), 0, p.numpy(), s.numpy(), z.numpy(), 48, None, y.numpy(), 0)
        with pytest.raises(ValueError, match="scales"):
            fn(x.numpy(), 0, p.numpy(), s[:, :1].numpy(), z.numpy(), 32, None, y.numpy(), 0)
