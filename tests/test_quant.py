"""quantize_buckets / dequantize_buckets: every backend and ISA against the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pykernels as pk
from pykernels import _native, _reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 63, 64, 65, 1000, 100_003]
BUCKETS = [1, 3, 64, 512]
LIMIT = {8: 127, 4: 7, 2: 1}


def randn(n, dtype, gen, scale=1.0):
    return (torch.randn(n, generator=gen) * scale).to(dtype)


def seed_of(gen) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


def reference(x, bits, bucket, stochastic, seed, residual=None):
    """(codes, scales) from the NumPy oracle; residual updated in place."""
    n = x.numel()
    code = _reference.DTYPE_CODES[x.dtype]
    codes = np.empty(pk.ops.quant.packed_bytes(n, bits), dtype=np.uint8)
    scales = np.empty(pk.ops.quant.num_buckets(n, bucket), dtype=np.float32)
    r = None if residual is None else residual.reshape(-1).numpy().copy()
    bits_in = _reference.tensor_bits(x.reshape(-1).contiguous())
    _reference.quantize_buckets(bits_in, code, bits, bucket, stochastic, seed, r, codes, scales)
    if residual is not None:
        residual.copy_(torch.from_numpy(r).view(residual.shape))
    return torch.from_numpy(codes), torch.from_numpy(scales)


def reference_decode(codes, scales, n, bits, bucket):
    out = np.zeros(n, dtype=np.float32)
    _reference.dequantize_buckets(codes.numpy(), scales.numpy(), n, bits, bucket, out, False)
    return torch.from_numpy(out)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    return a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(backend, dtype, bits, n, gen):
    x = randn(n, dtype, gen, scale=3.0)
    for bucket in BUCKETS:
        for stochastic in (True, False):
            seed = seed_of(gen)
            codes, scales = pk.ops.quantize_buckets(x, bits, bucket, stochastic, seed)
            rc, rs = reference(x, bits, bucket, stochastic, seed)
            assert same_bits(codes, rc) and same_bits(scales, rs)
            out = pk.ops.dequantize_buckets(codes, scales, n, bits, bucket)
            assert same_bits(out, reference_decode(rc, rs, n, bits, bucket))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_error_feedback_matches_reference(backend, dtype, bits, gen):
    for n, bucket in [(1, 1), (999, 7), (50_000, 512)]:
        x = randn(n, dtype, gen)
        r = torch.randn(n, generator=gen) * 0.3
        r_ref = r.clone()
        seed = seed_of(gen)
        codes, scales = pk.ops.quantize_buckets(x, bits, bucket, True, seed, residual=r)
        rc, rs = reference(x, bits, bucket, True, seed, residual=r_ref)
        assert same_bits(codes, rc) and same_bits(scales, rs)
        assert same_bits(r, r_ref)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_isa_matches_reference(cpu_isa, bits, dtype, gen):
    n = (1 << 20) + 3
    x = randn(n, dtype, gen)
    r = torch.randn(n, generator=gen)
    r_ref = r.clone()
    seed = seed_of(gen)
    for bucket in (512, 37):
        codes, scales = pk.ops.quantize_buckets(x, bits, bucket, True, seed, residual=r)
        rc, rs = reference(x, bits, bucket, True, seed, residual=r_ref)
        assert same_bits(codes, rc) and same_bits(scales, rs) and same_bits(r, r_ref)
        out = torch.randn(n, generator=gen)
        want = out + reference_decode(rc, rs, n, bits, bucket)
        pk.ops.dequantize_buckets(codes, scales, bits=bits, bucket=bucket, out=out, accumulate=True)
        assert same_bits(out, want)


def test_thread_count_does_not_change_the_bits(gen):
    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    x = randn(3_000_001, torch.float32, gen)
    before = _native.C.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            pk.set_num_threads(threads)
            results.append(pk.ops.quantize_buckets(x, 4, 100, True, 77))
    finally:
        pk.set_num_threads(before)
    for codes, scales in results[1:]:
        assert torch.equal(codes, results[0][0]) and same_bits(scales, results[0][1])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_layout_scale_and_levels(bits, gen):
    """Codes in [0, 2L], packed little-endian at i * bits; scale = absmax / L."""
    n, bucket = 1001, 10
    x = randn(n, torch.float32, gen)
    codes, scales = pk.ops.quantize_buckets(x, bits, bucket, True, 3)
    lim = LIMIT[bits]
    raw = codes.numpy().astype(np.int64)
    i = np.arange(n)
    c = (raw[i * bits // 8] >> (i * bits % 8)) & ((1 << bits) - 1)
    assert c.min() >= 0 and c.max() <= 2 * lim
    if n * bits % 8:  # unused high bits of the last byte are zero
        assert raw[-1] >> (n * bits % 8) == 0
    amax = torch.nn.functional.pad(x.abs(), (0, -n % bucket)).view(-1, bucket).amax(1)
    assert same_bits(scales, amax / lim)
    # Each value lands on one of the two levels around it.
    v = x.numpy() / np.repeat(scales.numpy(), bucket)[:n]
    q = c - lim
    assert np.all((q == np.floor(v)) | (q == np.floor(v) + 1) | (np.abs(v) >= lim - 1e-5))
    decoded = pk.ops.dequantize_buckets(codes, scales, n, bits, bucket)
    assert torch.equal(
        decoded, torch.from_numpy(q.astype(np.float32)) * scales.repeat_interleave(bucket)[:n]
    )


def test_nearest_rounding_error_is_half_a_step(gen):
    x = randn(100_000, torch.float32, gen)
    for bits in (8, 4, 2):
        codes, scales = pk.ops.quantize_buckets(x, bits, 512, False)
        err = pk.ops.dequantize_buckets(codes, scales, x.numel(), bits, 512) - x
        step = scales.repeat_interleave(512)[: x.numel()]
        assert bool((err.abs() <= step * 0.5 * (1 + 1e-5)).all())


def test_stochastic_rounding_is_unbiased(gen):
    """The mean of decodes over seeds converges to x.

    Each decode is floor or floor + 1 of x / scale, a Bernoulli draw with the
    fractional part as p. Over S seeds Hoeffding bounds the deviation of the
    mean: P(|mean - x| > t * scale) <= 2 exp(-2 S t^2). With S = 512 and
    t = 0.2, that is 3e-18 per element: this cannot flake. Nearest rounding,
    biased by construction, fails the same check.
    """
    n, bucket, seeds = 4096, 256, 512
    x = randn(n, torch.float32, gen)
    # The first bucket: entries 0.3 of a step above a level (scale 7 / 127, set
    # by its last entry), where nearest rounding is off by 0.3 every time.
    x[bucket - 1] = 7.0
    x[: bucket - 1] = (torch.arange(bucket - 1) % 100 + 0.3) * (7.0 / 127)
    total = torch.zeros(n, dtype=torch.float64)
    base = seed_of(gen)
    for s in range(seeds):
        codes, scales = pk.ops.quantize_buckets(x, 8, bucket, True, base + s)
        total += pk.ops.dequantize_buckets(codes, scales, n, 8, bucket).double()
    mean = total / seeds
    step = scales.double().repeat_interleave(bucket)[:n]
    assert float(((mean - x.double()).abs() / step).max()) < 0.2
    # The same check catches a biased rounding.
    codes, scales = pk.ops.quantize_buckets(x, 8, bucket, False)
    nearest = pk.ops.dequantize_buckets(codes, scales, n, 8, bucket).double()
    assert float(((nearest - x.double()).abs() / step).max()) > 0.25


def test_seed_reproducible_and_independent(gen):
    x = randn(10_000, torch.float32, gen)
    seed = seed_of(gen)
    a = pk.ops.quantize_buckets(x, 4, 512, True, seed)
    b = pk.ops.quantize_buckets(x, 4, 512, True, seed)
    c = pk.ops.quantize_buckets(x, 4, 512, True, seed + 1)
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[0], c[0])
    # Noise is uniform on [0, 1): the mean of a million draws is within 2e-3 of 1/2.
    u = _reference.quant_noise(seed, 0, 1_000_000)
    assert u.min() >= 0 and u.max() < 1 and abs(float(u.mean()) - 0.5) < 2e-3


def test_error_feedback_conserves_the_update(gen):
    x = randn(100_003, torch.float32, gen)
    r = torch.randn(x.shape, generator=gen) * 0.1
    y = x + r
    codes, scales = pk.ops.quantize_buckets(x, 2, 64, True, 5, residual=r)
    decoded = pk.ops.dequantize_buckets(codes, scales, x.numel(), 2, 64)
    # decoded + r reproduces x + r_before up to the rounding of r = y - decoded.
    assert torch.allclose(decoded + r, y, rtol=0, atol=1e-6)
    assert not torch.allclose(decoded, y, atol=1e-3)


def test_special_buckets(backend):
    bucket = 4
    x = torch.tensor(
        [0.0, 0.0, -0.0, 0.0]  # zeros: scale 0
        + [1e-44, -2e-45, 0.0, 1e-45]  # too small to invert: scale 0
        + [1.0, float("nan"), 2.0, 3.0]  # NaN: scale NaN
        + [1.0, float("inf"), 2.0, 3.0]  # inf: scale NaN
        + [0.5, -1.0, 0.25, 0.0]  # ordinary
    )
    r = torch.full_like(x, 0.0)
    codes, scales = pk.ops.quantize_buckets(x, 8, bucket, True, 1, residual=r)
    assert scales[0] == 0 and scales[1] == 0
    assert math.isnan(scales[2]) and math.isnan(scales[3])
    assert scales[4] == 1.0 / 127
    out = pk.ops.dequantize_buckets(codes, scales, x.numel(), 8, bucket)
    assert torch.equal(out[:8], torch.zeros(8))
    assert bool(out[8:16].isnan().all())
    assert out[17] == -1.0
    assert torch.equal(codes[:8], torch.full((8,), 127, dtype=torch.uint8))
    # The residual keeps what was not sent, and forgets non-finite buckets.
    assert torch.equal(r[4:8], x[4:8])
    assert torch.equal(r[8:16], torch.zeros(8))


def test_views_and_shapes(gen):
    base = torch.randn(64, 130, generator=gen)
    x = base[:, 1:129].t()  # non-contiguous
    r = torch.randn(130, 64, generator=gen)[1:129]
    r_ref = r.clone().contiguous()
    codes, scales = pk.ops.quantize_buckets(x, 4, 100, True, 9, residual=r)
    rc, rs = reference(x.contiguous(), 4, 100, True, 9, residual=r_ref)
    assert torch.equal(codes, rc) and same_bits(scales, rs) and torch.equal(r, r_ref)
    out = torch.zeros(128, 64)
    pk.ops.dequantize_buckets(codes, scales, bits=4, bucket=100, out=out)
    assert torch.equal(out.reshape(-1), reference_decode(rc, rs, x.numel(), 4, 100))
    strided = torch.zeros(64, 256)[:, ::2]
    pk.ops.dequantize_buckets(codes, scales, bits=4, bucket=100, out=strided)
    assert torch.equal(strided.reshape(-1), out.reshape(-1))


def test_bad_arguments():
    q, dq = pk.ops.quantize_buckets, pk.ops.dequantize_buckets
    x = torch.randn(100)
    cases = [
        (lambda: q([1.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: q(x.double()), TypeError, "x must be float32"),
        (lambda: q(x.int()), TypeError, "x must be float32"),
        (lambda: q(x, bits=3), ValueError, "bits must be 8, 4 or 2"),
        (lambda: q(x, bits=True), TypeError, "bits must be an int"),
        (lambda: q(x, bits=8.0), TypeError, "bits must be an int"),
        (lambda: q(x, bucket=0), ValueError, "bucket must be in"),
        (lambda: q(x, bucket=(1 << 20) + 1), ValueError, "bucket must be in"),
        (lambda: q(x, seed=-1), ValueError, "seed must be in"),
        (lambda: q(x, seed=1 << 63), ValueError, "seed must be in"),
        (lambda: q(x, stochastic=1), TypeError, "stochastic must be a bool"),
        (lambda: q(x, residual=torch.zeros(100).double()), TypeError, "residual must be float32"),
        (lambda: q(x, residual=torch.zeros(99)), ValueError, "residual must have x's numel"),
        (lambda: q(x, residual=[0.0]), TypeError, "residual must be a torch.Tensor"),
    ]
    codes, scales = q(x, 4, 16)
    cases += [
        (lambda: dq(codes.int(), scales, 100, 4, 16), TypeError, "codes must be torch.uint8"),
        (lambda: dq(codes, scales.double(), 100, 4, 16), TypeError, "scales must be torch.float32"),
        (lambda: dq(codes, scales, 101, 4, 16), ValueError, "codes must hold"),
        (lambda: dq(codes, scales, 100, 4, 8), ValueError, "scales must hold"),
        (lambda: dq(codes, scales, 100, 5, 16), ValueError, "bits must be 8, 4 or 2"),
        (lambda: dq(codes, scales, None, 4, 16), ValueError, "give numel or out"),
        (lambda: dq(codes, scales, -1, 4, 16), ValueError, "numel must be in"),
        (lambda: dq(codes, scales, 100, 4, 16, accumulate=True), ValueError, "needs out"),
        (
            lambda: dq(codes, scales, bits=4, bucket=16, out=torch.zeros(100).half()),
            TypeError,
            "out must be float32",
        ),
        (lambda: dq(codes, scales, 99, 4, 16, out=torch.zeros(100)), ValueError, "numel 99"),
        (
            lambda: dq(codes, scales, 100, 4, 16, accumulate=1),
            TypeError,
            "accumulate must be a bool",
        ),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_native_binding_checks_buffers():
    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    C = _native.C
    x = np.zeros(10, dtype=np.uint32)
    with pytest.raises(ValueError, match="codes"):
        C.quantize_buckets(
            x, 0, 8, 4, True, 0, None, np.zeros(9, np.uint8), np.zeros(3, np.float32)
        )
    with pytest.raises(ValueError, match="scales"):
        C.quantize_buckets(
            x, 0, 8, 4, True, 0, None, np.zeros(10, np.uint8), np.zeros(2, np.float32)
        )
    with pytest.raises(ValueError, match="bits"):
        C.quantize_buckets(
            x, 0, 3, 4, True, 0, None, np.zeros(10, np.uint8), np.zeros(3, np.float32)
        )
    with pytest.raises(ValueError, match="bucket"):
        C.quantize_buckets(
            x, 0, 8, 1 << 21, True, 0, None, np.zeros(10, np.uint8), np.zeros(1, np.float32)
        )
    with pytest.raises(ValueError, match="out"):
        C.dequantize_buckets(
            np.zeros(5, np.uint8), np.zeros(3, np.float32), 10, 4, 4, np.zeros(9, np.float32), False
        )


def test_opcheck(gen):
    x = torch.randn(3000, generator=gen)
    ops = torch.ops.pykernels
    torch.library.opcheck(ops.quantize_buckets.default, (x, 8, 512, True, 3))
    torch.library.opcheck(ops.quantize_buckets.default, (x.bfloat16(), 2, 7, False, 0))
    torch.library.opcheck(
        ops.quantize_buckets_ef.default, (x, torch.randn(3000, generator=gen), 4, 64, True, 1)
    )
    codes, scales = pk.ops.quantize_buckets(x, 4, 64)
    torch.library.opcheck(ops.dequantize_buckets.default, (codes, scales, 3000, 4, 64))
    torch.library.opcheck(
        ops.dequantize_buckets_into.default, (codes, scales, torch.randn(3000), 4, 64, True)
    )


def test_torch_compile_fullgraph_matches_eager(gen):
    def step(g, r):
        codes, scales = pk.ops.quantize_buckets(g, 4, 128, True, 11, residual=r)
        return pk.ops.dequantize_buckets(codes, scales, g.numel(), 4, 128) * 2.0

    g = torch.randn(5000, generator=gen)
    r1, r2 = torch.zeros(5000), torch.zeros(5000)
    want = step(g, r1)
    got = torch.compile(step, fullgraph=True)(g, r2)
    assert torch.equal(got, want) and torch.equal(r1, r2)


@pytest.mark.cuda
def test_cuda_tensors_match_cpu(gen):
    x = torch.randn(10_001, generator=gen)
    r = torch.randn(10_001, generator=gen)
    want = pk.ops.quantize_buckets(x, 4, 512, True, 2, residual=r.clone())
    codes, scales = pk.ops.quantize_buckets(x.cuda(), 4, 512, True, 2, residual=r.cuda())
    assert codes.is_cuda and torch.equal(codes.cpu(), want[0])
    out = pk.ops.dequantize_buckets(codes, scales, x.numel(), 4, 512)
    assert out.is_cuda


@pytest.mark.parametrize("n", [0, 1, 7, 8, 1001])
def test_pack_bits_matches_reference(backend, n, gen):
    for width in range(33):
        hi = 1 << width
        v = torch.randint(0, 1 << 62, (n,), generator=gen, dtype=torch.int64).numpy()
        v = (v % max(hi, 1)).astype(np.uint32)
        noisy = v | (np.uint32(0xFFFFFFFF) << np.uint32(width) if width < 32 else np.uint32(0))
        packed = pk.ops.quant.pack_bits(noisy.astype(np.uint32), width)  # high bits ignored
        want = np.zeros(pk.ops.quant.packed_bytes(n, width), dtype=np.uint8)
        _reference.pack_bits(v, width, want)
        assert np.array_equal(packed, want)
        assert np.array_equal(pk.ops.quant.unpack_bits(packed, n, width), v)
        if n * width % 8:
            assert packed[-1] >> (n * width % 8) == 0


def test_pack_bits_bad_arguments():
    with pytest.raises(TypeError, match="1-D uint32"):
        pk.ops.quant.pack_bits(np.zeros(3, dtype=np.int64), 4)
    with pytest.raises(ValueError, match="width must be in"):
        pk.ops.quant.pack_bits(np.zeros(3, dtype=np.uint32), 33)
    with pytest.raises(ValueError, match="need 2 bytes, got 3"):
        pk.ops.quant.unpack_bits(np.zeros(3, dtype=np.uint8), 3, 5)
    with pytest.raises(TypeError, match="1-D uint8"):
        pk.ops.quant.unpack_bits(np.zeros(3, dtype=np.int8), 3, 5)
    if _native.C is not None:
        with pytest.raises(ValueError, match="out"):
            _native.C.pack_bits(np.zeros(3, np.uint32), 5, np.zeros(1, np.uint8))
        with pytest.raises(ValueError, match="width"):
            _native.C.unpack_bits(np.zeros(3, np.uint8), 3, -1, np.zeros(3, np.uint32))
