"""Our ops are ordinary torch ops to torch's tools (DESIGN: "Our ops are
ordinary torch ops"): the profiler, dispatch modes, FakeTensorMode and vmap
see the registered op, never the eager shortcut that skips the dispatcher."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import pykernels as pk
from pykernels import backends


def _cases():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    w_q = torch.randint(-127, 128, (24, 64), dtype=torch.int8, generator=g)
    ws = torch.rand(24, generator=g) + 0.1
    sl = pk.nn.SparseLinear.from_linear(lin, sparsity=0.5)
    il = pk.nn.Int8Linear.from_linear(lin)
    return {
        "topk_sparsify": lambda x: pk.ops.topk_sparsify(x.reshape(-1), k=5)[0],
        "int8_weight_linear": lambda x: pk.ops.int8_weight_linear(x, w_q, ws),
        "sparse_linear": sl,
        "Int8Linear": il,
        "quantize_per_row": lambda x: pk.ops.quantize_per_row(x)[1],
    }


CASES = _cases()


class _Log(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", CASES)
def test_dispatch_modes_see_the_op(name):
    x = torch.randn(4, 64)
    with torch.no_grad(), _Log() as log:
        CASES[name](x)
    assert any(op.startswith("pykernels.") for op in log.ops), log.ops


@pytest.mark.parametrize("name", CASES)
def test_profiler_sees_the_op(name):
    x = torch.randn(4, 64)
    with torch.no_grad(), torch.profiler.profile() as prof:
        CASES[name](x)
    assert any(e.name.startswith("pykernels::") for e in prof.events())


@pytest.mark.parametrize("name", CASES)
def test_fake_tensor_mode_gives_shapes_without_data(name):
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = CASES[name](x)
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        got = CASES[name](mode.from_tensor(x))
    assert isinstance(got, FakeTensor)
    assert got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize("name", CASES)
def test_vmap_equals_a_loop(name):
    xs = torch.randn(3, 4, 64)
    with torch.no_grad():
        got = torch.vmap(CASES[name])(xs)
        want = torch.stack([CASES[name](x) for x in xs])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_flop_counter_runs_over_a_compressed_model():
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    qm = pk.quantize_int8(model)
    x = torch.randn(5, 32)
    with torch.no_grad(), FlopCounterMode(display=False):
        y = qm(x)
    torch.testing.assert_close(y, qm(x), rtol=0, atol=0)


def test_shortcut_still_taken_for_plain_eager_calls():
    x = torch.randn(2, 3)
    with torch.no_grad():
        assert backends.skip_dispatcher(x)
    assert not backends.skip_dispatcher(x.requires_grad_())
    with _Log():
        assert not backends.skip_dispatcher(torch.randn(2))
    assert not backends.plain(torch.empty(2, device="meta"))
