"""QAT training step against float training and torch.ao fake quantization.

One step of a 4096 x 4096 Linear at M = 256 tokens: forward, and backward
to the weight, bias and input gradients (what a layer inside a network
computes; the optimizer update is the same for all and left out).

* ``float``: ``nn.Linear`` (the baseline: QAT should cost <= 1.3x it).
* ``pk QATLinear``: weights per channel and activations per token through
  the fused fake-quant kernel (forward and straight-through backward).
* ``torch.ao prepare_qat``: the deprecated torch.ao flow, ``QuantStub`` +
  ``nnqat.Linear`` with ``get_default_qat_qconfig("x86")`` (per-channel
  weight FakeQuantize, per-tensor activation FakeQuantize with observers).
* ``torch ops per-token``: the same arithmetic as QATLinear written with
  torch ops and a ``detach`` straight-through trick, what one writes by hand.
* ``fake-quant only``: the fused kernel's forward + backward on the weight
  alone, and torch.ao's ``fake_quantize_per_channel_affine`` on it.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..nn import QATLinear
from . import Case

SHAPES = [(256, 4096, 4096)]


def _torch_fq(x: Tensor) -> Tensor:
    s = x.detach().abs().amax(dim=-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(x.detach() / s).clamp(-127, 127) * s
    return x + (q - x).detach()


class _TorchQAT(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(_torch_fq(x), _torch_fq(self.lin.weight), self.lin.bias)


def _ao_qat(lin: nn.Linear) -> nn.Module:
    from torch.ao.quantization import DeQuantStub, QuantStub, get_default_qat_qconfig, prepare_qat

    m = nn.Sequential(QuantStub(), copy.deepcopy(lin), DeQuantStub()).train()
    m.qconfig = get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat(m)


def _step(layer: nn.Module, x: Tensor, gy: Tensor):
    def run():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        layer(x).backward(gy)

    return run


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []
    gen = torch.Generator().manual_seed(0)
    out = []
    for m, k, n in SHAPES:
        torch.manual_seed(0)
        lin = nn.Linear(k, n)
        x = torch.randn(m, k, generator=gen).requires_grad_()
        gy = torch.randn(m, n, generator=gen)
        qat = QATLinear.from_linear(copy.deepcopy(lin))
        impls = {
            "float": _step(lin, x, gy),
            "pk QATLinear": _step(qat, x, gy),
            "torch.ao prepare_qat": _step(_ao_qat(lin), x, gy),
            "torch ops per-token": _step(_TorchQAT(copy.deepcopy(lin)), x, gy),
        }
        out.append(
            Case("qat", f"train step {m}x{k}x{n}", device, impls, "float", reps=3 if quick else 7)
        )
        w = lin.weight.detach().clone().requires_grad_()
        gw = torch.randn(n, k, generator=gen)
        ch = torch.zeros(n, dtype=torch.int32)
        scale = (w.detach().abs().amax(dim=1) / 127).float()

        def pk_fq(w=w, gw=gw):
            w.grad = None
            ops.fake_quantize_per_row(w).backward(gw)

        def ao_fq(w=w, gw=gw, scale=scale, ch=ch):
            w.grad = None
            torch.fake_quantize_per_channel_affine(w, scale, ch, 0, -127, 127).backward(gw)

        out.append(
            Case(
                "qat",
                f"weight fake-quant fwd+bwd {n}x{k}",
                device,
                {
                    "torch fake_quantize_per_channel_affine": ao_fq,
                    "pk fake_quantize_per_row": pk_fq,
                },
                "torch fake_quantize_per_channel_affine",
                # the least a fake-quant forward moves: read w, write y (fp32); the
                # straight-through backward need not touch memory (see ops/qat.py)
                bytes_moved=2 * 4 * n * k,
                reps=3 if quick else 9,
            )
        )
    return out
