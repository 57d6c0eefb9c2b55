"""pykernels.comm codecs: TopK, Quantize, LowRank, Chain, and the wire format."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch

import pykernels as pk
from pykernels import _reference, comm
from pykernels.comm import wire

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 2, 7, 64, 1000, 4097, 100_003]


def randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def roundtrip(p: comm.Payload) -> comm.Payload:
    blob = p.to_bytes()
    assert p.nbytes == len(blob)
    q = comm.Payload.from_bytes(blob)
    assert q.to_bytes() == blob
    assert (q.codec, q.dtype, q.shape) == (p.codec, p.dtype, p.shape)
    return q


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {torch.float32: torch.int32, torch.float64: torch.int64}.get(a.dtype, torch.int16)
    return torch.equal(a.view(view), b.view(view))


# --- TopK -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("value_dtype", FLOATS)
def test_topk_error_feedback_invariant_is_exact(dtype, value_dtype, gen):
    """x + residual_before == decode(encode(x)) + residual_after, bit for bit, over steps."""
    codec = comm.TopK(0.01, value_dtype=value_dtype)
    shape = (313, 97)
    r_before = torch.zeros(shape)
    for step in range(4):
        x = randn(shape, dtype, gen, scale=10.0 ** (step - 1))
        if step == 3:
            # Beyond fp16's range: saturates, the rest stays behind. (An fp16 x
            # cannot hold 1e5: that inf would make a non-finite step, which
            # leaves the residual alone; 6e4 plus its residual goes beyond.)
            x.view(-1)[:3] = 6e4 if dtype == torch.float16 else 1e5
        p = codec.encode(x, key="w")
        r_after = codec.state_dict()["w/residual"]
        decoded = codec.decode(roundtrip(p))
        assert decoded.dtype == dtype and decoded.shape == shape
        assert bits_equal(x.float() + r_before, decoded.float() + r_after)
        r_before = r_after.clone()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", SIZES)
def test_topk_matches_the_reference_selection(dtype, n, gen):
    codec = comm.TopK(0.05)
    r = torch.zeros(n)
    for _ in range(2):
        x = randn(n, dtype, gen)
        p = codec.encode(x, key="g")
        k = codec.k_for(n)
        assert p.params["k"] == k == (0 if n == 0 else max(1, round(0.05 * n)))
        v, i = _reference.topk_sparsify_tensor(x, k, residual=r)
        want = torch.zeros(n, dtype=dtype)
        want[i] = v
        got = codec.decode(roundtrip(p))
        assert bits_equal(got, want)
        assert torch.equal(codec.state_dict()["g/residual"], r)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_topk_k_equal_n_and_k_larger_than_n(n, gen):
    x = randn(n, torch.float32, gen)
    for codec in (comm.TopK(1.0), comm.TopK(k=n), comm.TopK(k=n + 5)):
        p = codec.encode(x)
        assert p.params["k"] == n
        assert torch.equal(codec.decode(roundtrip(p)), x)
        assert torch.equal(codec.state_dict()["/residual"], torch.zeros(n))


def test_topk_scalar_and_empty_tensors(gen):
    codec = comm.TopK(0.5)
    x = torch.tensor(3.5)
    p = roundtrip(codec.encode(x, key="s"))
    assert p.shape == () and torch.equal(codec.decode(p), x)
    e = torch.zeros(0, 5)
    p = roundtrip(codec.encode(e, key="e"))
    assert codec.decode(p).shape == (0, 5) and p.params["k"] == 0


def test_topk_bytes_per_entry_targets(gen):
    x = randn(1_000_000, torch.float32, gen)
    p32 = comm.TopK(0.01).encode(x)
    p16 = comm.TopK(0.01, value_dtype=torch.float16).encode(x)
    assert p32.params["k"] == 10_000
    assert p32.nbytes / 10_000 <= 5.5
    assert p16.nbytes / 10_000 <= 3.5
    pq = comm.Chain(comm.TopK(0.01), comm.Quantize(8)).encode(x)
    assert pq.nbytes < p16.nbytes


def test_topk_index_codings(gen):
    """Gaps with exceptions, one width, and a bitmap, each chosen where smallest."""
    n = 200_000
    # Clustered: a dense run plus a few far entries, so most gaps are 0 and a
    # few are huge (the exceptions).
    x = torch.zeros(n)
    x[50_000:52_000] = randn(2000, torch.float32, gen) + 10
    x[[3, 120_000, 199_999]] = 100.0
    p = comm.TopK(k=2003, error_feedback=False).encode(x)
    coding, width, gaps = wire.index_plan(p.parts["indices"].numpy(), n)
    assert coding == 0 and width <= 1 and int((gaps >> width > 0).sum()) >= 3
    assert p.nbytes < 2003 * 4 + 2003 // 4 + 200  # ~2 bits per index
    q = roundtrip(p)
    assert torch.equal(q.parts["indices"], p.parts["indices"])
    assert torch.equal(comm.decode(q), comm.decode(p))
    # Dense selections go as a bitmap.
    x = randn(n, torch.float32, gen)
    p = comm.TopK(0.5, error_feedback=False).encode(x)
    assert wire.index_plan(p.parts["indices"].numpy(), n)[0] == 1
    q = roundtrip(p)
    assert torch.equal(q.parts["indices"], p.parts["indices"])


def test_topk_approx_and_aggregate(gen):
    codec = comm.TopK(0.02, approx=True)
    payloads = []
    for w in range(3):
        x = randn(50_001, torch.float32, gen)
        payloads.append(roundtrip(codec.encode(x, key=f"worker{w}")))
    total = codec.aggregate(payloads)
    want = codec.decode(payloads[0]) + codec.decode(payloads[1]) + codec.decode(payloads[2])
    assert bits_equal(total, want)


def test_topk_state_dict_resumes_identically(gen):
    a = comm.TopK(0.01)
    xs = [randn((100, 50), torch.float32, gen) for _ in range(3)]
    a.encode(xs[0], key="l1")
    a.encode(xs[1], key="l2")
    b = comm.TopK(0.01)
    b.load_state_dict(a.state_dict())
    assert sorted(b.keys()) == ["l1", "l2"]
    pa, pb = a.encode(xs[2], key="l1"), b.encode(xs[2], key="l1")
    assert pa.to_bytes() == pb.to_bytes()
    with pytest.raises(ValueError, match="state of key 'l1' is for shape"):
        a.encode(torch.randn(7), key="l1")
    a.reset("l1")
    a.encode(torch.randn(7), key="l1")


# --- Quantize -------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_decode_matches_the_ops(bits, dtype, gen):
    codec = comm.Quantize(bits, bucket=100)
    for n in SIZES:
        x = randn(n, dtype, gen)
        p = codec.encode(x, key=f"n{n}")
        codes, scales = pk.ops.quantize_buckets(x, bits, 100, True, p.params["seed"])
        want = pk.ops.dequantize_buckets(codes, scales, n, bits, 100).to(dtype)
        got = codec.decode(roundtrip(p))
        assert bits_equal(got, want)
        assert got.abs().max() <= x.float().abs().max() * 1.001 if n else True


def test_quantize_bytes_per_element_targets(gen):
    x = randn(1_000_000, torch.float32, gen)
    assert comm.Quantize(8).encode(x).nbytes / x.numel() <= 1.02
    assert comm.Quantize(4).encode(x).nbytes / x.numel() <= 0.52
    for bits in (8, 4, 2):
        for n, shape in ((1_000_000, (1_000_000,)), (999, (9, 111))):
            c = comm.Quantize(bits)
            assert c.encode(torch.randn(shape)).nbytes == c.nbytes_for(n, len(shape))


def test_quantize_seeds_are_reproducible_and_fresh(gen):
    x = randn(5000, torch.float32, gen)
    a, b = comm.Quantize(4, seed=7), comm.Quantize(4, seed=7)
    pa = [a.encode(x, key="k").to_bytes() for _ in range(3)]
    pb = [b.encode(x, key="k").to_bytes() for _ in range(3)]
    assert pa == pb and len(set(pa)) == 3  # same sequence, a fresh draw each call
    c = comm.Quantize(4, seed=7)
    c.encode(x, key="k")
    d = comm.Quantize(4, seed=7)
    d.load_state_dict(c.state_dict())
    assert d.encode(x, key="k").to_bytes() == pa[1]
    assert a.encode(x, key="k", seed=5).params["seed"] == 5
    assert comm.Quantize(4, seed=8).encode(x, key="k").to_bytes() != pa[0]


def test_quantize_is_unbiased_over_calls(gen):
    """Mean of 256 decodes within 0.25 of a step of x (Hoeffding: P < 1e-13 per entry)."""
    codec = comm.Quantize(2, bucket=64)
    x = randn(2048, torch.float32, gen)
    total = torch.zeros(2048, dtype=torch.float64)
    for _ in range(256):
        total += codec.decode(codec.encode(x, key="x")).double()
    step = x.view(-1, 64).abs().amax(1).repeat_interleave(64).double()
    assert float(((total / 256 - x.double()).abs() / step).max()) < 0.25


def test_quantize_error_feedback_and_aggregate(gen):
    codec = comm.Quantize(2, error_feedback=True, bucket=32)
    r_before = torch.zeros(1000)
    payloads = []
    for _w in range(3):
        x = randn(1000, torch.float32, gen)
        p = codec.encode(x, key="k")
        r_after = codec.state_dict()["k/residual"]
        assert torch.allclose(x + r_before, codec.decode(p) + r_after, atol=1e-6, rtol=0)
        r_before = r_after.clone()
        payloads.append(roundtrip(p))
    want = codec.decode(payloads[0]) + codec.decode(payloads[1]) + codec.decode(payloads[2])
    assert bits_equal(codec.aggregate(payloads), want)


# --- LowRank --------------------------------------------------------------------


def test_lowrank_small_and_1d_tensors_go_dense(gen):
    codec = comm.LowRank(4)
    for shape in [(10,), (), (0,), (8, 8), (3, 100)]:
        x = randn(shape, torch.float32, gen)
        p = codec.encode(x, key=str(shape))
        assert p.codec == "dense"
        assert bits_equal(codec.decode(roundtrip(p)), x)
    assert codec.plan((100, 100)) == (100, 100, 4)
    assert codec.plan((64, 3, 3, 3)) == (64, 27, 4)
    assert codec.plan((5, 5)) is None


def test_lowrank_recovers_a_low_rank_matrix(gen):
    a = torch.randn(300, 3, generator=gen) @ torch.randn(3, 200, generator=gen)
    codec = comm.LowRank(4)
    p = codec.encode(a.reshape(300, 20, 10), key="a")
    q = roundtrip(p)
    assert p.codec == "lowrank" and q.params["rank"] == 4
    out = codec.decode(q)
    assert out.shape == (300, 20, 10)
    assert torch.allclose(out.reshape(300, 200), a, atol=1e-3 * float(a.abs().max()))
    assert p.nbytes < 4 * (300 + 200) * 4 + 100


def test_lowrank_warm_start_converges_to_the_best_rank_r(gen):
    u, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(150, 150, generator=gen))
    s = 1.0 / torch.arange(1, 151).float()
    m = u[:, :150] @ torch.diag(s) @ v.T
    best = float(s[2:].norm())  # rank-2 optimum
    codec = comm.LowRank(2, error_feedback=False)
    errors = [float((codec.decode(codec.encode(m, key="m")) - m).norm()) for _ in range(30)]
    assert errors[-1] <= 1.01 * best < errors[0]


def test_lowrank_error_feedback_and_aggregate(gen):
    codec = comm.LowRank(3)
    r_before = torch.zeros(64, 48)
    payloads = []
    for _w in range(3):
        x = randn((64, 48), torch.float32, gen)
        p = codec.encode(x, key="w")
        r_after = codec.state_dict()["w/residual"]
        assert torch.allclose(x + r_before, codec.decode(p) + r_after, atol=1e-5)
        r_before = r_after.clone()
        payloads.append(roundtrip(p))
    want = sum(codec.decode(p) for p in payloads)
    assert torch.allclose(codec.aggregate(payloads), want, atol=1e-5)
    fresh = comm.LowRank(3)
    fresh.load_state_dict(codec.state_dict())
    x = randn((64, 48), torch.float32, gen)
    assert fresh.encode(x, key="w").to_bytes() == codec.encode(x, key="w").to_bytes()


def test_lowrank_dtypes_and_no_warm_start(gen):
    for dtype in FLOATS + [torch.float64]:
        codec = comm.LowRank(2, warm_start=False)
        x = randn((40, 30), dtype, gen)
        p1, p2 = codec.encode(x, key="x"), codec.encode(x, key="x")
        assert codec.decode(roundtrip(p1)).dtype == dtype
        assert not torch.equal(p1.parts["q"], p2.parts["q"])  # a fresh random start each call


def test_lowrank_zero_gradient_gives_zeros_not_nan():
    codec = comm.LowRank(4)
    out = codec.decode(codec.encode(torch.zeros(50, 40), key="z"))
    assert torch.equal(out, torch.zeros(50, 40))


# --- Chain ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_chain_topk_then_quantize(bits, gen):
    codec = comm.Chain(comm.TopK(0.01), comm.Quantize(bits, bucket=64))
    r_before = torch.zeros(20_000)
    payloads = []
    for _step in range(3):
        x = randn(20_000, torch.float32, gen)
        p = codec.encode(x, key="c")
        assert isinstance(p.parts["values"], comm.Payload)
        r_after = codec.state_dict()["first.c/residual"]
        decoded = codec.decode(roundtrip(p))
        scale = float(x.abs().max())
        assert torch.allclose(x + r_before, decoded + r_after, atol=1e-6 * scale, rtol=0)
        # The kept values are quantized versions of the top-k values.
        idx = p.parts["indices"]
        assert torch.count_nonzero(decoded) <= idx.numel()
        r_before = r_after.clone()
        payloads.append(comm.Payload.from_bytes(p.to_bytes()))
    want = codec.decode(payloads[0]) + codec.decode(payloads[1]) + codec.decode(payloads[2])
    assert bits_equal(codec.aggregate(payloads), want)
    fresh = comm.Chain(comm.TopK(0.01), comm.Quantize(bits, bucket=64))
    fresh.load_state_dict(codec.state_dict())
    x = randn(20_000, torch.float32, gen)
    assert fresh.encode(x, key="c").to_bytes() == codec.encode(x, key="c").to_bytes()


def test_decode_needs_no_encoder_state(gen):
    """What a Flower server does: decode blobs with a codec that never encoded."""
    x = randn((50, 40), torch.float32, gen)
    pairs = [
        (comm.TopK(0.1), comm.TopK(k=1, error_feedback=False)),
        (comm.Quantize(4), comm.Quantize(8)),
        (comm.LowRank(2), comm.LowRank(7)),
        (comm.Chain(comm.TopK(0.1), comm.Quantize(8)), comm.TopK(0.5)),
    ]
    for enc, server in pairs:
        p = enc.encode(x, key="w")
        q = comm.Payload.from_bytes(p.to_bytes())
        assert server.keys() == [] and q.shape == (50, 40)
        assert bits_equal(server.decode(q), enc.decode(p))
        assert bits_equal(server.aggregate([q, q]), enc.aggregate([p, p]))


def test_reprs():
    assert repr(comm.TopK(0.01)) == (
        "TopK(ratio=0.01, approx=False, error_feedback=True, value_dtype=float32)"
    )
    assert repr(comm.TopK(k=5, value_dtype=torch.float16)).startswith("TopK(k=5,")
    assert repr(comm.Quantize(4)) == (
        "Quantize(bits=4, stochastic=True, bucket=512, error_feedback=False, seed=0)"
    )
    assert repr(comm.LowRank(4)).startswith("LowRank(rank=4, warm_start=True")
    assert repr(comm.Chain(comm.TopK(0.01), comm.Quantize(8))).startswith("Chain(TopK(")
    p = comm.TopK(0.5).encode(torch.ones(4))
    assert repr(p).startswith("Payload(topk, shape=[4], dtype=float32, k=2,")


# --- bad arguments ---------------------------------------------------------------


def test_bad_codec_arguments():
    cases = [
        (lambda: comm.TopK(0.0), ValueError, r"ratio must be in \(0, 1\]"),
        (lambda: comm.TopK(1.5), ValueError, r"ratio must be in \(0, 1\]"),
        (lambda: comm.TopK(-0.1), ValueError, r"ratio must be in \(0, 1\]"),
        (lambda: comm.TopK(float("nan")), ValueError, r"ratio must be in \(0, 1\]"),
        (lambda: comm.TopK("0.1"), TypeError, "ratio must be a float"),
        (lambda: comm.TopK(True), TypeError, "ratio must be a float"),
        (lambda: comm.TopK(), ValueError, "exactly one of ratio and k"),
        (lambda: comm.TopK(0.1, k=5), ValueError, "exactly one of ratio and k"),
        (lambda: comm.TopK(k=0), ValueError, "k must be >= 1"),
        (lambda: comm.TopK(k=2.0), TypeError, "k must be an int"),
        (lambda: comm.TopK(0.1, value_dtype=torch.float64), TypeError, "value_dtype"),
        (lambda: comm.TopK(0.1, approx=1), TypeError, "approx must be a bool"),
        (lambda: comm.Quantize(3), ValueError, "bits must be 8, 4 or 2"),
        (lambda: comm.Quantize(16), ValueError, "bits must be 8, 4 or 2"),
        (lambda: comm.Quantize(True), TypeError, "bits must be an int"),
        (lambda: comm.Quantize(8, bucket=0), ValueError, "bucket must be in"),
        (lambda: comm.Quantize(8, seed=-1), ValueError, "seed must be in"),
        (lambda: comm.Quantize(8, stochastic="yes"), TypeError, "stochastic must be a bool"),
        (lambda: comm.LowRank(0), ValueError, "rank must be >= 1"),
        (lambda: comm.LowRank(-2), ValueError, "rank must be >= 1"),
        (lambda: comm.LowRank(2.5), TypeError, "rank must be an int"),
        (lambda: comm.LowRank(2, min_compression_rate=0), ValueError, "min_compression_rate"),
        (lambda: comm.Chain(comm.Quantize(8), comm.TopK(0.1)), TypeError, "first must be a TopK"),
        (lambda: comm.Chain(comm.TopK(0.1), comm.LowRank(2)), TypeError, "second must be"),
        (
            lambda: comm.Chain(comm.TopK(0.1), comm.Quantize(8, error_feedback=True)),
            ValueError,
            "must not keep its own error feedback",
        ),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_bad_encode_and_state_arguments():
    for codec in (comm.TopK(0.1), comm.Quantize(8)):
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            codec.encode(torch.randn(10).double())
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            codec.encode(torch.arange(10))
        with pytest.raises(TypeError, match="must be a torch.Tensor"):
            codec.encode([1.0, 2.0])
        with pytest.raises(TypeError, match="key must be a str"):
            codec.encode(torch.randn(10), key=3)
    with pytest.raises(TypeError, match="floating-point"):
        comm.LowRank(2).encode(torch.zeros(10, 10, dtype=torch.int32))
    codec = comm.TopK(0.1)
    with pytest.raises(ValueError, match="keeps no 'q' state"):
        codec.load_state_dict({"w/q": torch.zeros(3)})
    with pytest.raises(ValueError, match="is not '<key>/<field>'"):
        codec.load_state_dict({"residual": torch.zeros(3)})
    with pytest.raises(TypeError, match="must be a tensor"):
        codec.load_state_dict({"w/residual": [0.0]})
    with pytest.raises(TypeError, match="must be torch.float32"):
        codec.load_state_dict({"w/residual": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="r <= rank=2"):
        comm.LowRank(2).load_state_dict({"w/q": torch.zeros(10, 3)})
    with pytest.raises(ValueError, match="neither 'first.' nor 'second.'"):
        comm.Chain(comm.TopK(0.1), comm.Quantize(8)).load_state_dict({"x/residual": torch.zeros(1)})
    with pytest.raises(ValueError, match="no payloads"):
        comm.aggregate([])
    a, b = comm.TopK(0.5).encode(torch.ones(4)), comm.TopK(0.5).encode(torch.ones(5))
    with pytest.raises(ValueError, match="decode to different tensors"):
        comm.aggregate([a, b])
    with pytest.raises(TypeError, match="expected a Payload"):
        comm.decode(b"PKCM")


# --- the wire: corrupted and hostile bytes ---------------------------------------


def sample_payloads(gen):
    x = randn(3000, torch.float32, gen)
    return [
        comm.TopK(0.01).encode(x),
        comm.TopK(0.6).encode(x),  # bitmap
        comm.Quantize(4, bucket=64).encode(x),
        comm.LowRank(2).encode(x.view(60, 50)),
        comm.Chain(comm.TopK(0.05), comm.Quantize(2)).encode(x),
        comm.LowRank(2).encode(x[:10]),  # dense
    ]


def reseal(body: bytes) -> bytes:
    """A blob whose checksum is valid again: what a hostile sender can make."""
    return body + struct.pack("<I", zlib.crc32(body))


def test_truncated_and_corrupted_blobs_raise_value_error(gen):
    for p in sample_payloads(gen):
        blob = p.to_bytes()
        cuts = sorted({0, 1, 4, 7, 8, 12, 20, len(blob) // 2, len(blob) - 5, len(blob) - 1})
        for cut in cuts:
            with pytest.raises(ValueError):
                comm.Payload.from_bytes(blob[:cut])
        with pytest.raises(ValueError):
            comm.Payload.from_bytes(blob + b"\x00")
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
        for pos in rng.choice(len(blob), size=min(len(blob), 40), replace=False):
            bad = bytearray(blob)
            bad[pos] ^= 1 << int(rng.integers(8))
            with pytest.raises(ValueError):
                comm.Payload.from_bytes(bytes(bad))


def test_wrong_magic_and_version(gen):
    blob = comm.TopK(0.1).encode(torch.randn(100, generator=gen)).to_bytes()
    with pytest.raises(ValueError, match="bad magic"):
        comm.Payload.from_bytes(reseal(b"XKCM" + blob[4:-4]))
    with pytest.raises(ValueError, match="format version 2 is not supported"):
        comm.Payload.from_bytes(reseal(blob[:4] + b"\x02" + blob[5:-4]))
    # The version is read before the checksum: another version may check differently.
    with pytest.raises(ValueError, match="format version 2"):
        comm.Payload.from_bytes(blob[:4] + b"\x02" + blob[5:])
    with pytest.raises(ValueError, match="checksum"):
        comm.Payload.from_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))


def header(codec: str, dtype: int, shape: tuple[int, ...]) -> bytes:
    return struct.pack("<4sBBBB", b"PKCM", 1, wire.CODECS[codec], dtype, len(shape)) + struct.pack(
        f"<{len(shape)}Q", *shape
    )


def topk_body(k, coding=0, width=0, n_exc=0, vdt=0, vcodec=0, flags=0) -> bytes:
    return struct.pack("<QBBBBBQ", k, flags, vdt, vcodec, coding, width, n_exc)


def test_hostile_blobs_raise_before_allocating():
    cases = [
        # a shape claiming 2^60 elements (and a product that overflows 64 bits)
        (header("topk", 0, (1 << 60,)) + topk_body(1, width=8) + b"\x05" + b"\0" * 4, "max_numel"),
        (header("dense", 0, (1 << 40, 1 << 40)), "max_numel"),
        (header("quantize", 0, (1 << 33,)), "max_numel"),
        # an index past the end: gap 200 in a tensor of 100
        (header("topk", 0, (100,)) + topk_body(1, width=8) + b"\xc8" + b"\0" * 4, "past the end"),
        # the same through an exception's high part
        (
            header("topk", 0, (100,))
            + topk_body(1, width=1, n_exc=1)
            + b"\x00"
            + struct.pack("<II", 0, 1 << 20)
            + b"\0" * 4,
            "past the end",
        ),
        # exceptions out of order
        (
            header("topk", 0, (100,))
            + topk_body(2, width=1, n_exc=2)
            + b"\x00"
            + struct.pack("<IIII", 1, 0, 1, 1)
            + b"\0" * 8,
            "out of order",
        ),
        # k larger than numel
        (header("topk", 0, (10,)) + topk_body(11), "exceeds numel"),
        # counts inconsistent with the length: k values that are not there
        (header("topk", 0, (1000,)) + topk_body(500, width=0), "counts inconsistent"),
        (header("topk", 0, (1000,)) + topk_body(3, width=40), "width 40 > 32"),
        (header("topk", 0, (1000,)) + topk_body(3, n_exc=4), "exceptions for k"),
        # a bitmap whose count disagrees, or with bits past the end
        (header("topk", 0, (12,)) + topk_body(3, coding=1) + b"\x03\x00" + b"\0" * 12, "holds 2"),
        (
            header("topk", 0, (12,)) + topk_body(1, coding=1) + b"\x00\x80" + b"\0" * 4,
            "past the end",
        ),
        (header("topk", 0, (12,)) + topk_body(1, coding=7), "index coding 7"),
        (header("topk", 0, (12,)) + topk_body(1, vdt=3), "value dtype"),
        (header("topk", 3, (12,)) + topk_body(1), "not fp64"),
        # quantize: bad bits, bucket, codes out of range, missing codes
        (header("quantize", 0, (8,)) + struct.pack("<BBIQ", 3, 1, 8, 0), "bits must be"),
        (header("quantize", 0, (8,)) + struct.pack("<BBIQ", 8, 1, 0, 0), "bucket must be"),
        (
            header("quantize", 0, (2,))
            + struct.pack("<BBIQ", 8, 1, 8, 0)
            + b"\0" * 4
            + b"\x01\xff",
            "code out of range",
        ),
        (
            header("quantize", 0, (3,)) + struct.pack("<BBIQ", 2, 1, 8, 0) + b"\0" * 4 + b"\xc0",
            "last byte",
        ),
        (header("quantize", 0, (1000,)) + struct.pack("<BBIQ", 8, 1, 8, 0), "counts inconsistent"),
        # lowrank: a shape that does not match, a rank too large, factors missing
        (header("lowrank", 0, (10, 10)) + struct.pack("<BIQQ", 3, 2, 10, 11), "does not match"),
        (header("lowrank", 0, (10, 10)) + struct.pack("<BIQQ", 3, 11, 10, 10), "rank 11"),
        (
            header("lowrank", 0, (10, 10)) + struct.pack("<BIQQ", 3, 2, 10, 10),
            "counts inconsistent",
        ),
        # unknown codec, dtype, dimensions; trailing bytes
        (struct.pack("<4sBBBB", b"PKCM", 1, 9, 0, 0), "unknown codec id 9"),
        (struct.pack("<4sBBBB", b"PKCM", 1, 0, 9, 0), "unknown dtype id 9"),
        (struct.pack("<4sBBBB", b"PKCM", 1, 0, 0, 200), "200 dimensions"),
        (header("dense", 0, (2,)) + b"\0" * 12, "unexpected bytes"),
    ]
    for body, msg in cases:
        with pytest.raises(ValueError, match=msg):
            comm.Payload.from_bytes(reseal(body))
    assert comm.Payload.from_bytes(reseal(header("dense", 0, (2,)) + b"\0" * 8)).shape == (2,)


def test_from_bytes_accepts_buffers_and_max_numel(gen):
    p = comm.Quantize(8).encode(torch.randn(1000, generator=gen))
    blob = p.to_bytes()
    want = comm.decode(p)
    for data in (
        blob,
        bytearray(blob),
        memoryview(blob),
        np.frombuffer(blob, dtype=np.uint8),
        torch.frombuffer(bytearray(blob), dtype=torch.uint8),
    ):
        assert torch.equal(comm.decode(comm.Payload.from_bytes(data)), want)
    with pytest.raises(ValueError, match="max_numel=999"):
        comm.Payload.from_bytes(blob, max_numel=999)
    with pytest.raises(TypeError, match="expected bytes"):
        comm.Payload.from_bytes("PKCM")
    with pytest.raises(TypeError, match="1-D uint8"):
        comm.Payload.from_bytes(np.zeros(10, dtype=np.int32))


def test_pack_bits_roundtrip(gen):
    for width in range(0, 33):
        hi = 1 << width
        v = torch.randint(0, max(hi, 1), (1001,), generator=gen, dtype=torch.int64).numpy()
        if width == 32:
            v = v & 0xFFFFFFFF
        buf = wire.pack_bits(v.astype(np.uint32), width)
        assert len(buf) == math.ceil(1001 * width / 8)
        assert np.array_equal(wire.unpack_bits(buf, 1001, width), v.astype(np.uint32))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_forged_quantize_codes_are_refused(bits, gen):
    """The one code no encoder writes (all ones), anywhere in the codes, is refused."""
    n = 1003
    p = comm.Quantize(bits, bucket=64).encode(torch.randn(n, generator=gen))
    blob = p.to_bytes()
    codes_at = len(blob) - 4 - (n * bits + 7) // 8
    field = (1 << bits) - 1
    for byte in (0, 9, 100, (n * bits // 8) - 1 - 3, (n * bits // 8) - 1):
        for shift in range(0, 8, bits):
            bad = bytearray(blob[:-4])
            bad[codes_at + byte] |= field << shift
            with pytest.raises(ValueError, match="quantize code"):
                comm.Payload.from_bytes(reseal(bytes(bad)))
