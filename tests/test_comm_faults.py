"""comm codecs under faults: non-finite steps never enter error feedback, and the
error-feedback identity holds for every codec, tensor dtype and value dtype.

``x + r_before == decode(encode(x)) + r_after``: TopK bit for bit in fp32; the
quantizing and low-rank codecs within fp32 rounding (far below one rounding to
fp16 or bf16, which is what they lost per step before).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pykernels import comm
from pykernels.comm.base import all_finite, payload_finite, to_dtype
from pykernels.comm.topk import send_limit

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
NAN, INF = float("nan"), float("inf")

# Codecs with error feedback, by the name of their residual in the state dict.
EF_CODECS = {
    "topk": (lambda: comm.TopK(0.01), "w/residual"),
    "topk_fp16": (lambda: comm.TopK(0.01, value_dtype=torch.float16), "w/residual"),
    "topk_bf16": (lambda: comm.TopK(0.01, value_dtype=torch.bfloat16), "w/residual"),
    "quantize": (lambda: comm.Quantize(4, bucket=64, error_feedback=True), "w/residual"),
    "lowrank": (lambda: comm.LowRank(3), "w/residual"),
    "chain": (
        lambda: comm.Chain(comm.TopK(0.02), comm.Quantize(8, bucket=32)),
        "first.w/residual",
    ),
}

SHAPE = (100, 100)  # n = 10,000: the issue's size


def fault(kind: str, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(SHAPE, generator=gen)
    if kind == "all_nan":
        x.fill_(NAN)
    elif kind == "some_nan":
        x.view(-1)[[3, 500, 9999]] = NAN
    elif kind == "inf":
        x.view(-1)[[7, 4000]] = INF
    elif kind == "-inf":
        x.view(-1)[11] = -INF
    elif kind == "nan_and_inf":
        x.view(-1)[:5000] = NAN
        x.view(-1)[5000:] = INF
    return x


def tensor_state(codec: comm.Codec) -> dict[str, torch.Tensor]:
    """The state that carries tensors from step to step (not the noise counters)."""
    return {k: v.clone() for k, v in codec.state_dict().items() if not k.endswith("/step")}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a
    )


@pytest.mark.parametrize("kind", ["all_nan", "some_nan", "inf", "-inf", "nan_and_inf"])
@pytest.mark.parametrize("name", list(EF_CODECS))
def test_a_non_finite_step_leaves_error_feedback_as_it_was(name, kind, gen):
    make, res_key = EF_CODECS[name]
    codec = make()
    for _ in range(3):  # a residual worth keeping
        codec.encode(torch.randn(SHAPE, generator=gen), key="w")
    before = tensor_state(codec)
    assert bool(before[res_key].abs().sum() > 0)

    bad = codec.encode(fault(kind, gen), key="w")
    # Sent in its own step, and seen: the receiver's sum is not finite (AMP's
    # GradScaler skips it), and the payload says it was made without error feedback.
    assert not bool(torch.isfinite(codec.decode(comm.Payload.from_bytes(bad.to_bytes()))).all())
    assert not payload_finite(bad) and bad.params["error_feedback"] is False
    assert same_bits(tensor_state(codec), before)

    # Every later clean step sends finite values, and its identity holds again.
    r_before = before[res_key].view(SHAPE)
    for _ in range(5):
        x = torch.randn(SHAPE, generator=gen)
        p = codec.encode(x, key="w")
        out = codec.decode(comm.Payload.from_bytes(p.to_bytes()))
        assert bool(torch.isfinite(out).all())
        r_after = codec.state_dict()[res_key].view(SHAPE)
        assert all_finite(r_after)
        torch.testing.assert_close(out + r_after, x + r_before, rtol=0, atol=1e-5)
        r_before = r_after.clone()


def test_the_issues_topk_case_sends_no_nan_after_one_bad_step(gen):
    """n = 10,000, ratio 0.01: each clean encode after an all-NaN one sent 100 NaN
    (the residual drained 9800 -> 9700 -> ...); now none."""
    codec = comm.TopK(0.01)
    codec.encode(torch.randn(10_000, generator=gen), key="g")
    bad = codec.decode(codec.encode(torch.full((10_000,), NAN), key="g"))
    assert int(bad.isnan().sum()) == 100  # k of them, sent
    for _ in range(3):
        out = codec.decode(codec.encode(torch.randn(10_000, generator=gen), key="g"))
        assert int(out.isnan().sum()) == 0
        assert int(codec.state_dict()["g/residual"].isnan().sum()) == 0


@pytest.mark.parametrize("dtype", FLOATS)
def test_non_finite_steps_in_16_bit_tensors(dtype, gen):
    for make in (lambda: comm.TopK(0.05), lambda: comm.Quantize(8, error_feedback=True)):
        codec = make()
        codec.encode(torch.randn(4000, generator=gen).to(dtype), key="w")
        before = tensor_state(codec)
        x = torch.randn(4000, generator=gen).to(dtype)
        x[17] = INF
        x[18] = NAN
        out = codec.decode(codec.encode(x, key="w"))
        assert out.dtype == dtype and not bool(torch.isfinite(out).all())
        assert same_bits(tensor_state(codec), before)


def test_lowrank_non_finite_step_keeps_the_warm_start_q(gen):
    codec = comm.LowRank(2)
    for _ in range(3):
        codec.encode(torch.randn(60, 40, generator=gen), key="w")
    before = tensor_state(codec)
    assert set(before) == {"w/residual", "w/q"}
    x = torch.randn(60, 40, generator=gen)
    x[5, 5] = NAN
    p = codec.encode(x, key="w")
    assert p.params["error_feedback"] is False
    assert same_bits(tensor_state(codec), before)
    # no error feedback at all: the warm start alone is protected too
    codec = comm.LowRank(2, error_feedback=False)
    codec.encode(torch.randn(60, 40, generator=gen), key="w")
    q = codec.state_dict()["w/q"].clone()
    codec.encode(torch.full((60, 40), INF), key="w")
    assert torch.equal(codec.state_dict()["w/q"], q)


@pytest.mark.parametrize("name", ["topk", "chain", "quantize", "lowrank"])
def test_an_overflowing_sum_leaves_no_inf_in_the_residual(name, gen):
    """A finite input whose sum with a finite residual overflows fp32."""
    make, res_key = EF_CODECS[name]
    codec = make()
    r = torch.randn(SHAPE, generator=gen)
    r.view(-1)[:300] = 3e38
    codec.load_state_dict({res_key: r})
    x = torch.randn(SHAPE, generator=gen)
    x.view(-1)[:300] = 3e38  # 6e38 in fp32: inf
    p = codec.encode(x, key="w")
    assert all_finite(codec.state_dict()[res_key])
    assert not bool(torch.isfinite(codec.decode(p)).all())  # the step is seen


@pytest.mark.parametrize("name", ["topk", "topk_fp16", "topk_bf16", "chain", "quantize"])
def test_take_back_returns_what_was_sent_to_the_residual(name, gen):
    make, res_key = EF_CODECS[name]
    codec = make()
    codec.encode(torch.randn(SHAPE, generator=gen), key="w")
    r_before = codec.state_dict()[res_key].clone()
    x = torch.randn(SHAPE, generator=gen)
    p = codec.encode(x, key="w")
    assert not torch.equal(codec.state_dict()[res_key], r_before + x)
    codec.take_back(p, key="w")
    r = codec.state_dict()[res_key]
    if name.startswith("topk"):
        assert torch.equal(r, r_before + x)  # exactly: nothing lost, nothing made up
    else:
        torch.testing.assert_close(r, r_before + x, rtol=0, atol=1e-6)
    # a payload made without error feedback takes nothing back
    bad = codec.encode(fault("some_nan", gen), key="w")
    codec.take_back(bad, key="w")
    assert torch.equal(codec.state_dict()[res_key], r)


def test_a_residual_with_nan_is_refused_when_loaded():
    for codec, name in (
        (comm.TopK(0.1), "w/residual"),
        (comm.Quantize(8, error_feedback=True), "w/residual"),
        (comm.LowRank(2), "w/residual"),
        (comm.LowRank(2), "w/q"),
    ):
        t = torch.zeros(10, 2)
        t[3, 1] = NAN
        with pytest.raises(ValueError, match=f"{name} holds NaN or inf"):
            codec.load_state_dict({name: t})
    chain = comm.Chain(comm.TopK(0.1), comm.Quantize(8))
    with pytest.raises(ValueError, match="w/residual holds NaN or inf"):
        chain.load_state_dict({"first.w/residual": torch.tensor([1.0, INF])})


# --- the identity for every codec, tensor dtype and value dtype (issue 20, item 5) ---


def steps(dtype: torch.dtype, gen: torch.Generator, shape=(64, 150)):
    """Updates of growing size, the last with entries near fp16's limit."""
    for scale in (1.0, 100.0, 3e3):
        x = torch.randn(shape, generator=gen) * scale
        if scale == 3e3:
            x.view(-1)[:40] = 65000.0 * torch.sign(torch.randn(40, generator=gen))
        yield x.to(dtype)


def check_identity(codec, res_key, dtype, gen, exact):
    r_before = torch.zeros(64, 150)
    for x in steps(dtype, gen):
        out = codec.decode(comm.Payload.from_bytes(codec.encode(x, key="w").to_bytes()))
        assert out.dtype == dtype
        # a finite update never decodes to inf
        assert bool(torch.isfinite(out).all())
        r_after = codec.state_dict()[res_key].view(64, 150)
        want = x.float() + r_before
        got = out.float() + r_after
        if exact:
            assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        else:
            # One rounding to fp16 of the largest entries (65000) is 32; to bf16
            # 256. Within fp32 rounding is 2^-20 of the largest.
            err = float((got - want).abs().max())
            assert err <= 2.0**-20 * float(want.abs().max()), err
        r_before = r_after.clone()


@pytest.mark.parametrize("value_dtype", FLOATS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_topk_identity_is_exact_for_every_dtype_pair(dtype, value_dtype, gen):
    codec = comm.TopK(0.05, value_dtype=value_dtype)
    check_identity(codec, "w/residual", dtype, gen, exact=True)


@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_identity_for_every_dtype(dtype, gen):
    for stochastic in (True, False):
        codec = comm.Quantize(8, bucket=128, error_feedback=True, stochastic=stochastic)
        check_identity(codec, "w/residual", dtype, gen, exact=False)


@pytest.mark.parametrize("dtype", FLOATS)
def test_chain_identity_for_every_dtype(dtype, gen):
    codec = comm.Chain(comm.TopK(0.05), comm.Quantize(8, bucket=64))
    check_identity(codec, "first.w/residual", dtype, gen, exact=False)


@pytest.mark.parametrize("dtype", FLOATS)
def test_lowrank_identity_for_every_dtype(dtype, gen):
    check_identity(comm.LowRank(4), "w/residual", dtype, gen, exact=False)


def test_topk_bf16_values_of_fp16_tensors_decode_finite():
    """bf16's nearest to 65504 is 65536, which decodes to inf in fp16: the values
    saturate at 65280 and error feedback keeps the rest."""
    assert send_limit(torch.float16, torch.bfloat16) == 65280.0
    assert send_limit(torch.float32, torch.float16) == 65504.0
    assert send_limit(torch.bfloat16, torch.float16) == 65504.0
    assert send_limit(torch.float32, torch.bfloat16) == float(torch.finfo(torch.bfloat16).max)
    codec = comm.TopK(k=3, value_dtype=torch.bfloat16)
    x = torch.tensor([65504.0, -65504.0, 65408.0, 1.0], dtype=torch.float16)
    out = codec.decode(codec.encode(x, key="w"))
    assert torch.equal(out, torch.tensor([65280.0, -65280.0, 65280.0, 0.0], dtype=torch.float16))
    r = codec.state_dict()["w/residual"]
    assert torch.equal(r, torch.tensor([224.0, -224.0, 128.0, 1.0]))
    # the whole of it arrives over the next steps
    total = out.float()
    for _ in range(3):
        total += codec.decode(codec.encode(torch.zeros(4, dtype=torch.float16), key="w")).float()
    assert torch.equal(total, x.float())


def test_to_dtype_saturates_finite_values_only():
    x = torch.tensor([1e6, -1e6, 70000.0, INF, -INF, NAN, 3.0])
    y = to_dtype(x, torch.float16)
    want = [65504.0, -65504.0, 65504.0, INF, -INF, NAN, 3.0]
    np.testing.assert_array_equal(y.float().numpy(), np.array(want, dtype=np.float32))
    assert to_dtype(torch.tensor([3.4e38]), torch.bfloat16).isfinite().all()


@pytest.mark.parametrize("dtype", FLOATS + [torch.float64])
def test_all_finite(dtype):
    for n in (0, 1, 7, 1000, 70_001):
        x = torch.randn(n).to(dtype)
        assert all_finite(x)
        assert all_finite(x[::2])
        if n:
            for v in (NAN, INF, -INF):
                y = x.clone()
                y[n // 2] = v
                assert not all_finite(y)
                assert not all_finite(y[n // 2 :])
    # finite values whose sum overflows are finite
    big = torch.full((10,), float(torch.finfo(dtype).max), dtype=dtype)
    assert all_finite(big)


def test_take_back_refuses_what_is_not_this_keys_payload(gen):
    for codec in (comm.TopK(0.1), comm.Quantize(8, error_feedback=True)):
        codec.encode(torch.randn(50, generator=gen), key="w")
        other = codec.encode(torch.randn(40, generator=gen), key="v")
        with pytest.raises(ValueError, match="decodes to 40 elements, the residual of key 'w'"):
            codec.take_back(other, key="w")
        with pytest.raises(TypeError, match="payload must be a Payload"):
            codec.take_back(b"PKCM", key="w")
