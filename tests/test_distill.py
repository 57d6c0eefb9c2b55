"""pk.distill: DistillLoss against a hand-written formula on fresh random data, its
refusals, and fit() with plain, QAT and sparse students on scikit-learn's digits."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels.distill import DistillLoss, fit


def kd_formula(s, t, labels, T, alpha):
    """alpha T^2 KL(p_t || p_s) + (1 - alpha) CE, written out elementwise."""
    s2, t2 = s.reshape(-1, s.shape[-1]).double(), t.reshape(-1, t.shape[-1]).double()
    pt = torch.softmax(t2 / T, -1)
    kl = (pt * (torch.log(pt) - torch.log_softmax(s2 / T, -1))).sum(-1).mean()
    ce = -torch.log_softmax(s2, -1).gather(1, labels.reshape(-1, 1)).mean()
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.mark.parametrize("T, alpha", [(1.0, 0.5), (2.0, 0.5), (4.0, 0.9), (0.5, 0.0), (3.0, 1.0)])
@pytest.mark.parametrize("shape", [(16, 10), (3, 7, 33)])
def test_kd_matches_formula(T, alpha, shape, gen):
    s = torch.randn(shape, generator=gen) * 3
    t = torch.randn(shape, generator=gen) * 3
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    got = DistillLoss(temperature=T, alpha=alpha)(s, t, labels)
    assert float(got) == pytest.approx(float(kd_formula(s, t, labels, T, alpha)), rel=1e-5)
    # without labels: the soft term alone
    soft = DistillLoss(temperature=T, alpha=alpha)(s, t)
    assert float(soft) == pytest.approx(float(kd_formula(s, t, labels, T, 1.0)), rel=1e-5)
    assert float(DistillLoss(temperature=T)(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_hidden_terms(gen):
    s, t = torch.randn(8, 5, 24, generator=gen), torch.randn(8, 5, 24, generator=gen)
    mse = DistillLoss(hidden="mse")(s, t)
    assert float(mse) == pytest.approx(float(((s - t) ** 2).mean()), rel=1e-6)
    cos = DistillLoss(hidden="cosine")(s, t)
    expect = (1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).mean()
    assert float(cos) == pytest.approx(float(expect), rel=1e-5)
    # logits and hidden together, in pairs and in mappings
    sl, tl = torch.randn(8, 10, generator=gen), torch.randn(8, 10, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    loss = DistillLoss(alpha=0.3, hidden="mse", hidden_weight=0.5)
    both = loss((sl, s), (tl, t), y)
    expect = kd_formula(sl, tl, y, 2.0, 0.3) + 0.5 * ((s - t) ** 2).mean()
    assert float(both) == pytest.approx(float(expect), rel=1e-5)
    assert float(loss({"logits": sl, "hidden": s}, {"logits": tl, "hidden": t}, y)) == float(both)


def test_gradient_flows_to_student_only(gen):
    s = torch.randn(6, 10, generator=gen, requires_grad=True)
    t = torch.randn(6, 10, generator=gen, requires_grad=True)
    DistillLoss()(s, t, torch.randint(0, 10, (6,), generator=gen)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0}, "temperature must be a number > 0"),
        ({"temperature": -1.0}, "temperature must be a number > 0"),
        ({"temperature": math.nan}, "temperature must be a number > 0"),
        ({"alpha": 1.5}, "alpha must be in"),
        ({"hidden": "l1"}, "hidden must be one of"),
        ({"hidden_weight": -1}, "hidden_weight must be"),
    ],
)
def test_loss_refuses(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillLoss(**kwargs)


def test_loss_refuses_mismatches(gen):
    loss = DistillLoss()
    with pytest.raises(ValueError, match="differ in shape"):
        loss(torch.randn(4, 10), torch.randn(4, 9))
    with pytest.raises(ValueError, match="labels must have shape"):
        loss(torch.randn(4, 10), torch.randn(4, 10), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="student_out must be"):
        loss("x", torch.randn(4, 10))
    with pytest.raises(ValueError, match="hidden states given for only one"):
        logits = torch.randn(2, 3)
        DistillLoss(hidden="mse")(
            {"hidden": torch.randn(2, 3), "logits": logits}, {"logits": logits}
        )
    with pytest.raises(ValueError, match="logits given for only one"):
        DistillLoss()({"logits": torch.randn(2, 3)}, {"hidden": torch.randn(2, 3)})


def test_fit_refuses(gen):
    m = nn.Linear(4, 3)
    data = [torch.randn(2, 4)]
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        fit(m, nn.Linear(4, 3), data, steps=0)
    with pytest.raises(ValueError, match="same module"):
        fit(m, m, data, steps=1)
    with pytest.raises(ValueError, match="yields no batch"):
        fit(m, nn.Linear(4, 3), [], steps=1)
    with pytest.raises(ValueError, match="cannot be iterated again"):
        fit(m, nn.Linear(4, 3), iter(data), steps=3, progress=False)


@functools.lru_cache(maxsize=1)
def _digits_teacher():
    from pykernels import _digits as D

    xtr, ytr, xte, yte = D.data(0)
    teacher = D.train(D.mlp(0, hidden=256), xtr, ytr, epochs=20, lr=3e-3)
    return D, teacher, xtr, ytr, xte, yte


@pytest.mark.parametrize("kind", ["float", "qat", "sparse"])
def test_fit_on_digits(kind):
    """A small student distilled from a larger teacher learns the task; works with QAT
    and sparse students; the loss goes down; the teacher is not touched."""
    pytest.importorskip("sklearn")
    D, teacher, xtr, ytr, xte, yte = _digits_teacher()
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    if kind == "qat":
        student = pk.qat.prepare(student)
    elif kind == "sparse":
        student = pk.sparsify(student, sparsity=0.5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = [m.training for m in teacher.modules()]
    batches = [(xtr[i : i + 64], ytr[i : i + 64]) for i in range(0, len(xtr), 64)]
    hist = fit(
        student,
        teacher,
        batches,
        steps=20 * len(batches),
        optimizer=torch.optim.Adam(student.parameters(), lr=3e-3),
        loss=DistillLoss(temperature=4.0, alpha=0.7),
        progress=False,
    )
    assert len(hist) == 20 * len(batches) and all(math.isfinite(h) for h in hist)
    assert sum(hist[-10:]) < 0.5 * sum(hist[:10])
    if kind == "qat":
        student = pk.qat.convert(student)
    acc = D.accuracy(student, xte, yte)
    assert acc >= D.accuracy(teacher, xte, yte) - 2.0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert [m.training for m in teacher.modules()] == modes  # its modes too (issue 20)


def test_fit_generator_batches_callback_and_defaults(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    teacher, student = nn.Linear(6, 4), nn.Linear(6, 4)
    data = [torch.randn(8, 6, generator=gen) for _ in range(3)]
    seen = []
    hist = fit(student, teacher, data, steps=7, callback=lambda s, v: seen.append((s, v)))
    assert [s for s, _ in seen] == list(range(7)) and [v for _, v in seen] == hist
    assert student.training  # restored

    # a mapping batch goes in as keyword arguments
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 4)

        def forward(self, x):
            return self.lin(x)

    hist = fit(Kw(), Kw(), [{"x": d} for d in data], steps=2, progress=False)
    assert len(hist) == 2


# --- issue 20: masked classes, and the callers' modes ---------------------------------


def masked_kd(s, t, T):
    """T^2 KL(p_t || p_s) with p_t = 0 on the classes the teacher masks: the sum over
    the classes it keeps, in float64."""
    s2, t2 = s.reshape(-1, s.shape[-1]).double(), t.reshape(-1, t.shape[-1]).double()
    total = 0.0
    for srow, trow in zip(s2, t2, strict=True):
        keep = torch.isfinite(trow)
        pt = torch.softmax(trow[keep] / T, -1)
        ls = torch.log_softmax(srow / T, -1)[keep]
        total += float((pt * (pt.log() - ls)).sum())
    return T * T * total / s2.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
def test_masked_teacher_classes_add_nothing(T, dtype, gen):
    s = (torch.randn(6, 12, generator=gen) * 3).to(dtype)
    t = (torch.randn(6, 12, generator=gen) * 3).to(dtype)
    mask = torch.rand(6, 12, generator=gen) < 0.4
    mask[:, 0] = False  # every row keeps a class
    t = t.masked_fill(mask, float("-inf"))
    s.requires_grad_(True)
    loss = DistillLoss(temperature=T)(s, t)
    value = float(loss.detach())
    assert math.isfinite(value)
    assert value == pytest.approx(masked_kd(s.detach(), t, T), rel=1e-4, abs=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # the student masking the same classes changes nothing (0 log 0 on both sides)
    s2 = s.detach().masked_fill(mask, float("-inf")).requires_grad_(True)
    loss2 = DistillLoss(temperature=T)(s2, t)
    assert float(loss2.detach()) == pytest.approx(masked_kd(s2.detach(), t, T), rel=1e-4, abs=1e-6)
    loss2.backward()
    assert torch.isfinite(s2.grad).all() and not s2.grad[mask].any()
    # with labels the hard term is added as before
    labels = torch.zeros(6, dtype=torch.long)
    with_labels = DistillLoss(temperature=T, alpha=0.5)(s.detach(), t, labels)
    assert math.isfinite(float(with_labels))


def test_masked_classes_where_the_teacher_puts_mass_are_infinite_not_nan(gen):
    t = torch.randn(2, 5, generator=gen)
    s = torch.randn(2, 5, generator=gen)
    s[0, 1] = float("-inf")  # the student rules out a class the teacher allows
    assert float(DistillLoss()(s, t)) == math.inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_teacher_logits_are_not_masked_away(bad, gen):
    t = torch.randn(3, 5, generator=gen)
    t[1, 2] = bad  # a broken teacher row: its probabilities are NaN, not 0
    loss = DistillLoss()(torch.randn(3, 5, generator=gen), t)
    assert math.isnan(float(loss))


def test_a_teacher_row_with_every_class_masked_is_refused(gen):
    t = torch.randn(3, 5, generator=gen)
    t[1] = float("-inf")
    with pytest.raises(ValueError, match="teacher_out.*all -inf"):
        DistillLoss()(torch.randn(3, 5, generator=gen), t)


class WithBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


@pytest.mark.parametrize("teacher_train", [True, False])
@pytest.mark.parametrize("student_train", [True, False])
def test_fit_gives_both_models_back_in_their_modes(teacher_train, student_train, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    teacher, student = WithBN().train(teacher_train), WithBN().train(student_train)
    teacher.bn.eval()  # a frozen BatchNorm inside each, whatever the model's mode
    student.bn.eval()
    t_modes = [m.training for m in teacher.modules()]
    s_modes = [m.training for m in student.modules()]
    stats = teacher.bn.running_mean.clone()
    seen = []
    student.bn.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    data = [torch.randn(8, 6, generator=gen) for _ in range(2)]
    fit(student, teacher, data, steps=3, progress=False)
    assert [m.training for m in teacher.modules()] == t_modes
    assert [m.training for m in student.modules()] == s_modes
    assert torch.equal(teacher.bn.running_mean, stats)  # the teacher ran in eval mode
    # a student passed in train mode keeps its frozen BatchNorm frozen while it trains
    assert seen == [not student_train] * 3
