"""Update compression: codecs against the torch way, and DDP steps against torch's hooks.

Codec cases (CPU, n = 16e6 fp32, encode + decode): TopK(1%) against
``torch.topk`` + gather + scatter (GRACE's TopK), with and without error
feedback (GRACE's residual memory); Quantize(8) and (4) against the same
stochastic bucketed quantization written with torch ops; and the
orthonormalization LowRank needs (``torch.linalg.qr`` against Cholesky-QR and
Gram-Schmidt from torch ops).

The DDP part (:func:`ddp_bench`, printed by :func:`summary`, not run with
``--quick``) runs in child processes: a ~25M-parameter MLP on 2 gloo processes over loopback with
allreduce, torch's ``fp16_compress_hook`` and ``powerSGD_hook`` (rank 4),
and ``comm.ddp.compress_hook`` with TopK(1%), Quantize(8 / 4) and LowRank(4).
Loopback hides the network (and the two ranks share this machine's 2
cores), so each method's step is also projected for a 1 and a 10 Gbit/s
link, as if each rank had a machine: its compute time plus the bytes one
rank sends per step over the bandwidth. Compute time is the same step in a
one-process group on both cores, where no byte moves but every compression
and decompression runs (allreduce: a hook that communicates nothing), plus,
for the all-gather codecs, the measured cost of parsing and adding the
other rank's payloads, which a lone process does not receive. Bytes follow
the ring algorithms: an allreduce of N bytes sends ``2 (W - 1) / W * N`` per
rank, an all-gather of S bytes per rank ``(W - 1) * S``. Accuracy comes from
the digits MLP (the one the tests train) with each method, 2 processes.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from contextlib import closing
from typing import Any

import torch

from .. import comm
from . import Case, Result

N = 16_000_000
QUICK_N = 1_024_000  # a multiple of the 512-element buckets, as N is
GBIT = 1e9 / 8  # bytes per second of a 1 Gbit/s link


# --- codec cases ----------------------------------------------------------------------


def _grace_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    idx = torch.topk(x.abs(), k, sorted=False).indices
    values = x.gather(0, idx)
    return torch.zeros_like(x).scatter_(0, idx, values)


def _grace_topk_ef(x: torch.Tensor, residual: torch.Tensor, k: int) -> torch.Tensor:
    compensated = x + residual
    out = _grace_topk(compensated, k)
    residual.copy_(compensated - out)
    return out


def torch_quantize(x: torch.Tensor, bits: int = 8, bucket: int = 512) -> torch.Tensor:
    """Stochastic bucketed absmax quantization and back, in plain torch (the peer)."""
    lim = 2 ** (bits - 1) - 1
    xb = x.view(-1, bucket)
    scale = xb.abs().amax(1, keepdim=True) / lim
    q = torch.floor(xb / scale + torch.rand(xb.shape)).clamp_(-lim, lim)
    codes = (q + lim).to(torch.uint8)
    if bits == 4:
        flat = codes.view(-1, 2)
        packed = flat[:, 0] | (flat[:, 1] << 4)
        codes = torch.stack([packed & 15, packed >> 4], 1).view(xb.shape)
    return ((codes.float() - lim) * scale).view(-1)


def _roundtrip(codec: comm.Codec, x: torch.Tensor, wire: bool) -> torch.Tensor:
    p = codec.encode(x, key="x")
    if wire:
        p = comm.Payload.from_bytes(p.to_bytes())
    return codec.decode(p)


def _cholesky_qr(p: torch.Tensor) -> torch.Tensor:
    p64 = p.double()
    chol = torch.linalg.cholesky(p64.T @ p64)
    return torch.linalg.solve_triangular(chol, p64.T, upper=False).T.float()


def _gram_schmidt(p: torch.Tensor) -> torch.Tensor:
    p = p.clone()
    for i in range(p.shape[1]):
        col = p[:, i : i + 1]
        col /= col.norm()
        if i + 1 < p.shape[1]:
            rest = p[:, i + 1 :]
            rest -= (col * rest).sum(0, keepdim=True) * col
    return p


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []  # the codecs' native kernels are CPU kernels; CUDA runs the torch backend
    n = QUICK_N if quick else N
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen)
    k = n // 100
    r_grace = torch.zeros(n)
    topk, topk_ef = comm.TopK(0.01, error_feedback=False), comm.TopK(0.01)
    reps = 3 if quick else 5
    out = [
        Case(
            "comm",
            f"TopK 1% n={n}",
            device,
            {
                "GRACE topk+gather+scatter": lambda: _grace_topk(x, k),
                "pk TopK(0.01, ef=False)": lambda: _roundtrip(topk, x, False),
                "pk ... via bytes": lambda: _roundtrip(topk, x, True),
            },
            baseline="GRACE topk+gather+scatter",
            bytes_moved=4 * n,
            reps=reps,
        ),
        Case(
            "comm",
            f"TopK 1% + error feedback n={n}",
            device,
            {
                "GRACE topk + residual memory": lambda: _grace_topk_ef(x, r_grace, k),
                "pk TopK(0.01)": lambda: _roundtrip(topk_ef, x, False),
                "pk ... via bytes": lambda: _roundtrip(topk_ef, x, True),
            },
            baseline="GRACE topk + residual memory",
            bytes_moved=4 * n,
            reps=reps,
        ),
    ]
    for bits in (8, 4):
        q = comm.Quantize(bits)
        out.append(
            Case(
                "comm",
                f"Quantize({bits}) stochastic, bucket 512, n={n}",
                device,
                {
                    f"torch stochastic q{bits}": lambda bits=bits: torch_quantize(x, bits),
                    f"pk Quantize({bits})": lambda q=q: _roundtrip(q, x, False),
                    "pk ... via bytes": lambda q=q: _roundtrip(q, x, True),
                },
                baseline=f"torch stochastic q{bits}",
                bytes_moved=4 * n,
                reps=reps,
            )
        )
    for rows in (4096, 16384):
        p = torch.randn(rows, 4, generator=gen)
        out.append(
            Case(
                "comm",
                f"orthonormalize [{rows}, 4] (LowRank's P)",
                device,
                {
                    "torch.linalg.qr": lambda p=p: torch.linalg.qr(p).Q,
                    "Cholesky-QR (fp64 Gram)": lambda p=p: _cholesky_qr(p),
                    "Gram-Schmidt": lambda p=p: _gram_schmidt(p),
                },
                baseline="torch.linalg.qr",
                reps=50,
            )
        )
    return out


def summary(results: list[Result]) -> str:
    """The DDP comparison (runs its child processes now; see ddp_bench).

    ``COMM_DDP_JSON=path`` also writes its figures there.
    """
    if any(f"n={QUICK_N}" in r.case for r in results):
        return (
            "DDP comparison: not run with --quick (it spawns gloo processes for a few "
            "minutes); run without --quick, or pytest benchmarks/bench_comm.py"
        )
    report = ddp_bench()
    path = os.environ.get("COMM_DDP_JSON")
    if path:  # the CLI's --json holds the codec cases only
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
    return format_ddp(report)


# --- DDP -------------------------------------------------------------------------------

METHODS = (
    "allreduce",
    "fp16_compress_hook",
    "powerSGD_hook r4",
    "pk TopK(0.01)",
    "pk TopK(0.01) fp16 values",
    "pk Quantize(8)",
    "pk Quantize(4)",
    "pk LowRank(4)",
)


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _big_mlp() -> torch.nn.Module:
    """25.2M parameters: 1024 -> 4096 -> 4096 -> 1024 -> 10."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(1024, 4096),
        nn.ReLU(),
        nn.Linear(4096, 4096),
        nn.ReLU(),
        nn.Linear(4096, 1024),
        nn.ReLU(),
        nn.Linear(1024, 10),
    )


def _digits_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def _codec(method: str) -> comm.Codec | None:
    return {
        "pk TopK(0.01)": lambda: comm.TopK(0.01),
        "pk TopK(0.01) fp16 values": lambda: comm.TopK(0.01, value_dtype=torch.float16),
        "pk Quantize(8)": lambda: comm.Quantize(8),
        "pk Quantize(4)": lambda: comm.Quantize(4),
        "pk LowRank(4)": lambda: comm.LowRank(4),
    }.get(method, lambda: None)()


def _waited_powersgd_hook(state, bucket):  # no annotations: DDP checks them as objects
    """torch's powerSGD_hook, waited on before the hook returns.

    It issues its second and third allreduce from future callbacks; on gloo
    those race the next bucket's first allreduce, and the ranks disagree on
    the order (a collective mismatch or a hang, both seen here with this
    model's buckets). Waiting serializes the buckets, which on these CPU
    processes costs little: their compute does not overlap either.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

    fut = powerSGD_hook.powerSGD_hook(state, bucket)
    fut.wait()
    return fut


def _no_comm_hook(_, bucket):
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class _Hooked:
    """A DDP model with `method`'s communication, and its byte counter."""

    def __init__(self, module: torch.nn.Module, method: str, start_iter: int, world: int):
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.model = DDP(module)
        self.method, self.world = method, world
        self.numel = sum(p.numel() for p in module.parameters())
        self.state: Any = None
        codec = _codec(method)
        if codec is not None:
            self.state = comm.ddp.CompressionState(codec, start_iter=start_iter)
            self.model.register_comm_hook(self.state, comm.ddp.compress_hook)
        elif method == "fp16_compress_hook":
            self.model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif method == "powerSGD_hook r4":
            self.state = powerSGD_hook.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=4,
                start_powerSGD_iter=start_iter,
                use_error_feedback=True,
                warm_start=True,
            )
            self.model.register_comm_hook(self.state, _waited_powersgd_hook)
        elif method == "no communication":
            self.model.register_comm_hook(None, _no_comm_hook)
        del dist

    def counter(self) -> float:
        """Bytes this rank has sent so far (ring model), or elements for powerSGD."""
        if isinstance(self.state, comm.ddp.CompressionState):
            return float(self.state.stats()["bytes_sent"])
        if self.method == "powerSGD_hook r4":
            return float(self.state.total_numel_after_compression)
        return 0.0

    def bytes_per_step(self, delta: float, steps: int) -> float:
        """Bytes one rank sends per compressed step."""
        ring = 2 * (self.world - 1) / self.world
        if isinstance(self.state, comm.ddp.CompressionState):
            return delta / steps
        if self.method == "powerSGD_hook r4":
            return delta / steps * 4 * ring  # fp32 P, Q and dense tensors, allreduced
        width = 2 if self.method == "fp16_compress_hook" else 4
        return self.numel * width * ring


def _step_worker(rank: int, world: int, port: int, out: str, methods: list[str], cfg: dict) -> None:
    import torch.distributed as dist

    import pykernels as pk

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    threads = cfg["threads"] // world  # the machine's cores, shared by its ranks
    torch.set_num_threads(threads)
    pk.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(cfg["batch"], 1024, generator=g)
    y = torch.randint(0, 10, (cfg["batch"],), generator=g)
    rows = {}
    for method in methods:
        h = _Hooked(_big_mlp(), method, start_iter=2, world=world)
        opt = torch.optim.SGD(h.model.parameters(), lr=1e-3, momentum=0.9)
        times = []
        before = 0.0
        for step in range(cfg["warmup"] + cfg["steps"]):
            if step == cfg["warmup"]:
                before = h.counter()
            dist.barrier()
            t0 = time.perf_counter()
            torch.nn.functional.cross_entropy(h.model(x), y).backward()
            opt.step()
            opt.zero_grad()
            t = time.perf_counter() - t0
            if step >= cfg["warmup"]:
                times.append(t)
        rows[method] = {
            "step_s": statistics.median(times),
            "bytes": h.bytes_per_step(h.counter() - before, cfg["steps"]),
        }
        del h, opt
    got = [None] * world
    dist.all_gather_object(got, rows)
    if rank == 0:
        # The step is as slow as its slowest rank.
        merged = {
            m: {"step_s": max(r[m]["step_s"] for r in got), "bytes": got[0][m]["bytes"]}
            for m in methods
        }
        with open(out, "w") as f:
            json.dump(merged, f)
    dist.destroy_process_group()


def _digits_worker(rank: int, world: int, port: int, out: str, methods: list[str], cfg: dict):
    import torch.distributed as dist
    from sklearn.datasets import load_digits

    import pykernels as pk

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    pk.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    xs, ys = load_digits(return_X_y=True)
    xs = torch.tensor(xs, dtype=torch.float32) / 16.0
    ys = torch.tensor(ys)
    perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1437], perm[1437:]
    steps = cfg["digits_steps"]
    acc = {}
    for method in methods:
        h = _Hooked(_digits_mlp(), method, start_iter=10, world=world)
        opt = torch.optim.SGD(h.model.parameters(), lr=0.2, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.2, total_steps=steps, pct_start=0.1)
        for step in range(steps):
            gen = torch.Generator().manual_seed(1000 * step + rank)
            idx = tr[torch.randint(0, len(tr), (32,), generator=gen)]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(h.model(xs[idx]), ys[idx]).backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            acc[method] = (h.model(xs[te]).argmax(1) == ys[te]).float().mean().item() * 100
    if rank == 0:
        with open(out, "w") as f:
            json.dump(acc, f)
    dist.destroy_process_group()


def _receive_ms(method: str, threads: int) -> float:
    """What a one-process run leaves out for an all-gather codec: parsing the other
    rank's payload of each bucket and adding it into the mean (median of 5).

    The buckets are DDP's (rebuilt) buckets of the 25M MLP.
    """
    import pykernels as pk

    codec = _codec(method)
    if not isinstance(codec, (comm.TopK, comm.Quantize)):
        return 0.0
    torch.set_num_threads(threads)
    pk.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    blobs = []
    outs = []
    for n in (4_205_578, 16_781_312, 4_198_400):
        blobs.append(codec.encode(torch.randn(n, generator=g) * 1e-3, key=str(n)).to_bytes())
        outs.append(torch.zeros(n))

    def receive():
        for blob, out in zip(blobs, outs, strict=False):
            comm.codecs.sum_into([comm.Payload.from_bytes(blob)], out, scale=0.5)

    receive()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        receive()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _spawn(fn, world: int, methods: list[str], cfg: dict) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        for attempt in range(3):
            try:
                mp.spawn(fn, args=(world, _free_port(), out, methods, cfg), nprocs=world)
                break
            except mp.ProcessRaisedException as e:
                # The port was free when picked; another process may take it first.
                if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
                    raise
                if attempt == 2:
                    raise
        with open(out) as f:
            return json.load(f)


def ddp_bench(quick: bool = False, methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Step times, bytes, projections and digits accuracy of each DDP method (2 processes)."""
    cfg = {
        "batch": 32,
        "warmup": 3,
        "steps": 3 if quick else 5,
        "digits_steps": 300 if quick else 600,
        "threads": 2,  # the machine's cores: 1 per rank with 2 ranks, 2 in the compute run
    }
    t0 = time.perf_counter()
    loop = _spawn(_step_worker, 2, list(methods), cfg)
    compute = _spawn(_step_worker, 1, ["no communication", *methods], cfg)
    acc = _spawn(_digits_worker, 2, list(methods), cfg)
    rows = {}
    base_bytes = loop["allreduce"]["bytes"]
    for m in methods:
        # allreduce's compute is the step with no communication at all; an
        # all-gather codec's adds the other rank's payloads, which a
        # one-process run does not receive.
        receive = _receive_ms(m, cfg["threads"])
        c = compute["no communication" if m == "allreduce" else m]["step_s"] + receive / 1e3
        b = loop[m]["bytes"]
        rows[m] = {
            "loopback_ms": 1e3 * loop[m]["step_s"],
            "compute_ms": 1e3 * c,
            "receive_ms": receive,
            "bytes_per_step": b,
            "fewer_bytes": base_bytes / b if b else float("inf"),
            "proj_1g_ms": 1e3 * (c + b / GBIT),
            "proj_10g_ms": 1e3 * (c + b / (10 * GBIT)),
            "digits_acc": acc.get(m),
        }
    for bw in ("proj_1g_ms", "proj_10g_ms"):
        for m in methods:
            rows[m][bw.replace("proj", "speedup")] = rows["allreduce"][bw] / rows[m][bw]
    return {
        "rows": rows,
        "config": {**cfg, "params": sum(p.numel() for p in _big_mlp().parameters()), "world": 2},
        "seconds": time.perf_counter() - t0,
    }


def format_ddp(report: dict[str, Any]) -> str:
    cfg = report["config"]
    head = (
        f"DDP step, 2 gloo processes over loopback (1 thread each; compute: 1 process, "
        f"{cfg['threads']} threads), MLP {cfg['params'] / 1e6:.1f}M params, "
        f"batch {cfg['batch']} per rank, median of {cfg['steps']} steps after "
        f"{cfg['warmup']}; digits accuracy after {cfg['digits_steps']} steps"
    )
    cols = (
        "method",
        "loopback ms",
        "compute ms",
        "recv ms",
        "MB/step/rank",
        "x fewer B",
        "1Gb/s ms",
        "x allreduce",
        "10Gb/s ms",
        "x allreduce",
        "digits %",
    )
    lines = [cols]
    for m, r in report["rows"].items():
        acc = r["digits_acc"]
        lines.append(
            (
                m,
                f"{r['loopback_ms']:.0f}",
                f"{r['compute_ms']:.0f}",
                f"{r['receive_ms']:.1f}",
                f"{r['bytes_per_step'] / 1e6:.3f}",
                f"{r['fewer_bytes']:.1f}",
                f"{r['proj_1g_ms']:.0f}",
                f"{r['speedup_1g_ms']:.2f}",
                f"{r['proj_10g_ms']:.0f}",
                f"{r['speedup_10g_ms']:.2f}",
                "" if acc is None else f"{acc:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(cols))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return head + "\n" + "\n".join(text) + f"\n({report['seconds']:.0f} s)"
