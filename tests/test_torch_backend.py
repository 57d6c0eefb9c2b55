"""The torch backend (torch ops on the data's device) and device handling.

Its exactness against the reference is checked on CPU tensors by every test
that takes the ``backend`` fixture (it forces ``torch`` in turn). Here: what
only it does (padding for CUDA's int8 GEMM, no host copies), shape-only meta
tensors, Int8Linear's layout per device, and CUDA runs where a GPU exists.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels import _reference, backends
from pykernels._torch import int8 as tint8


@pytest.mark.parametrize("mkn", [(1, 1, 1), (3, 5, 7), (16, 8, 8), (17, 9, 15), (40, 64, 24)])
def test_int_mm_padding_is_exact(mkn, gen):
    m, k, n = mkn
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    c = tint8.int_mm_padded(a, b)
    assert c.dtype == torch.int32 and c.shape == (m, n)
    assert torch.equal(c.long(), a.long() @ b.long().T)


@pytest.mark.parametrize("mkn", [(1, 1, 2), (5, 1, 3), (33, 1, 17), (4, 2, 3)])
def test_int8_gemm_with_k_1_is_exact(mkn, gen):
    """torch's CPU _int_mm returns garbage for K = 1 with N >= 2 (torch 2.13)."""
    m, k, n = mkn
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    c = tint8.int8_gemm(a, b)
    assert c.dtype == torch.int32 and torch.equal(c.long(), a.long() @ b.long().T)


def test_forced_torch_backend_never_touches_numpy(monkeypatch, gen):
    """Everything runs as torch ops: no NumPy buffer is made (what a GPU needs)."""
    monkeypatch.setenv("PYKERNELS_BACKEND", "torch")

    def no_numpy(self, *a, **k):
        raise AssertionError("the torch backend made a NumPy buffer")

    x = torch.randn(6, 40, generator=gen)
    lin = nn.Linear(40, 24)
    q = pk.nn.Int8Linear.from_linear(lin)
    sp = pk.nn.SparseLinear.from_linear(lin, 0.7)
    xg = x.clone().requires_grad_()
    monkeypatch.setattr(torch.Tensor, "numpy", no_numpy)
    q(x)
    sp(xg).sum().backward()
    pk.ops.topk_sparsify(x, k=5, residual=torch.zeros_like(x))
    pk.ops.int8_gemm(x.to(torch.int8), x.to(torch.int8))
    pk.ops.batched_svd(torch.randn(3, 5, 4, generator=gen))


def test_meta_tensors_give_shapes(gen):
    lin = nn.Linear(64, 32)
    x = torch.randn(5, 64, device="meta")
    for layer in (
        pk.nn.Int8Linear.from_linear(lin),
        pk.nn.Int8Linear.from_linear(lin, mode="weight_only"),
        pk.nn.SparseLinear.from_linear(lin, 0.5),
    ):
        y = layer.to("meta")(x)
        assert y.device.type == "meta" and y.shape == (5, 32)
    v, i = pk.ops.topk_sparsify(torch.randn(100, device="meta"), k=7)
    assert v.shape == (7,) and i.dtype == torch.int64


def test_int8_layer_layout_follows_the_device(gen):
    """Packed for the CPU kernels; row-major elsewhere (torch ops read it there)."""
    lin = nn.Linear(48, 20)
    q = pk.nn.Int8Linear.from_linear(lin)
    assert "weight_packed" in q._buffers and "weight" not in q._buffers
    # The row-major path gives the packed path's answer on the CPU.
    x = torch.randn(7, 48, generator=gen)
    rowmajor = pk.ops.int8_linear(x, q.weight_int8(), q.weight_scale, q.bias)
    assert torch.equal(rowmajor, q(x))
    m = q.to("meta")  # in place, as Module.to is
    assert "weight" in m._buffers and "weight_packed" not in m._buffers
    assert m.weight.shape == (20, 48) and m.weight.dtype == torch.int8


# --- on a GPU ------------------------------------------------------------------


@pytest.fixture(params=["torch", "native"])
def cuda_backend(request, monkeypatch):
    """CUDA calls through the torch backend (default) and the opt-in native kernels."""
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    if request.param == "native":
        monkeypatch.setenv(backends.CUDA_KERNELS_ENV, "1")
    else:
        monkeypatch.delenv(backends.CUDA_KERNELS_ENV, raising=False)
    return request.param


@pytest.mark.cuda
def test_cuda_default_is_torch(monkeypatch):
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.delenv(backends.CUDA_KERNELS_ENV, raising=False)
    for family in backends.FAMILIES:
        assert backends.choose(family, "cuda").name == "torch"


@pytest.mark.cuda
def test_cuda_topk_every_backend(cuda_backend, gen):
    x = torch.randn(100_003, generator=gen)
    r = torch.randn(100_003, generator=gen)
    for k in (0, 1, 1000, 100_003):
        got = pk.ops.topk_sparsify(x.cuda(), k=k)
        assert got[0].is_cuda
        want = _reference.topk_sparsify_tensor(x, k)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
        rc, rr = r.cuda(), r.clone()
        got = pk.ops.topk_sparsify(x.cuda(), k=k, residual=rc)
        want = _reference.topk_sparsify_tensor(x, k, residual=rr)
        assert torch.equal(got[1].cpu(), want[1]) and torch.equal(rc.cpu(), rr)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 17, 128])
def test_cuda_int8_stays_on_device(m, gen):
    lin = nn.Linear(256, 72)
    q = pk.nn.Int8Linear.from_linear(lin)
    x = torch.randn(m, 256, generator=gen)
    ref = q(x)
    g = q.to("cuda")
    assert "weight" in g._buffers and g.weight.is_cuda
    y = g(x.cuda())
    assert y.is_cuda
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    a = torch.randint(-128, 128, (m, 40), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 128, (24, 40), dtype=torch.int8, generator=gen)
    assert torch.equal(pk.ops.int8_gemm(a.cuda(), b.cuda()).cpu(), pk.ops.int8_gemm(a, b))


@pytest.mark.cuda
def test_cuda_sparse_and_svd_stay_on_device(gen):
    layer = pk.nn.SparseLinear.from_linear(nn.Linear(64, 32), 0.8)
    x = torch.randn(5, 64, generator=gen)
    ref = layer(x)
    g = layer.to("cuda")
    xc = x.cuda().requires_grad_()
    y = g(xc)
    assert y.is_cuda
    y.sum().backward()
    torch.testing.assert_close(y.detach().cpu(), ref, rtol=1e-5, atol=1e-5)
    a = torch.randn(4, 9, 6, generator=gen)
    u, s, vh = pk.ops.batched_svd(a.cuda())
    assert s.is_cuda
    torch.testing.assert_close((u * s[..., None, :]) @ vh, a.cuda(), rtol=1e-4, atol=1e-4)
