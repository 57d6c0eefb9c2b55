"""comm.flower under faults: refused and failed replies, non-finite updates, stragglers.

The in-process tests drive the ClientApp (with the mod) and the strategy on
real Flower messages through test_comm_flower's small grid; the last one runs
a real ``run_simulation`` (Ray) with every fault at once.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from test_comm_flower import (  # noqa: E402
    NODES,
    Grid,
    LocalTrainer,
    f32,
    float_arrays,
    global_arrays,
    residual,
)

from pykernels import comm  # noqa: E402
from pykernels.comm import _flower_demo as demo  # noqa: E402
from pykernels.comm import flower as pkf  # noqa: E402


@pytest.fixture(autouse=True)
def _task_identity():
    # Messages built outside a Flower runtime need a run and node identity.
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    logging.getLogger("flwr").setLevel(logging.WARNING)
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class Faulty(LocalTrainer):
    """A LocalTrainer that misbehaves in chosen (round, node)s."""

    def __init__(self, faults: dict[tuple[int, int], str]) -> None:
        super().__init__()
        self.faults = faults

    def __call__(self, msg: Message, ctx) -> Message:
        out = super().__call__(msg, ctx)
        rnd = int(msg.content["config"].get("server-round", 0))
        kind = self.faults.get((rnd, ctx.node_id))
        arrays = dict(out.content["arrays"])
        if kind == "nan":
            w = arrays["fc1.weight"].numpy().copy()
            w[3, 4] = np.nan
            arrays["fc1.weight"] = Array(w)
        elif kind == "inf16":
            w = arrays["fc2.weight"].numpy().copy()
            w[0, 0] = np.inf
            arrays["fc2.weight"] = Array(w)
        elif kind == "reshape":
            arrays["fc1.bias"] = Array(np.zeros(47, np.float32))
        elif kind == "rename":
            arrays["fc9.bias"] = arrays.pop("fc1.bias")
        out.content["arrays"] = ArrayRecord(arrays)
        return out


def make_app(codec, trainer):
    app = ClientApp(mods=[pkf.compression_mod(codec)])
    app.train()(trainer)
    return app


def stamp(messages):
    """Message ids, as a Grid's push gives them: a reply must point at one."""
    for i, m in enumerate(messages):
        m.metadata.__dict__["_message_id"] = f"ins-{m.metadata.dst_node_id}-{i}"
    return messages


def run_round(strategy, grid, rnd, arrays, tamper=None):
    msgs = stamp(list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid)))
    replies = grid.send_and_receive(msgs)
    if tamper:
        replies = [tamper(r) for r in replies]
    new, _ = strategy.aggregate_train(rnd, replies)
    return msgs, replies, (new if new is not None else arrays)


def codec_state(ctx) -> dict[str, np.ndarray]:
    rec = ctx.state.get(pkf.STATE_CODEC)
    return {} if rec is None else {k: np.array(a.numpy()) for k, a in rec.items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --- point 2: error replies are built against the incoming message --------------------


@pytest.mark.parametrize("kind", ["reshape", "rename", "nan", "inf16"])
def test_mod_error_replies_answer_the_message_and_the_server_names_them(kind):
    node = NODES[1]
    trainer = Faulty({(1, node): kind})
    grid = Grid(make_app(comm.TopK(0.05), trainer))
    strategy = pkf.Compressed(FedAvg())
    msgs, replies, _ = run_round(strategy, grid, 1, global_arrays())
    bad = next(r for r in replies if r.metadata.src_node_id == node)
    sent = next(m for m in msgs if m.metadata.dst_node_id == node)
    assert bad.has_error()
    # what the server (and Flower's link state) matches a reply by
    assert bad.metadata.reply_to_message_id == sent.metadata.message_id
    assert bad.metadata.src_node_id == node and bad.metadata.dst_node_id == 0
    assert bad.metadata.run_id == sent.metadata.run_id
    want = {
        "reshape": "'fc1.bias' came back as",
        "rename": "missing ['fc1.bias'], unexpected ['fc9.bias']",
        "nan": "['fc1.weight'] is not finite",
        "inf16": "['fc2.weight'] is not finite",
    }[kind]
    assert want in bad.error.reason
    # counted and named by the server; the others are aggregated
    assert [n for n, _ in strategy.failed[1]] == [node]
    assert want in strategy.failed[1][0][1]
    assert strategy.missing[1] == [] and strategy.refused[1] == []
    # a refused update left the node's codec state untouched (its first send: none)
    assert codec_state(grid.ctx[node]) == {}


# --- point 1 in Flower, point 3: nothing taken out of error feedback is lost ------------


def corrupt(node):
    def tamper(reply):
        if reply.metadata.src_node_id == node and not reply.has_error():
            blobs = dict(reply.content[pkf.UPDATE_RECORD])
            b = bytearray(blobs["fc1.weight"])
            b[len(b) // 2] ^= 0x40
            blobs["fc1.weight"] = bytes(b)
            reply.content[pkf.UPDATE_RECORD] = ConfigRecord(blobs)
        return reply

    return tamper


CODECS = {
    "topk": (lambda: comm.TopK(0.05), ""),
    "lowrank": (lambda: comm.LowRank(2), ""),
    "chain": (lambda: comm.Chain(comm.TopK(0.1), comm.Quantize(8)), "first."),
}


@pytest.mark.parametrize("how", ["refused", "lost", "failed"])
@pytest.mark.parametrize("name", list(CODECS))
def test_an_update_that_was_not_aggregated_goes_back_into_error_feedback(name, how):
    make, prefix = CODECS[name]
    node = NODES[2]
    faults = {(2, node): "nan"} if how == "failed" else {}
    trainer = Faulty(faults)
    grid = Grid(make_app(make(), trainer))
    strategy = pkf.Compressed(FedAvg())
    arrays = float_arrays()
    _, _, arrays = run_round(strategy, grid, 1, arrays)
    after_1 = codec_state(grid.ctx[node])
    assert after_1
    # round 2: the node's reply is refused by the server, lost on the way, or
    # refused by its own mod (a non-finite update)
    tamper = corrupt(node) if how == "refused" else None
    grid.drop = {node} if how == "lost" else set()
    _, _, arrays = run_round(strategy, grid, 2, arrays, tamper)
    grid.drop = set()
    if how == "refused":
        assert [n for n, _ in strategy.refused[2]] == [node]
    elif how == "lost":
        assert strategy.missing[2] == [node]
    else:
        assert [n for n, _ in strategy.failed[2]] == [node]
    # round 3: told its round-2 reply was not aggregated, the node starts from
    # its state after round 1, bit for bit, and error feedback goes on from it
    msgs, replies, _ = run_round(strategy, grid, 3, arrays)
    r1 = {k: torch.tensor(v) for k, v in after_1.items() if k.endswith("/residual")}
    reply = next(r for r in replies if r.metadata.src_node_id == node)
    for k, blob in reply.content[pkf.UPDATE_RECORD].items():
        x = f32(trainer.sent[node][k]) - f32(trainer.received[node][k])
        upd = comm.decode(comm.Payload.from_bytes(blob)).float()
        r3 = residual(grid.ctx[node], k, prefix)
        before = r1.get(f"{prefix}{k}/residual")
        if r3 is None:  # a vector LowRank sends dense: no state
            assert torch.equal(upd, x)
            continue
        before = torch.zeros_like(x) if before is None else before.view_as(x)
        if name == "topk":
            assert torch.equal(x + before, upd + r3.view_as(x))
        else:
            torch.testing.assert_close(upd + r3.view_as(x), x + before, rtol=0, atol=1e-5)
    # Round 3 started from round 1's whole state (LowRank's warm-start Q too):
    # the pre-send state the mod kept is it, bit for bit.
    prev = grid.ctx[node].state[pkf.STATE_PREV]
    assert same_state({k: np.array(a.numpy()) for k, a in prev.items()}, after_1)


def test_the_server_tells_each_node_its_round_and_outcomes():
    node = NODES[0]
    grid = Grid(make_app(comm.TopK(0.05), Faulty({})))
    strategy = pkf.Compressed(FedAvg())
    arrays = global_arrays()
    seen = {}
    for rnd in (1, 2, 3, 4):
        grid.drop = {node} if rnd == 2 else set()
        msgs = stamp(list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid)))
        m = next(m for m in msgs if m.metadata.dst_node_id == node)
        meta = m.content[pkf.TRAIN_META]
        seen[rnd] = (meta["round"], list(meta["sent"]), list(meta["aggregated"]))
        # every message has its own content (FedAvg shares one RecordDict)
        assert len({id(m.content) for m in msgs}) == len(msgs)
        replies = grid.send_and_receive(msgs)
        new, _ = strategy.aggregate_train(rnd, replies)
        arrays = new or arrays
    assert seen == {
        1: (1, [], []),
        2: (2, [1], [True]),
        3: (3, [1, 2], [True, False]),
        4: (4, [1, 2, 3], [True, False, True]),
    }


def test_the_train_function_does_not_see_the_servers_record():
    seen = []

    def train(msg, ctx):
        seen.append(set(msg.content.keys()))
        return LocalTrainer()(msg, ctx)

    app = ClientApp(mods=[pkf.compression_mod(comm.TopK(0.05))])
    app.train()(train)
    strategy = pkf.Compressed(FedAvg())
    run_round(strategy, Grid(app), 1, global_arrays())
    assert seen and all(pkf.TRAIN_META not in s for s in seen)


# --- point 4: stragglers cannot roll a node's state back ------------------------------


def test_a_late_run_keeps_nothing_and_raises():
    node = NODES[0]
    grid = Grid(make_app(comm.TopK(0.05), Faulty({})))
    strategy = pkf.Compressed(FedAvg())
    strategy._timeout = 5.0  # as start(..., timeout=5) sets it
    _, _, arrays = run_round(strategy, grid, 1, global_arrays())
    state = codec_state(grid.ctx[node])
    msgs = stamp(list(strategy.configure_train(2, arrays, ConfigRecord(), grid)))
    m = next(m for m in msgs if m.metadata.dst_node_id == node)
    assert m.metadata.ttl == 5.0
    told = m.content[pkf.TRAIN_META]
    # the run ends after the deadline: the mod raises (Flower then keeps the
    # context it had, which a newer round may have written)
    m.metadata.created_at = time.time() - 4.9

    class Slow(Faulty):
        def __call__(self, msg, ctx):
            time.sleep(0.3)
            return super().__call__(msg, ctx)

    slow = ClientApp(mods=[pkf.compression_mod(comm.TopK(0.05))])
    slow.train()(Slow({}))
    with pytest.raises(pkf.LateReply, match="round 2 would be .* past its deadline"):
        slow(m, grid.ctx[node])
    assert same_state(codec_state(grid.ctx[node]), state)
    assert grid.ctx[node].state[pkf.STATE_META]["round"] == 1
    # already late on arrival: nothing runs
    m.content[pkf.TRAIN_META] = told  # (the mod took it out)
    m.metadata.created_at = time.time() - 60
    trainer = Faulty({})
    late = make_app(comm.TopK(0.05), trainer)
    with pytest.raises(pkf.LateReply, match="on arrival"):
        late(m, grid.ctx[node])
    assert trainer.calls == 0


def test_a_message_older_than_the_nodes_state_is_refused():
    node = NODES[0]
    grid = Grid(make_app(comm.TopK(0.05), Faulty({})))
    strategy = pkf.Compressed(FedAvg())
    _, _, arrays = run_round(strategy, grid, 1, global_arrays())
    msgs2 = stamp(list(strategy.configure_train(2, arrays, ConfigRecord(), grid)))
    grid.send_and_receive(msgs2)
    state = codec_state(grid.ctx[node])
    m = next(m for m in msgs2 if m.metadata.dst_node_id == node)
    # round 2's message delivered again, after round 2 ran on the node
    m2 = Message(m.content, dst_node_id=node, message_type=m.metadata.message_type)
    m2.content[pkf.TRAIN_META] = ConfigRecord({"round": 2, "sent": [1], "aggregated": [True]})
    stamp([m2])
    reply = grid.app(m2, grid.ctx[node])
    assert reply.has_error() and "from round 2, not older than this message's round 2" in (
        reply.error.reason
    )
    assert same_state(codec_state(grid.ctx[node]), state)


def test_a_state_rolled_back_by_a_late_save_is_detected_and_settled(caplog):
    """What a straggler does when nothing stops it (no deadline): its older state
    is saved over the newer one. The next message finds it and says so."""
    node = NODES[1]
    grid = Grid(make_app(comm.TopK(0.05), Faulty({})))
    strategy = pkf.Compressed(FedAvg())
    _, _, arrays = run_round(strategy, grid, 1, global_arrays())
    after_1 = codec_state(grid.ctx[node])
    # round 2: the node's reply misses the deadline (the server sees none)...
    grid.drop = {node}
    _, _, arrays = run_round(strategy, grid, 2, arrays)
    grid.drop = set()
    late_copy = RecordDict(dict(grid.ctx[node].state.items()))  # what its run saved
    # ...round 3 runs and is aggregated; then the late run's save lands
    _, _, arrays = run_round(strategy, grid, 3, arrays)
    assert grid.ctx[node].state[pkf.STATE_META]["round"] == 3
    grid.ctx[node].state = late_copy
    with caplog.at_level(logging.WARNING, logger="flwr"):
        msgs = stamp(list(strategy.configure_train(4, arrays, ConfigRecord(), grid)))
        m = next(m for m in msgs if m.metadata.dst_node_id == node)
        seen = {}

        def spy(msg, ctx):
            seen["state"] = codec_state(ctx)
            return LocalTrainer()(msg, ctx)

        app = ClientApp(mods=[pkf.compression_mod(comm.TopK(0.05))])
        app.train()(spy)
        reply = app(m, grid.ctx[node])
    assert not reply.has_error()
    assert "state is from round 2, but the server aggregated its replies of rounds [3]" in (
        caplog.text
    )
    # round 2's reply was not aggregated: its state before it (round 1's) is used
    assert same_state(seen["state"], after_1)


def test_start_sets_the_train_messages_ttl_to_its_timeout():
    class Recording(Grid):
        ttls: list[float] = []

        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            Recording.ttls += [m.metadata.ttl for m in messages]
            return super().send_and_receive(stamp(messages), timeout)

    grid = Recording(make_app(comm.TopK(0.05), Faulty({})))
    strategy = pkf.Compressed(FedAvg(fraction_evaluate=0.0))
    res = strategy.start(grid=grid, initial_arrays=global_arrays(), num_rounds=2, timeout=7)
    assert Recording.ttls == [7.0] * (2 * len(NODES))
    assert res.failed == {1: [], 2: []} and res.missing == {1: [], 2: []}
    assert set(res.wait_s) == {1, 2} and all(0 <= w < 5 for w in res.wait_s.values())


# --- all of it in a real simulation -------------------------------------------------------


def test_faults_in_a_real_simulation():
    """3 clients, 6 rounds, a 10 s round timeout. Round 2: client 0 replies with a
    mismatched array, client 1 with a NaN update (both refused by their mod),
    client 2's payload is corrupted on the way (refused by the server). Round 3:
    client 1 straggles 12 s. Round 5: client 2 takes 4 s more, within the timeout
    (the straggler's run ends meanwhile)."""
    pytest.importorskip("ray")
    setup = demo.Setup(
        clients=3,
        rounds=6,
        local_epochs=1,
        timeout=10.0,
        faults=demo.parse_faults("2:0:mismatch,2:1:nan,2:2:corrupt,3:1:slow:12,5:2:slow:4"),
    )
    run = demo.simulate("topk:0.05", setup)
    assert run.failed_per_round == [0, 2, 0, 0, 0, 0]
    assert run.refused_per_round == [0, 1, 0, 0, 0, 0]
    assert run.missing_per_round == [0, 0, 1, 0, 0, 0]
    # No round waits for its timeout but the straggler's.
    waits = run.wait_s
    assert waits[2] >= 9.5, waits
    assert max(waits[:2] + waits[3:]) < 8.0, waits
    state = run.client_state  # per round: {client: [state's round, sum |state|]}
    # Client 2's corrupted round-2 reply was not aggregated: round 3 starts from
    # the state round 2 started from (the same sum), not from its round-2 send.
    assert state[1][2][0] == 1 and state[2][2] == [2.0, state[1][2][1]]
    # Clients 0 and 1 sent nothing in round 2: their state is still round 1's.
    assert state[2][0][0] == 1
    # The straggler's run kept nothing: its state is from round 1 in round 4,
    # and from the round before every round after (never rolled back to 3).
    assert state[3][1][0] == 1
    assert [state[r][1][0] for r in (4, 5)] == [4, 5]
    assert run.final_accuracy > 30


def test_fault_specs_and_the_cli_refuses_a_bad_one_before_simulating():
    from pykernels.__main__ import main

    assert demo.parse_faults("2:0:nan, 3:1:slow:12,4:2:corrupt") == (
        (2, 0, "nan"),
        (3, 1, "slow:12"),
        (4, 2, "corrupt"),
    )
    for bad in ("2:0:gzip", "a:0:nan", "2:0:slow", "2:0:nan:3", "2:0"):
        with pytest.raises(ValueError, match="expected ROUND:PARTITION:KIND"):
            demo.parse_faults(bad)
    with pytest.raises(ValueError, match="fault '2:0:gzip'"):
        main(["federated", "--faults", "2:0:gzip", "--rounds", "1"])
