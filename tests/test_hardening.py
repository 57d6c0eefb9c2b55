"""Regressions of issue 15 (a hostile-user sweep): each bullet's input, on every
backend where it matters, against a plain torch result or its documented error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pykernels as pk


def linear(k, n, gen, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen))
        if bias:
            lin.bias.copy_(torch.randn(n, generator=gen))
    return lin


# --- int8: expanded (zero-stride) activations ------------------------------------


@pytest.mark.parametrize("op", ["int8_linear", "int8_weight_linear", "packed"])
@pytest.mark.parametrize(
    "make",
    [
        lambda x: x[:1].expand(7, -1),  # one token broadcast: row stride 0
        lambda x: x[:, :1].expand(-1, 48),  # column stride 0
        lambda x: x[None, :1].expand(3, 5, -1),  # 3-D, both leading strides 0
        lambda x: x.t().contiguous().t(),  # transposed (column-major) rows
    ],
)
def test_int8_linears_take_any_strides(backend, op, make, gen):
    x = make(torch.randn(7, 48, generator=gen))
    w = torch.randint(-127, 128, (9, 48), dtype=torch.int8, generator=gen)
    s = torch.rand(9, generator=gen) / 100
    b = torch.randn(9, generator=gen)
    fn = pk.ops.int8_weight_linear if op == "int8_weight_linear" else pk.ops.int8_linear
    wq = pk.ops.pack_int8_weight(w) if op == "packed" else w
    got = fn(x, wq, s, b)
    assert torch.equal(got, fn(x.contiguous(), wq, s, b))  # the same numbers, not close
    ref = getattr(
        pk._reference, "int8_weight_linear" if op == "int8_weight_linear" else "int8_linear"
    )
    want = ref(x.reshape(-1, 48), w, s, b).view(*x.shape[:-1], 9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# --- a Linear with no outputs (or no inputs), through every layer type -------------


def _layers(lin):
    out = {
        "int8-dynamic": pk.nn.Int8Linear.from_linear(lin, mode="dynamic"),
        "int8-weight_only": pk.nn.Int8Linear.from_linear(lin, mode="weight_only"),
        "sparse-unstructured": pk.nn.SparseLinear.from_linear(lin, 0.5),
        "sparse-block": pk.nn.SparseLinear.from_linear(lin, 0.5, pattern="block"),
        "lowrank-rank": pk.nn.LowRankLinear.from_linear(lin, rank=3),
        "lowrank-energy": pk.nn.LowRankLinear.from_linear(lin, energy=0.9),
        "lowrank-tol": pk.nn.LowRankLinear.from_linear(lin, tol=0.1),
    }
    if lin.in_features % 4 == 0:
        out["sparse-2:4"] = pk.nn.SparseLinear.from_linear(lin, pattern="2:4")
    return out


@pytest.mark.parametrize("kn", [(16, 0), (0, 5), (0, 0)])
def test_empty_linear_through_every_layer(backend, kn, gen):
    k, n = kn
    lin = linear(k, n, gen)
    x = torch.randn(3, 2, k, generator=gen)
    want = lin(x)  # zeros [3, 2, n], plus the bias when K = 0
    for name, layer in _layers(lin).items():
        got = layer(x)
        assert got.shape == (3, 2, n), name
        torch.testing.assert_close(got, want, msg=name)
        # state_dict round trip into a fresh layer of the same kind
        fresh = _layers(linear(k, n, gen))[name]
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(fresh(x), want, msg=name)
    for convert in (
        pk.quantize_int8,
        lambda m: pk.sparsify(m, 0.5),
        lambda m: pk.factorize(m, rank=2),
    ):
        model = nn.Sequential(lin, nn.ReLU())
        torch.testing.assert_close(convert(model)(x), model(x))
