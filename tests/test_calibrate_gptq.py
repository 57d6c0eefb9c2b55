"""GPTQ (pykernels.compress.calibrate.gptq) against round to nearest, on random
correlated inputs, and the int8:gptq / cluster:N:gptq recipe steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels.compress import recipes
from pykernels.compress.calibrate import ClusterGrid, Int4Grid, Int8Grid, collect, gptq
from pykernels.compress.calibrate.gptq import int4_group_params, int4_quantize_group
from pykernels.nn import ClusteredLinear, Int8Linear


def correlated(gen, rows, k, outliers=4, a=None):
    """Inputs whose channels are correlated (the random mixing ``a``, drawn when None)
    with a few large ones: what makes GPTQ's error compensation pay."""
    if a is None:
        a = torch.randn(k, k, generator=gen) / k**0.5
    x = torch.randn(rows, k, generator=gen) @ a + 0.1 * torch.randn(rows, k, generator=gen)
    x[:, :outliers] *= 10
    return x


def out_err(x, w, w_hat):
    return float((x @ (w_hat - w).T).norm() / (x @ w.T).norm())


def rtn_int8(w):
    s = pk.ops.quantize_per_row(w)[1]
    return torch.round(w / s[:, None]).clamp(-127, 127) * s[:, None], s


def rtn_int4(w, g, sym):
    n, k = w.shape
    s, z = int4_group_params(w.reshape(-1, g), sym)
    q = int4_quantize_group(w.reshape(-1, g), s, z, sym)
    return ((q - z[:, None]) * s[:, None]).reshape(n, k)


def hess(x):
    return 2 * x.double().T @ x.double() / x.shape[0]


@pytest.mark.parametrize("act_order", [False, True])
def test_int8_gptq_beats_rtn_and_is_its_codes(gen, act_order):
    x, w = correlated(gen, 1024, 192), torch.randn(96, 192, generator=gen)
    rtn, s = rtn_int8(w)
    r = gptq(w, hess(x), Int8Grid(s), act_order=act_order)
    assert r.codes.abs().max() <= 127
    assert torch.equal(r.w_hat, r.codes.float() * s[:, None])  # exactly the codes' values
    assert out_err(x, w, r.w_hat) < 0.8 * out_err(x, w, rtn)
    assert r.loss > 0


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_gptq_beats_rtn_and_dequantizes_by_the_contract(gen, sym, g, act_order):
    x, w = correlated(gen, 1024, 256), torch.randn(64, 256, generator=gen)
    grid = Int4Grid(64, 256, g, sym)
    r = gptq(w, hess(x), grid, act_order=act_order)
    assert 0 <= int(r.codes.min()) and int(r.codes.max()) <= 15
    zeros, scales = grid.zeros.repeat_interleave(g, 1), grid.scales.repeat_interleave(g, 1)
    assert torch.equal(r.w_hat, (r.codes.float() - zeros) * scales)
    if sym:
        assert torch.equal(grid.zeros, torch.full_like(grid.zeros, 8.0))
    assert ((grid.zeros >= 0) & (grid.zeros <= 15)).all() and (grid.scales > 0).all()
    assert out_err(x, w, r.w_hat) < 0.8 * out_err(x, w, rtn_int4(w, g, sym))


@pytest.mark.parametrize("per_row", [True, False])
def test_cluster_gptq_keeps_the_codebook_and_beats_nearest(gen, per_row):
    x, w = correlated(gen, 1024, 128), torch.randn(48, 128, generator=gen)
    lin = nn.Linear(128, 48)
    with torch.no_grad():
        lin.weight.copy_(w)
    base = ClusteredLinear.from_linear(lin, 8, "row" if per_row else "layer")
    cb = base.codebook.detach()
    r = gptq(w, hess(x), ClusterGrid(cb))
    assert torch.equal(r.w_hat, cb.expand(48, -1).gather(1, r.codes))
    assert out_err(x, w, r.w_hat) < out_err(x, w, base.dequantized_weight())


def test_identity_hessian_is_round_to_nearest(gen):
    w = torch.randn(32, 64, generator=gen)
    rtn, s = rtn_int8(w)
    r = gptq(w, torch.eye(64, dtype=torch.float64), Int8Grid(s))
    assert torch.equal(r.w_hat, rtn)


def test_damping_rank_deficient_and_dead_channels(gen):
    # 16 rows for 64 channels: X^T X is singular and only damping makes it invertible.
    x = correlated(gen, 16, 64)
    x[:, 5] = 0  # a channel the calibration never excites
    w = torch.randn(32, 64, generator=gen)
    rtn, s = rtn_int8(w)
    for damp in (0.01, 0.1, 0.5):
        r = gptq(w, hess(x), Int8Grid(s), damp=damp)
        assert torch.isfinite(r.w_hat).all()
        assert out_err(x, w, r.w_hat) < out_err(x, w, rtn)
        # the dead channel pulls on nothing: it is rounded as it is
        assert torch.equal(r.w_hat[:, 5], rtn[:, 5])
    # heavier damping trusts the calibration less: nearer round to nearest
    lo = gptq(w, hess(x), Int8Grid(s), damp=0.01).w_hat
    hi = gptq(w, hess(x), Int8Grid(s), damp=0.9).w_hat
    assert (hi - rtn).norm() < (lo - rtn).norm()


def test_hessian_of_several_batches_equals_one_big_batch(gen):
    lin = nn.Linear(48, 8)
    xs = [correlated(gen, n, 48) for n in (7, 64, 33)]
    parts = collect(lin, xs, {"l": lin})["l"]
    whole = collect(lin, [torch.cat(xs)], {"l": lin})["l"]
    assert parts.rows == whole.rows == 104
    # Each batch's product is float32 (summed in float64): equal to float32's rounding.
    x = torch.cat(xs).double()
    exact = x.T @ x
    tol = 1e-5 * float(exact.abs().max())
    torch.testing.assert_close(parts.xtx, whole.xtx, rtol=0, atol=tol)
    torch.testing.assert_close(parts.xtx, exact, rtol=0, atol=tol)
    torch.testing.assert_close(parts.hessian(), 2 * exact / 104, rtol=0, atol=tol / 50)
    torch.testing.assert_close(parts.abs_mean(), x.abs().mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts.abs_max, x.abs().amax(0), rtol=0, atol=0)
    # 3-D inputs (batch, tokens, features) are rows too
    three = collect(lin, [torch.cat(xs).reshape(8, 13, 48)], {"l": lin})["l"]
    torch.testing.assert_close(three.xtx, whole.xtx, rtol=0, atol=tol)


def test_inverse_factor_is_the_upper_cholesky_of_the_damped_inverse(gen):
    from pykernels.compress.calibrate.gptq import _inverse_cholesky

    h = hess(correlated(gen, 256, 96))
    u = _inverse_cholesky(h, 0.01).double()
    damped = h + 0.01 * h.diag().mean() * torch.eye(96, dtype=torch.float64)
    assert torch.equal(u, torch.triu(u)) and bool((u.diag() > 0).all())
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(damped), rtol=1e-3, atol=1e-4)


def test_gptq_refuses_bad_arguments(gen):
    w = torch.randn(8, 16, generator=gen)
    s = rtn_int8(w)[1]
    h = torch.eye(16, dtype=torch.float64)
    with pytest.raises(ValueError, match="hessian"):
        gptq(w, torch.eye(8), Int8Grid(s))
    with pytest.raises(ValueError, match="damp"):
        gptq(w, h, Int8Grid(s), damp=0)
    with pytest.raises(ValueError, match="block_size"):
        gptq(w, h, Int8Grid(s), block_size=0)
    with pytest.raises(TypeError, match="act_order"):
        gptq(w, h, Int8Grid(s), act_order=1)
    with pytest.raises(ValueError, match="finite"):
        gptq(w, h * float("nan"), Int8Grid(s))
    with pytest.raises(TypeError, match="weight"):
        gptq(w[0], h, Int8Grid(s))


# --- recipes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["int8:gptq", "int8:weight_only:gptq", "int8:gptq:act_order", "cluster:16:gptq",
     "cluster:16:layer:gptq:damp=0.05"],
)  # fmt: skip
def test_gptq_recipe_spellings_round_trip(text):
    step = recipes.parse(text)[0]
    assert step.gptq and str(step) == text
    assert recipes.parse(str(step))[0] == step
    assert recipes.from_specs([step.spec()])[0] == step


def test_plain_specs_are_unchanged_and_gptq_options_need_gptq():
    assert recipes.parse("int8")[0].spec() == {
        "step": "int8", "mode": "dynamic", "embeddings": True, "act_bits": 8, "fuse": True,
    }  # fmt: skip
    assert "gptq" not in recipes.parse("cluster:16")[0].spec()
    for bad in ("int8:act_order", "cluster:16:damp=0.1", "int8:gptq:damp=2"):
        with pytest.raises(ValueError):
            recipes.parse(bad)


def mlp(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()


def test_int8_gptq_step_stores_the_gptq_codes_and_beats_rtn(gen, tmp_path):
    pytest.importorskip("safetensors")
    m = mlp(gen)
    a = torch.randn(64, 64, generator=gen) / 8
    cal = [correlated(gen, 256, 64, a=a) for _ in range(3)]
    x = correlated(gen, 128, 64, a=a)  # held out: fresh rows of the same distribution
    # weight_only: the error is the weights' alone (per-token activation rounding of the
    # outlier channels would swamp the difference in dynamic mode)
    out, rep = pk.compress(m, "int8:weight_only:gptq", x, calibration=cal, progress=False)
    assert all(isinstance(out[i], Int8Linear) for i in (0, 2))
    # layer 0 sees exactly the calibration inputs: its codes are GPTQ's
    st = collect(m, cal, {"0": m[0]})["0"]
    s = pk.ops.quantize_per_row(m[0].weight.detach())[1]
    want = gptq(m[0].weight.detach(), st.hessian(), Int8Grid(s)).codes
    assert torch.equal(out[0].weight_int8().long(), want)
    assert torch.equal(out[0].weight_scale, s)
    rows = {r.name: r for r in rep.layers}
    assert rows["0"].rtn_error is not None and rows["0"].rel_error < rows["0"].rtn_error
    assert "vs RTN" in str(rep)
    path = tmp_path / "m.safetensors"
    pk.save(out, path)
    back = pk.load(path, mlp(gen))
    torch.testing.assert_close(back(x), out(x), rtol=0, atol=0)


def test_cluster_gptq_step(gen):
    m = mlp(gen)
    a = torch.randn(64, 64, generator=gen) / 8
    cal = [correlated(gen, 512, 64, a=a)]
    x = correlated(gen, 128, 64, a=a)
    plain, _ = pk.compress(m, "cluster:8", x, progress=False)
    out, rep = pk.compress(m, "cluster:8:gptq", x, calibration=cal, progress=False)
    assert isinstance(out[0], ClusteredLinear)
    torch.testing.assert_close(out[0].codebook, plain[0].codebook)  # k-means' codebook stays
    assert not torch.equal(out[0].codes, plain[0].codes)
    r0 = next(r for r in rep.layers if r.name == "0")
    assert r0.rel_error < r0.rtn_error


def test_int8_from_quantized_computes_with_the_given_codes_and_refuses_bad_ones(gen):
    q = torch.randint(-127, 128, (24, 40), generator=gen, dtype=torch.int8)
    s = torch.rand(24, generator=gen) + 0.01
    b = torch.randn(24, generator=gen)
    x = torch.randn(5, 40, generator=gen)
    for mode in ("dynamic", "weight_only"):
        layer = Int8Linear.from_quantized(q, s, b, mode=mode)
        assert torch.equal(layer.weight_int8(), q) and torch.equal(layer.weight_scale, s)
        ref = x @ (q.float() * s[:, None]).T + b
        assert float((layer(x) - ref).norm() / ref.norm()) < 2e-2  # W8A8 rounds x
    with pytest.raises(TypeError, match="w_q"):
        Int8Linear.from_quantized(q.float(), s)
    with pytest.raises(ValueError, match="w_scale"):
        Int8Linear.from_quantized(q, s[:3])
    with pytest.raises(ValueError, match="w_scale"):
        Int8Linear.from_quantized(q, s * float("inf"))
    with pytest.raises(ValueError, match="-128"):
        Int8Linear.from_quantized(torch.full((2, 4), -128, dtype=torch.int8), torch.ones(2))
    with pytest.raises(ValueError, match="bias"):
        Int8Linear.from_quantized(q, s, torch.ones(3))
