"""Backend choice, forced backends, and a package that lost its extension."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import pykernels as pk
from pykernels import _native, backends


def test_native_is_built_unless_disabled():
    # CI installs from source: a missing extension there is a build failure,
    # not something to fall back from silently.
    if os.environ.get("PYKERNELS_NO_NATIVE") == "1":
        pytest.skip("pure-Python install requested")
    assert _native.C is not None, _native.C_error
    assert backends.choose("topk", "cpu").name == "native-cpu"


def test_auto_order_prefers_native(monkeypatch):
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    assert backends.choose("topk", torch.device("cpu")).name == "native-cpu"


def test_forced_backends(monkeypatch):
    for kind, name in [("numba", "numba"), ("reference", "reference"), ("torch", "torch")]:
        monkeypatch.setenv("PYKERNELS_BACKEND", kind)
        assert backends.choose("topk", "cpu").name == name


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.setenv("PYKERNELS_BACKEND", "native")
    monkeypatch.setattr(_native, "C", None)
    monkeypatch.setattr(_native, "C_error", "ImportError: test removed it")
    with pytest.raises(backends.BackendUnavailable, match="test removed it"):
        pk.ops.topk_sparsify(torch.randn(10), k=2)
    monkeypatch.setenv("PYKERNELS_BACKEND", "numba")
    with pytest.raises(backends.BackendUnavailable, match="runs on cpu tensors, not meta"):
        backends.choose("topk", "meta")


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("PYKERNELS_BACKEND", "fastest")
    with pytest.raises(backends.BackendUnavailable, match="not one of"):
        pk.ops.topk_sparsify(torch.randn(10), k=2)


def test_cuda_without_gpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("PYKERNELS_BACKEND", "native")
    with pytest.raises(backends.BackendUnavailable, match="native-cuda"):
        backends.choose("topk", "cuda")
    monkeypatch.delenv("PYKERNELS_BACKEND")
    # Torch ops on the device, never the host-copying reference.
    for family in backends.FAMILIES:
        assert backends.choose(family, "cuda").name == "torch"
        assert pk.info()["backends"][family]["cuda"] == "torch"


@pytest.fixture
def fake_gpu(monkeypatch):
    """A machine where _C_cuda is built and torch sees a GPU (no GPU is touched)."""
    monkeypatch.setattr(_native, "C_cuda", object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    monkeypatch.delenv(backends.CUDA_KERNELS_ENV, raising=False)


def test_native_cuda_is_opt_in(fake_gpu, monkeypatch):
    # Built but never verified on a GPU: not chosen unless asked for.
    assert backends.choose("topk", "cuda").name == "torch"
    why = backends.BACKENDS[0].refuses("topk", torch.device("cuda"))
    assert backends.CUDA_NOT_VERIFIED in why and backends.CUDA_KERNELS_ENV in why
    monkeypatch.setenv(backends.CUDA_KERNELS_ENV, "1")
    assert backends.choose("topk", "cuda").name == "native-cuda"
    monkeypatch.delenv(backends.CUDA_KERNELS_ENV)
    monkeypatch.setenv("PYKERNELS_BACKEND", "native")
    assert backends.choose("topk", "cuda").name == "native-cuda"
    # No native CUDA int8 kernel: forcing native on CUDA says so.
    with pytest.raises(backends.BackendUnavailable, match="native-cuda has no int8 kernels"):
        backends.choose("int8", "cuda")


def test_reference_and_torch_only_where_meant(monkeypatch):
    monkeypatch.delenv("PYKERNELS_BACKEND", raising=False)
    ref = next(b for b in backends.BACKENDS if b.name == "reference")
    tb = next(b for b in backends.BACKENDS if b.name == "torch")
    assert "only when forced" in ref.refuses("int8", torch.device("cuda"))
    assert ref.refuses("int8", torch.device("cuda"), forced=True) is None
    assert "only when forced" in tb.refuses("int8", torch.device("cpu"))
    assert tb.refuses("int8", torch.device("cpu"), forced=True) is None
    assert tb.refuses("sparse", torch.device("meta")) is None
    monkeypatch.setenv("PYKERNELS_BACKEND", "torch")
    for family in backends.FAMILIES:
        assert backends.choose(family, "cpu").name == "torch"


def test_info_says_what_is_not_shipped():
    d = pk.info()
    if _native.C_cuda is not None:
        assert backends.CUDA_NOT_VERIFIED in d["native_cuda_status"]


def test_info_says_whether_amx_tiles_run():
    d = pk.info()
    if _native.C is None:
        assert "not available" in d["amx_kernels"]
        return
    cpu = _native.C.cpu_info()
    assert cpu["amx_tiles"] in ("absent", "denied", "granted")
    if "amx" not in d["isa_compiled"]:
        assert "not built" in d["amx_kernels"]
    elif cpu["amx_tiles"] == "granted":
        # The tiles are only detected once the OS has granted the permission.
        assert d["isa_detected"] == "amx" and "granted" in d["amx_kernels"]
        assert ("in use" in d["amx_kernels"]) == (d["isa_active"] == "amx")
    else:
        assert d["isa_detected"] != "amx"
        assert ("refused" in d["amx_kernels"]) == (cpu["amx_tiles"] == "denied")
    # On Linux, CPUID's AMX bits are what /proc/cpuinfo lists.
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return
    if {"amx_tile", "amx_int8"} <= set(flags):
        assert cpu["amx_tiles"] != "absent"
    elif "flags" in flags:
        assert cpu["amx_tiles"] == "absent"


def test_set_cpu_isa_rejects_unknown_names():
    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    with pytest.raises(ValueError, match="cpu isa must be one of"):
        _native.C.set_cpu_isa("sse9")


def test_isa_cap_from_environment(tmp_path):
    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    code = "import pykernels as pk; print(pk.info()['isa_active'])"
    env = dict(os.environ, PYKERNELS_CPU_ISA="portable")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "portable"


def test_a_cap_of_the_other_architecture_is_ignored_saying_so(tmp_path):
    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    other = "avx2" if _native.is_arm() else "neon"
    code = "import pykernels as pk; print(pk.info()['isa_cap'])"
    env = dict(os.environ, PYKERNELS_CPU_ISA=other)
    out = subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == _native.ISA_NAMES[-1]  # no cap
    assert f"PYKERNELS_CPU_ISA='{other}' is a tier of" in out.stderr
    assert "ignoring it" in out.stderr
    with pytest.raises(ValueError, match=", ".join(_native.ISA_NAMES)):
        _native.C.set_cpu_isa(other)


def test_import_survives_a_missing_extension(tmp_path):
    """A broken or missing _C warns once, and top-k still works through Numba."""
    code = (
        "import sys, warnings\n"
        "sys.modules['pykernels._C'] = None\n"  # makes the import fail
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    import pykernels as pk\n"
        "    import pykernels._native\n"
        "import torch\n"
        "from pykernels import _reference\n"
        "x = torch.randn(5000)\n"
        "v, i = pk.ops.topk_sparsify(x, k=50)\n"
        "rv, ri = _reference.topk_sparsify_tensor(x, 50)\n"
        "assert torch.equal(i, ri) and torch.equal(v, rv)\n"
        "print(sum('native CPU kernels unavailable' in str(m.message) for m in w),"
        " pk.backends.choose('topk', 'cpu').name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYKERNELS_BACKEND"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "numba"]


def test_set_num_threads():
    with pytest.raises(ValueError, match="positive int"):
        pk.set_num_threads(0)
    if _native.C is None:
        pytest.skip("native CPU kernels not built")
    before = _native.C.get_num_threads()
    try:
        pk.set_num_threads(1)
        assert pk.info()["threads"] == 1
        x = torch.randn(1 << 20)
        pk.ops.topk_sparsify(x, k=100)
    finally:
        pk.set_num_threads(before)
