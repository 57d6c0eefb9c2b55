"""One place per concept: the backend tables, the dtype table and the old
module paths that moved."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

import pykernels as pk
from pykernels import _layout, backends

OLD_NEW = [
    ("pykernels._native", "pykernels.backends.native"),
    ("pykernels._cffi", "pykernels.backends.cffi"),
    ("pykernels._numba", "pykernels.backends.numba"),
    ("pykernels._numba.int8", "pykernels.backends.numba.int8"),
    ("pykernels._numba.topk", "pykernels.backends.numba.topk"),
    ("pykernels._torch", "pykernels.backends.torch"),
    ("pykernels._torch.sparse", "pykernels.backends.torch.sparse"),
    ("pykernels._reference", "pykernels.backends.reference"),
]


@pytest.mark.parametrize(("old", "new"), OLD_NEW)
def test_old_module_paths_are_the_new_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_from_imports_and_names_work():
    from pykernels import _native, _reference
    from pykernels._reference import int8_linear, packed_shape, topk_sparsify_tensor

    assert _native is backends.native
    assert packed_shape is _layout.packed_shape
    assert int8_linear is importlib.import_module("pykernels.backends.reference.int8").int8_linear
    assert topk_sparsify_tensor is _reference.topk_sparsify_tensor
    assert pk._reference.DTYPE_CODES is _layout.DTYPE_CODES


def test_monkeypatching_the_old_name_reaches_the_backends(monkeypatch):
    import pykernels._native as old

    monkeypatch.setattr(old, "C", None)
    assert backends.native.C is None
    assert backends._search("int8", torch.device("cpu")).name != "native-cpu"  # noqa: SLF001
    monkeypatch.setenv("PYKERNELS_BACKEND", "native")
    with pytest.raises(backends.BackendUnavailable, match="_C is not available"):
        backends.impl("int8", "linear", torch.zeros(1))


def test_dtype_codes_one_table():
    assert _layout.DTYPE_CODES == {
        torch.float32: 0,
        torch.float16: 1,
        torch.bfloat16: 2,
        torch.float64: 3,
    }
    assert all(_layout.TORCH_DTYPE[c] is d for d, c in _layout.DTYPE_CODES.items())
    # The C++ twin agrees (csrc/common/dtype.h, compiled into the bindings).
    from pykernels.comm import wire

    for d, c in wire.DTYPES.items():
        assert _layout.DTYPE_CODES[d] == c


CPU_BACKENDS = [b for b in backends.BACKENDS if "cpu" in b.device_types or "*" in b.device_types]


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda b: b.name)
def test_every_registered_op_has_an_implementation_on_every_cpu_backend(backend, monkeypatch):
    """A family's table covers each backend that declares the family, so no op
    of a family can fail to dispatch where the family itself is available."""
    if backend.unavailable():
        pytest.skip(backend.unavailable())
    import pykernels.ops  # noqa: F401 - registers every table

    assert backends._TABLES  # noqa: SLF001
    for (family, op), _table in backends._TABLES.items():  # noqa: SLF001
        if family in backend.families:
            fn = backends._bound(backend, family, op)  # noqa: SLF001
            assert callable(fn), (backend.name, family, op)


def test_register_refuses_unknown_family_and_keys():
    with pytest.raises(ValueError, match="unknown family"):
        backends.register("nope", "op", any=lambda: None)
    with pytest.raises(ValueError, match="unknown backend keys"):
        backends.register("int8", "op", gpu=lambda: None)


def test_ops_never_branch_on_backends():
    """The choice is made in backends.impl; an op that tests a backend's kind or
    name would be a second place to change when a backend is added."""
    ops = Path(pk.__file__).parent / "ops"
    pattern = re.compile(r"backend\.(kind|name)|backends\.choose\(|cpu_function\(")
    offenders = [
        f"{p.name}:{i}"
        for p in ops.glob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_host_call_copies_back_and_passes_bits():
    seen = {}

    def fn(a, bits, flag, out):
        seen["dtypes"] = (a.dtype, bits.dtype, flag)
        out[:] = a * 2

    a = torch.arange(4, dtype=torch.float32)
    out = torch.zeros(4)
    backends.host_call(fn, a, backends.Bits(torch.ones(3, dtype=torch.bfloat16)), True, out)
    assert torch.equal(out, a * 2)
    assert str(seen["dtypes"][1]) == "uint16" and seen["dtypes"][2] is True
