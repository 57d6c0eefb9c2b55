"""Sequential GPTQ (each Linear's Hessian from the inputs the already-quantized
Linears before it produce) and the int4 groups' clip search, on fresh random data."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pykernels.compress.calibrate import (
    InputStats,
    Int4Grid,
    call_groups,
    collect,
    gptq,
    run_gptq,
)
from pykernels.compress.calibrate.gptq import (
    CLIP_GRID,
    int4_group_params,
    int4_quantize_group,
    int4_search_params,
)
from pykernels.compress.context import Context, Selector


class Block(nn.Module):
    """An attention-shaped block: q, k and v read the same input, then o, then f."""

    def __init__(self, k: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(k, k), nn.Linear(k, k), nn.Linear(k, k)
        self.o, self.f = nn.Linear(k, k), nn.Linear(k, k)
        self.unused = nn.Linear(k, k)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).T / 8, -1) @ self.v(x)
        return self.f(torch.relu(self.o(a) + x))


def mlp(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()


def context(model, cal):
    ctx = Context(model, cal[0], Selector(model, None, None), False)
    ctx.calibration = cal
    return ctx


STEP = types.SimpleNamespace(act_order=False, damp=0.01)


def test_call_groups_follow_the_forward_and_share_inputs(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    b = Block()
    lins = [b.f, b.unused, b.o, b.v, b.k, b.q]  # any order in, the forward's order out
    got = call_groups(b, torch.randn(8, 32, generator=gen), lins)
    assert got == [[b.q, b.k, b.v], [b.o], [b.f], [b.unused]]
    # a Linear called twice per forward has no single point where it is done
    shared = nn.Linear(16, 16)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    assert call_groups(twice, torch.randn(4, 16, generator=gen), [shared]) is None


def test_collect_stop_before_keeps_what_came_before(gen):
    m = mlp(gen)
    cal = [torch.randn(40, 64, generator=gen) for _ in range(3)]
    full = collect(m, cal, {"0": m[0], "2": m[2]}, ("hessian",))
    calls = []
    h = m[2].register_forward_hook(lambda *a: calls.append(1))
    part = collect(m, cal, {"0": m[0], "2": m[2]}, ("hessian",), stop_before=m[2])
    h.remove()
    assert not calls  # the forward ended before m[2] ran
    for k in ("0", "2"):  # and what came before it (m[2]'s own input too) was recorded
        assert part[k].rows == full[k].rows == 120
        torch.testing.assert_close(part[k].xtx, full[k].xtx, rtol=0, atol=0)


@pytest.mark.parametrize("clip", [None, "mse"])
def test_sequential_hessian_comes_from_the_quantized_predecessor(gen, clip):
    m = mlp(gen)
    a = torch.randn(64, 64, generator=gen) / 8
    cal = [torch.randn(64, 64, generator=gen) @ a for _ in range(3)]
    x_ref = torch.cat(cal)
    y_ref = m(x_ref).detach()

    def grid(lin):
        return Int4Grid(lin.out_features, lin.in_features, 32, False, clip)

    seq = run_gptq(context(m, cal), STEP, [m[0], m[2]], grid, "t", sequential=True)
    par = run_gptq(context(m, cal), STEP, [m[0], m[2]], grid, "t", sequential=False)
    # the first Linear sees the calibration inputs either way
    assert torch.equal(seq[id(m[0])][0].codes, par[id(m[0])][0].codes)
    # the second: its Hessian from relu(layer 0 with GPTQ's weights), batch by batch
    w0 = seq[id(m[0])][0].w_hat
    st = InputStats(96, wanted=("hessian",))
    fl = InputStats(96, wanted=("hessian",))
    for x in cal:
        st.add(torch.relu(F.linear(x, w0, m[0].bias.detach())))
        fl.add(torch.relu(m[0](x)).detach())
    assert not torch.allclose(st.hessian(), fl.hessian())
    want = gptq(m[2].weight.detach(), st.hessian(), grid(m[2]))
    assert torch.equal(seq[id(m[2])][0].codes, want.codes)
    assert not torch.equal(par[id(m[2])][0].codes, want.codes)
    # the model is left as it was: no Linear keeps the quantized forward
    assert all("forward" not in lin.__dict__ for lin in (m[0], m[2]))
    torch.testing.assert_close(m(x_ref), y_ref, rtol=0, atol=0)


def test_sequential_restores_the_model_when_gptq_fails(gen):
    m = mlp(gen)
    cal = [torch.randn(32, 64, generator=gen)]
    y = m(cal[0]).detach()

    def grid(lin):
        if lin is m[2]:
            raise RuntimeError("boom")
        return Int4Grid(lin.out_features, lin.in_features, 32, False)

    with pytest.raises(RuntimeError, match="boom"):
        run_gptq(context(m, cal), STEP, [m[0], m[2]], grid, "t", sequential=True)
    assert "forward" not in m[0].__dict__
    torch.testing.assert_close(m(cal[0]), y, rtol=0, atol=0)


def group_err(w, s, z, sym, weight=None):
    q = int4_quantize_group(w, s, z, sym)
    d = ((q - (8.0 if sym else z[:, None])) * s[:, None] - w) ** 2
    return (d if weight is None else d * weight).sum(1)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_clip_search_never_adds_error_and_helps_heavy_tails(gen, sym, weighted):
    w = torch.randn(512, 128, generator=gen)
    # heavy tails: a few large weights per row stretch the plain range
    w = w * (1 + 6 * (torch.rand(512, 128, generator=gen) < 0.02))
    weight = torch.rand(128, generator=gen, dtype=torch.float64) + 0.1 if weighted else None
    s0, z0 = int4_group_params(w, sym)
    s1, z1 = int4_search_params(w, sym, weight)
    wt = None if weight is None else weight.float()
    e0, e1 = group_err(w, s0, z0, sym, wt), group_err(w, s1, z1, sym, wt)
    assert bool((e1 <= e0).all())
    assert float(e1.sum()) < 0.95 * float(e0.sum())
    # each row's choice is the best of the grid's shrink factors
    for p in CLIP_GRID:
        sp, zp = int4_group_params(w * p, sym)
        assert bool((e1 <= group_err(w, sp, zp, sym, wt) + 1e-6).all())
    # codes stay in range and dequantize by the contract
    q = int4_quantize_group(w, s1, z1, sym)
    assert 0 <= int(q.min()) and int(q.max()) <= 15


def test_clip_search_inside_gptq_and_bad_clip(gen):
    x = torch.randn(512, 128, generator=gen)
    w = torch.randn(64, 128, generator=gen) * (1 + 6 * (torch.rand(64, 128, generator=gen) < 0.02))
    h = 2 * x.double().T @ x.double() / 512
    plain = gptq(w, h, Int4Grid(64, 128, 32, False))
    for clip in ("mse", "hessian"):
        grid = Int4Grid(64, 128, 32, False, clip)
        r = gptq(w, h, grid)
        # what GPTQ returns is exactly what its grid's scales and zeros decode to
        s = grid.scales.repeat_interleave(32, 1)
        z = grid.zeros.repeat_interleave(32, 1)
        torch.testing.assert_close(r.w_hat, (r.codes.float() - z) * s, rtol=0, atol=0)
        err = float((x @ (r.w_hat - w).T).norm())
        assert err < float((x @ (plain.w_hat - w).T).norm())
    with pytest.raises(ValueError, match="clip"):
        Int4Grid(4, 32, 32, False, "max")


def test_int4_gptq_step_runs_the_chosen_settings(gen):
    import pykernels as pk
    from pykernels.compress.calibrate import INT4_GPTQ

    m = mlp(gen)
    a = torch.randn(64, 64, generator=gen) / 8
    cal = [torch.randn(128, 64, generator=gen) @ a for _ in range(2)]
    out, _ = pk.compress(m, "int4:g32:weight_only:gptq", cal[0], calibration=cal, progress=False)
    o = INT4_GPTQ
    want = run_gptq(
        context(m, cal),
        STEP,
        [m[0], m[2]],
        lambda lin: Int4Grid(lin.out_features, lin.in_features, 32, False, o["clip"]),
        "t",
        act_order=o["act_order"],
        damp=o["damp"],
        sequential=o["sequential"],
    )
    for i in (0, 2):
        r, grid = want[id(m[i])]
        torch.testing.assert_close(out[i].scales.float(), grid.scales, rtol=0, atol=0)
        torch.testing.assert_close(out[i].dequantized_weight(), r.w_hat, rtol=0, atol=0)
