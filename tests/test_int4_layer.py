"""pk.nn.Int4Linear, the int4 recipe step and its save/load kind."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels.backends.reference import int4 as ref
from pykernels.compress import recipes
from pykernels.ops.int4 import resolve_mode

MODES = ["dynamic", "weight_only", "auto"]


def linear(k, n, gen, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


def rel_err(y, expected):
    return float((y.double() - expected.double()).norm() / expected.double().norm())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("g", [32, 128])
def test_from_linear(mode, symmetric, g, gen):
    lin = linear(256, 70, gen, bias=not symmetric)
    q = pk.nn.Int4Linear.from_linear(lin, g, symmetric, mode)
    x = torch.randn(3, 5, 256, generator=gen)
    with torch.no_grad():
        y, expected = q(x), lin(x)
    assert y.shape == expected.shape and y.dtype == torch.float32
    assert rel_err(y, expected) < 0.18  # 4-bit weights (and 8-bit activations): about 0.1
    p, s, z = ref.quantize_weight(lin.weight.detach().numpy(), g, symmetric)
    assert torch.equal(q.packed, torch.from_numpy(p)) and torch.equal(q.scales, torch.from_numpy(s))
    assert torch.equal(q.zeros, torch.from_numpy(z))
    b = None if lin.bias is None else lin.bias.detach()
    # auto: 15 rows run W4A8 (more than AUTO_WEIGHT_ONLY_ROWS)
    f = ref.linear_weight_only if resolve_mode(mode, 15) == "weight_only" else ref.linear_dynamic
    torch.testing.assert_close(
        y,
        f(x.reshape(15, 256), q.packed, q.scales, q.zeros, g, b).view(3, 5, 70),
        rtol=1e-5,
        atol=1e-5,
    )
    w_hat = torch.from_numpy(ref.dequantize_weight(p, s, z, g))
    assert torch.equal(q.dequantized_weight(), w_hat)
    assert q.symmetric is symmetric and q.group_size == g and q.mode == mode


def test_from_quantized_copies_and_checks(gen):
    p = torch.randint(0, 256, (12, 32), dtype=torch.uint8, generator=gen)
    s = torch.rand(12, 2, generator=gen)
    z = torch.randint(0, 16, (12, 2), dtype=torch.uint8, generator=gen)
    q = pk.nn.Int4Linear.from_quantized(p, s, z, 32, bias=torch.ones(12), mode="weight_only")
    assert torch.equal(q.packed, p) and q.packed.data_ptr() != p.data_ptr()
    assert (q.in_features, q.out_features, q.mode, q.symmetric) == (64, 12, "weight_only", False)
    x = torch.randn(2, 64, generator=gen)
    torch.testing.assert_close(q(x), ref.linear_weight_only(x, p, s, z, 32, torch.ones(12)))
    sym = pk.nn.Int4Linear.from_quantized(p, s, torch.full_like(z, 8), 32)
    assert sym.symmetric and sym.bias is None
    with pytest.raises(ValueError, match="zeros"):
        pk.nn.Int4Linear.from_quantized(p, s, z + 16, 32)
    with pytest.raises(ValueError, match="group_size"):
        pk.nn.Int4Linear.from_quantized(p, s, z, 64)
    with pytest.raises(ValueError, match="bias"):
        pk.nn.Int4Linear.from_quantized(p, s, z, 32, bias=torch.ones(3))
    with pytest.raises(ValueError, match="mode"):
        pk.nn.Int4Linear.from_quantized(p, s, z, 32, mode="fast")


def test_bad_construction():
    with pytest.raises(ValueError, match="group_size"):
        pk.nn.Int4Linear.from_linear(nn.Linear(100, 4), 32)
    with pytest.raises(ValueError, match="group_size"):
        pk.nn.Int4Linear(65, 4, group_size=64)
    with pytest.raises(TypeError, match="linear"):
        pk.nn.Int4Linear.from_linear(nn.Conv1d(3, 3, 1))
    lin = nn.Linear(64, 4)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pk.nn.Int4Linear.from_linear(lin, 64)
    with pytest.raises(ValueError, match="mode"):
        pk.nn.Int4Linear(64, 4, group_size=64, mode="static")
    with pytest.raises(TypeError, match="symmetric"):
        pk.nn.Int4Linear(64, 4, group_size=32, symmetric=1)


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_round_trip_and_bytes(mode, gen):
    lin = linear(128, 40, gen)
    q = pk.nn.Int4Linear.from_linear(lin, 64, mode=mode)
    sd = q.state_dict()
    assert set(sd) == {"packed", "scales", "zeros", "bias"}
    assert sd["packed"].shape == (40, 64) and sd["scales"].shape == (40, 2)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = pk.nn.Int4Linear(128, 40, group_size=64, mode=mode)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(4, 128, generator=gen)
    assert torch.equal(fresh(x), q(x))
    # Half a byte a weight plus a float32 scale and a byte per group, the bias.
    assert q.nbytes() == 40 * 64 + 40 * 2 * 5 + 40 * 4
    assert q.nbytes() < 0.16 * 40 * 128 * 4
    assert f"mode={mode}" in repr(q) and "int4 g64 asym" in repr(q)
    bad = dict(sd, zeros=torch.full_like(sd["zeros"], 20))
    with pytest.raises(RuntimeError, match="zeros"):
        fresh.load_state_dict(bad)


def test_to_dtype_keeps_float32_scales_and_half_inputs(gen):
    q = pk.nn.Int4Linear.from_linear(linear(64, 8, gen), 32)
    q = q.to(torch.bfloat16)
    assert q.scales.dtype == torch.float32 and q.bias.dtype == torch.float32
    assert q.packed.dtype == torch.uint8 and q.zeros.dtype == torch.uint8
    x = torch.randn(3, 64, generator=gen).bfloat16()
    assert q(x).dtype == torch.bfloat16


def test_weight_only_layer_trains_an_adapter(gen):
    q = pk.nn.Int4Linear.from_linear(linear(64, 8, gen), 32, mode="weight_only")
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    q(x).sum().backward()
    w = q.dequantized_weight()
    torch.testing.assert_close(x.grad, torch.ones(4, 8) @ w)


# --- the recipe step, save/load ---------------------------------------------------------


@pytest.mark.parametrize(
    "text, fields, again",
    [
        ("int4", (128, False, "auto", False), "int4:g128"),
        ("int4:g128", (128, False, "auto", False), "int4:g128"),
        ("int4:g128:dynamic", (128, False, "dynamic", False), "int4:g128:dynamic"),
        ("int4:g64:sym", (64, True, "auto", False), "int4:g64:sym"),
        ("int4:g128:weight_only", (128, False, "weight_only", False), "int4:g128:weight_only"),
        ("int4:g32:asym:gptq", (32, False, "auto", True), "int4:g32:gptq"),
        ("int4:group_size=64:mode=weight_only", (64, False, "weight_only", False), None),
    ],
)
def test_recipe_parse(text, fields, again):
    (step,) = recipes.parse(text)
    assert isinstance(step, recipes.Int4)
    assert (step.group_size, step.symmetric, step.mode, step.gptq) == fields
    if again:
        assert str(step) == again
    assert recipes.parse(str(step)) == [step]
    assert recipes.from_specs([step.spec()]) == [step]


@pytest.mark.parametrize("text", ["int4:g48", "int4:g16", "int4:fast", "int4:mode=static"])
def test_recipe_rejects(text):
    with pytest.raises(ValueError):
        recipes.parse(text)


def model(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(
        nn.Linear(128, 96), nn.GELU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10)
    ).eval()


@pytest.mark.parametrize("recipe", ["int4", "int4:g32:sym", "int4:g64:weight_only"])
def test_compress_save_load(recipe, gen, tmp_path):
    m = model(gen)
    x = torch.randn(4, 128, generator=gen)
    small, report = pk.compress(m, recipe, x)
    g = recipes.parse(recipe)[0].group_size
    kinds = {type(mod).__name__ for mod in small.modules()}
    assert "Int4Linear" in kinds
    # in_features 96 is no multiple of 64 or 128: that layer stays float.
    assert isinstance(small[2], pk.nn.Int4Linear) == (96 % g == 0)
    assert report.total["output_cosine"] > 0.98
    path = tmp_path / "m.safetensors"
    pk.save(small, path)
    again = pk.load(path, model(gen))
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    assert repr(again) == repr(small)


def test_gptq_refuses_until_registered_then_uses_the_hook(gen, monkeypatch):
    m = model(gen)
    x = torch.randn(2, 128, generator=gen)
    # pykernels.compress.calibrate registers the real GPTQ, which needs calibration=
    with pytest.raises(ValueError, match="needs calibration data"):
        pk.compress(m, "int4:g32:gptq", x)
    monkeypatch.delitem(recipes._INT4_QUANTIZERS, "gptq", raising=False)
    with pytest.raises(NotImplementedError, match="GPTQ"):
        pk.compress(m, "int4:g32:gptq", x)
    seen = []

    def fake_gptq(step, ctx, targets):
        # A stand-in calibrated method: symmetric codes where the step asked for
        # asymmetric ones, for the first layer only.
        seen.extend(fqn for fqn, _ in targets)
        fqn, lin = targets[0]
        yield fqn, pk.ops.int4_quantize_weight(lin.weight.detach(), step.group_size, True)

    monkeypatch.setitem(recipes._INT4_QUANTIZERS, "gptq", fake_gptq)
    small, _ = pk.compress(m, "int4:g32:gptq", x)
    assert seen == ["0", "2", "4"]
    assert small[0].symmetric and bool((small[0].zeros == 8).all())
    assert not small[2].symmetric  # round-to-nearest, asymmetric
    with pytest.raises(ValueError, match="gptq"):
        recipes.register_int4_quantizer("awq", fake_gptq)
