"""AWQ and SmoothQuant (pykernels.compress.calibrate.scaling): folding leaves the
float model's function unchanged, the scales cut the quantization error, and
the steps refuse what they cannot do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels.compress import recipes
from pykernels.compress.calibrate import collect
from pykernels.compress.calibrate.scaling import InputScaled, smoothquant_scales, w8a8_error
from pykernels.compress.calibrate.steps import AWQ, SmoothQuant
from pykernels.compress.context import Context, Selector
from pykernels.nn import Int8Linear


def outlier_inputs(gen, rows, k, channels=(0, 1, 2, 3)):
    """Activations with a few channels 20-50x larger than the rest, as transformers have."""
    x = torch.randn(rows, k, generator=gen)
    for i, c in enumerate(channels):
        x[:, c] *= 20 + 10 * i
    return x


def net(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    # LayerNorm -> Linear and Linear -> Linear fold; the Linear after ReLU cannot
    return nn.Sequential(
        nn.LayerNorm(64), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48), nn.Linear(48, 32)
    ).eval()


def perturb_norm(m):
    with torch.no_grad():  # a trained LayerNorm: not the identity
        m[0].weight.uniform_(0.5, 1.5)
        m[0].bias.normal_(0, 0.2)
        m[0].weight[:4] *= 20  # outlier channels after the norm
    return m


def scaled(model, step, cal, nxt="int8"):
    work = copy.deepcopy(model)
    ctx = Context(work, cal[0], Selector(work, None, None), False)
    ctx.calibration, ctx.remaining = cal, recipes.parse(nxt)
    step.apply(ctx)
    return ctx


@pytest.mark.parametrize("step", [AWQ(), SmoothQuant(), SmoothQuant(0.5)], ids=str)
def test_scaling_leaves_the_float_model_unchanged(gen, step):
    m = perturb_norm(net(gen))
    cal = [torch.randn(128, 64, generator=gen) for _ in range(2)]
    ctx = scaled(m, step, cal)
    x = torch.randn(64, 64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ctx.model(x), m(x), rtol=1e-4, atol=1e-5)
    # folded where an op can take it, explicit behind the ReLU
    assert isinstance(ctx.model[3], InputScaled) and isinstance(ctx.model[1], nn.Linear)
    assert not torch.equal(ctx.model[0].weight, m[0].weight)  # 1/s is in the LayerNorm
    # [4]'s input scale s went into [3]'s rows (1/s) and [4]'s columns (s) ([3]'s own
    # explicit scale changes its columns too); AWQ's search may keep s = 1 where the
    # inputs have no outliers, SmoothQuant always scales
    rows = not torch.equal(ctx.model[3].inner.weight, m[3].weight)
    cols = not torch.equal(ctx.model[4].weight, m[4].weight)
    assert rows or not cols
    assert rows or isinstance(step, AWQ)


def test_scaling_folds_into_attention_values_of_a_bert_layer(gen):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m = transformers.BertModel(cfg).eval()
    ids = [torch.randint(0, 50, (4, 12), generator=gen) for _ in range(2)]
    cal = [{"input_ids": i} for i in ids]
    for step in (AWQ(), SmoothQuant()):
        ctx = scaled(m, step, cal)
        att = ctx.model.encoder.layer[0].attention
        # out_proj takes its 1/s from the value projection: still a plain Linear
        assert type(att.output.dense) is nn.Linear
        assert not torch.equal(
            att.self.value.inner.weight, m.encoder.layer[0].attention.self.value.weight
        )
        with torch.no_grad():
            got = ctx.model(**cal[0]).last_hidden_state
            want = m(**cal[0]).last_hidden_state
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_smoothquant_halves_per_tensor_w8a8_error_on_outlier_channels(gen):
    x = outlier_inputs(gen, 2048, 128)
    w = torch.randn(64, 128, generator=gen) / 11
    lin = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    st = collect(lin, [x[:1024]], {"l": lin}, ("absmax", "sample"))["l"]
    held, one = x[1024:], torch.ones(128)
    for alpha in (None, 0.5):
        s, a = smoothquant_scales([lin], st, alpha)
        assert 0 < a < 1
        assert w8a8_error(held, w, s, per_tensor=True) < 0.5 * w8a8_error(held, w, one, True)
        assert w8a8_error(held, w, s) < w8a8_error(held, w, one)


@pytest.mark.parametrize("recipe", ["awq+int8", "smoothquant+int8", "smoothquant:0.6+int8:gptq"])
def test_scaled_int8_recipes_beat_rtn_and_round_trip(gen, tmp_path, recipe):
    pytest.importorskip("safetensors")
    m = perturb_norm(net(gen))
    cal = [torch.randn(256, 64, generator=gen) for _ in range(2)]
    x = torch.randn(128, 64, generator=gen)
    out, rep = pk.compress(m, recipe, x, calibration=cal, progress=False)
    assert isinstance(out[1], Int8Linear) and isinstance(out[3].inner, Int8Linear)
    rows = {r.name: r for r in rep.layers}
    assert set(rows) == {"1", "3", "4"} and all(r.rtn_error is not None for r in rows.values())
    # the LayerNorm's outlier channels hurt per-token int8; the scales take them out
    assert rows["1"].rel_error < rows["1"].rtn_error
    plain, prep = pk.compress(m, "int8", x, progress=False)
    assert rep.total["output_rel_error"] < prep.total["output_rel_error"]
    path = tmp_path / "m.safetensors"
    pk.save(out, path)
    back = pk.load(path, net(gen))
    with torch.no_grad():
        torch.testing.assert_close(back(x), out(x), rtol=0, atol=0)


def test_scaling_steps_refuse_what_they_cannot_do(gen):
    m = net(gen)
    x = torch.randn(8, 64, generator=gen)
    cal = [x]
    with pytest.raises(ValueError, match="int4 or int8 step after it"):
        pk.compress(m, "awq", x, calibration=cal, progress=False)
    with pytest.raises(ValueError, match="int4 or int8 step after it"):
        pk.compress(m, "awq+sparse:0.5", x, calibration=cal, progress=False)
    for bad in ("smoothquant:1.5", "smoothquant:-0.1", "smoothquant:abc", "awq:0.5"):
        with pytest.raises(ValueError):
            recipes.parse(bad)
    assert str(recipes.parse("smoothquant:0.5")[0]) == "smoothquant:0.5"
    assert str(recipes.parse("smoothquant")[0]) == "smoothquant"
    with pytest.raises(ValueError, match="InputScaled"):
        InputScaled(nn.Linear(4, 2), torch.ones(3))
