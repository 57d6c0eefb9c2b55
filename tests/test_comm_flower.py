"""pykernels.comm.flower: the client mod and the strategy wrapper on real Flower messages.

Everything but the last test runs without Ray: the ClientApp (with the mod)
and the strategy's configure/aggregate are called directly on Flower
``Message`` objects, through a small in-process grid.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp.strategy import (  # noqa: E402
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
)
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from pykernels import comm  # noqa: E402
from pykernels.comm import _flower_demo as demo  # noqa: E402
from pykernels.comm import flower as pkf  # noqa: E402

NODES = [11, 12, 13]


@pytest.fixture(autouse=True)
def _task_identity():
    # Messages built outside a Flower runtime need a run and node identity.
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    logging.getLogger("flwr").setLevel(logging.WARNING)
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def global_arrays(seed: int = 0) -> ArrayRecord:
    g = np.random.default_rng(seed)
    return ArrayRecord(
        {
            "fc1.weight": Array(g.standard_normal((48, 40)).astype(np.float32)),
            "fc1.bias": Array(g.standard_normal(48).astype(np.float32)),
            "fc2.weight": Array(g.standard_normal((10, 48)).astype(np.float16)),
            "steps": Array(np.arange(5, dtype=np.int64)),
            "mask": Array(g.random(7) > 0.5),
            "scale64": Array(g.standard_normal(3)),  # float64: passes through
        }
    )


def float_arrays(seed: int = 0) -> ArrayRecord:
    """Arrays whose dtypes survive FedAvg (it averages int and bool arrays into float64)."""
    a = global_arrays(seed)
    return ArrayRecord({k: v for k, v in a.items() if k not in ("steps", "mask")})


def make_context(node: int) -> Context:
    return Context(
        run_id=7,
        node_id=node,
        node_config={"partition-id": NODES.index(node) if node in NODES else 0},
        state=RecordDict(),
        run_config={},
    )


class LocalTrainer:
    """A ClientApp body: new arrays = received + a fresh random step (kept for the test)."""

    def __init__(self) -> None:
        self.received: dict[int, dict[str, np.ndarray]] = {}
        self.sent: dict[int, dict[str, np.ndarray]] = {}
        self.calls = 0

    def __call__(self, msg: Message, ctx: Context) -> Message:
        self.calls += 1
        rnd = int(msg.content["config"].get("server-round", 0))
        g = np.random.default_rng(ctx.node_id * 1000 + rnd)
        received = {k: a.numpy() for k, a in msg.content["arrays"].items()}
        new = {}
        for k, a in received.items():
            if a.dtype.kind == "f":
                new[k] = (a + 0.1 * g.standard_normal(a.shape)).astype(a.dtype)
            else:
                new[k] = a + 1 if a.dtype.kind == "i" else ~a
        self.received[ctx.node_id] = received
        self.sent[ctx.node_id] = new
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in new.items()}),
                "metrics": MetricRecord({"num-examples": 10 * ctx.node_id, "loss": 1.0}),
            }
        )
        return Message(content, reply_to=msg)


def client_app(codec, trainer: LocalTrainer | None = None) -> tuple[ClientApp, LocalTrainer]:
    trainer = trainer or LocalTrainer()
    mods = [] if codec == "plain" else [pkf.compression_mod(codec)]
    app = ClientApp(mods=mods)
    app.train()(trainer)

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        n = sum(int(a.numpy().size) for a in msg.content["arrays"].values())
        return Message(RecordDict({"metrics": MetricRecord({"n": n})}), reply_to=msg)

    return app, trainer


class Grid:
    """The part of Flower's Grid a strategy uses, delivering to ClientApps in process."""

    def __init__(self, app: ClientApp, nodes=NODES) -> None:
        self.app = app
        self.ctx = {n: make_context(n) for n in nodes}
        self.drop: set[int] = set()  # nodes whose reply never arrives

    def get_node_ids(self):
        return list(self.ctx)

    def send_and_receive(self, messages, timeout=None):
        out = [self.app(m, self.ctx[m.metadata.dst_node_id]) for m in messages]
        out = [r for r in out if r.metadata.src_node_id not in self.drop]
        return sorted(out, key=lambda r: r.metadata.src_node_id)


def one_round(strategy, app, arrays=None, rnd=1, grid=None):
    grid = grid or Grid(app)
    msgs = list(strategy.configure_train(rnd, arrays or global_arrays(), ConfigRecord(), grid))
    replies = grid.send_and_receive(msgs)
    return grid, replies


def f32(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.array(a), dtype=torch.float32)


def residual(ctx: Context, name: str, prefix: str = "") -> torch.Tensor | None:
    rec = ctx.state.get(pkf.STATE_CODEC)
    key = f"{prefix}{name}/residual"
    if rec is None or key not in rec:
        return None
    return torch.tensor(np.array(rec[key].numpy()))


CODECS = {
    "topk": lambda: comm.TopK(0.05),
    "quant8": lambda: comm.Quantize(8),
    "lowrank": lambda: comm.LowRank(2),
    "chain": lambda: comm.Chain(comm.TopK(0.1), comm.Quantize(8, stochastic=False)),
}


# --- the uplink: what a client sends decodes to what it computed -------------------


@pytest.mark.parametrize("name", list(CODECS))
def test_reply_decodes_to_the_client_update(name):
    codec = CODECS[name]()
    app, trainer = client_app(codec)
    strategy = pkf.Compressed(FedAvg())
    grid, replies = one_round(strategy, app)
    assert len(replies) == len(NODES)
    for reply in replies:
        node = reply.metadata.src_node_id
        assert not reply.has_error()
        assert set(reply.content.config_records) == {pkf.UPDATE_RECORD}
        blobs = reply.content[pkf.UPDATE_RECORD]
        # float32/float16 arrays go as payloads, the others as they are.
        assert sorted(blobs) == ["fc1.bias", "fc1.weight", "fc2.weight"]
        assert sorted(reply.content["arrays"]) == ["mask", "scale64", "steps"]
        decoded, up, dense = strategy.decode_reply(reply)
        full = decoded.content["arrays"]
        assert list(full.keys()) == list(global_arrays().keys())
        assert set(decoded.content.config_records) == set()
        for k in ("steps", "mask", "scale64"):
            np.testing.assert_array_equal(full[k].numpy(), trainer.sent[node][k])
        for k in blobs:
            x = f32(trainer.sent[node][k]) - f32(trainer.received[node][k])  # the update
            p = comm.Payload.from_bytes(blobs[k])
            upd = comm.decode(p).float()
            ref_full = (f32(trainer.received[node][k]) + upd).numpy()
            assert full[k].numpy().dtype == trainer.sent[node][k].dtype
            np.testing.assert_array_equal(
                full[k].numpy(), ref_full.astype(trainer.sent[node][k].dtype)
            )
            r_after = residual(grid.ctx[node], k, "first." if name == "chain" else "")
            if name in ("topk", "chain"):
                # error feedback, first round: x == decoded + r_after, exactly
                assert torch.equal(x, upd + r_after.view_as(x))
                assert int((upd != 0).sum()) <= p.params["k"]
            elif name == "lowrank":
                if p.codec == "lowrank":
                    torch.testing.assert_close(upd + r_after.view_as(x), x, rtol=0, atol=1e-5)
                else:  # a vector: sent dense
                    assert torch.equal(upd, x)
            else:  # stochastic rounding: off by at most one level of its bucket
                step = p.parts["scales"].repeat_interleave(p.params["bucket"])[: x.numel()]
                assert bool(((upd - x).abs().view(-1) <= step * (1 + 1e-6)).all())


def test_error_feedback_persists_across_rounds_in_context_state():
    app, trainer = client_app(comm.TopK(0.05))
    strategy = pkf.Compressed(FedAvg())
    grid = Grid(app)
    arrays = global_arrays()
    before = {}
    for rnd in (1, 2, 3):
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        replies = grid.send_and_receive(msgs)
        for reply in replies:
            node = reply.metadata.src_node_id
            for k, blob in reply.content[pkf.UPDATE_RECORD].items():
                x = f32(trainer.sent[node][k]) - f32(trainer.received[node][k])
                upd = comm.decode(comm.Payload.from_bytes(blob)).float()
                r_after = residual(grid.ctx[node], k).view_as(x)
                r_before = before.get((node, k), torch.zeros_like(x))
                # x + r_before == decoded + r_after, exactly, round after round
                assert torch.equal(x + r_before, upd + r_after)
                if rnd > 1:
                    assert bool(r_before.abs().sum() > 0)
                before[(node, k)] = r_after.clone()
        arrays, _ = strategy.aggregate_train(rnd, replies)
    # each node keeps its own residuals
    r = [residual(grid.ctx[n], "fc1.weight") for n in NODES]
    assert not torch.equal(r[0], r[1])
    # the state survives what Flower does to a context between rounds (serialization)
    st = grid.ctx[NODES[0]].state
    again = _roundtrip(st)
    assert torch.equal(
        torch.tensor(np.array(again[pkf.STATE_CODEC]["fc1.weight/residual"].numpy())), r[0]
    )


def _roundtrip(obj):
    """Flower's own serialization of a record tree, and back."""
    kids = {oid: _roundtrip(child) for oid, child in (obj.children or {}).items()}
    return type(obj).inflate(obj.deflate(), kids)


def test_quantize_rounding_noise_differs_per_node():
    app, _ = client_app(comm.Quantize(8))
    _, replies = one_round(pkf.Compressed(FedAvg()), app)
    seeds = {
        comm.Payload.from_bytes(r.content[pkf.UPDATE_RECORD]["fc1.weight"]).params["seed"]
        for r in replies
    }
    assert len(seeds) == len(NODES)


def test_evaluate_messages_pass_through():
    arrays = global_arrays()
    for codec in (comm.TopK(0.05), None):
        app, _ = client_app(codec)
        ctx = make_context(11)
        msg = Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord()}), 11, MessageType.EVALUATE
        )
        reply = app(msg, ctx)
        assert dict(reply.content["metrics"]) == {
            "n": sum(int(a.numpy().size) for a in arrays.values())
        }
        assert pkf.STATE_CODEC not in ctx.state


def test_codec_none_sends_arrays_with_accounting():
    app, trainer = client_app(None)
    strategy = pkf.Compressed(FedAvg())
    _, replies = one_round(strategy, app)
    for reply in replies:
        node = reply.metadata.src_node_id
        assert len(reply.content[pkf.UPDATE_RECORD]) == 0
        for k, a in reply.content["arrays"].items():
            np.testing.assert_array_equal(a.numpy(), trainer.sent[node][k])
        m = reply.content["metrics"]
        dense = sum(v.nbytes for v in trainer.sent[node].values())
        assert m[pkf.UPLINK_BYTES] == m[pkf.DENSE_BYTES] == dense


# --- every wrapped strategy aggregates as it would uncompressed ---------------------

STRATEGIES = {
    "FedAvg": lambda: FedAvg(),
    "FedAdam": lambda: FedAdam(),
    "FedYogi": lambda: FedYogi(),
    "FedProx": lambda: FedProx(proximal_mu=0.1),
    "FedAvgM": lambda: FedAvgM(server_momentum=0.9),
    "FedMedian": lambda: FedMedian(),
    "FedTrimmedAvg": lambda: FedTrimmedAvg(beta=0.2),
}


@pytest.mark.parametrize("sname", list(STRATEGIES))
def test_every_strategy_aggregates_as_uncompressed(sname):
    orders: dict[int, list[int]] = {}  # the order the wrapper handed replies over

    def run(codec, wrap):
        inner = STRATEGIES[sname]()
        strategy = pkf.Compressed(inner) if wrap else inner
        if wrap:
            agg = inner.aggregate_train

            def spy(rnd, replies):
                replies = list(replies)
                orders[rnd] = [r.metadata.src_node_id for r in replies]
                return agg(rnd, replies)

            inner.aggregate_train = spy
        app, _ = client_app(codec)
        grid = Grid(app)
        arrays = global_arrays()
        for rnd in (1, 2):  # FedAdam, FedAvgM keep server state across rounds
            msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
            replies = grid.send_and_receive(msgs)
            if not wrap:  # the same order: a floating-point sum depends on it
                replies.sort(key=lambda r: orders[rnd].index(r.metadata.src_node_id))
            arrays, metrics = strategy.aggregate_train(rnd, replies)
        return arrays, metrics

    # codec None: the arrays themselves travel, the aggregate is bit for bit Flower's
    same, metrics = run(None, wrap=True)
    ref, ref_metrics = run("plain", wrap=False)
    assert list(same.keys()) == list(ref.keys())
    for k in ref:
        np.testing.assert_array_equal(same[k].numpy(), ref[k].numpy())
    assert metrics["loss"] == ref_metrics["loss"]
    # a lossless codec (every entry kept): global + (new - global), one fp32 rounding
    close, _ = run(comm.TopK(1.0, error_feedback=False), wrap=True)
    ref, _ = run("plain", wrap=False)  # in the order this run handed over
    for k in ref:
        a, b = close[k].numpy(), ref[k].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape
        tol = 2e-3 if a.dtype == np.float16 else 1e-5
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), atol=tol, rtol=0)


def test_aggregate_does_not_depend_on_arrival_order():
    app, _ = client_app(comm.TopK(0.05))
    results = []
    for perm in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        strategy = pkf.Compressed(FedAvg())
        grid = Grid(app)
        msgs = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), grid))
        replies = grid.send_and_receive(msgs)
        arrays, _ = strategy.aggregate_train(1, [replies[i] for i in perm])
        results.append(arrays)
    for other in results[1:]:
        for k in results[0]:
            np.testing.assert_array_equal(other[k].numpy(), results[0][k].numpy())


# --- byte accounting ------------------------------------------------------------------


def test_byte_accounting_is_the_payload_bytes():
    app, trainer = client_app(comm.TopK(0.05))
    strategy = pkf.Compressed(FedAvg())
    _, replies = one_round(strategy, app)
    want_up = want_dense = 0
    for reply in replies:
        node = reply.metadata.src_node_id
        blobs = reply.content[pkf.UPDATE_RECORD]
        passed = reply.content["arrays"]
        up = sum(comm.Payload.from_bytes(b).nbytes for b in blobs.values())
        up += sum(a.numpy().nbytes for a in passed.values())
        dense = sum(v.nbytes for v in trainer.sent[node].values())
        m = reply.content["metrics"]
        assert m[pkf.UPLINK_BYTES] == up
        assert m[pkf.DENSE_BYTES] == dense
        assert up < dense
        assert strategy.decode_reply(reply)[1:] == (up, dense)
        want_up += up
        want_dense += dense
    _, metrics = strategy.aggregate_train(1, replies)
    assert metrics[pkf.UPLINK_BYTES] == want_up == strategy.uplink_bytes[1]
    assert metrics[pkf.DENSE_BYTES] == want_dense == strategy.dense_bytes[1]


def test_start_returns_per_round_bytes():
    app, _ = client_app(comm.Quantize(8))
    strategy = pkf.Compressed(FedAvg(fraction_evaluate=0.0))
    grid = Grid(app)
    res = strategy.start(grid=grid, initial_arrays=global_arrays(), num_rounds=3)
    assert isinstance(res, pkf.CompressedResult)
    assert sorted(res.uplink_bytes) == [1, 2, 3]
    for r in (1, 2, 3):
        assert res.uplink_bytes[r] == res.train_metrics_clientapp[r][pkf.UPLINK_BYTES] > 0
        assert res.dense_bytes[r] == res.train_metrics_clientapp[r][pkf.DENSE_BYTES]
    assert 1.5 < res.compression_ratio < 4.0  # int8 on the floats, the rest as is
    assert res.refused == {1: [], 2: [], 3: []}


# --- bad replies ----------------------------------------------------------------------


def _tamper(reply: Message, how: str) -> Message:
    c = reply.content
    blobs = dict(c[pkf.UPDATE_RECORD])
    arrays = dict(c["arrays"])
    if how == "plain":  # what a client without compression_mod sends
        del c[pkf.UPDATE_RECORD]
        return reply
    if how == "not_payload":
        blobs["fc1.weight"] = b"\x89PNG not a pykernels payload at all"
    elif how == "corrupted":
        b = bytearray(blobs["fc1.weight"])
        b[len(b) // 2] ^= 0x40
        blobs["fc1.weight"] = bytes(b)
    elif how == "truncated":
        blobs["fc1.weight"] = blobs["fc1.weight"][:-9]
    elif how == "wrong_shape":
        blobs["fc1.weight"] = comm.TopK(0.1).encode(torch.randn(40, 48)).to_bytes()
    elif how == "missing_name":
        del blobs["fc1.bias"]
    elif how == "extra_name":
        blobs["fc3.weight"] = comm.TopK(0.1).encode(torch.randn(4)).to_bytes()
    elif how == "renamed":
        blobs["fc1.bias_"] = blobs.pop("fc1.bias")
    elif how == "passthrough_shape":
        arrays["steps"] = Array(np.arange(6, dtype=np.int64))
    elif how == "not_finite":
        blobs["fc1.bias"] = comm.Quantize(8).encode(torch.full((48,), float("inf"))).to_bytes()
    else:  # pragma: no cover
        raise AssertionError(how)
    c[pkf.UPDATE_RECORD] = ConfigRecord(blobs)
    c["arrays"] = ArrayRecord(arrays)
    return reply


BAD = {
    "plain": "no 'pk.update'",
    "not_payload": "bad magic",
    "corrupted": "checksum",
    "truncated": "fc1.weight",
    "wrong_shape": r"shape \[40, 48\]",
    "missing_name": "do not match the global arrays",
    "extra_name": "do not match the global arrays",
    "renamed": "do not match the global arrays",
    "passthrough_shape": "'steps'",
    "not_finite": "not finite",
}


@pytest.mark.parametrize("how", list(BAD))
def test_bad_reply_is_refused_and_dropped(how, caplog):
    app, trainer = client_app(comm.TopK(0.05))
    # the reference: the round with the two good replies only
    ref_strategy = pkf.Compressed(FedAvg(min_available_nodes=2, min_train_nodes=2))
    _, good = one_round(ref_strategy, app, grid=Grid(app, nodes=NODES[:2]))
    ref, _ = ref_strategy.aggregate_train(1, good)

    app, _ = client_app(comm.TopK(0.05))
    strategy = pkf.Compressed(FedAvg())
    _, replies = one_round(strategy, app)
    bad = replies[2]
    bad_node = bad.metadata.src_node_id
    _tamper(bad, how)
    with pytest.raises(pkf.ReplyRefused, match=f"node {bad_node}: .*{BAD[how]}"):
        strategy.decode_reply(bad)
    with caplog.at_level(logging.ERROR, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert f"refused the reply of node {bad_node}" in caplog.text
    assert [n for n, _ in strategy.refused[1]] == [bad_node]
    for k in ref:
        np.testing.assert_array_equal(arrays[k].numpy(), ref[k].numpy())
    assert metrics[pkf.UPLINK_BYTES] == ref_strategy.uplink_bytes[1]


def test_reply_of_a_node_not_sampled_is_refused():
    app, _ = client_app(comm.TopK(0.05))
    strategy = pkf.Compressed(FedAvg())
    _, replies = one_round(strategy, app)
    strategy._sent.pop(replies[0].metadata.src_node_id)
    with pytest.raises(pkf.ReplyRefused, match="not sent a train message"):
        strategy.decode_reply(replies[0])


def test_error_replies_go_to_the_strategy_as_failures():
    def broken(msg, ctx):
        raise RuntimeError("boom")

    strategy = pkf.Compressed(FedAvg())
    app, _ = client_app(comm.TopK(0.05))
    grid, replies = one_round(strategy, app)
    app2 = ClientApp(mods=[pkf.compression_mod(comm.TopK(0.05))])
    app2.train()(broken)
    msgs = list(strategy.configure_train(2, global_arrays(), ConfigRecord(), grid))
    errs = []
    for m in msgs:
        try:
            errs.append(app2(m, grid.ctx[m.metadata.dst_node_id]))
        except RuntimeError:
            pass
    # the ClientApp raises (Flower turns that into an error reply); one made by hand:
    from flwr.app import Error

    err = Message(Error(code=2, reason="boom"), reply_to=msgs[0])
    arrays, _ = strategy.aggregate_train(2, [err])
    assert arrays is None and strategy.refused[2] == []


def test_mod_refuses_a_reply_that_changed_the_arrays():
    def rename(msg, ctx):
        arrays = ArrayRecord({"other": Array(np.zeros(3, np.float32))})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=msg)

    def reshape(msg, ctx):
        a = {k: v for k, v in msg.content["arrays"].items()}
        a["fc1.bias"] = Array(np.zeros(47, np.float32))
        content = RecordDict(
            {"arrays": ArrayRecord(a), "metrics": MetricRecord({"num-examples": 1})}
        )
        return Message(content, reply_to=msg)

    for fn, match in ((rename, "missing"), (reshape, "fc1.bias")):
        app = ClientApp(mods=[pkf.compression_mod(comm.TopK(0.05))])
        app.train()(fn)
        msg = Message(
            RecordDict({"arrays": global_arrays(), "config": ConfigRecord()}), 11, MessageType.TRAIN
        )
        reply = app(msg, make_context(11))
        assert reply.has_error()
        assert "compression_mod" in reply.error.reason and match in reply.error.reason


def test_argument_checks():
    with pytest.raises(TypeError, match="codec"):
        pkf.compression_mod("topk")
    with pytest.raises(TypeError, match="strategy"):
        pkf.Compressed(object())
    with pytest.raises(TypeError, match="downlink"):
        pkf.Compressed(FedAvg(), downlink=0.01)
    assert comm.flower is pkf
    assert "TopK" in repr(pkf.Compressed(FedAvg(), downlink=comm.TopK(0.1)))


# --- downlink -------------------------------------------------------------------------


def test_downlink_clients_rebuild_the_servers_reference():
    app, trainer = client_app(comm.TopK(0.05))
    strategy = pkf.Compressed(FedAvg(), downlink=comm.TopK(0.1))
    grid = Grid(app)
    arrays = float_arrays()
    prev = None
    for rnd in (1, 2, 3, 4):
        if rnd == 3:
            grid.drop = {NODES[0]}  # its reply is lost: next time it gets the full model
        else:
            grid.drop = set()
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        deltas = {m.metadata.dst_node_id for m in msgs if pkf.DOWNLINK_RECORD in m.content}
        if rnd == 1:
            assert deltas == set()
            assert strategy.downlink_bytes[1] == strategy.downlink_dense_bytes[1]
        elif rnd == 4:
            assert deltas == set(NODES[1:])
        else:
            assert deltas == set(NODES)
            assert strategy.downlink_bytes[rnd] < strategy.downlink_dense_bytes[rnd] / 3
        replies = grid.send_and_receive(msgs)
        assert not any(r.has_error() for r in replies)
        for node in NODES:
            got = trainer.received[node]
            assert list(got) == list(arrays.keys())
            for k, v in got.items():
                # what the client trained from is the server's reference, bit for bit
                np.testing.assert_array_equal(v, strategy._ref[k])
                held = grid.ctx[node].state[pkf.STATE_REF][k].numpy()
                np.testing.assert_array_equal(held, strategy._ref[k])
        # the reference follows the global model (the downlink's error feedback)
        if prev is not None:
            w = arrays["fc1.weight"].numpy()
            err = np.abs(strategy._ref["fc1.weight"] - w).max()
            assert err < np.abs(w - prev).max()
        prev = arrays["fc1.weight"].numpy()
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        assert metrics[pkf.DOWNLINK_BYTES] == strategy.downlink_bytes[rnd]


def test_downlink_delta_to_a_version_the_node_lacks_is_an_error_reply():
    app, _ = client_app(comm.TopK(0.05))
    strategy = pkf.Compressed(FedAvg(), downlink=comm.Quantize(8))
    grid, replies = one_round(strategy, app, arrays=float_arrays())
    arrays, _ = strategy.aggregate_train(1, replies)
    msgs = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    node = msgs[0].metadata.dst_node_id
    grid.ctx[node].state[pkf.STATE_REF_META] = ConfigRecord({"version": 99})
    reply = app(msgs[0], grid.ctx[node])
    assert reply.has_error() and "holds 99" in reply.error.reason


# --- the demo's pieces and one real simulation -------------------------------------------


def test_partition_and_codec_specs():
    parts = demo.partition(10, 0.5, 0)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)) == len(demo._data(0)[1])
    assert min(len(p) for p in parts) >= 10
    assert demo.partition(10, 0.5, 0) is parts  # cached, the same every call
    # non-IID: label histograms differ a lot between clients
    y = demo._data(0)[1].numpy()
    hist = np.array([np.bincount(y[p], minlength=10) / len(p) for p in parts])
    assert hist.max() > 0.4
    assert demo.parse_codec("none") is None
    assert isinstance(demo.parse_codec("topk:0.01"), comm.TopK)
    assert isinstance(demo.parse_codec("topk:0.01+quant:8"), comm.Chain)
    assert demo.parse_codec("lowrank:4").rank == 4
    for bad in ("gzip", "topk:2", "quant:3", "quant:8+topk:0.1"):
        with pytest.raises(ValueError, match="codec"):
            demo.parse_codec(bad)


def test_run_simulation_end_to_end():
    pytest.importorskip("ray")
    setup = demo.Setup(clients=2, rounds=2, local_epochs=1)
    run = demo.simulate("topk:0.05", setup)
    assert len(run.accuracy) == 2 and run.refused == 0
    assert all(b > 0 for b in run.uplink_bytes)
    assert run.ratio > 8
    # Ray kept each node's Context.state: round 2 began with the residuals of
    # the model's 6 arrays that round 1 left there
    assert run.codec_state_arrays == [0.0, 6.0]
    # FedAvg on the 2 clients' updates learned something (10 classes: 10% is chance)
    assert run.final_accuracy > 30


def test_cli_refuses_a_bad_codec_before_simulating(capsys):
    from pykernels.__main__ import main

    assert main(["federated", "--codec", "none,gzip", "--rounds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m pykernels federated: error: --codec: codec 'gzip'")
    assert len(err.splitlines()) == 1


def test_pykernels_imports_without_flwr_and_flower_says_what_to_install():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['flwr'] = None\n"
        "import pykernels, pykernels.comm\n"
        "from pykernels import comm\n"
        "try:\n"
        "    comm.flower\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pykernels[federated]" in out.stdout
