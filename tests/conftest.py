"""Shared fixtures: every backend and every compiled CPU ISA, fresh random data."""

from __future__ import annotations

import pytest
import torch

from pykernels import _native, backends

CPU_BACKENDS = ["native", "torch", "numba", "reference"]


def _available(kind: str) -> bool:
    name = {"native": "native-cpu"}.get(kind, kind)
    return next(b for b in backends.BACKENDS if b.name == name).unavailable() is None


@pytest.fixture(params=CPU_BACKENDS)
def backend(request, monkeypatch):
    """Forces each backend in turn on CPU tensors (PYKERNELS_BACKEND)."""
    if not _available(request.param):
        pytest.skip(f"{request.param} backend unavailable here")
    monkeypatch.setenv("PYKERNELS_BACKEND", request.param)
    return request.param


def _isas() -> list[str]:
    if _native.C is None:
        return []
    info = _native.C.cpu_info()
    order = list(_native.ISA_NAMES)  # this architecture's tiers, from the extension
    detected = order.index(info["isa_detected"])
    return [i for i in info["isa_compiled"] if order.index(i) <= detected]


@pytest.fixture(params=_isas() or ["none"])
def cpu_isa(request, monkeypatch):
    """Caps the native CPU kernels at each ISA this machine can run."""
    if request.param == "none":
        pytest.skip("native CPU kernels not built")
    monkeypatch.setenv("PYKERNELS_BACKEND", "native")
    previous = _native.C.cpu_info()["isa_cap"]
    _native.C.set_cpu_isa(request.param)
    yield request.param
    _native.C.set_cpu_isa(previous)


@pytest.fixture
def gen():
    """A generator with a fresh seed per test; gen.initial_seed() reproduces it."""
    g = torch.Generator()
    g.seed()
    return g


def cuda_ready() -> bool:
    return torch.cuda.is_available() and _native.C_cuda is not None


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip cleanly where there is no GPU or no _C_cuda."""
    if cuda_ready():
        return
    why = "no CUDA device" if not torch.cuda.is_available() else "pykernels._C_cuda not built"
    skip = pytest.mark.skip(reason=f"cuda test: {why}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
