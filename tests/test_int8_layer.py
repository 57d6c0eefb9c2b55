"""pk.nn.Int8Linear and pk.quantize_int8: a drop-in for nn.Linear in inference."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels import _reference

MODES = ["dynamic", "weight_only"]


def linear(k, n, gen, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


def rel_err(y, ref):
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_close_to_float_and_exact_to_ops(mode, bias, gen):
    lin = linear(200, 70, gen, bias)
    q = pk.nn.Int8Linear.from_linear(lin, mode=mode)
    x = torch.randn(3, 5, 200, generator=gen)
    with torch.no_grad():
        y, ref = q(x), lin(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel_err(y, ref) < 2e-2
    w_q, ws = pk.ops.quantize_per_row(lin.weight.detach())
    assert torch.equal(q.weight_int8(), w_q) and torch.equal(q.weight_scale, ws)
    b = None if lin.bias is None else lin.bias.detach()
    fn = _reference.int8_linear if mode == "dynamic" else _reference.int8_weight_linear
    expected = fn(x.reshape(15, 200), w_q, ws, b).view(3, 5, 70)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(q.dequantized_weight(), lin.weight, atol=float(ws.max()) / 2 + 1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_half_outputs(dtype, gen):
    lin = linear(64, 32, gen)
    q = pk.nn.Int8Linear.from_linear(lin)
    x = torch.randn(4, 64, generator=gen).to(dtype)
    with torch.no_grad():
        y = q(x)
        ref = lin(x.float())
    assert y.dtype == dtype
    assert rel_err(y, ref) < 2e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip_into_a_fresh_layer(mode, bias, gen):
    q = pk.nn.Int8Linear.from_linear(linear(130, 45, gen, bias), mode=mode)
    sd = q.state_dict()
    expected_keys = {"weight", "weight_scale"} | ({"bias"} if bias else set())
    assert set(sd) == expected_keys
    assert sd["weight"].dtype == torch.int8 and sd["weight"].shape == (45, 130)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    # A fresh layer from another Linear of the same shape: nothing of the
    # original survives but the file.
    fresh = pk.nn.Int8Linear.from_linear(linear(130, 45, gen, bias), mode=mode)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(6, 130, generator=gen)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.weight_int8(), q.weight_int8())


def test_state_dict_errors(gen):
    q = pk.nn.Int8Linear.from_linear(linear(16, 8, gen))
    sd = q.state_dict()
    bad = dict(sd, weight=sd["weight"][:4])
    with pytest.raises(RuntimeError, match="mismatch for weight"):
        q.load_state_dict(bad)
    missing = {k: v for k, v in sd.items() if k != "weight"}
    with pytest.raises(RuntimeError, match="Missing key"):
        q.load_state_dict(missing)
    q.load_state_dict(missing, strict=False)  # tolerated when not strict


def test_nested_state_dict_and_quantize_int8(gen):
    model = nn.Sequential(linear(32, 64, gen), nn.ReLU(), nn.Sequential(linear(64, 16, gen)))
    x = torch.randn(5, 32, generator=gen)
    converted = pk.quantize_int8(model)
    assert isinstance(model[0], nn.Linear)  # not in place by default
    assert isinstance(converted[0], pk.nn.Int8Linear)
    assert isinstance(converted[2][0], pk.nn.Int8Linear)
    with torch.no_grad():
        assert rel_err(converted(x), model(x)) < 3e-2
    sd = converted.state_dict()
    assert sd["2.0.weight"].dtype == torch.int8
    again = pk.quantize_int8(
        nn.Sequential(linear(32, 64, gen), nn.ReLU(), nn.Sequential(linear(64, 16, gen)))
    )
    again.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(again(x), converted(x))


def test_quantize_int8_filter_inplace_and_mode(gen):
    model = nn.Sequential(linear(8, 8, gen), nn.Sequential(linear(8, 8, gen)), linear(8, 4, gen))
    seen = []

    def keep_last_float(module, fqn):
        seen.append(fqn)
        return fqn != "2"

    out = pk.quantize_int8(model, mode="weight_only", filter_fn=keep_last_float, inplace=True)
    assert out is model
    assert sorted(seen) == ["0", "1.0", "2"]
    assert isinstance(model[0], pk.nn.Int8Linear) and model[0].mode == "weight_only"
    assert isinstance(model[1][0], pk.nn.Int8Linear)
    assert isinstance(model[2], nn.Linear)
    single = pk.quantize_int8(linear(8, 4, gen))
    assert isinstance(single, pk.nn.Int8Linear)
    with pytest.raises(ValueError, match="mode"):
        pk.quantize_int8(model, mode="int4")
    with pytest.raises(TypeError, match="nn.Module"):
        pk.quantize_int8("model")


def test_nbytes_and_repr(gen):
    lin = linear(1024, 1024, gen)
    fp32 = sum(p.numel() * p.element_size() for p in lin.parameters())
    for mode in MODES:
        q = pk.nn.Int8Linear.from_linear(lin, mode=mode)
        assert q.nbytes() <= 0.26 * fp32
        assert q.nbytes() >= 1024 * 1024 + 2 * 4 * 1024
        r = repr(q)
        assert "in_features=1024" in r and "out_features=1024" in r and f"mode={mode}" in r
        assert f"nbytes={q.nbytes()}" in r


@pytest.mark.parametrize("mode", MODES)
def test_no_grad_inference_mode_and_compile(mode, gen):
    lin = linear(96, 40, gen)
    q = pk.nn.Int8Linear.from_linear(lin, mode=mode)
    x = torch.randn(7, 96, generator=gen)
    with torch.no_grad():
        ref = q(x)
    with torch.inference_mode():
        assert torch.equal(q(x), ref)
    model = nn.Sequential(q, nn.GELU())
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), torch.nn.functional.gelu(ref))


def test_backward_raises_a_clear_error(gen):
    q = pk.nn.Int8Linear.from_linear(linear(16, 8, gen))
    x = torch.randn(2, 16, generator=gen, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        q(x).sum().backward()


def test_dtype_moves_keep_float32_scales(gen):
    q = pk.nn.Int8Linear.from_linear(linear(16, 8, gen))
    q.half()
    assert q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.float32
    assert q.weight_packed.dtype == torch.int8
    y = q(torch.randn(3, 16, generator=gen).half())
    assert y.dtype == torch.float16


def test_constructor_and_from_linear_errors():
    with pytest.raises(ValueError, match="mode"):
        pk.nn.Int8Linear(4, 4, mode="static")
    with pytest.raises(ValueError, match="in_features"):
        pk.nn.Int8Linear(-1, 4)
    with pytest.raises(TypeError, match="nn.Linear"):
        pk.nn.Int8Linear.from_linear(nn.Conv1d(2, 2, 1))
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        pk.nn.Int8Linear.from_linear(lin)
    q = pk.nn.Int8Linear.from_linear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="K = 4"):
        q(torch.randn(2, 5))


@pytest.mark.cuda
@pytest.mark.parametrize("mode", MODES)
def test_to_cuda_and_back(mode, gen):
    lin = linear(64, 48, gen)
    q = pk.nn.Int8Linear.from_linear(lin, mode=mode)
    x = torch.randn(5, 64, generator=gen)
    with torch.no_grad():
        ref = q(x)
        g = q.to("cuda")
        torch.testing.assert_close(g(x.cuda()).cpu(), ref, rtol=1e-5, atol=1e-5)
        w_q = pk.ops.quantize_per_row(lin.weight.detach())[0]
        assert torch.equal(g.state_dict()["weight"].cpu(), w_q)
        back = g.to("cpu")
        assert torch.equal(back(x), ref)


def test_act_bits_7_layer_model_and_errors(gen):
    lin = linear(300, 70, gen)
    q7 = pk.nn.Int8Linear.from_linear(lin, act_bits=7)
    assert q7.act_bits == 7 and "act_bits=7" in repr(q7)
    assert "act_bits" not in repr(pk.nn.Int8Linear.from_linear(lin))
    x = torch.nn.functional.gelu(torch.randn(2, 9, 300, generator=gen))
    with torch.no_grad():
        y, ref = q7(x), lin(x)
    w_q, ws = pk.ops.quantize_per_row(lin.weight.detach())
    expected = _reference.int8_linear(x.reshape(18, 300), w_q, ws, lin.bias.detach(), 7)
    torch.testing.assert_close(y, expected.view(2, 9, 70), rtol=1e-5, atol=1e-5)
    assert rel_err(y, ref) < 2e-2
    # act_bits is configuration, like mode: a fresh layer built with it loads the state
    fresh = pk.nn.Int8Linear(300, 70, act_bits=7)
    fresh.load_state_dict(q7.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    model = nn.Sequential(linear(300, 40, gen), nn.GELU(), linear(40, 8, gen))
    qm = pk.quantize_int8(model, act_bits=7)
    assert all(m.act_bits == 7 for m in qm if isinstance(m, pk.nn.Int8Linear))
    with pytest.raises(ValueError, match="act_bits=7 needs mode='dynamic'"):
        pk.nn.Int8Linear.from_linear(lin, mode="weight_only", act_bits=7)
    with pytest.raises(ValueError, match="act_bits must be 8 or 7"):
        pk.quantize_int8(model, act_bits=4)
    with pytest.raises(TypeError, match="act_bits must be an int"):
        pk.nn.Int8Linear(3, 4, act_bits="7")
    with pytest.raises(ValueError, match="act_bits"):
        pk.compress(model, "int8:weight_only:act_bits=7", torch.randn(2, 300), progress=False)


def test_a_layer_pickled_before_act_bits_existed_still_runs(gen):
    lin = linear(40, 12, gen)
    q = pk.nn.Int8Linear.from_linear(lin)
    del q.__dict__["act_bits"]  # as unpickling an older layer leaves it
    old = pickle.loads(pickle.dumps(q))
    x = torch.randn(3, 40, generator=gen)
    with torch.no_grad():
        assert old.act_bits == 8 and torch.equal(old(x), pk.nn.Int8Linear.from_linear(lin)(x))
    assert "act_bits" not in repr(old)
