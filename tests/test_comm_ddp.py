"""comm.ddp: the DDP communication hook on gloo, with 1, 2 and 3 processes on localhost.

The multi-process tests train a small MLP on scikit-learn's bundled digits
(1797 8x8 images): each spawn runs several codecs one after the other, so
that process start-up (importing torch) is paid once per spawn.
"""

from __future__ import annotations

import gc
import json
import os
import socket
from contextlib import closing
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pykernels import comm

sklearn = pytest.importorskip("sklearn")

HIDDEN = 256
STEPS = 600
BATCH = 32


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def digits():
    """(x_train, y_train, x_test, y_test): a fixed 80/20 split of load_digits."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1437], perm[1437:]
    return x[tr], y[tr], x[te], y[te]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 10),
    )


def make_codec(name: str) -> comm.Codec | None:
    return {
        "allreduce": lambda: None,
        "topk": lambda: comm.TopK(0.01),
        "topk_fp16": lambda: comm.TopK(0.01, value_dtype=torch.float16),
        "quantize8": lambda: comm.Quantize(8),
        "quantize4_ef": lambda: comm.Quantize(4, error_feedback=True),
        "lowrank4": lambda: comm.LowRank(4),
        "chain": lambda: comm.Chain(comm.TopK(0.01), comm.Quantize(8)),
        "topk_exact": lambda: comm.TopK(1.0),
    }[name]()


def batch_of(x_train, y_train, rank: int, step: int):
    """This rank's batch at a step: a function of (rank, step) only, so a resumed run sees
    the same data as the uninterrupted one."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    idx = torch.randint(0, len(x_train), (BATCH,), generator=g)
    return x_train[idx], y_train[idx]


class Run:
    """A DDP model with its optimizer, schedule and (optional) compression state."""

    def __init__(self, codec_name: str, steps: int, start_iter: int = 10, bucket_cap_mb=None):
        self.model = DDP(mlp(), bucket_cap_mb=bucket_cap_mb) if bucket_cap_mb else DDP(mlp())
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.2, momentum=0.9)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=0.2, total_steps=steps, pct_start=0.1
        )
        codec = make_codec(codec_name)
        self.state = None
        if codec is not None:
            self.state = comm.ddp.CompressionState(codec, start_iter=start_iter, model=self.model)
            self.model.register_comm_hook(self.state, comm.ddp.compress_hook)
        self.step_no = 0

    def backward(self, data) -> None:
        x, y = data
        self.opt.zero_grad()
        nn.functional.cross_entropy(self.model(x), y).backward()

    def step(self) -> None:
        self.opt.step()
        self.sched.step()
        self.step_no += 1

    def grads(self) -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in self.model.parameters()])

    def checkpoint(self) -> dict:
        return {
            "model": self.model.module.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "comm": self.state.state_dict() if self.state else None,
            "step": self.step_no,
        }

    def restore(self, ck: dict) -> None:
        self.model.module.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["opt"])
        self.sched.load_state_dict(ck["sched"])
        if self.state is not None:
            self.state.load_state_dict(ck["comm"])
        self.step_no = ck["step"]


def same_on_all_ranks(t: torch.Tensor) -> bool:
    world = dist.get_world_size()
    got = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(got, t)
    return all(torch.equal(g.view(torch.int32), t.view(torch.int32)) for g in got)


# --- workers (top-level: spawned processes import them) ---------------------------------


def accuracy_worker(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    setup(rank, world, port)
    x_train, y_train, x_test, y_test = digits()
    results = {}
    for name in names:
        run = Run(name, STEPS)
        identical = True
        for step in range(STEPS):
            run.backward(batch_of(x_train, y_train, rank, step))
            if step in (0, 50, STEPS - 1):  # allreduce phase and compressed phase
                identical &= same_on_all_ranks(run.grads())
            run.step()
        with torch.no_grad():
            acc = (run.model(x_test).argmax(1) == y_test).float().mean().item() * 100
        results[name] = {
            "acc": acc,
            "identical": identical,
            "stats": run.state.stats() if run.state else None,
        }
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def identical_worker(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    """A few compressed steps per codec: are the averaged gradients the same bits on
    every rank, and close to the true average?"""
    setup(rank, world, port)
    x_train, y_train, _, _ = digits()
    results = {}
    for name in names:
        run = Run(name, 8, start_iter=2, bucket_cap_mb=0.05)  # several buckets
        replica = mlp()
        report = {"identical": True, "max_err": 0.0, "scale": 0.0}
        for step in range(8):
            data = batch_of(x_train, y_train, rank, step)
            replica.load_state_dict(run.model.module.state_dict())
            replica.zero_grad()
            nn.functional.cross_entropy(replica(data[0]), data[1]).backward()
            local = torch.cat([p.grad.reshape(-1) for p in replica.parameters()])
            mean = local.clone()
            dist.all_reduce(mean)
            mean /= world
            run.backward(data)
            g = run.grads()
            report["identical"] &= same_on_all_ranks(g)
            if step >= 2:
                report["max_err"] = max(report["max_err"], float((g - mean).abs().max()))
                report["scale"] = max(report["scale"], float(local.abs().max()))
            run.step()
        report["stats"] = run.state.stats()
        results[name] = report
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


RESUME_AT = 30  # checkpoint after this many steps


def resume_worker(
    rank: int, world: int, port: int, tmp: str, jobs: list[tuple[str, float]], phase: str
) -> None:
    """phase "full": train RESUME_AT + 1 steps, checkpoint after RESUME_AT, keep the
    gradients of the last step. phase "resume": fresh processes load the checkpoint
    and compute that last step. jobs: (codec name, DDP bucket_cap_mb or 0 for the default)."""
    setup(rank, world, port)
    x_train, y_train, _, _ = digits()
    for name, cap in jobs:
        run = Run(name, 100, start_iter=5, bucket_cap_mb=cap or None)
        ck_path = Path(tmp) / f"{name}-{cap}-rank{rank}.pt"
        if phase == "full":
            for step in range(RESUME_AT):
                run.backward(batch_of(x_train, y_train, rank, step))
                run.step()
            torch.save(run.checkpoint(), ck_path)
        else:
            run.restore(torch.load(ck_path, weights_only=False))
        run.backward(batch_of(x_train, y_train, rank, RESUME_AT))
        torch.save(run.grads(), Path(tmp) / f"{name}-{cap}-rank{rank}-{phase}.grad")
    dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    for attempt in range(3):
        try:
            mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)
            return
        except mp.ProcessRaisedException as e:
            # The port was free when picked; another process may take it first.
            busy = "EADDRINUSE" in str(e) or "address already in use" in str(e).lower()
            if not busy or attempt == 2:
                raise


# --- tests -------------------------------------------------------------------------------


def test_digits_accuracy_matches_allreduce_two_processes(tmp_path):
    """600 steps on digits, 2 processes: every codec within 1.5 points of allreduce."""
    out = tmp_path / "acc.json"
    names = ["allreduce", "topk", "quantize8", "lowrank4"]
    spawn(accuracy_worker, 2, str(out), names)
    res = json.loads(out.read_text())
    base = res["allreduce"]["acc"]
    assert base > 95.0
    for name in names:
        assert res[name]["identical"], name
        assert res[name]["acc"] >= base - 1.5, (name, res[name]["acc"], base)
    topk, q8, lr = res["topk"]["stats"], res["quantize8"]["stats"], res["lowrank4"]["stats"]
    assert topk["steps"] == STEPS and topk["compressed_steps"] == STEPS - 10
    # Over the whole run (10 allreduce steps included): TopK 1% moves far fewer bytes.
    assert topk["ratio"] > 15 and q8["ratio"] > 3 and lr["ratio"] > 5


def test_three_processes_identical_and_close_to_the_true_mean(tmp_path):
    out = tmp_path / "same.json"
    names = ["topk", "topk_fp16", "quantize8", "quantize4_ef", "lowrank4", "chain", "topk_exact"]
    spawn(identical_worker, 3, str(out), names)
    res = json.loads(out.read_text())
    for name in names:
        assert res[name]["identical"], name
        assert res[name]["stats"]["compressed_steps"] == 6
    # k = n: exactly the mean, up to the order of the sum.
    assert res["topk_exact"]["max_err"] <= 1e-6 * res["topk_exact"]["scale"]
    # 8 bits: at most a quantization step (max|g| / 127) off the mean.
    assert res["quantize8"]["max_err"] <= res["quantize8"]["scale"] / 127 * 1.01
    for name in ("topk", "lowrank4", "chain"):
        assert 0 < res[name]["max_err"] < 10 * res[name]["scale"]


def test_checkpoint_resume_in_fresh_processes(tmp_path):
    """The step after a resume gives the gradients of the uninterrupted run, bit for bit.

    With DDP's default bucket sizes this small model is one bucket from the
    start. With small buckets, a fresh DDP runs its first iteration on its
    initial layout (here one bucket) and only then rebuilds the one the
    checkpoint was made with: LowRank, whose state is per parameter, still
    matches; the per-bucket codecs resume (their residuals follow the
    parameters) but compress that one step over different buckets.
    """
    exact = [("topk", 0), ("lowrank4", 0), ("quantize4_ef", 0), ("chain", 0), ("lowrank4", 0.1)]
    jobs = exact + [("topk", 0.1)]
    spawn(resume_worker, 2, str(tmp_path), jobs, "full")
    spawn(resume_worker, 2, str(tmp_path), jobs, "resume")
    for name, cap in jobs:
        for rank in range(2):
            full = torch.load(tmp_path / f"{name}-{cap}-rank{rank}-full.grad")
            resumed = torch.load(tmp_path / f"{name}-{cap}-rank{rank}-resume.grad")
            if (name, cap) in exact:
                assert torch.equal(full.view(torch.int32), resumed.view(torch.int32)), (name, cap)
            else:
                assert bool(torch.isfinite(resumed).all()) and not torch.equal(full, resumed)
                rel = float((full - resumed).norm() / full.norm())
                assert rel < 1.0, rel


def test_residuals_follow_the_parameters_across_bucket_layouts(group):
    state = comm.ddp.CompressionState(comm.TopK(0.01), start_iter=2)
    r = {i: torch.randn(n) for i, n in ((0, 5), (1, 3), (2, 4))}
    state.load_state_dict(
        {
            "iter": 7,
            "codec": {"bucket0/residual": torch.cat([r[0], r[1]]), "bucket1/residual": r[2]},
            "layouts": {"bucket0": [[0, 5], [1, 3]], "bucket1": [[2, 4]]},
        }
    )
    # A fresh DDP's first layout: everything in one bucket, in another order.
    state._follow("bucket0", ((2, 4), (0, 5), (1, 3)), torch.device("cpu"))
    sd = state.state_dict()
    assert torch.equal(sd["codec"]["bucket0/residual"], torch.cat([r[2], r[0], r[1]]))
    assert "bucket1/residual" not in sd["codec"] and list(sd["layouts"]) == ["bucket0"]
    # DDP rebuilds: two buckets again.
    state._follow("bucket0", ((0, 5),), torch.device("cpu"))
    state._follow("bucket1", ((1, 3), (2, 4)), torch.device("cpu"))
    sd = state.state_dict()
    assert torch.equal(sd["codec"]["bucket0/residual"], r[0])
    assert torch.equal(sd["codec"]["bucket1/residual"], torch.cat([r[1], r[2]]))
    assert sd["iter"] == 7


# --- in-process (world size 1) ------------------------------------------------------------


@pytest.fixture
def group():
    """A one-process gloo group in this process."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_state_arguments_are_checked(group):
    state = comm.ddp.CompressionState
    with pytest.raises(TypeError, match="codec must be a pykernels.comm codec"):
        state("topk")
    with pytest.raises(ValueError, match="start_iter must be >= 2"):
        state(comm.TopK(0.01), start_iter=1)
    with pytest.raises(ValueError, match="start_iter must be >= 0"):
        state(comm.Quantize(8), start_iter=-1)
    with pytest.raises(TypeError, match="start_iter must be an int"):
        state(comm.Quantize(8), start_iter=2.0)
    with pytest.raises(TypeError, match="process_group must be"):
        state(comm.Quantize(8), process_group="world")
    with pytest.raises(TypeError, match="parameter '0.weight'.*not torch.float64"):
        state(comm.TopK(0.01), model=mlp().double())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        state(comm.TopK(0.01), model=[1])
    state(comm.Quantize(8), start_iter=0)  # no per-bucket state: may start at once
    state(comm.LowRank(4), model=mlp().double())  # LowRank computes fp64 grads in fp32


def test_state_needs_an_initialized_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="not initialized"):
        comm.ddp.CompressionState(comm.TopK(0.01))


def test_hook_refuses_a_dtype_before_communicating(group):
    model = DDP(mlp().double())
    state = comm.ddp.CompressionState(comm.TopK(0.01), start_iter=2)
    model.register_comm_hook(state, comm.ddp.compress_hook)
    with pytest.raises(Exception, match="TopK encodes float32, float16 or bfloat16"):
        model(torch.randn(4, 64, dtype=torch.float64)).sum().backward()


@pytest.mark.parametrize("name", ["topk", "quantize8", "lowrank4", "chain"])
def test_single_process_hook_stats_and_pickle(group, name):
    import pickle

    x_train, y_train, _, _ = digits()
    run = Run(name, 20, start_iter=3)
    for step in range(6):
        run.backward(batch_of(x_train, y_train, 0, step))
        run.step()
    s = run.state.stats()
    assert s["steps"] == 6 and s["compressed_steps"] == 3
    assert s["bytes_sent"] == 0 and s["bytes_dense"] == 0  # one process sends nothing
    clone = pickle.loads(pickle.dumps(run.state))
    assert clone.iter == 6 and clone.process_group is None
    assert repr(clone.codec) == repr(run.state.codec)
    assert repr(run.state).startswith("CompressionState(")


def test_hook_worker_ends_with_its_state_and_at_exit(group):
    """A worker thread alive at interpreter finalization is ended by pthread_exit,
    which aborted DDP processes at exit ("terminate called without an active
    exception"): workers end when their state is collected, and at exit."""
    from pykernels.comm import ddp

    w = ddp._Worker()
    fut = torch.futures.Future()
    w.submit(lambda: torch.ones(2), fut)
    w.stop()
    assert torch.equal(fut.wait(), torch.ones(2)) and not w._thread.is_alive()

    state = comm.ddp.CompressionState(comm.TopK(0.01))
    worker = ddp._worker_of(state)
    assert ddp._worker_of(state) is worker
    thread = worker._thread
    assert worker in ddp._live_workers and thread.is_alive()
    del state
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()

    # What atexit runs: every live worker is stopped and joined.
    others = [ddp._Worker() for _ in range(3)]
    ddp._stop_workers()
    assert not any(o._thread.is_alive() for o in others)
