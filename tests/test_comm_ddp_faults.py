"""comm.ddp under faults: NaN and inf steps, and a collective that times out.

Two gloo processes train the digits MLP of test_comm_ddp. One rank's gradient
turns all-NaN at one step, the other's gets a few inf entries at another:
that step's mean is non-finite on every rank (AMP's GradScaler would skip it,
as this loop does), and every later step's mean is finite again, with no
residual holding a non-finite value.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_comm_ddp import Run, batch_of, digits, free_port, mlp, same_on_all_ranks, spawn
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pykernels import comm
from pykernels.comm.base import all_finite

pytest.importorskip("sklearn")

STEPS = 14
NAN_STEP = (6, 1)  # (step, rank): that rank's whole gradient is NaN
INF_STEP = (10, 0)  # a few entries of that rank's gradient are inf
CODECS = ["topk", "topk_fp16", "chain", "quantize4_ef", "lowrank4"]


def tensor_state(state: comm.ddp.CompressionState) -> dict[str, torch.Tensor]:
    sd = state.codec.state_dict()
    return {k: v.clone() for k, v in sd.items() if not k.endswith("/step")}


def bucket_order_grads(run: Run, local: list[torch.Tensor]) -> torch.Tensor:
    """This rank's own gradient laid out as the hook's residual of bucket 0."""
    ids = run.state._param_ids
    by_number = {ids[id(p)]: g for p, g in zip(run.model.parameters(), local, strict=True)}
    return torch.cat([by_number[i].reshape(-1) for i, _ in run.state._layouts["bucket0"]])


def check_fault_step(run, name, step, faulty, before, after, local) -> tuple[bool, bool]:
    """(state of what was not finite is unchanged, the rest holds its whole update).

    Nobody applies a step that is not finite on some rank, so every rank takes
    back what it sent: a residual that sent something becomes
    ``residual_before + x`` (exactly, for TopK), and one whose input was not
    finite (or, for LowRank, whose allreduced factors were not) stays as it was.
    """

    def same(keys) -> bool:
        return all(torch.equal(after[k], before[k]) for k in keys)

    if name != "lowrank4":  # one bucket holds every parameter
        if faulty:
            return same(after) and after.keys() == before.keys(), True
        key = "first.bucket0/residual" if name == "chain" else "bucket0/residual"
        want = before[key] + bucket_order_grads(run, local)
        if name.startswith("topk"):
            return True, torch.equal(after[key], want)
        return True, torch.allclose(after[key], want, rtol=0, atol=1e-6)
    # LowRank: per parameter. At the NaN step every parameter of one rank was
    # NaN; at the inf step only the first weight, on one rank.
    ids = run.state._param_ids
    params = list(run.model.parameters())
    ok_bad = ok_rest = True
    for j, (p, g) in enumerate(zip(params, local, strict=True)):
        key = f"param{ids[id(p)]}"
        if f"{key}/residual" not in after:
            continue  # a vector: sent dense, no state
        if step == NAN_STEP[0] or j == 0:
            ok_bad &= same([f"{key}/residual", f"{key}/q"])
        else:
            want = before[f"{key}/residual"] + g
            ok_rest &= torch.allclose(after[f"{key}/residual"], want, rtol=0, atol=1e-5)
    return ok_bad, ok_rest


def faults_worker(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x_train, y_train, _, _ = digits()
    results = {}
    for name in names:
        run = Run(name, STEPS, start_iter=2)
        replica = mlp()
        rep: dict = {
            "fault_step_not_finite": True,
            "later_steps_finite": True,
            "identical": True,
            "faulty_rank_state_unchanged": True,
            "healthy_rank_state": True,
            "residuals_finite": True,
            "skipped": 0,
        }
        for step in range(STEPS):
            x, y = batch_of(x_train, y_train, rank, step)
            replica.load_state_dict(run.model.module.state_dict())
            replica.zero_grad()
            nn.functional.cross_entropy(replica(x), y).backward()
            local = [p.grad.clone() for p in replica.parameters()]
            before = tensor_state(run.state)
            faulty = (step, rank) in (NAN_STEP, INF_STEP)
            handle = None
            if (step, rank) == INF_STEP:
                first = next(run.model.module.parameters())

                def poison(g: torch.Tensor) -> torch.Tensor:
                    g = g.clone()
                    g.view(-1)[[0, 5, 77]] = float("inf")
                    return g

                handle = first.register_hook(poison)
            run.opt.zero_grad()
            loss = nn.functional.cross_entropy(run.model(x), y)
            if (step, rank) == NAN_STEP:
                loss = loss * float("nan")
            loss.backward()
            if handle is not None:
                handle.remove()
            g = run.grads()
            rep["identical"] &= same_on_all_ranks(g)
            finite = bool(torch.isfinite(g).all())
            after = tensor_state(run.state)
            if step in (NAN_STEP[0], INF_STEP[0]):
                rep["fault_step_not_finite"] &= not finite
                ok_faulty, ok_healthy = check_fault_step(
                    run, name, step, faulty, before, after, local
                )
                rep["faulty_rank_state_unchanged"] &= ok_faulty
                rep["healthy_rank_state"] &= ok_healthy
            elif step > NAN_STEP[0]:
                rep["later_steps_finite"] &= finite
            rep["residuals_finite"] &= all(all_finite(t) for t in after.values())
            if finite:
                run.step()
            else:  # what GradScaler does with a non-finite step: skip it
                rep["skipped"] += 1
        results[name] = rep
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def test_nan_and_inf_steps_never_enter_error_feedback(tmp_path):
    out = tmp_path / "faults.json"
    spawn(faults_worker, 2, str(out), CODECS)
    res = json.loads(out.read_text())
    for name in CODECS:
        r = res[name]
        assert r["skipped"] == 2, (name, r)  # the two fault steps, no other
        for check in (
            "fault_step_not_finite",  # AMP sees the bad step on every rank
            "later_steps_finite",  # and only that step
            "identical",
            "faulty_rank_state_unchanged",
            "healthy_rank_state",
            "residuals_finite",
        ):
            assert r[check], (name, check)


# --- a collective that fails -----------------------------------------------------------


def timeout_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=3))
    x_train, y_train, _, _ = digits()
    run = Run("topk", 20, start_iter=2)
    for step in range(4):
        run.backward(batch_of(x_train, y_train, rank, step))
        run.step()
    flag = Path(tmp) / "error.txt"
    if rank == 0:
        try:
            run.backward(batch_of(x_train, y_train, rank, 4))  # rank 1 never joins
            msg = "no error"
        except Exception as e:  # what DDP's backward raises
            msg = f"{type(e).__name__}: {e}"
        flag.write_text(msg)
    else:
        deadline = time.time() + 120
        while not flag.exists() and time.time() < deadline:
            time.sleep(0.2)
    # The group is broken now: leave without its teardown (or the hook's thread).
    os._exit(0)


def test_a_collective_timeout_surfaces_its_own_error(tmp_path):
    spawn(timeout_worker, 2, str(tmp_path))
    msg = (tmp_path / "error.txt").read_text()
    assert "Unable to cast" not in msg, msg
    assert "timed out" in msg.lower() or "timeout" in msg.lower(), msg


@pytest.fixture
def group():
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


class Broken(comm.TopK):
    """A TopK whose encode fails the way a worker's job can (here, in process)."""

    def encode(self, tensor, key=None):
        raise RuntimeError("boom: the job's own error")


def test_a_failing_job_surfaces_its_own_error_from_backward(group):
    model = DDP(mlp())
    state = comm.ddp.CompressionState(Broken(0.1, error_feedback=False), start_iter=0)
    model.register_comm_hook(state, comm.ddp.compress_hook)
    with pytest.raises(RuntimeError, match="RuntimeError: boom: the job's own error") as e:
        model(torch.randn(4, 64)).sum().backward()
    assert "Unable to cast" not in str(e.value)
    # the hook's worker survives a failed job: a working codec runs on afterwards
    ok = DDP(mlp())
    state = comm.ddp.CompressionState(comm.TopK(0.1, error_feedback=False), start_iter=0)
    ok.register_comm_hook(state, comm.ddp.compress_hook)
    ok(torch.randn(4, 64)).sum().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in ok.parameters())
