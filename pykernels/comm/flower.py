"""Flower integration: a client mod that compresses updates, a strategy wrapper that decodes them.

Flower pairs a client mod with a server strategy wrapper (``fixedclipping_mod``
with ``DifferentialPrivacyClientSideFixedClipping``); this module does the
same for update compression::

    from flwr.clientapp import ClientApp
    from flwr.serverapp.strategy import FedAvg
    from pykernels import comm

    app = ClientApp(mods=[comm.flower.compression_mod(comm.TopK(0.01))])
    strategy = comm.flower.Compressed(FedAvg(), downlink=None)

Uplink (:func:`compression_mod`): a train reply's arrays become the client's
update (new arrays minus the global arrays it received), one pykernels
payload per array name, carried as bytes in a ``ConfigRecord`` named
``"pk.update"``; the reply's ``ArrayRecord`` keeps only the arrays that pass
through (non-float arrays, float64). Error-feedback state lives in the
client's ``Context.state`` (an ``ArrayRecord`` named ``"pk.codec"``), so it
persists across rounds as Flower persists that context. Evaluate messages
pass through untouched.

Server (:class:`Compressed`): each reply is turned back into full arrays
(the arrays the client was sent + the decoded update) before the wrapped
strategy sees it, so FedAvg, FedAdam, FedProx, ... run unchanged. They are
handed over in an order fixed by their content, not by arrival, so a run
is reproducible (a weighted floating-point sum depends on the order). A reply
that cannot be decoded (no pykernels record, names or shapes that do not
match what the node was sent, a corrupted blob) is refused with an error
naming the node and dropped from the round, as Flower drops failures.

Byte accounting: every reply carries ``pk.uplink_bytes`` and
``pk.dense_bytes`` in its ``MetricRecord``; the wrapper logs each round's
totals, writes them (summed, not averaged) into the round's aggregated train
metrics and returns them on the result (:class:`CompressedResult`).

Downlink (``Compressed(strategy, downlink=codec)``): the train broadcast
becomes a compressed delta to the previous broadcast, which each client
holds in its ``Context.state``. The server keeps the same reference model
(it applies the decoded delta, with the codec's error feedback on the
server), so server and clients agree bit for bit; a node that missed a
broadcast (not sampled, failed) is sent the full reference instead.
Evaluate broadcasts are sent as Flower sends them.

Put ``compression_mod`` first in ``mods=[...]``: it rebuilds the broadcast
before the other mods see it and compresses the reply after they are done.

Faults: a reply the mod cannot send (arrays that changed name, shape or
dtype; an update holding NaN or inf) becomes an error reply to the message
received, which the server counts and names (``failed``) without waiting
for the round's timeout. Each train message tells the node whether its
recent replies were aggregated; the error-feedback state from before a
reply that was not (refused, failed, late, lost) is restored, so nothing
taken out of the residuals is lost. The state is versioned by round: a run
that ends past its message's deadline raises :class:`LateReply` (Flower then
discards its context instead of saving it over a newer round's), a message
older than the node's state is refused, and a state found older than a
reply the server aggregated is reported.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Any

import numpy as np
import torch

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Error,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp.typing import ClientAppCallable, Mod
    from flwr.common.constant import ErrorCode
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Result, Strategy
    from flwr.supercore import log
except ImportError as e:  # pragma: no cover - exercised only without flwr
    raise ImportError(
        "pykernels.comm.flower needs Flower: pip install 'pykernels[federated]' "
        "(or 'flwr[simulation]>=1.41')"
    ) from e

from . import codecs as _codecs
from .base import _mix, all_finite
from .codecs import Codec
from .wire import Payload

__all__ = [
    "DENSE_BYTES",
    "DOWNLINK_BYTES",
    "UPLINK_BYTES",
    "Compressed",
    "CompressedResult",
    "LateReply",
    "ReplyRefused",
    "compression_mod",
]

UPLINK_BYTES = "pk.uplink_bytes"
DENSE_BYTES = "pk.dense_bytes"
DOWNLINK_BYTES = "pk.downlink_bytes"
UPDATE_RECORD = "pk.update"  # ConfigRecord: array name -> payload bytes (uplink)
DOWNLINK_RECORD = "pk.downlink"  # ConfigRecord: array name -> payload bytes (broadcast)
DOWNLINK_META = "pk.downlink.meta"  # ConfigRecord: version, base, record, names
TRAIN_META = "pk.train"  # ConfigRecord: round, and the node's recent (round, aggregated)
STATE_CODEC = "pk.codec"  # Context.state: the uplink codec's state_dict
STATE_PREV = "pk.codec.prev"  # Context.state: the state before the last send
STATE_META = "pk.codec.meta"  # Context.state: the round of the last send
STATE_REF = "pk.downlink.ref"  # Context.state: the broadcast reference model
STATE_REF_META = "pk.downlink.version"  # Context.state: its version
HISTORY = 16  # rounds of each node's outcomes the server sends it

# Array dtypes that are compressed; the rest (ints, bools, float64) pass through.
_COMPRESSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class ReplyRefused(ValueError):
    """A train reply that the server cannot decode; it is dropped from the round."""

    def __init__(self, node_id: int, reason: str) -> None:
        super().__init__(f"Compressed: refused the reply of node {node_id}: {reason}")
        self.node_id = node_id
        self.reason = reason


class LateReply(RuntimeError):
    """Raised by :func:`compression_mod` for a train reply past its message's deadline.

    The server stopped waiting for it (the deadline is the message's
    ``created_at + ttl``; :class:`Compressed` sets the ttl to ``start``'s
    timeout), and a newer round may already have run on this node. Raising
    keeps Flower from saving this run's context over the newer one (a
    ClientApp that raises has its context discarded), which would roll the
    node's error feedback back.
    """


# --- helpers -------------------------------------------------------------------


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type.split(".", 1)[0] == MessageType.TRAIN


def _compressible(a: np.ndarray) -> bool:
    return a.dtype in _COMPRESSED_DTYPES


def _f32(a: np.ndarray) -> torch.Tensor:
    # A copy: Array.numpy() may be read-only, and torch.from_numpy warns on that.
    return torch.tensor(np.ascontiguousarray(a), dtype=torch.float32)


def _codec_for_node(codec: Codec, ctxt: Context) -> Codec:
    """A private copy of ``codec``; stochastic rounding gets a per-node seed.

    Without it every client would draw the same rounding noise for the same
    key and round, and the noise would not average out over clients. The
    node's ``partition-id`` (its stable identity in a simulation, where node
    ids are drawn anew each run) is used when it has one, else its node id.
    """
    ident = ctxt.node_config.get("partition-id", ctxt.node_id)
    try:
        ident = int(ident)
    except (TypeError, ValueError):
        ident = ctxt.node_id
    c = copy.deepcopy(codec)
    if c.noise_seed is not None:
        c.noise_seed = _mix(c.noise_seed, ident) & ((1 << 62) - 1)
    c.reset()
    return c


def _save_state(codec: Codec, state: RecordDict) -> None:
    sd = codec.state_dict()
    state[STATE_CODEC] = ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in sd.items()})


def _load_state(codec: Codec, state: RecordDict) -> None:
    rec = state.get(STATE_CODEC)
    if rec is not None:
        codec.load_state_dict({k: torch.tensor(np.array(a.numpy())) for k, a in rec.items()})


def _single(records: dict, kind: str, where: str) -> tuple[str, Any]:
    if len(records) != 1:
        raise ValueError(f"{where} has {len(records)} {kind}s, expected exactly one")
    return next(iter(records.items()))


def _digest(reply: Message) -> bytes:
    """A hash of what a compressed reply carries (its payloads and arrays)."""
    h = hashlib.blake2b(digest_size=16)
    for name, blob in sorted(reply.content[UPDATE_RECORD].items()):
        h.update(name.encode())
        h.update(blob if isinstance(blob, bytes) else repr(blob).encode())
    for rec in reply.content.array_records.values():
        for name, arr in sorted(rec.items()):
            h.update(name.encode())
            h.update(arr.data)
    return h.digest()


def _mod_error(msg: Message, reason: str) -> Message:
    """An error reply to `msg`, the message the node *received*.

    Built against the incoming message, it carries the metadata the server
    matches replies by (src = this node, reply_to = the message); one built
    against the node's own outgoing reply had them reversed, was rejected by
    Flower's link state, and the round waited for its timeout.
    """
    log(ERROR, reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def _deadline(msg: Message) -> float:
    return float(msg.metadata.created_at) + float(msg.metadata.ttl)


def _check_in_time(msg: Message, rnd: int | None, when: str) -> None:
    late = time.time() - _deadline(msg)
    if late > 0:
        what = f"round {rnd}" if rnd is not None else "this train message"
        raise LateReply(
            f"compression_mod: the reply to {what} would be {late:.1f} s past its "
            f"deadline ({when}); not sent, and this run's state is not kept, so a "
            "newer round's state on this node stands"
        )


# --- client side ---------------------------------------------------------------


def _apply_downlink(msg: Message, ctxt: Context) -> None:
    """Replaces a compressed broadcast by the full arrays, updating the reference in state."""
    content = msg.content
    meta = content[DOWNLINK_META]
    version, base, key = int(meta["version"]), int(meta["base"]), str(meta["record"])
    names = list(meta["names"])
    blobs = content.get(DOWNLINK_RECORD, ConfigRecord())
    sent = content[key]
    if base < 0:  # the full reference
        ref = {n: sent[n].numpy() for n in names}
    else:
        held = ctxt.state.get(STATE_REF_META)
        held_v = None if held is None else int(held["version"])
        if held_v != base:
            raise ValueError(
                f"the broadcast is a delta to version {base} of the global model, "
                f"this node holds {held_v}"
            )
        old = ctxt.state[STATE_REF]
        ref = {}
        for n in names:
            if n in blobs:
                p = Payload.from_bytes(bytes(blobs[n]))
                prev = old[n].numpy()
                ref[n] = (_f32(prev) + _codecs.decode(p).float()).numpy().astype(prev.dtype)
            else:
                ref[n] = sent[n].numpy()
    arrays = ArrayRecord({n: Array(np.asarray(ref[n])) for n in names})
    ctxt.state[STATE_REF] = arrays
    ctxt.state[STATE_REF_META] = ConfigRecord({"version": version})
    new = RecordDict(
        {k: v for k, v in content.items() if k not in (DOWNLINK_RECORD, DOWNLINK_META)}
    )
    new[key] = arrays
    msg.content = new


@dataclass
class _Feedback:
    """What the server's train message says: its round, and how the node's recent
    replies fared (round -> aggregated), from :class:`Compressed`."""

    round: int
    outcomes: dict[int, bool]


def _feedback(msg: Message) -> _Feedback | None:
    """Takes the server's TRAIN_META record out of `msg` (the ClientApp never sees it)."""
    content = msg.content
    meta = content.get(TRAIN_META)
    if meta is None:
        return None
    msg.content = RecordDict({k: v for k, v in content.items() if k != TRAIN_META})
    sent, agg = list(meta.get("sent", [])), list(meta.get("aggregated", []))
    if len(sent) != len(agg):
        raise ValueError(f"the {TRAIN_META!r} record lists {len(sent)} rounds, {len(agg)} outcomes")
    return _Feedback(int(meta["round"]), {int(r): bool(a) for r, a in zip(sent, agg, strict=True)})


def _settle_state(fb: _Feedback, ctxt: Context) -> None:
    """Settles the codec state the node's previous send left, with what the server says.

    A send whose reply the server did not aggregate (refused, failed, late,
    lost) gets its pre-send state back: what it took out of the residuals is
    kept, not lost. The state is versioned by the round of its send: one
    older than a send the server aggregated was overwritten by a late run
    (warned); one not older than this message means this message is the late
    one (refused, so that it cannot roll the state back).
    """
    meta = ctxt.state.get(STATE_META)
    held = None if meta is None else int(meta["round"])
    if held is not None and held >= fb.round:
        raise ValueError(
            f"this node's compression state is from round {held}, not older than this "
            f"message's round {fb.round}: a late or repeated message, not run (it would "
            "roll the newer state back)"
        )
    if meta is not None and meta.get("settled", False):
        return  # settled by an earlier message whose run sent nothing
    if held is not None and fb.outcomes.get(held) is False and STATE_PREV in ctxt.state:
        ctxt.state[STATE_CODEC] = ctxt.state[STATE_PREV]
        log(
            INFO,
            "compression_mod: node %s: its reply of round %s was not aggregated; the "
            "error-feedback state from before it is restored",
            ctxt.node_id,
            held,
        )
    lost = sorted(r for r, agg in fb.outcomes.items() if agg and (held is None or r > held))
    if lost:
        log(
            WARNING,
            "compression_mod: node %s: its compression state is %s, but the server "
            "aggregated its replies of rounds %s: a late run saved an older state over the "
            "newer one (or the node lost its context); their error feedback is lost",
            ctxt.node_id,
            "missing" if held is None else f"from round {held}",
            lost,
        )
    if STATE_PREV in ctxt.state:
        del ctxt.state[STATE_PREV]
    if held is not None or lost:
        # Settled: a run that ends without sending (an error reply) must not
        # restore or warn again.
        ctxt.state[STATE_META] = ConfigRecord(
            {"round": -1 if held is None else held, "settled": True}
        )


def _compress_reply(
    codec: Codec | None,
    received: ArrayRecord,
    out: Message,
    ctxt: Context,
    msg: Message,
    fb: _Feedback | None,
) -> Message:
    key, arrays = _single(out.content.array_records, "ArrayRecord", "the train reply")
    if set(arrays.keys()) != set(received.keys()):
        missing = sorted(set(received.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(received.keys()))
        return _mod_error(
            msg,
            f"compression_mod: the reply's arrays must be the arrays received "
            f"(missing {missing}, unexpected {extra})",
        )
    updates: dict[str, torch.Tensor] = {}
    uplink = dense = 0
    for name, arr in arrays.items():
        new = arr.numpy()
        old = received[name].numpy()
        dense += new.nbytes
        if new.shape != old.shape or new.dtype != old.dtype:
            return _mod_error(
                msg,
                f"compression_mod: array {name!r} came back as {new.dtype}{list(new.shape)}, "
                f"it was received as {old.dtype}{list(old.shape)}",
            )
        if codec is not None and _compressible(new):
            updates[name] = _f32(new) - _f32(old)
    # A non-finite update is refused here, before the codec sees it: the node's
    # state stays as it was, and the server counts and names the failure.
    bad = [n for n, u in updates.items() if not all_finite(u)]
    if bad:
        return _mod_error(
            msg, f"compression_mod: the update of {bad} is not finite (NaN or inf); not sent"
        )
    c = None if codec is None else _codec_for_node(codec, ctxt)
    if c is not None:
        _load_state(c, ctxt.state)
    blobs: dict[str, bytes] = {}
    passed: dict[str, Array] = {}
    for name, arr in arrays.items():
        if name not in updates:
            passed[name] = arr
            uplink += arr.numpy().nbytes
            continue
        blob = c.encode(updates[name], key=name).to_bytes()
        blobs[name] = blob
        uplink += len(blob)
    if fb is not None:
        # Past the deadline the server has moved on; keep no state of this run.
        _check_in_time(msg, fb.round, "after compressing")
    if c is not None:
        before = ctxt.state.get(STATE_CODEC)
        _save_state(c, ctxt.state)
        if fb is not None:
            # The first send's "before" is no state at all: an empty record.
            ctxt.state[STATE_PREV] = before if before is not None else ArrayRecord()
            ctxt.state[STATE_META] = ConfigRecord({"round": fb.round})
    content = RecordDict({k: v for k, v in out.content.items() if k != key})
    content[key] = ArrayRecord(passed)
    content[UPDATE_RECORD] = ConfigRecord(blobs)
    metrics = out.content.metric_records
    if metrics:
        mkey = next(iter(metrics))
        mr = MetricRecord(dict(metrics[mkey]))
    else:
        mkey, mr = "metrics", MetricRecord()
    mr[UPLINK_BYTES] = int(uplink)
    mr[DENSE_BYTES] = int(dense)
    content[mkey] = mr
    out.content = content
    return out


def compression_mod(codec: Codec | None) -> Mod:
    """A Flower client mod that sends each train reply as a compressed update.

    Args:
        codec: a :mod:`pykernels.comm` codec (``TopK``, ``Quantize``,
            ``LowRank``, ``Chain``), used as a template: each node gets its own
            copy whose state (error-feedback residuals, warm-start factors,
            rounding counters) is kept in ``Context.state["pk.codec"]``.
            ``None`` sends every array uncompressed and only adds the byte
            accounting (the baseline of a comparison).

    The reply must carry exactly one ``ArrayRecord`` with the arrays the node
    received (same names, shapes and dtypes); otherwise the mod returns
    an error reply (``MOD_FAILED_PRECONDITION``) naming what differs. The mod
    also rebuilds broadcasts that :class:`Compressed` sent with ``downlink=``.
    """
    if codec is not None and not isinstance(codec, Codec):
        raise TypeError(
            f"compression_mod: codec must be a pykernels.comm codec or None, "
            f"got {type(codec).__name__}"
        )

    def pykernels_compression_mod(
        msg: Message, ctxt: Context, call_next: ClientAppCallable
    ) -> Message:
        if not _is_train(msg):
            return call_next(msg, ctxt)
        try:
            fb = _feedback(msg)
        except (ValueError, KeyError, TypeError) as e:
            return _mod_error(msg, f"compression_mod: {e}")
        if fb is not None:
            # A message already past its deadline: whatever ran would be late.
            _check_in_time(msg, fb.round, "on arrival")
            if codec is not None:
                try:
                    _settle_state(fb, ctxt)
                except ValueError as e:
                    return _mod_error(msg, f"compression_mod: {e}")
        if DOWNLINK_META in msg.content:
            try:
                _apply_downlink(msg, ctxt)
            except (ValueError, KeyError, TypeError) as e:
                return _mod_error(msg, f"compression_mod: cannot rebuild the broadcast: {e}")
        try:
            _, received = _single(msg.content.array_records, "ArrayRecord", "the train message")
        except ValueError as e:
            return _mod_error(msg, f"compression_mod: {e}")
        out = call_next(msg, ctxt)
        if out.has_error():
            return out
        try:
            return _compress_reply(codec, received, out, ctxt, msg, fb)
        except (ValueError, TypeError) as e:
            return _mod_error(msg, f"compression_mod: {e}")

    pykernels_compression_mod.codec = codec  # type: ignore[attr-defined]
    return pykernels_compression_mod


# --- server side ---------------------------------------------------------------


@dataclass
class CompressedResult(Result):
    """Flower's :class:`Result` plus the byte accounting of :class:`Compressed`, per round.

    ``uplink_bytes[r]``: what the accepted replies of round ``r`` carried
    (payloads plus arrays passed through); ``dense_bytes[r]``: the raw bytes
    of the same arrays uncompressed; ``downlink_bytes[r]`` and
    ``downlink_dense_bytes[r]``: the same for the train broadcast;
    ``refused[r]``: ``(node_id, reason)`` of each reply dropped;
    ``failed[r]``: ``(node_id, reason)`` of each error reply (a ClientApp that
    raised, a reply the mod refused to send); ``missing[r]``: nodes sent a
    train message that did not reply in time; ``wait_s[r]``: seconds the
    round waited for its train replies.
    """

    uplink_bytes: dict[int, int] = field(default_factory=dict)
    dense_bytes: dict[int, int] = field(default_factory=dict)
    downlink_bytes: dict[int, int] = field(default_factory=dict)
    downlink_dense_bytes: dict[int, int] = field(default_factory=dict)
    refused: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    failed: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    missing: dict[int, list[int]] = field(default_factory=dict)
    wait_s: dict[int, float] = field(default_factory=dict)

    @property
    def compression_ratio(self) -> float:
        """Dense bytes over uplink bytes, all rounds."""
        up = sum(self.uplink_bytes.values())
        return sum(self.dense_bytes.values()) / up if up else float("nan")

    def __repr__(self) -> str:
        up, dense = sum(self.uplink_bytes.values()), sum(self.dense_bytes.values())
        return (
            super().__repr__()
            + f"\nUplink: {up} bytes ({dense} dense, {self.compression_ratio:.2f}x)\n"
        )


class Compressed(Strategy):
    """Wraps a Flower strategy so that it aggregates replies of :func:`compression_mod`.

    Args:
        strategy: any Flower strategy (FedAvg, FedAdam, FedProx, ...); it sees
            full arrays, as if the clients had sent them uncompressed.
        downlink: a codec to compress the train broadcast with (a delta to
            the previous one), or None to broadcast as Flower does.

    Attributes (per round): ``uplink_bytes``, ``dense_bytes``,
    ``downlink_bytes``, ``downlink_dense_bytes``, ``refused``, ``failed``,
    ``missing``, ``wait_s``; ``start`` returns them on a :class:`CompressedResult`.

    Each train message tells its node, in a ``"pk.train"`` record that
    :func:`compression_mod` takes out, the round and whether the node's
    recent replies were aggregated: the mod then restores the error-feedback
    state from before a reply that was not (refused, failed, late, lost).
    Started with ``start(..., timeout=T)``, train messages get a ttl of at
    most T, which the mod takes as the reply's deadline.
    """

    def __init__(self, strategy: Strategy, downlink: Codec | None = None) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"Compressed: strategy must be a Flower Strategy, got {type(strategy).__name__}"
            )
        if downlink is not None and not isinstance(downlink, Codec):
            raise TypeError(
                f"Compressed: downlink must be a pykernels.comm codec or None, "
                f"got {type(downlink).__name__}"
            )
        self.strategy = strategy
        self.downlink = downlink
        self.uplink_bytes: dict[int, int] = {}
        self.dense_bytes: dict[int, int] = {}
        self.downlink_bytes: dict[int, int] = {}
        self.downlink_dense_bytes: dict[int, int] = {}
        self.refused: dict[int, list[tuple[int, str]]] = {}
        self.failed: dict[int, list[tuple[int, str]]] = {}
        self.missing: dict[int, list[int]] = {}
        self.wait_s: dict[int, float] = {}
        self._history: dict[int, dict[int, bool]] = {}  # node -> {round: aggregated}
        self._timeout: float | None = None  # start()'s, the train messages' ttl
        self._sent_at = 0.0
        self._sent: dict[int, ArrayRecord] = {}  # node -> the arrays it trains from
        self._ref: dict[str, np.ndarray] | None = None  # downlink reference
        self._ref_version = 0
        self._node_version: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"Compressed({self.strategy!r}, downlink={self.downlink!r})"

    def summary(self) -> None:
        log(INFO, "\t├──> pykernels compression: uplink by compression_mod on the clients")
        log(INFO, "\t│\t└── downlink: %s", self.downlink if self.downlink else "uncompressed")
        self.strategy.summary()

    # --- train -----------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent = {}
        if self.downlink is None:
            for m in messages:
                _, rec = _single(m.content.array_records, "ArrayRecord", "a train message")
                self._sent[m.metadata.dst_node_id] = rec
        else:
            messages = self._compress_broadcast(server_round, messages)
        for m in messages:
            self._tell(server_round, m)
        self._sent_at = time.monotonic()
        return messages

    def _tell(self, server_round: int, m: Message) -> None:
        """Adds the node's round and recent outcomes to its message (its own content:
        a strategy may give every message the same RecordDict)."""
        node = m.metadata.dst_node_id
        hist = self._history.setdefault(node, {})
        rounds = sorted(r for r in hist if r < server_round)[-HISTORY:]
        content = RecordDict(dict(m.content.items()))
        content[TRAIN_META] = ConfigRecord(
            {
                "round": int(server_round),
                "sent": [int(r) for r in rounds],
                "aggregated": [bool(hist[r]) for r in rounds],
            }
        )
        m.content = content
        hist[server_round] = False  # until its reply is aggregated
        for r in sorted(hist)[: -HISTORY - 1]:
            del hist[r]
        if self._timeout is not None and m.metadata.ttl > self._timeout:
            m.metadata.ttl = float(self._timeout)

    def _compress_broadcast(self, server_round: int, messages: list[Message]) -> list[Message]:
        if not messages:
            return messages
        key, glob = _single(messages[0].content.array_records, "ArrayRecord", "a train message")
        names = list(glob.keys())
        g = {n: glob[n].numpy() for n in names}
        same = (
            self._ref is not None
            and list(self._ref) == names
            and all(
                self._ref[n].shape == g[n].shape and self._ref[n].dtype == g[n].dtype for n in names
            )
        )
        blobs: dict[str, bytes] = {}
        if same:
            assert self._ref is not None
            ref = {}
            for n in names:
                if _compressible(g[n]):
                    p = self.downlink.encode(_f32(g[n]) - _f32(self._ref[n]), key=n)
                    blob = p.to_bytes()
                    blobs[n] = blob
                    dec = _codecs.decode(Payload.from_bytes(blob)).float()
                    ref[n] = (_f32(self._ref[n]) + dec).numpy().astype(g[n].dtype)
                else:
                    ref[n] = g[n]
            base = self._ref_version
        else:
            self.downlink.reset()
            ref = {n: np.array(g[n]) for n in names}
            base = -1
        self._ref = ref
        self._ref_version += 1
        full = ArrayRecord({n: Array(np.asarray(ref[n])) for n in names})
        passed = ArrayRecord({n: Array(np.asarray(ref[n])) for n in names if n not in blobs})
        dense = sum(a.nbytes for a in ref.values())
        delta_bytes = sum(len(b) for b in blobs.values()) + sum(
            ref[n].nbytes for n in names if n not in blobs
        )
        sent_bytes = 0
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            delta = base >= 0 and self._node_version.get(node) == base
            meta = ConfigRecord(
                {
                    "version": self._ref_version,
                    "base": base if delta else -1,
                    "record": key,
                    "names": names,
                }
            )
            content = RecordDict({k: v for k, v in m.content.items() if k != key})
            content[key] = passed if delta else full
            if delta:
                content[DOWNLINK_RECORD] = ConfigRecord(dict(blobs))
            content[DOWNLINK_META] = meta
            m.content = content
            sent_bytes += delta_bytes if delta else dense
            self._node_version[node] = self._ref_version
            self._sent[node] = full
            out.append(m)
        self.downlink_bytes[server_round] = sent_bytes
        self.downlink_dense_bytes[server_round] = dense * len(messages)
        log(
            INFO,
            "Compressed: round %s broadcast %d bytes (%d dense)",
            server_round,
            sent_bytes,
            dense * len(messages),
        )
        return out

    def decode_reply(self, reply: Message) -> tuple[Message, int, int]:
        """(the reply with full arrays, its uplink bytes, its dense bytes).

        Raises :class:`ReplyRefused` when the reply cannot be decoded.
        """
        node = reply.metadata.src_node_id
        sent = self._sent.get(node)
        if sent is None:
            raise ReplyRefused(node, "the node was not sent a train message this round")
        content = reply.content
        blobs = content.get(UPDATE_RECORD)
        if not isinstance(blobs, ConfigRecord):
            raise ReplyRefused(
                node,
                f"the reply carries no {UPDATE_RECORD!r} ConfigRecord (not a pykernels "
                "payload: is compression_mod installed on the client?)",
            )
        try:
            key, passed = _single(content.array_records, "ArrayRecord", "the reply")
        except ValueError as e:
            raise ReplyRefused(node, str(e)) from None
        names = list(sent.keys())
        got = list(passed.keys()) + list(blobs.keys())
        if sorted(got) != sorted(names) or len(set(got)) != len(got):
            raise ReplyRefused(
                node,
                f"its arrays {sorted(got)} do not match the global arrays {sorted(names)}",
            )
        full: dict[str, Array] = {}
        uplink = dense = 0
        for n in names:
            g = sent[n].numpy()
            dense += g.nbytes
            if n in passed:
                a = passed[n].numpy()
                if a.shape != g.shape or a.dtype != g.dtype:
                    raise ReplyRefused(
                        node,
                        f"array {n!r} is {a.dtype}{list(a.shape)}, the global array is "
                        f"{g.dtype}{list(g.shape)}",
                    )
                full[n] = passed[n]
                uplink += a.nbytes
                continue
            blob = blobs[n]
            if not isinstance(blob, bytes):
                raise ReplyRefused(node, f"the update of {n!r} is not bytes")
            try:
                p = Payload.from_bytes(blob, max_numel=max(g.size, 1))
            except ValueError as e:
                raise ReplyRefused(node, f"the update of {n!r}: {e}") from None
            if p.shape != tuple(g.shape):
                raise ReplyRefused(
                    node,
                    f"the update of {n!r} has shape {list(p.shape)}, the global array "
                    f"{list(g.shape)}",
                )
            if not _compressible(g):
                raise ReplyRefused(node, f"array {n!r} ({g.dtype}) is not sent compressed")
            upd = _codecs.decode(p, device="cpu").float()
            if not bool(torch.isfinite(upd).all()):
                raise ReplyRefused(node, f"the update of {n!r} is not finite")
            full[n] = Array((_f32(g) + upd).numpy().astype(g.dtype))
            uplink += len(blob)
        new = RecordDict({k: v for k, v in content.items() if k not in (key, UPDATE_RECORD)})
        new[key] = ArrayRecord(full)
        return Message(content=new, metadata=copy.copy(reply.metadata)), uplink, dense

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        waited = time.monotonic() - self._sent_at
        good: list[tuple[bytes, int, Message]] = []
        failed: list[Message] = []
        refused: list[tuple[int, str]] = []
        errors: list[tuple[int, str]] = []
        uplink = dense = 0
        replied = set()
        answered = set()
        for reply in replies:
            answered.add(reply.metadata.src_node_id)
            if reply.has_error():
                failed.append(reply)  # the wrapped strategy sees it as a failure too
                node, reason = reply.metadata.src_node_id, reply.error.reason
                log(ERROR, "Compressed: node %s failed in round %s: %s", node, server_round, reason)
                errors.append((node, reason))
                continue
            try:
                msg, up, dn = self.decode_reply(reply)
            except ReplyRefused as e:
                log(ERROR, "%s (dropped from round %s)", e, server_round)
                refused.append((e.node_id, e.reason))
                continue
            node = reply.metadata.src_node_id
            replied.add(node)
            good.append((_digest(reply), node, msg))
            uplink += up
            dense += dn
        # Replies arrive in any order, and a floating-point weighted sum depends on
        # it: handing them over in an order fixed by their content makes the
        # aggregate, and so a whole run, reproducible.
        good.sort(key=lambda t: (t[0], t[1]))
        decoded = [m for _, _, m in good] + failed
        # A node that failed or was refused may not hold the reference any more.
        for node in set(self._sent) - replied:
            self._node_version.pop(node, None)
        self.uplink_bytes[server_round] = uplink
        self.dense_bytes[server_round] = dense
        self.refused[server_round] = refused
        self.failed[server_round] = errors
        self.missing[server_round] = sorted(set(self._sent) - answered)
        self.wait_s[server_round] = waited
        if self.missing[server_round]:
            log(
                WARNING,
                "Compressed: round %s got no reply from nodes %s (timed out)",
                server_round,
                self.missing[server_round],
            )
        log(
            INFO,
            "Compressed: round %s uplink %d bytes (%d dense, %.2fx) from %d replies, %d refused",
            server_round,
            uplink,
            dense,
            dense / uplink if uplink else float("nan"),
            len(replied),
            len(refused),
        )
        if not replied:
            log(WARNING, "Compressed: no reply of round %s could be aggregated", server_round)
        arrays, metrics = self.strategy.aggregate_train(server_round, decoded)
        if arrays is not None:
            # What the next message tells each node: its update is in the model.
            for node in replied:
                self._history.setdefault(node, {})[server_round] = True
        if metrics is not None:
            # The wrapped strategy averages metrics; bytes add up.
            metrics[UPLINK_BYTES] = int(uplink)
            metrics[DENSE_BYTES] = int(dense)
            if server_round in self.downlink_bytes:
                metrics[DOWNLINK_BYTES] = int(self.downlink_bytes[server_round])
        return arrays, metrics

    # --- evaluate: the wrapped strategy's ---------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def start(self, *args: Any, **kwargs: Any) -> CompressedResult:
        """Flower's ``Strategy.start``, returning the byte accounting with the result."""
        bound = inspect.signature(Strategy.start).bind(self, *args, **kwargs)
        bound.apply_defaults()
        timeout = bound.arguments["timeout"]
        self._timeout = None if timeout is None else float(timeout)
        res = super().start(*args, **kwargs)
        return CompressedResult(
            arrays=res.arrays,
            train_metrics_clientapp=res.train_metrics_clientapp,
            evaluate_metrics_clientapp=res.evaluate_metrics_clientapp,
            evaluate_metrics_serverapp=res.evaluate_metrics_serverapp,
            uplink_bytes=dict(self.uplink_bytes),
            dense_bytes=dict(self.dense_bytes),
            downlink_bytes=dict(self.downlink_bytes),
            downlink_dense_bytes=dict(self.downlink_dense_bytes),
            refused={k: list(v) for k, v in self.refused.items()},
            failed={k: list(v) for k, v in self.failed.items()},
            missing={k: list(v) for k, v in self.missing.items()},
            wait_s=dict(self.wait_s),
        )
