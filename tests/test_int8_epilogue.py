"""The fused epilogue of int8_linear (activation, residual) against the unfused
int8 path and the float64 reference, on every backend and every CPU tier."""

from __future__ import annotations

import math

import pytest
import torch

import pykernels as pk
from pykernels import _reference
from pykernels.ops.int8 import ACTIVATIONS, apply_epilogue

# Row tails of the register tiles, N past one block of 64 columns and not a
# multiple of 16 (the epilogue's vector tail), K not a multiple of 4.
SHAPES = [(1, 64, 48), (5, 130, 70), (37, 384, 200), (64, 96, 1152)]


def _ref64(y: torch.Tensor, act: str) -> torch.Tensor:
    y = y.double()
    if act == "relu":
        return torch.relu(y)
    if act == "gelu":
        return 0.5 * y * (1 + torch.special.erf(y / math.sqrt(2)))
    if act == "gelu_tanh":
        return 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
    if act == "silu":
        return y * torch.sigmoid(y)
    return y


def _make(m, k, n, gen):
    x = torch.randn(m, k, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    ws = torch.rand(n, generator=gen) * 0.02 + 1e-3
    b = torch.randn(n, generator=gen)
    r = torch.randn(m, n, generator=gen)
    return x, w, ws, b, r


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_fused_equals_unfused_every_tier(cpu_isa, act, m, k, n, gen):
    x, w, ws, b, r = _make(m, k, n, gen)
    packed = pk.ops.pack_int8_weight(w)
    base = pk.ops.int8_linear(x, packed, ws, b)
    for residual in (None, r):
        y = pk.ops.int8_linear(x, packed, ws, b, activation=act, residual=residual)
        unfused = apply_epilogue(base, act, residual)
        # The same int8 products and scales; only the activation's float
        # evaluation differs (erf to ~4e-7, exp to ~2 ulp), relative to |y|.
        tol = 2e-6 * (1 + base.abs())
        assert bool(((y - unfused).abs() <= tol).all()), float((y - unfused).abs().max())
        # And against the exact activation of the float64 reference linear.
        ref = _ref64(_reference.int8_linear(x, w, ws, b), act)
        if residual is not None:
            ref = ref + residual.double()
        scale = float(ref.abs().max())
        assert float((y.double() - ref).abs().max()) <= 1e-5 * scale + 1e-6


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_backend_same_epilogue(backend, act, gen):
    x, w, ws, b, r = _make(9, 70, 40, gen)
    y = pk.ops.int8_linear(x, w, ws, b, activation=act, residual=r)
    ref = _ref64(_reference.int8_linear(x, w, ws, b), act) + r.double()
    assert float((y.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_round_once(cpu_isa, dtype, gen):
    x, w, ws, b, r = _make(7, 64, 33, gen)
    x, r = x.to(dtype), r.to(dtype)
    y = pk.ops.int8_linear(x, w, ws, b, activation="gelu", residual=r)
    assert y.dtype == dtype
    base = pk.ops.int8_linear(x.float(), w, ws, b)
    want = apply_epilogue(base, "gelu", r.float()).to(dtype)
    eps = torch.finfo(dtype).eps
    assert bool(((y.float() - want.float()).abs() <= 2 * eps * (1 + want.float().abs())).all())


def test_leading_dims_and_extremes(cpu_isa, gen):
    x = torch.randn(2, 3, 32, generator=gen) * 50
    w = torch.randint(-127, 128, (80, 32), dtype=torch.int8, generator=gen)
    ws = torch.full((80,), 0.5)
    r = torch.randn(2, 3, 80, generator=gen)
    for act in ACTIVATIONS:
        y = pk.ops.int8_linear(x, w, ws, activation=act, residual=r)
        assert y.shape == (2, 3, 80)
        assert bool(torch.isfinite(y).all())  # |y| in the thousands: exp saturates cleanly
        base = pk.ops.int8_linear(x, w, ws)
        want = apply_epilogue(base, act, r)
        assert bool(((y - want).abs() <= 1e-5 * (1 + want.abs())).all()), act


def test_nan_rows_stay_nan(cpu_isa):
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    w = torch.randint(-127, 128, (20, 16), dtype=torch.int8)
    ws = torch.ones(20)
    for act in ACTIVATIONS:
        y = pk.ops.int8_linear(x, w, ws, activation=act, residual=torch.zeros(4, 20))
        assert bool(torch.isnan(y[1]).all()), act
        assert bool(torch.isfinite(y[[0, 2, 3]]).all()), act


def test_bad_epilogue_arguments():
    x = torch.randn(3, 8)
    w = torch.randint(-127, 128, (5, 8), dtype=torch.int8)
    ws = torch.ones(5)
    with pytest.raises(ValueError, match="activation"):
        pk.ops.int8_linear(x, w, ws, activation="gelu2")
    with pytest.raises(ValueError, match="residual"):
        pk.ops.int8_linear(x, w, ws, residual=torch.zeros(3, 4))
    with pytest.raises(TypeError, match="residual"):
        pk.ops.int8_linear(x, w, ws, residual=torch.zeros(3, 5, dtype=torch.int32))
    with pytest.raises(TypeError, match="residual"):
        pk.ops.int8_linear(x, w, ws, residual=[0.0] * 15)
    with pytest.raises(ValueError, match="activation"):
        pk.nn.Int8Linear(8, 5, activation="tanh")


def test_layer_activation_and_residual_save_load(tmp_path, gen):
    lin = torch.nn.Linear(48, 64)
    layer = pk.nn.Int8Linear.from_linear(lin, activation="gelu")
    assert "activation=gelu" in repr(layer)
    x = torch.randn(6, 48, generator=gen)
    r = torch.randn(6, 64, generator=gen)
    plain = pk.nn.Int8Linear.from_linear(lin)
    want = apply_epilogue(plain(x), "gelu", r)
    got = layer(x, r)
    assert bool(((got - want).abs() <= 2e-6 * (1 + want.abs())).all())
    model = torch.nn.Sequential(layer)
    pk.save(model, tmp_path / "m")
    back = pk.load(tmp_path / "m", torch.nn.Sequential(torch.nn.Linear(48, 64)))
    assert back[0].activation == "gelu"
    assert torch.equal(back[0](x), layer(x))


def test_fake_tensor_mode_sees_the_fused_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = torch.randint(-127, 128, (5, 8), dtype=torch.int8)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = pk.ops.int8_linear(
            torch.randn(3, 8), w, torch.ones(5), activation="silu", residual=torch.randn(3, 5)
        )
    assert tuple(y.shape) == (3, 5)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (50, 130, 70), (100, 96, 200)])
def test_quantized_hand_off_equals_quantizing_the_output(cpu_isa, act, m, k, n, gen):
    x, w, ws, b, _ = _make(m, k, n, gen)
    packed = pk.ops.pack_int8_weight(w)
    y = pk.ops.int8_linear(x, packed, ws, b, activation=act)
    q0, s0 = pk.ops.quantize_per_row(y)
    q, s = pk.ops.int8_linear_quantized_out(x, packed, ws, b, activation=act)
    assert torch.equal(q, q0) and torch.equal(s, s0)
    # and the next layer from (q, s) equals it from the float activation
    w2 = torch.randint(-127, 128, (33, n), dtype=torch.int8, generator=gen)
    p2, ws2, r = pk.ops.pack_int8_weight(w2), torch.rand(33, generator=gen), torch.randn(m, 33)
    want = pk.ops.int8_linear(y, p2, ws2, None, activation="silu", residual=r)
    got = pk.ops.int8_linear_prequantized(q, s, p2, ws2, None, activation="silu", residual=r)
    assert torch.equal(got, want)


def test_prequantized_every_backend_and_refusals(backend, gen):
    q = torch.randint(-127, 128, (7, 40), dtype=torch.int8, generator=gen)
    s = torch.rand(7, generator=gen)
    w = torch.randint(-127, 128, (9, 40), dtype=torch.int8, generator=gen)
    ws, b = torch.rand(9, generator=gen), torch.randn(9, generator=gen)
    packed = pk.ops.pack_int8_weight(w)
    y = pk.ops.int8_linear_prequantized(q, s, packed, ws, b)
    ref = (q.double() @ w.double().T) * s.double()[:, None] * ws.double() + b.double()
    assert float((y.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    bad = q.clone()
    bad[3, 5] = -128
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        pk.ops.int8_linear_prequantized(bad, s, packed, ws, b)
    with pytest.raises(TypeError, match="q must be an int8"):
        pk.ops.int8_linear_prequantized(q.float(), s, packed, ws, b)
    with pytest.raises(ValueError, match="x_scale"):
        pk.ops.int8_linear_prequantized(q, s[:3], packed, ws, b)
    with pytest.raises(TypeError, match="Int8PackedWeight"):
        pk.ops.int8_linear_quantized_out(torch.randn(7, 40), w, ws, b)


# --- LayerNorm / RMSNorm ending the epilogue -------------------------------------


def _norm64(y, norm, w, b, eps):
    y = y.double()
    if norm == "layer":
        mu = y.mean(-1, keepdim=True)
        y = (y - mu) / torch.sqrt(((y - mu) ** 2).mean(-1, keepdim=True) + eps)
    else:
        y = y / torch.sqrt((y**2).mean(-1, keepdim=True) + eps)
    y = y if w is None else y * w.double()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_norm_epilogue_every_tier(cpu_isa, norm, m, k, n, gen):
    x, w, ws, b, r = _make(m, k, n, gen)
    g, beta = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    packed = pk.ops.pack_int8_weight(w)
    base = pk.ops.int8_linear(x, packed, ws, b)
    for nw, nb, act, res in (
        (g, beta, "none", r),
        (None, None, "gelu", None),
        (g, None, "silu", r),
    ):
        nb = nb if norm == "layer" else None
        y = pk.ops.int8_linear(
            x,
            packed,
            ws,
            b,
            activation=act,
            residual=res,
            norm=norm,
            norm_weight=nw,
            norm_bias=nb,
            eps=1e-6,
        )
        want = apply_epilogue(base, act, res, norm, nw, nb, 1e-6)
        assert float((y - want).abs().max()) <= 2e-5 * (1 + float(want.abs().max()))
        pre = _ref64(_reference.int8_linear(x, w, ws, b), act)
        ref = _norm64(pre + (0 if res is None else res.double()), norm, nw, nb, 1e-6)
        assert float((y.double() - ref).abs().max()) <= 1e-4 * (1 + float(ref.abs().max()))


def test_norm_epilogue_every_backend_and_dtype(backend, gen):
    x, w, ws, b, r = _make(9, 40, 70, gen)
    g, beta = torch.randn(70, generator=gen), torch.randn(70, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        y = pk.ops.int8_linear(
            xd, w, ws, b, residual=r, norm="layer", norm_weight=g, norm_bias=beta
        )
        assert y.dtype == dtype
        base = pk.ops.int8_linear(xd.float(), w, ws, b)
        want = torch.nn.functional.layer_norm(base + r, (70,), g, beta, 1e-5)
        assert float((y.float() - want).abs().max()) <= (
            2e-2 if dtype != torch.float32 else 2e-5
        ) * (1 + float(want.abs().max()))


def test_norm_epilogue_refusals(gen):
    x, w, ws, b, _ = _make(3, 8, 5, gen)
    with pytest.raises(ValueError, match="norm must be one of"):
        pk.ops.int8_linear(x, w, ws, norm="batch")
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        pk.ops.int8_linear(x, w, ws, norm="layer", norm_weight=torch.ones(4))
    with pytest.raises(TypeError, match="norm_bias must be a float"):
        pk.ops.int8_linear(x, w, ws, norm="layer", norm_bias=torch.ones(5, dtype=torch.int32))
    with pytest.raises(ValueError, match="RMSNorm has no bias"):
        pk.ops.int8_linear(x, w, ws, norm="rms", norm_bias=torch.ones(5))
    with pytest.raises(ValueError, match="norm_weight given but norm is None"):
        pk.ops.int8_linear(x, w, ws, norm_weight=torch.ones(5))
    with pytest.raises(ValueError, match="eps must be finite"):
        pk.ops.int8_linear(x, w, ws, norm="layer", eps=float("nan"))
    with pytest.raises(TypeError, match="eps must be a float"):
        pk.ops.int8_linear(x, w, ws, norm="layer", eps="1e-5")
    layer = pk.nn.Int8Linear.from_linear(torch.nn.Linear(8, 5))
    with pytest.raises(TypeError, match="norm must be an nn.LayerNorm"):
        layer(x, norm=torch.nn.BatchNorm1d(5))
    with pytest.raises(ValueError, match="normalize the 5 output features"):
        layer(x, norm=torch.nn.LayerNorm(4))


def test_layer_norm_module_fused(gen):
    lin = torch.nn.Linear(48, 64)
    layer = pk.nn.Int8Linear.from_linear(lin)
    x, r = torch.randn(6, 48, generator=gen), torch.randn(6, 64, generator=gen)
    for norm in (torch.nn.LayerNorm(64), torch.nn.RMSNorm(64), torch.nn.RMSNorm(64, eps=1e-3)):
        with torch.no_grad():
            norm.weight.normal_(generator=gen)
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_(generator=gen)
            want = norm(layer(x) + r)
        assert float((layer(x, r, norm) - want).abs().max()) <= 1e-5 * (1 + float(want.abs().max()))


# --- the gated linear (Llama-style MLPs) --------------------------------------------

GATED_SHAPES = [(1, 64, 32), (5, 70, 45), (37, 96, 200), (130, 40, 64)]


def _gated_ref(x, w, ws, b, n, act):
    y = _reference.int8_linear(x, w, ws, b).double()
    return _ref64(y[:, :n], act) * y[:, n:]


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu", "none"])
@pytest.mark.parametrize("m,k,n", GATED_SHAPES)
def test_gated_every_tier(cpu_isa, act, m, k, n, gen):
    x, w, ws, b, _ = _make(m, k, 2 * n, gen)
    for bias in (b, None):
        gw = pk.ops.pack_int8_gated_weight(w, ws, bias)
        y = pk.ops.int8_linear_gated(x, gw, activation=act)
        g = pk.ops.int8_linear(x, w[:n], ws[:n], None if bias is None else bias[:n])
        u = pk.ops.int8_linear(x, w[n:], ws[n:], None if bias is None else bias[n:])
        want = apply_epilogue(g, act, None) * u
        assert float((y - want).abs().max()) <= 2e-6 * (1 + float(want.abs().max()))
        ref = _gated_ref(x, w, ws, bias, n, act)
        assert float((y.double() - ref).abs().max()) <= 1e-5 * (1 + float(ref.abs().max()))


def test_gated_every_backend(backend, gen):
    n = 45
    x, w, ws, b, _ = _make(11, 70, 2 * n, gen)
    gw = pk.ops.pack_int8_gated_weight(w, ws, b)
    for dtype in (torch.float32, torch.bfloat16):
        y = pk.ops.int8_linear_gated(x.to(dtype), gw)
        assert y.dtype == dtype and y.shape == (11, n)
        ref = _gated_ref(x.to(dtype).float(), w, ws, b, n, "silu")
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert float((y.double() - ref).abs().max()) <= tol * (1 + float(ref.abs().max()))
    # leading dims, empty and one-row inputs
    x3 = torch.randn(2, 3, 70, generator=gen)
    assert torch.allclose(
        pk.ops.int8_linear_gated(x3, gw).reshape(6, n),
        pk.ops.int8_linear_gated(x3.reshape(6, 70), gw),
    )
    assert pk.ops.int8_linear_gated(torch.randn(0, 70), gw).shape == (0, n)


def test_gated_refusals_and_fake(gen):
    x, w, ws, b, _ = _make(3, 8, 10, gen)
    gw = pk.ops.pack_int8_gated_weight(w, ws, b)
    with pytest.raises(ValueError, match=r"stack gate and up rows"):
        pk.ops.pack_int8_gated_weight(w[:9], ws[:9])
    with pytest.raises(ValueError, match="w_scale must have shape"):
        pk.ops.pack_int8_gated_weight(w, ws[:4])
    with pytest.raises(TypeError, match="w_q must be int8"):
        pk.ops.pack_int8_gated_weight(w.float(), ws)
    with pytest.raises(TypeError, match="Int8GatedWeight"):
        pk.ops.int8_linear_gated(x, w)
    with pytest.raises(ValueError, match="activation"):
        pk.ops.int8_linear_gated(x, gw, activation="tanh")
    with pytest.raises(ValueError, match="K = 8"):
        pk.ops.int8_linear_gated(torch.randn(3, 9), gw)
    bad = gw._replace(packed=gw.packed.clone())
    bad.packed[-1] = 1  # a byte the compensation does not account for
    with pytest.raises(ValueError, match=r"w\.comp does not match"):
        pk.ops.int8_linear_gated(x, bad)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        assert tuple(pk.ops.int8_linear_gated(torch.randn(4, 8), gw).shape) == (4, 5)
    torch.library.opcheck(
        torch.ops.pykernels.int8_linear_gated,
        (x, gw.packed, gw.comp, gw.w_scale, gw.bias, 5, 8, "silu"),
    )
