"""``python -m pykernels federated``: Flower simulations of compressed federated learning.

One ``flwr.simulation.run_simulation`` per codec (Ray backend, offline) on
scikit-learn's bundled digits, split non-IID across clients (a Dirichlet
over the labels), training a small MLP with FedAvg. The clients run
:func:`~pykernels.comm.flower.compression_mod`, the server
:class:`~pykernels.comm.flower.Compressed`; accuracy is measured on the
server on the held-out test split after every round.

``--faults ROUND:PARTITION:KIND,...`` injects faults into chosen clients'
rounds (kinds in :data:`FAULTS`), to measure what a run loses to them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import _digits
from .codecs import Chain, Codec, Quantize, TopK
from .lowrank import LowRank

HIDDEN = 128

#: what ``--faults`` can inject into a client's round
FAULTS = {
    "nan": "the trained arrays hold a NaN (a non-finite update: the mod refuses it)",
    "mismatch": "the reply's arrays are not the ones received (the mod refuses it)",
    "corrupt": "a byte of one payload flipped on the way (the server refuses it)",
    "raise": "the ClientApp raises (Flower reports a failure)",
    "slow": "the client takes SECONDS (slow:SECONDS) longer, past a round timeout",
}


@dataclass
class Setup:
    """What every simulation of a comparison shares."""

    clients: int = 10
    rounds: int = 30
    alpha: float = 0.5
    seed: int = 0
    local_epochs: int = 2
    lr: float = 0.1
    batch: int = 32
    #: (round, partition id, kind) faults; kind is a key of FAULTS ("slow:SECONDS")
    faults: tuple[tuple[int, int, str], ...] = ()
    timeout: float = 3600.0  # Strategy.start's round timeout (Flower's default)


@dataclass
class Run:
    """One simulation's outcome."""

    codec: str
    uplink_bytes: list[int] = field(default_factory=list)  # per round
    dense_bytes: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)  # after each round (percent)
    refused: int = 0
    wall_s: float = 0.0
    codec_state_arrays: list[float] = field(default_factory=list)  # per round, client mean
    failed: int = 0  # error replies, all rounds
    failed_per_round: list[int] = field(default_factory=list)
    refused_per_round: list[int] = field(default_factory=list)
    missing_per_round: list[int] = field(default_factory=list)  # no reply by the timeout
    wait_s: list[float] = field(default_factory=list)  # per round, waiting for replies
    #: per round: {partition id: [codec state round, sum of |codec state|]} of the
    #: replies aggregated (the state each client's round started from)
    client_state: list[dict[int, list[float]]] = field(default_factory=list)

    @property
    def uplink_total(self) -> int:
        return sum(self.uplink_bytes)

    @property
    def ratio(self) -> float:
        return sum(self.dense_bytes) / self.uplink_total if self.uplink_total else math.nan

    @property
    def final_accuracy(self) -> float:
        return self.accuracy[-1] if self.accuracy else math.nan

    def rounds_to(self, target: float) -> int | None:
        for i, a in enumerate(self.accuracy, 1):
            if a >= target:
                return i
        return None


def parse_codec(spec: str) -> Codec | None:
    """``none``, ``topk:RATIO``, ``quant:BITS``, ``lowrank:RANK``, ``topk:RATIO+quant:BITS``."""
    spec = spec.strip().lower()
    if spec == "none":
        return None
    parts = spec.split("+")
    if len(parts) == 2:
        first, second = parse_codec(parts[0]), parse_codec(parts[1])
        if isinstance(first, TopK) and isinstance(second, Quantize):
            return Chain(first, second)
        raise ValueError(f"codec {spec!r}: a chain is topk:RATIO+quant:BITS")
    name, _, arg = spec.partition(":")
    try:
        if name == "topk":
            return TopK(float(arg or 0.01))
        if name == "quant":
            return Quantize(int(arg or 8))
        if name == "lowrank":
            return LowRank(int(arg or 4))
    except ValueError as e:
        raise ValueError(f"codec {spec!r}: {e}") from None
    raise ValueError(f"codec {spec!r}: expected none, topk:R, quant:BITS, lowrank:RANK")


@lru_cache(maxsize=4)
def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _digits.data(seed)


@lru_cache(maxsize=16)
def partition(clients: int, alpha: float, seed: int) -> tuple[np.ndarray, ...]:
    """Indices of the training split per client: a Dirichlet(alpha) over clients per label.

    Redrawn (the same seeded generator) until every client holds at least 10
    examples, the usual way to keep a client from being empty.
    """
    _, ytr, _, _ = _data(seed)
    y = ytr.numpy()
    rng = np.random.default_rng(seed)
    while True:
        shards: list[list[int]] = [[] for _ in range(clients)]
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(y == c))
            p = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for shard, part in zip(shards, np.split(idx, cuts), strict=True):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= 10:
            return tuple(np.sort(np.array(s, dtype=np.int64)) for s in shards)


def parse_faults(spec: str) -> tuple[tuple[int, int, str], ...]:
    """``ROUND:PARTITION:KIND,...`` (KIND in FAULTS; ``slow:SECONDS``) as Setup.faults."""
    out = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        parts = item.split(":")
        try:
            rnd, pid, kind = int(parts[0]), int(parts[1]), ":".join(parts[2:])
            name, _, arg = kind.partition(":")
            if name not in FAULTS or (name == "slow") != bool(arg):
                raise ValueError
            if arg:
                float(arg)
        except (ValueError, IndexError):
            raise ValueError(
                f"fault {item!r}: expected ROUND:PARTITION:KIND, KIND one of "
                f"{sorted(FAULTS)} (slow:SECONDS)"
            ) from None
        out.append((rnd, pid, kind))
    return tuple(out)


def _fault(setup: Setup, rnd: int, pid: int) -> str | None:
    for r, p, kind in setup.faults:
        if (r, p) == (rnd, pid):
            return kind
    return None


def _corrupt_mod(setup: Setup) -> Callable:
    """A client mod outside compression_mod: flips one byte of one payload of the
    replies that ``setup.faults`` marks "corrupt" (a link that damages data)."""
    from flwr.app import ConfigRecord

    from .flower import UPDATE_RECORD

    def corrupt_on_the_way(msg: Any, ctx: Any, call_next: Callable) -> Any:
        rnd = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
        pid = int(ctx.node_config.get("partition-id", -1))
        out = call_next(msg, ctx)
        if _fault(setup, rnd, pid) == "corrupt" and not out.has_error():
            blobs = dict(out.content[UPDATE_RECORD])
            name = sorted(blobs)[0]
            b = bytearray(blobs[name])
            b[len(b) // 2] ^= 0x40
            blobs[name] = bytes(b)
            out.content[UPDATE_RECORD] = ConfigRecord(blobs)
        return out

    return corrupt_on_the_way


def _state_summary(ctx: Any) -> tuple[int, float]:
    """(round of the codec state's last send, sum of |its arrays|): what the client starts from."""
    from .flower import STATE_CODEC, STATE_META

    meta = ctx.state.get(STATE_META)
    held = ctx.state.get(STATE_CODEC)
    total = 0.0 if held is None else sum(float(np.abs(a.numpy()).sum()) for a in held.values())
    return (-1 if meta is None else int(meta["round"])), total


def _client_app(codec: Codec | None, setup: Setup) -> Any:
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from .flower import STATE_CODEC, compression_mod

    mods = [compression_mod(codec)]
    if any(kind == "corrupt" for _, _, kind in setup.faults):
        mods.insert(0, _corrupt_mod(setup))
    app = ClientApp(mods=mods)

    def local(ctx: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
        pid = int(ctx.node_config["partition-id"])
        xtr, ytr, _, _ = _data(setup.seed)
        idx = torch.from_numpy(partition(setup.clients, setup.alpha, setup.seed)[pid])
        return xtr[idx], ytr[idx], pid

    @app.train()
    def train(msg: Message, ctx: Any) -> Message:
        torch.set_num_threads(1)
        # What the mod's state holds as this round starts: the codec state persists
        # only if Flower keeps the node's Context.state across rounds.
        held = ctx.state.get(STATE_CODEC)
        state_arrays = 0 if held is None else len(held)
        x, y, pid = local(ctx)
        model = _digits.mlp(setup.seed, HIDDEN)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        rnd = int(msg.content["config"]["server-round"])
        state_round, state_sum = _state_summary(ctx)
        fault = _fault(setup, rnd, pid)
        if fault == "raise":
            raise RuntimeError(f"injected fault: client {pid} fails in round {rnd}")
        if fault is not None and fault.startswith("slow:"):
            time.sleep(float(fault.split(":", 1)[1]))
        opt = torch.optim.SGD(model.parameters(), lr=setup.lr, momentum=0.9)
        g = torch.Generator().manual_seed(setup.seed * 1_000_003 + pid * 1009 + rnd)
        total = 0.0
        for _ in range(setup.local_epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), setup.batch):
                b = perm[i : i + setup.batch]
                opt.zero_grad()
                loss = F.cross_entropy(model(x[b]), y[b])
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
        metrics = MetricRecord(
            {
                "num-examples": len(x),
                "train-loss": total / (len(x) * setup.local_epochs),
                "codec-state-arrays": state_arrays,
                "partition-id": pid,
                "codec-state-round": state_round,
                "codec-state-sum": state_sum,
            }
        )
        arrays = ArrayRecord(model.state_dict())
        if fault == "nan":
            w = arrays["0.weight"].numpy().copy()
            w[0, 0] = np.nan
            arrays["0.weight"] = Array(w)
        elif fault == "mismatch":
            w = arrays["0.weight"].numpy()
            arrays["0.weight"] = Array(np.ascontiguousarray(w[:, :-1]))
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.query()
    def ping(msg: Message, ctx: Any) -> Message:
        local(ctx)  # loads the data (sklearn) in this actor: the first round's slow part
        _digits.mlp(setup.seed, HIDDEN)
        return Message(RecordDict(), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, ctx: Any) -> Message:
        x, y, _ = local(ctx)
        model = _digits.mlp(setup.seed, HIDDEN)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        metrics = MetricRecord({"num-examples": len(x), "accuracy": _digits.accuracy(model, x, y)})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def simulate(spec: str, setup: Setup, strategy_factory: Any = None) -> Run:
    """One Flower simulation (Ray backend) of ``setup`` with the codec ``spec``."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from .flower import Compressed

    codec = parse_codec(spec)
    _, _, xte, yte = _data(setup.seed)
    out: dict[str, Any] = {}
    server = ServerApp()

    def central(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        model = _digits.mlp(setup.seed, HIDDEN)
        model.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": _digits.accuracy(model, xte, yte)})

    states: dict[int, dict[int, list[float]]] = {}

    @server.main()
    def main(grid: Any, context: Any) -> None:
        inner = (
            strategy_factory()
            if strategy_factory is not None
            else FedAvg(
                fraction_evaluate=0.0,
                min_train_nodes=setup.clients,
                min_available_nodes=setup.clients,
            )
        )
        strategy = Compressed(inner)
        compressed_aggregate = strategy.aggregate_train

        def seen(rnd: int, replies: Any) -> Any:
            # The state each client started its round from, from every reply
            # that came back (refused ones included; the metrics are averaged
            # over clients once aggregated).
            replies = list(replies)
            for r in replies:
                if not r.has_error():
                    m = r.content["metrics"]
                    states.setdefault(rnd, {})[int(m["partition-id"])] = [
                        float(m["codec-state-round"]),
                        float(m["codec-state-sum"]),
                    ]
            return compressed_aggregate(rnd, replies)

        strategy.aggregate_train = seen
        # One query per node first, without a timeout: Ray starts its actors and
        # they import torch (seconds) here, not in round 1's time.
        nodes: list[int] = []
        for _ in range(600):  # the nodes register with the server as they start
            nodes = list(grid.get_node_ids())
            if len(nodes) >= setup.clients:
                break
            time.sleep(0.1)
        ping = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        list(grid.send_and_receive(ping, timeout=None))
        out["result"] = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(_digits.mlp(setup.seed, HIDDEN).state_dict()),
            num_rounds=setup.rounds,
            timeout=setup.timeout,
            train_config=ConfigRecord(),
            evaluate_fn=central,
        )

    t0 = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=_client_app(codec, setup),
        num_supernodes=setup.clients,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "log_to_driver": False},
        },
    )
    wall = time.perf_counter() - t0
    res = out.get("result")
    if res is None:
        raise RuntimeError(f"the {spec} simulation ended without a result (see the log above)")
    rounds = range(1, setup.rounds + 1)
    return Run(
        codec=spec,
        uplink_bytes=[res.uplink_bytes.get(r, 0) for r in rounds],
        dense_bytes=[res.dense_bytes.get(r, 0) for r in rounds],
        accuracy=[float(res.evaluate_metrics_serverapp[r]["accuracy"]) for r in rounds],
        refused=sum(len(v) for v in res.refused.values()),
        wall_s=wall,
        codec_state_arrays=[
            float(res.train_metrics_clientapp[r]["codec-state-arrays"])
            if r in res.train_metrics_clientapp
            else math.nan
            for r in rounds
        ],
        failed=sum(len(v) for v in res.failed.values()),
        failed_per_round=[len(res.failed.get(r, [])) for r in rounds],
        refused_per_round=[len(res.refused.get(r, [])) for r in rounds],
        missing_per_round=[len(res.missing.get(r, [])) for r in rounds],
        wait_s=[float(res.wait_s.get(r, math.nan)) for r in rounds],
        client_state=[states.get(r, {}) for r in rounds],
    )


def table(runs: list[Run], target: float = 90.0) -> str:
    base = next((r for r in runs if r.codec == "none"), None)
    lines = [
        "| codec | uplink MB total | compression ratio | x fewer bytes than none "
        f"| final test accuracy (%) | vs none (points) | rounds to {target:g}% | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        fewer = base.uplink_total / r.uplink_total if base and r.uplink_total else math.nan
        delta = r.final_accuracy - base.final_accuracy if base else math.nan
        reach = r.rounds_to(target)
        lines.append(
            f"| {r.codec} | {r.uplink_total / 1e6:.3f} | {r.ratio:.2f}x | {fewer:.2f}x "
            f"| {r.final_accuracy:.2f} | {delta:+.2f} | {reach if reach else '-'} "
            f"| {r.wall_s:.1f} |"
        )
    return "\n".join(lines)


def rounds_table(r: Run) -> str:
    """One line per round: accuracy, failures, refusals, missing replies, wait."""
    lines = [
        "| round | accuracy (%) | failed | refused | no reply | waited s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i in range(len(r.accuracy)):
        lines.append(
            f"| {i + 1} | {r.accuracy[i]:.2f} | {r.failed_per_round[i]} "
            f"| {r.refused_per_round[i]} | {r.missing_per_round[i]} | {r.wait_s[i]:.1f} |"
        )
    return "\n".join(lines)


def plot(runs: list[Run], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(
            "--plot needs matplotlib: pip install 'pykernels[plot]' (or [federated])"
        ) from e
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.plot(np.cumsum(r.uplink_bytes) / 1e6, r.accuracy, marker=".", label=r.codec)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink (MB, all clients)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Flower FedAvg on digits, non-IID (Dirichlet 0.5): accuracy per uplink byte")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    try:
        import flwr
    except ImportError:
        print("python -m pykernels federated needs Flower: pip install 'pykernels[federated]'")
        return 2
    from .._cli import UsageError

    specs = [s for s in args.codec.split(",") if s.strip()]
    for s in specs:
        try:
            parse_codec(s)  # bad specs fail before any simulation starts
        except ValueError as e:
            raise UsageError(f"--codec: {e}") from None
    setup = Setup(
        clients=args.clients,
        rounds=args.rounds,
        alpha=args.alpha,
        seed=args.seed,
        local_epochs=args.local_epochs,
        lr=args.lr,
        faults=parse_faults(args.faults or ""),
        timeout=args.timeout,
    )
    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    runs = []
    for s in specs:
        r = simulate(s.strip(), setup)
        print(
            f"{r.codec}: {r.uplink_total / 1e6:.3f} MB up, {r.ratio:.2f}x, "
            f"accuracy {r.final_accuracy:.2f}%, {r.wall_s:.1f} s",
            flush=True,
        )
        if setup.faults:
            print(rounds_table(r))
        runs.append(r)
    print()
    print(
        f"Flower {flwr.__version__}, {setup.clients} clients, {setup.rounds} rounds, "
        f"digits non-IID (Dirichlet alpha={setup.alpha}, seed {setup.seed}), "
        f"MLP 64-{HIDDEN}-{HIDDEN}-10, {setup.local_epochs} local epochs of SGD per round"
    )
    print(table(runs))
    if setup.faults:
        print(f"faults: {setup.faults}, round timeout {setup.timeout:g} s")
    if args.plot:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "flwr": flwr.__version__,
                    "setup": asdict(setup),
                    "runs": [asdict(r) for r in runs],
                },
                f,
                indent=1,
            )
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "federated",
        help="Flower simulations of FedAvg with compressed updates, one per codec",
    )
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument(
        "--codec",
        default="none,topk:0.01,quant:8,lowrank:4",
        help="comma-separated: none, topk:RATIO, quant:BITS, lowrank:RANK, topk:R+quant:B",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--plot", metavar="PATH.png", help="accuracy vs cumulative uplink bytes")
    p.add_argument("--json", metavar="PATH", help="write every round's figures as JSON")
    p.add_argument(
        "--faults",
        metavar="R:P:KIND,...",
        help="inject faults: in round R, client (partition) P; KIND: "
        + ", ".join(f"{k} ({v})" for k, v in FAULTS.items()),
    )
    p.add_argument(
        "--timeout", type=float, default=3600.0, help="round timeout, s (Flower's default)"
    )
    p.add_argument("--verbose", action="store_true", help="Flower's INFO log")
    p.set_defaults(fn=run)
