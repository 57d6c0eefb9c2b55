"""pk.schedules: the Zhu & Gupta schedule, GradualPruning's masks, and 90% gradual
pruning on scikit-learn's digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels.schedules import GradualPruning, Polynomial


def test_polynomial_values():
    s = Polynomial(0.1, 0.9, begin_step=100, end_step=1100, frequency=100)
    assert s(0) == 0.1 and s(100) == pytest.approx(0.1) and s(1100) == 0.9 and s(5000) == 0.9
    for t in range(100, 1100, 100):
        expect = 0.9 + (0.1 - 0.9) * (1 - (t - 100) / 1000) ** 3
        assert s(t) == pytest.approx(expect)
        assert s(t + 57) == s(t)  # held between updates
        assert s.updates(t) and not s.updates(t + 1)
    assert s.updates(1100) and not s.updates(99) and not s.updates(1200)
    values = [s(t) for t in range(0, 1300, 7)]
    assert values == sorted(values)  # never decreases
    # cubic: fast first, slow last
    assert s(200) - s(100) > s(1100) - s(1000)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"begin_step": 10, "end_step": 10}, "steps out of order"),
        ({"begin_step": 50, "end_step": 10}, "steps out of order"),
        ({"initial": 0.5, "final": 0.2}, "final .* must be >= initial"),
        ({"final": 1.0}, "final must be a sparsity"),
        ({"initial": -0.1}, "initial must be a sparsity"),
        ({"frequency": 0}, "frequency must be an int >= 1"),
        ({"begin_step": -1}, "begin_step must be an int"),
        ({"end_step": 2.5}, "end_step must be an int"),
        ({"power": 0}, "power must be > 0"),
    ],
)
def test_polynomial_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Polynomial(**kwargs)


def test_gradual_masks_follow_schedule(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 8))
    sched = Polynomial(0.0, 0.8, begin_step=0, end_step=40, frequency=5)
    pruner = GradualPruning(model, sched)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(64, 40, generator=gen), torch.randint(0, 8, (64,), generator=gen)
    prev_zero = None
    for t in range(1, 51):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        s = pruner.step()
        assert s == pytest.approx(sched(t))
        w = model[0].weight.detach()
        zero = w == 0
        assert int(zero.sum()) == int(s * w.numel())  # exactly the scheduled count
        if prev_zero is not None:
            assert bool((zero | ~prev_zero).all())  # once pruned, stays pruned
        prev_zero = zero
        # the kept weights are the largest at the last update
    out = pruner.finish()
    assert isinstance(out[0], pk.nn.SparseLinear) and isinstance(out[2], pk.nn.SparseLinear)
    assert out[0].density() == pytest.approx(1 - 0.8, abs=1e-3)
    assert torch.equal(out[0].to_dense(), w)
    assert "sparsity=0.800" in repr(pruner)


def test_gradual_refuses():
    with pytest.raises(TypeError, match="schedule must be a Polynomial"):
        GradualPruning(nn.Linear(3, 3), 0.9)
    with pytest.raises(ValueError, match="no nn.Linear"):
        GradualPruning(nn.Sequential(nn.ReLU()), Polynomial())
    with pytest.raises(ValueError, match="pattern must be"):
        GradualPruning(nn.Linear(4, 4), Polynomial(), pattern="2:4")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        GradualPruning("m", Polynomial())


def test_gradual_block_pattern(gen):
    model = nn.Sequential(nn.Linear(32, 32))
    pruner = GradualPruning(model, Polynomial(0.0, 0.5, 0, 4, 1), pattern="block")
    for _ in range(5):
        pruner.step()
    out = pruner.finish()
    assert out[0].pattern == "block" and out[0].density() == pytest.approx(0.5)


def test_gradual_pruning_on_digits():
    """90% unstructured reached gradually stays within 1 point of dense; one-shot 90%
    loses more (without fine-tuning, by far)."""
    pytest.importorskip("sklearn")
    from pykernels._digits import pruning_digits

    r = pruning_digits(seed=0)
    assert r["gradual_density"] == pytest.approx(0.1, abs=2e-3)
    assert r["gradual"] >= r["dense"] - 1.0
    assert r["one_shot"] < r["gradual"] - 1.0


def test_polynomial_takes_every_integer_a_loop_counts_in():
    np = pytest.importorskip("numpy")
    sched = Polynomial(
        0.1, 0.8, begin_step=np.int64(10), end_step=torch.tensor(110), frequency=np.int8(20)
    )
    assert (sched.begin_step, sched.end_step, sched.frequency) == (10, 110, 20)
    assert all(type(v) is int for v in (sched.begin_step, sched.end_step, sched.frequency))
    for step in range(0, 130, 7):
        want = sched(step)
        for v in (np.int64(step), np.int32(step), np.uint16(step), torch.tensor(step),
                  torch.tensor(step, dtype=torch.int32)):  # fmt: skip
            assert sched(v) == want and sched.updates(v) == sched.updates(step)
    for bad in (10.0, np.float64(10), torch.tensor(10.0), torch.tensor([10]), True, np.bool_(True),
                torch.tensor(True), "10", None, torch.tensor(10, device="meta")):  # fmt: skip
        with pytest.raises(TypeError, match="step must be an int"):
            sched(bad)
        with pytest.raises(TypeError, match="step must be an int"):
            sched.updates(bad)
