"""pykernels.qat: the fused fake-quant op on every backend and ISA against the
reference, its straight-through backward, QATLinear, prepare/convert, and QAT
on scikit-learn's digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels import _reference

SHAPES = [(0, 5), (1, 1), (3, 65), (17, 300), (64, 1024), (5, 0)]


def ref_fake_quant(x: torch.Tensor):
    x2 = np.ascontiguousarray(x.float().reshape(math.prod(x.shape[:-1]), x.shape[-1]).numpy())
    y = np.empty(x2.shape, np.float32)
    m = np.empty(x2.shape, np.uint8)
    s = np.empty(x2.shape[0], np.float32)
    _reference.fake_quant_per_row(x2, y, m, s)
    return torch.from_numpy(y).view(x.shape), torch.from_numpy(m).view(x.shape), torch.from_numpy(s)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where the other is NaN."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        a.nan_to_num(0), b.nan_to_num(0)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fake_quant_matches_reference(backend, dtype, shape, gen):
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    y, s = pk.ops.fake_quantize_per_row(x, return_scale=True)
    ry, _, rs = ref_fake_quant(x)
    assert y.dtype == dtype and y.shape == x.shape and s.shape == x.shape[:-1]
    assert torch.equal(y, ry.to(dtype)) and torch.equal(s.reshape(-1), rs)


def test_fake_quant_every_isa(cpu_isa, gen):
    x = torch.randn(37, 531, generator=gen) * 5
    x[3] = 0.0
    x[5, 17] = float("nan")
    x[9, 100] = float("-inf")
    y, s = pk.ops.fake_quantize_per_row(x, return_scale=True)
    ry, _, rs = ref_fake_quant(x)
    assert same(y, ry) and same(s, rs)


def test_fake_quant_is_int8_dequantized(gen):
    """Exactly what quantize_per_row (and so Int8Linear) gives back: q * scale."""
    x = torch.randn(33, 257, generator=gen) * 2
    q, s = pk.ops.quantize_per_row(x)
    assert torch.equal(pk.ops.fake_quantize_per_row(x), q.float() * s[:, None])


def test_fake_quant_special_rows_and_views(gen):
    x = torch.randn(4, 6, 50, generator=gen)[:, ::2, 5:45]
    assert torch.equal(pk.ops.fake_quantize_per_row(x), ref_fake_quant(x.contiguous())[0])
    z = torch.randn(4, 30, generator=gen)
    z[0] = 0.0
    z[1, 2] = float("nan")
    z[2, 3] = float("inf")
    y = pk.ops.fake_quantize_per_row(z)
    assert torch.all(y[0] == 0) and torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    assert torch.isfinite(y[3]).all()


def test_backward_is_straight_through(backend, gen):
    x = (torch.randn(9, 70, generator=gen) * 4).requires_grad_()
    with torch.no_grad():
        x[2] = 0.0
        x[4, 5] = float("nan")
    g = torch.randn(9, 70, generator=gen)
    pk.ops.fake_quantize_per_row(x).backward(g)
    _, m, _ = ref_fake_quant(x.detach())
    expect = torch.where(m.bool(), g, torch.zeros_like(g))
    assert torch.equal(x.grad, expect)
    assert torch.equal(x.grad[[0, 1, 2, 3, 5]], g[[0, 1, 2, 3, 5]])  # finite rows pass all
    assert torch.all(x.grad[4] == 0)


def test_backward_half(gen):
    x = torch.randn(5, 40, generator=gen).to(torch.bfloat16).requires_grad_()
    pk.ops.fake_quantize_per_row(x).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.all(x.grad == 1)


def test_opcheck(gen):
    x = torch.randn(6, 40, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.pykernels.fake_quant_per_row.default, (x,))
    g = torch.randn(6, 40, generator=gen)
    m = (torch.rand(6, 40, generator=gen) > 0.2).to(torch.uint8)
    torch.library.opcheck(torch.ops.pykernels.fake_quant_backward.default, (g, m))


def test_fake_quant_bad_input():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        pk.ops.fake_quantize_per_row([1.0])
    with pytest.raises(TypeError, match="x must be float32"):
        pk.ops.fake_quantize_per_row(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        pk.ops.fake_quantize_per_row(torch.tensor(1.0))


# --- QATLinear, prepare, convert ------------------------------------------------------


def mlp(gen, k=48, h=96, n=10):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(k, h), nn.ReLU(), nn.Linear(h, n, bias=False))


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_convert_matches_fake_quant_forward(mode, gen):
    model = mlp(gen)
    x = torch.randn(3, 11, 48, generator=gen)
    qat = pk.qat.prepare(model, mode=mode)
    assert all(isinstance(m, pk.nn.QATLinear) for m in (qat[0], qat[2]))
    assert isinstance(model[0], nn.Linear)  # deep-copied
    int8 = pk.qat.convert(qat)
    assert isinstance(int8[0], pk.nn.Int8Linear) and int8[0].mode == mode
    with torch.no_grad():
        # one layer: the same int8 operands, only the float sum differs
        a, b = qat[0](x), int8[0](x)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(a.abs().max()))
        a, b = qat(x), int8(x)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
        # and the fake-quant model is not simply the float one
        assert not torch.allclose(a, model(x), rtol=1e-4, atol=1e-4 * float(a.abs().max()))


def test_qat_trains_the_shared_parameters(gen):
    model = mlp(gen)
    qat = pk.qat.prepare(model, inplace=True)
    assert qat[0].weight is not None and qat is model
    before = qat[0].weight.detach().clone()
    opt = torch.optim.SGD(qat.parameters(), lr=0.1)
    x, t = torch.randn(16, 48, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    nn.functional.cross_entropy(qat(x), t).backward()
    assert qat[0].weight.grad is not None and qat[0].weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, qat[0].weight.detach())


def test_prepare_filter_and_refusals(gen):
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10), nn.Linear(10, 3)
    )
    q = pk.qat.prepare(model, lambda m, fqn: fqn == "2")
    assert isinstance(q[0], nn.Conv2d) and isinstance(q[2], pk.nn.QATLinear)
    assert type(q[3]) is nn.Linear
    with pytest.raises(TypeError, match="nn.Linear layers only.*Conv2d"):
        pk.qat.prepare(model, lambda m, fqn: True)
    with pytest.raises(TypeError, match="holds no nn.Linear"):
        pk.qat.prepare(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        pk.qat.prepare("model")
    with pytest.raises(ValueError, match="mode must be one of"):
        pk.qat.prepare(model, mode="int4")
    with pytest.raises(ValueError, match="no QATLinear"):
        pk.qat.convert(model)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        pk.nn.QATLinear.from_linear(nn.Conv2d(1, 2, 3))
    # attention's out_proj is a Linear subclass read directly by F.multi_head_attention_forward
    att = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="NonDynamicallyQuantizableLinear"):
        pk.qat.prepare(att, lambda m, fqn: "out_proj" in fqn)


def test_save_load_and_recipe(tmp_path, gen):
    model = mlp(gen)
    x = torch.randn(5, 48, generator=gen)
    q, _ = pk.compress(model, "qat", x, progress=False)
    assert isinstance(q[0], pk.nn.QATLinear)
    pk.save(q, tmp_path / "q.safetensors")
    back = pk.load(tmp_path / "q.safetensors", mlp(gen))
    assert isinstance(back[0], pk.nn.QATLinear) and back[0].mode == "dynamic"
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    assert "fake-quant" in repr(back)


# --- real data: digits --------------------------------------------------------------


def test_qat_on_digits():
    """int8 after QAT >= fp32 - 0.3 points and >= post-training int8 (test split)."""
    pytest.importorskip("sklearn")
    from pykernels._digits import qat_digits

    r = qat_digits(seed=0)
    assert r["qat_int8"] >= r["fp32"] - 0.3
    assert r["qat_int8"] >= r["ptq_int8"]


def test_mask_is_row_finiteness(gen):
    """With absmax scales the clipping range holds every finite value: the kernel's
    elementwise mask is 1 exactly on finite rows (what the backward's shortcut relies on)."""
    x = torch.randn(40, 300, generator=gen) * torch.rand(40, 1, generator=gen) * 1e3
    x[3] = 0.0
    x[7, 9] = float("nan")
    x[8, 1] = float("inf")
    x[11] = torch.randn(300, generator=gen) * 1e-30  # subnormal scales
    y, m, s = torch.ops.pykernels.fake_quant_per_row(x)
    assert torch.equal(m.bool(), torch.isfinite(s)[:, None].expand_as(m))


def test_qatlinear_compiles_fullgraph(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    layer = pk.nn.QATLinear.from_linear(nn.Linear(32, 16))
    x = torch.randn(4, 32, generator=gen, requires_grad=True)
    y = torch.compile(layer, fullgraph=True)(x)
    y.sum().backward()
    gw, gx = layer.weight.grad.clone(), x.grad.clone()
    layer.weight.grad, x.grad = None, None
    y2 = layer(x)
    y2.sum().backward()
    assert torch.allclose(y, y2) and torch.equal(gw, layer.weight.grad) and torch.equal(gx, x.grad)


# --- issue 20: QAT under torch's fused transformer paths ----------------------------------


def _paths(model, *args):
    """Outputs with grad off (torch's fused encoder path is eligible in eval mode), in
    inference mode, and with grad on (the module-by-module path)."""
    out = []
    for ctx in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with ctx():
            out.append(model(*args).detach().clone())
    return out


def _fake_quant_reference(layer, x):
    """What a prepared encoder layer computes, written out: its own attention, the
    feed-forward Linears fake-quantized by hand (weights per row, activations per
    token), post-norm, relu, no dropout."""

    def fq_linear(lin, h):
        w = pk.ops.fake_quantize_per_row(lin.weight.detach())
        return torch.nn.functional.linear(pk.ops.fake_quantize_per_row(h), w, lin.bias)

    with torch.no_grad():
        a = layer.self_attn(x, x, x, need_weights=False)[0]
        h = layer.norm1(x + a)
        ff = fq_linear(layer.linear2, torch.relu(fq_linear(layer.linear1, h)))
        return layer.norm2(h + ff)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("wrap", ["layer", "encoder"])
def test_prepared_encoder_runs_the_fake_quantized_weights_on_every_path(batch_first, wrap, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    if wrap == "encoder":
        layer = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    model = layer.eval()
    x = torch.randn(2, 6, 32, generator=gen)
    prepared = pk.qat.prepare(model).eval()
    inner = prepared if wrap == "layer" else prepared.layers[0]
    assert isinstance(inner.linear1, pk.nn.QATLinear)
    want = _fake_quant_reference(inner, x)
    float_out = _paths(model, x)[0]
    for got in _paths(prepared, x):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # not torch's fused path on the float weights, which gives the float output
        assert float((got - float_out).abs().max()) > 1e-4
    converted = pk.qat.convert(prepared).eval()
    assert isinstance((converted if wrap == "layer" else converted.layers[0]).linear2,
                      pk.nn.Int8Linear)  # fmt: skip
    for got in _paths(converted, x):
        # the int8 kernels sum in another order: an activation at a rounding boundary
        # may land one int8 step away, so compare as a whole, not element by element
        assert _rel(got, want) < 1e-2


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_prepared_transformer_converts_and_every_path_runs(gen, tmp_path):
    pytest.importorskip("safetensors")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True).eval()
    src, tgt = torch.randn(2, 6, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    prepared = pk.qat.prepare(model).eval()
    fake = _paths(prepared, src, tgt)
    for got in fake[1:]:
        torch.testing.assert_close(got, fake[0], rtol=1e-5, atol=1e-5)
    pk.save(prepared, tmp_path / "p.safetensors")
    fresh = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True)
    loaded = pk.load(tmp_path / "p.safetensors", fresh).eval()
    for got, want in zip(_paths(loaded, src, tgt), fake, strict=True):
        assert torch.equal(got, want)
    converted = pk.qat.convert(loaded).eval()
    for got in _paths(converted, src, tgt):
        assert _rel(got, fake[0]) < 1e-2
