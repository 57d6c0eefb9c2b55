"""The CPU kernels' threads (csrc/common/parallel.*).

No OpenMP runtime is linked: calls run on the one torch loaded, or on a pool
of our own where there is none and in a fork()ed child. Checked: many
back-to-back and concurrent calls on each path (wake-ups must never be lost),
fork() followed by a kernel call in the child, exactly one OpenMP runtime in
the process (torch's), and the thread settings as documented.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pykernels as pk
from pykernels import _native

pytestmark = pytest.mark.skipif(_native.C is None, reason="native CPU kernels not built")


def _run(code: str, tmp_path, timeout: float = 60) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYKERNELS_BACKEND"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


STRESS = """
import threading, torch, pykernels as pk
from pykernels import _reference
x = torch.randn(1 << 16)  # large enough to use every thread
want = _reference.topk_sparsify_tensor(x, 50)
for i in range(1000):
    v, idx = pk.ops.topk_sparsify(x, k=50)
    if i % 250 == 0:
        assert torch.equal(idx, want[1]) and torch.equal(v, want[0])
        threading.Event().wait(0.002)  # long enough for workers to go to sleep
xs = [torch.randn(200_000) for _ in range(4)]
wants = [_reference.topk_sparsify_tensor(x, 300) for x in xs]
errors = []
def worker(i):
    for _ in range(20):
        v, idx = pk.ops.topk_sparsify(xs[i], k=300)
        if not (torch.equal(v, wants[i][0]) and torch.equal(idx, wants[i][1])):
            errors.append(i)
threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join(timeout=120)
assert not any(t.is_alive() for t in threads), "a caller hung"
assert errors == [], errors
print(pk.info()["threading"].split()[0])
"""


@pytest.mark.parametrize("mode", ["auto", "pool", "serial"])
def test_many_and_concurrent_calls_on_every_path(mode, tmp_path):
    """Thousands of threaded calls with idle gaps, then Python threads calling at once
    (on the pool one uses it and the others run inline)."""
    out = _run(f"import os; os.environ['PYKERNELS_THREADING'] = {mode!r}\n" + STRESS, tmp_path)
    assert out.split() == [{"auto": "openmp", "pool": "pool", "serial": "serial"}[mode]]


def test_fork_then_kernel_call_in_the_child(tmp_path):
    """What a fork-based DataLoader worker does; GNU OpenMP's pool hung here."""
    out = _run(
        """
        import os, torch, pykernels as pk
        x = torch.randn(1 << 22)
        want = pk.ops.topk_sparsify(x, k=100)[1]    # the pool is running in the parent
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                # torch's own threads do not survive a fork either: DataLoader
                # workers set torch.set_num_threads(1); ours run on a new pool.
                ok = torch.equal(pk.ops.topk_sparsify(x, k=100)[1], want)
                q, s = pk.ops.quantize_per_row(x.view(1024, -1))
                ok = ok and pk.info()["threading"] == "pool"
                os._exit(0 if ok and q.shape == (1024, 4096) else 3)
            _, status = os.waitpid(pid, 0)
            assert os.WEXITSTATUS(status) == 0, status
        print("ok")
        """,
        tmp_path,
    )
    assert out.split() == ["ok"]


def test_one_openmp_runtime_in_the_process(tmp_path):
    """After torch, pykernels and a threaded kernel call, only torch's runtime is mapped."""
    out = _run(
        """
        import torch, pykernels as pk
        pk.ops.topk_sparsify(torch.randn(1 << 22), k=100)
        torch.randn(512, 512) @ torch.randn(512, 512)
        names = ("libgomp", "libiomp", "libomp")
        libs = {line.split()[-1] for line in open("/proc/self/maps")
                if any(n in line.rsplit("/", 1)[-1] for n in names)}
        print(len(libs), *libs, "|", pk.info()["threading"])
        """,
        tmp_path,
    )
    mapped, threading_kind = out.split("|")
    count, *libs = mapped.split()
    assert int(count) == 1, libs  # torch's, which our calls run on
    assert threading_kind.split() == ["openmp", f"({libs[0]})"]


def test_thread_settings_are_ours_and_torchs_apart(tmp_path):
    """pk.set_num_threads sets the kernels' threads only; torch's are its own."""
    out = _run(
        """
        import torch, pykernels as pk
        torch.set_num_threads(1)
        a = pk.info()["threads"]
        pk.set_num_threads(3)
        print(a, pk.info()["threads"], torch.get_num_threads())
        """,
        tmp_path,
    )
    default, ours, theirs = map(int, out.split())
    assert default == len(os.sched_getaffinity(0)) or os.environ.get("OMP_NUM_THREADS")
    assert ours == 3 and theirs == 1


def test_omp_num_threads_still_sets_the_default(tmp_path):
    env_code = """
        import pykernels as pk
        print(pk.info()["threads"])
        """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYKERNELS_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(env_code)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1"]


def test_no_openmp_runtime_is_linked():
    import subprocess as sp

    out = sp.run(["ldd", _native.C.__file__], capture_output=True, text=True).stdout
    assert not any(n in out for n in ("libgomp", "libiomp", "libomp")), out


def test_one_thread_gives_the_same_answer(gen):
    x = torch.randn(1 << 20, generator=gen)
    before = _native.C.get_num_threads()
    try:
        many = pk.ops.topk_sparsify(x, k=1000)
        pk.set_num_threads(1)
        one = pk.ops.topk_sparsify(x, k=1000)
    finally:
        pk.set_num_threads(before)
    assert torch.equal(many[0], one[0]) and torch.equal(many[1], one[1])
