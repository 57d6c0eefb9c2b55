"""The CompressionReport: every figure checked against a measurement made here."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels.nn import Int8Linear


def seeded(gen) -> None:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))


def mlp(d_in=24, hidden=40, d_out=6):
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, d_out),
    ).eval()


def inputs_of(model, x, names):
    """The input each named module receives in ``model(x)``."""
    seen, hooks = {}, []
    for name in names:
        mod = model.get_submodule(name)
        hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0])))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def test_int8_layer_errors_and_totals_are_measured(gen):
    seeded(gen)
    m = mlp()
    x = torch.randn(32, 24, generator=gen)
    out, r = pk.compress(m, "int8", x, progress=False)
    xs = inputs_of(m, x, ["0", "2", "4"])
    rows = {row.name: row for row in r.layers}
    assert list(rows) == ["0", "2", "4"]
    with torch.no_grad():
        for name in rows:
            lin = m.get_submodule(name)
            want = rel(Int8Linear.from_linear(lin)(xs[name]), lin(xs[name]))
            assert rows[name].rel_error == pytest.approx(want, rel=1e-6)
            assert 0 < rows[name].rel_error < 0.05
            assert rows[name].type_before == "Linear" and rows[name].type_after == "Int8Linear"
            q = out.get_submodule(name)
            assert rows[name].params_before == lin.weight.numel() + lin.bias.numel()
            assert rows[name].params_after == rows[name].params_before  # the same weights, int8
            assert rows[name].bytes_before == 4 * rows[name].params_before
            held = [*q.parameters(), *q.buffers()]
            assert rows[name].bytes_after == sum(t.numel() * t.element_size() for t in held)
            assert rows[name].steps == ["int8"]
        y, y_ref = out(x), m(x)
    t = r.total
    assert t["output_rel_error"] == pytest.approx(rel(y, y_ref), rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(y.double(), y_ref.double(), dim=-1).mean()
    assert t["output_cosine"] == pytest.approx(float(cos), rel=1e-9)
    assert t["params_before"] == t["params_after"] == sum(p.numel() for p in m.parameters())
    assert t["bytes_before"] == sum(p.numel() * 4 for p in m.parameters())
    held = [*out.parameters(), *out.buffers()]
    assert t["bytes_after"] == sum(b.numel() * b.element_size() for b in held)
    assert t["threads"] == torch.get_num_threads()


def test_pruned_layer_errors_count_removed_outputs_as_zeros(gen):
    seeded(gen)
    m = mlp(hidden=40)
    x = torch.randn(16, 24, generator=gen)
    out, r = pk.compress(m, "prune:0.5", x, progress=False)
    rows = {row.name: row for row in r.layers}
    with torch.no_grad():
        y0 = m[0](x)
    kept = [int((m[0].weight == w).all(1).nonzero()) for w in out[0].weight]
    gone = [i for i in range(40) if i not in kept]
    # the kept outputs are exact; the removed ones are the error
    want = float(y0[:, gone].double().norm() / y0.double().norm())
    assert rows["0"].rel_error == pytest.approx(want, rel=1e-6)
    assert rows["0"].params_after == 24 * 20 + 20 and rows["0"].params_before == 24 * 40 + 40
    assert rows["4"].params_after == 20 * 6 + 6
    assert r.total["params_after"] == sum(p.numel() for p in out.parameters())


def test_latency_is_timed_not_estimated(gen):
    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.01)
            return x

    seeded(gen)
    m = nn.Sequential(nn.Linear(8, 8), Slow()).eval()
    _, r = pk.compress(m, "int8", torch.randn(2, 8, generator=gen), progress=False)
    assert r.total["latency_ms_before"] >= 10 and r.total["latency_ms_after"] >= 10
    assert r.total["latency_reps"] >= 3


def test_to_dict_str_repr_and_plot(gen, tmp_path):
    seeded(gen)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16)).eval()
    x = torch.randn(4, 16, generator=gen)
    _, r = pk.compress(m, "prune:0.5+int8", x, progress=False)
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain data
    assert d["recipe"] == "prune:0.5+int8"
    assert [row["name"] for row in d["layers"]] == ["0", "2"]
    assert d["layers"][0]["steps"] == ["prune:0.5", "int8"]
    want = {"params_before", "params_after", "bytes_before", "bytes_after", "latency_ms_before"}
    want |= {"latency_ms_after", "output_rel_error", "output_cosine"}
    assert want <= set(d["total"])
    assert all(math.isfinite(v) for v in d["total"].values())
    assert d["skipped"] == [] or all({"fqn", "step", "reason"} <= set(s) for s in d["skipped"])
    text = str(r)
    for piece in ("prune:0.5+int8", "Linear -> Int8Linear", "latency", "cosine", "speedup"):
        assert piece in text
    assert "CompressionReport(" in repr(r)
    pytest.importorskip("matplotlib")
    path = tmp_path / "report.png"
    r.plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_what_was_left_alone_is_listed_with_why(gen):
    seeded(gen)
    # the last Linear's output is the model's output: its width is kept
    m = mlp()
    _, r = pk.compress(m, "prune:0.5", torch.randn(4, 24, generator=gen), progress=False)
    left = {s.fqn: s.reason for s in r.skipped}
    assert "4" in left and "output" in left["4"]
    assert "left alone" in str(r)
