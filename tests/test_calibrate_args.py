"""``pk.compress(..., calibration=)``: what it takes and the clear errors for what it
does not; calibrated steps refuse to run without it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pykernels as pk

CALIBRATED = ["int8:gptq", "cluster:8:gptq", "awq+int8", "smoothquant+int8", "smoothquant:0.5+int8"]


def model():
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).eval()


@pytest.mark.parametrize("recipe", CALIBRATED)
def test_calibrated_steps_need_calibration(recipe, gen):
    x = torch.randn(4, 16, generator=gen)
    with pytest.raises(ValueError, match="needs calibration data.*calibration=batches"):
        pk.compress(model(), recipe, x, progress=False)


@pytest.mark.parametrize(
    "cal, err, match",
    [
        (3, TypeError, "calibration must be an iterable of batches"),
        ("text", TypeError, "calibration must be an iterable of batches"),
        ([], ValueError, "calibration holds no batches"),
        (iter([]), ValueError, "calibration holds no batches"),
        ([1, 2], TypeError, "calibration batch 0 must be"),
        ([{1: torch.ones(2, 16)}], TypeError, "calibration batch 0 must be"),
        ([torch.ones(4, 16), None], TypeError, "calibration batch 1 must be"),
        ([torch.ones(4, 15)], ValueError, "does not run on calibration batch 0"),
        ([torch.ones(4, 16), torch.ones(2, 3)], ValueError, "calibration batch 1"),
        ([torch.full((4, 16), float("nan"))], ValueError, "NaN or inf"),
    ],
)
def test_bad_calibration_is_refused_clearly(cal, err, match, gen):
    x = torch.randn(4, 16, generator=gen)
    with pytest.raises(err, match=match):
        pk.compress(model(), "int8:gptq", x, calibration=cal, progress=False)


def test_calibration_forms_agree(gen):
    """A list, a tuple of batches, a generator, or one tensor: the same statistics."""
    x = torch.randn(32, 16, generator=gen)
    m = model()
    outs = []
    for cal in ([x], (x,), (t for t in [x]), x):
        out, _ = pk.compress(m, "int8:gptq", x[:4], calibration=cal, progress=False)
        outs.append(out[0].weight_int8())
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_plain_steps_ignore_calibration_and_match_without(gen):
    x = torch.randn(8, 16, generator=gen)
    m = model()
    a, _ = pk.compress(m, "int8", x, calibration=[x], progress=False)
    b, _ = pk.compress(m, "int8", x, progress=False)
    assert torch.equal(a[0].weight_int8(), b[0].weight_int8())
