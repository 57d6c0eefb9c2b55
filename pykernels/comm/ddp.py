"""DDP communication hooks over the comm codecs, shaped like torch's PowerSGD hook::

    from pykernels import comm
    state = comm.ddp.CompressionState(comm.TopK(0.01), process_group=None, start_iter=10)
    ddp_model.register_comm_hook(state, comm.ddp.compress_hook)
    ...
    state.stats()   # {"steps", "compressed_steps", "bytes_sent", "bytes_dense", "ratio"}

For the first ``start_iter`` iterations the hook is a plain averaging
allreduce (DDP rebuilds its buckets after the first iteration, and early
training is sensitive to compression). Then each gradient bucket is encoded
by the codec, per bucket and per process (error-feedback residuals stay on
the process that made them):

- Codecs whose ``exchange`` is ``"gather"`` (TopK, Quantize, Chain) have
  their payloads exchanged with all-gather (their sizes gathered first
  unless the codec is ``fixed_size``, the blobs padded to the largest) and
  summed with the codec's aggregation, payload by payload in rank order, so
  every rank ends with the same bits.
- ``"powersgd"`` (LowRank) runs PowerSGD's protocol: one allreduce of the
  tensors sent dense together with the P factors, one of the Q factors. Its
  state (warm-start Q, residual) is kept per parameter.

Non-finite gradients (an AMP overflow, a NaN batch) never enter error
feedback. A rank whose bucket holds NaN or inf sends it without error
feedback (that residual stays as it was), so the mean is not finite on every
rank and AMP's GradScaler skips the step as it would without compression.
With LowRank the allreduced factors carry the NaN to every rank, and no rank
keeps that tensor's residual or warm-start Q. Since nobody applies such a
step, at its last bucket every rank takes back what it sent in all its
buckets (:meth:`~pykernels.comm.Codec.take_back`): those residuals become
``x + residual_before``, the update kept for a later step.

A job that fails (a collective's timeout, a peer that died) fails the
future DDP waits on, and DDP raises that error from ``backward``.

Each compressed bucket's exchange runs as one job on a worker thread, in the
order DDP called the hook, so collectives are issued in the same order on
every rank while backward continues. Per-bucket residuals follow the
parameters when DDP's bucket layout changes, as it does for the first
iteration of a run resumed from a checkpoint.

Bytes are counted per rank as the ring algorithms move them: an allreduce
of N bytes sends ``2 (W - 1) / W * N``, an all-gather of S bytes per rank
sends ``(W - 1) * S``. ``bytes_dense`` is what allreduce of the same buckets
would have sent.
"""

# No `from __future__ import annotations` here: DDP compares the hook's annotations
# with dist.GradBucket and Future[Tensor] as objects.
import atexit
import queue
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks as default

from ..ops._checks import check_int, check_range
from .base import Codec, _mix, all_finite, payload_finite, sum_into
from .lowrank import LowRank
from .wire import Payload

__all__ = ["CompressionState", "compress_hook"]


def _count_arg(owner: str, name: str, v: Any, lo: int) -> int:
    return check_range(owner, name, check_int(owner, name, v), lo)


def allreduce_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring allreduce of `nbytes`."""
    return 2 * (world - 1) * nbytes // world


def allgather_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-gather of `nbytes` per rank."""
    return (world - 1) * nbytes


class CompressionState:
    """The state of :func:`compress_hook`: the codec (with its per-bucket state) and counters.

    Args:
        codec: a :class:`~pykernels.comm.TopK`, :class:`~pykernels.comm.Quantize`,
            :class:`~pykernels.comm.LowRank` or :class:`~pykernels.comm.Chain`,
            or any other :class:`~pykernels.comm.Codec` (its ``exchange``,
            ``fixed_size`` and ``noise_seed`` say how it is exchanged).
        process_group: the group to communicate in (default: the world).
        start_iter: iterations of plain allreduce before compression starts;
            at least 2 when the codec keeps per-bucket state (error feedback,
            warm start), because DDP rebuilds its buckets after iteration 1.
        model: optionally the (DDP) model, so that a codec that cannot handle
            its gradients' dtype or device is refused now rather than in the
            first backward.

    Checkpoint it with :meth:`state_dict` / :meth:`load_state_dict` on every
    rank (each rank's residuals are its own); it also pickles, without the
    process group, as torch's ``PowerSGDState`` does.
    """

    def __init__(
        self,
        codec: Codec,
        process_group: dist.ProcessGroup | None = None,
        start_iter: int = 10,
        *,
        model: nn.Module | None = None,
    ) -> None:
        if not isinstance(codec, Codec):
            raise TypeError(
                "CompressionState: codec must be a pykernels.comm codec (TopK, Quantize, "
                f"LowRank, Chain), got {type(codec).__name__}"
            )
        start_iter = _count_arg("CompressionState", "start_iter", start_iter, 0)
        if codec.keeps_tensor_state and start_iter < 2:
            raise ValueError(
                f"CompressionState: start_iter must be >= 2 for {codec!r}: its per-bucket state "
                "(error feedback, warm start) would not survive DDP's bucket rebuild after "
                "iteration 1"
            )
        if process_group is None:
            if not dist.is_available() or not dist.is_initialized():
                raise ValueError(
                    "CompressionState: torch.distributed is not initialized; call "
                    "init_process_group first or pass process_group="
                )
        elif not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                "CompressionState: process_group must be a torch.distributed.ProcessGroup, "
                f"got {type(process_group).__name__}"
            )
        if model is not None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"CompressionState: model must be an nn.Module, got {type(model)}")
            for name, p in model.named_parameters():
                if p.requires_grad:
                    try:
                        codec.check(p.dtype, p.device)
                    except (TypeError, ValueError) as e:
                        raise type(e)(f"CompressionState: parameter {name!r}: {e}") from None
        self.codec = codec
        self.process_group = process_group
        self.start_iter = start_iter
        self.iter = 0
        self._bytes_sent = 0
        self._bytes_dense = 0
        self._lock = threading.Lock()
        self._checked: set[tuple[torch.dtype, str]] = set()
        self._worker: _Worker | None = None
        # Parameters are numbered in the order the hook first sees them (the
        # initial bucket layout, the same in every fresh process); a bucket's
        # layout is its ((number, numel), ...). Per-bucket residuals follow the
        # parameters when DDP's layout changes (a resumed run starts from the
        # initial layout, not the rebuilt one its checkpoint was made with).
        self._param_ids: dict[int, int] = {}
        self._layouts: dict[str, tuple[tuple[int, int], ...]] = {}
        self._owner: dict[int, str] = {}
        self._displaced: dict[int, tuple[Tensor, int, int]] = {}
        # This iteration's payloads (key, payload) so far, and whether any
        # bucket's exchange was not finite: see _settle.
        self._pending: tuple[int, list[tuple[str, Payload]], bool] = (-1, [], False)

    def __repr__(self) -> str:
        return f"CompressionState({self.codec!r}, start_iter={self.start_iter}, iter={self.iter})"

    def stats(self) -> dict[str, Any]:
        """Iterations seen, of which compressed, and the bytes this rank sent.

        ``bytes_dense`` is what a ring allreduce of the same buckets would have
        sent, ``ratio`` = bytes_dense / bytes_sent (NaN before any traffic).
        """
        with self._lock:
            sent, dense = self._bytes_sent, self._bytes_dense
        return {
            "steps": self.iter,
            "compressed_steps": max(0, self.iter - self.start_iter),
            "bytes_sent": sent,
            "bytes_dense": dense,
            "ratio": dense / sent if sent else float("nan"),
        }

    def _count(self, sent: int, dense: int = 0) -> None:
        with self._lock:
            self._bytes_sent += sent
            self._bytes_dense += dense

    # --- checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters and the codec's state (tensors), for torch.save on each rank."""
        return {
            "iter": self.iter,
            "start_iter": self.start_iter,
            "bytes_sent": self._bytes_sent,
            "bytes_dense": self._bytes_dense,
            "codec": self.codec.state_dict(),
            "layouts": {k: [list(e) for e in v] for k, v in self._layouts.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`'s result (made with an equally configured codec).

        Every entry is checked before anything changes: a malformed one raises
        TypeError / ValueError naming it, and leaves this state as it was.
        """
        owner = "CompressionState.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"{owner}: state_dict must be a mapping (from state_dict()), "
                f"got {type(state_dict).__name__}"
            )
        missing = {"iter", "codec"} - set(state_dict)
        if missing:
            raise ValueError(f"{owner}: missing {sorted(missing)}")
        if not isinstance(state_dict["codec"], Mapping):
            raise TypeError(
                f"{owner}: 'codec' must be the codec's state_dict (a mapping), "
                f"got {type(state_dict['codec']).__name__}"
            )
        it = _count_arg(owner, "iter", state_dict["iter"], 0)
        counts = {
            k: _count_arg(owner, k, state_dict.get(k, 0), 0)
            for k in ("bytes_sent", "bytes_dense", "start_iter")
        }
        del counts["start_iter"]  # checked, but the constructor's value stands
        layouts = _parse_layouts(owner, state_dict.get("layouts", {}))
        holder = self._residual_holder()
        if holder is not None:
            # A layout and its bucket's residual must agree, or _follow would
            # move the wrong slices when DDP's buckets change.
            res = state_dict["codec"]
            prefix = "first." if holder is not self.codec else ""
            for k, lay in layouts.items():
                r = res.get(f"{prefix}{k}/residual")
                n = sum(numel for _, numel in lay)
                if isinstance(r, Tensor) and r.numel() != n:
                    raise ValueError(
                        f"{owner}: layouts[{k!r}] covers {n} elements, the codec's "
                        f"{prefix}{k}/residual has {r.numel()}"
                    )
        self.codec.load_state_dict(state_dict["codec"])
        self.iter = it
        self._bytes_sent, self._bytes_dense = counts["bytes_sent"], counts["bytes_dense"]
        self._layouts = layouts
        self._owner = {i: k for k, v in self._layouts.items() for i, _ in v}
        self._displaced = {}

    # --- parameters and bucket layouts ---------------------------------------------
    def _layout_of(self, bucket: dist.GradBucket) -> tuple[tuple[int, int], ...]:
        out = []
        for p in bucket.parameters():
            i = self._param_ids.setdefault(id(p), len(self._param_ids))
            out.append((i, p.numel()))
        return tuple(out)

    def _residual_holder(self) -> Codec | None:
        """The codec whose per-bucket residuals must follow the parameters, if any."""
        if self.codec.exchange != "gather":
            return None  # PowerSGD keys its state per parameter already
        return self.codec.residual_codec()

    def _follow(
        self, key: str, layout: tuple[tuple[int, int], ...], device: torch.device
    ) -> tuple[tuple[int, int], ...]:
        """The layout to compress bucket `key` in; moves residuals when its parameters changed.

        The same parameters in another order (a fresh DDP's first iteration
        lists them in registration order, a rebuilt one in gradient order)
        keep the known order: the result then equals the uninterrupted run's.
        """
        saved = self._layouts.get(key)
        if saved == layout:
            return layout
        if saved is not None and sorted(saved) == sorted(layout):
            return saved
        holder = self._residual_holder()
        if holder is not None and self._layouts:
            # Where each parameter's residual is now: in the tensor of the
            # bucket that owns it, or in one replaced earlier in this move.
            where = dict(self._displaced)
            for k, lay in self._layouts.items():
                r = holder._state.get(k, {}).get("residual")
                off = 0
                for i, n in lay:
                    if r is not None and self._owner.get(i) == k:
                        where[i] = (r.reshape(-1), off, n)
                    off += n
            new = torch.zeros(sum(n for _, n in layout), dtype=torch.float32, device=device)
            off = 0
            for i, n in layout:
                src = where.pop(i, None)
                if src is not None and src[2] == n:
                    new[off : off + n] = src[0][src[1] : src[1] + n].to(device)
                off += n
            # Parameters of the tensor being replaced that live elsewhere now.
            moved = {i for i, _ in layout}
            self._displaced = {
                i: loc
                for i, loc in where.items()
                if i in self._displaced or (self._owner.get(i) == key and i not in moved)
            }
            holder._state.setdefault(key, {})["residual"] = new
        self._layouts[key] = layout
        for i, _ in layout:
            self._owner[i] = key
        for k in list(self._layouts):
            if k != key and all(self._owner.get(i) != k for i, _ in self._layouts[k]):
                del self._layouts[k]
                if holder is not None:
                    holder._state.pop(k, None)
        return layout

    def _settle(self, it: int, sent: list[tuple[str, Payload]], bad: bool, last: bool) -> None:
        """Notes one bucket's payloads of iteration `it`; at its last bucket, if any
        bucket's exchange was not finite, takes every payload of it back.

        AMP's GradScaler skips a step whose gradients are not finite anywhere,
        so nothing sent in it, in any bucket, is applied: each rank puts what
        it sent back into its residuals (``x + residual_before``) rather than
        lose it. Runs on the hook's worker thread, buckets in order.
        """
        held_it, held, held_bad = self._pending
        if held_it != it:  # a new iteration (or one whose job failed part way)
            held, held_bad = [], False
        held = held + sent
        held_bad = held_bad or bad
        if last:
            if held_bad:
                for key, payload in held:
                    self.codec.take_back(payload, key)
            held, held_bad = [], False
        self._pending = (it, held, held_bad)

    def __getstate__(self) -> dict[str, Any]:
        skip = ("process_group", "_lock", "_worker", "_param_ids", "_pending")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self.process_group = None  # the default group, as PowerSGDState does
        self._lock = threading.Lock()
        self._worker = None
        self._param_ids = {}
        self._pending = (-1, [], False)


def _parse_layouts(owner: str, layouts: Any) -> dict[str, tuple[tuple[int, int], ...]]:
    """``{bucket key: ((parameter number, numel), ...)}`` from a state_dict's "layouts"."""
    if not isinstance(layouts, Mapping):
        raise TypeError(
            f"{owner}: 'layouts' must map bucket keys to [[param, numel], ...] lists, "
            f"got {type(layouts).__name__}"
        )
    out: dict[str, tuple[tuple[int, int], ...]] = {}
    seen: dict[int, str] = {}
    for k, lay in layouts.items():
        where = f"layouts[{k!r}]"
        if not isinstance(k, str):
            raise TypeError(f"{owner}: {where}: bucket keys are str, got {type(k).__name__}")
        if isinstance(lay, (str, bytes)) or not isinstance(lay, (list, tuple)):
            raise TypeError(
                f"{owner}: {where} must be a list of [param, numel] pairs, got {type(lay).__name__}"
            )
        pairs = []
        for j, e in enumerate(lay):
            if isinstance(e, (str, bytes)) or not isinstance(e, (list, tuple)) or len(e) != 2:
                raise ValueError(f"{owner}: {where}[{j}] must be a [param, numel] pair, got {e!r}")
            i = _count_arg(owner, f"{where}[{j}][0]", e[0], 0)
            n = _count_arg(owner, f"{where}[{j}][1]", e[1], 0)
            if i in seen:
                raise ValueError(f"{owner}: parameter {i} is in both {seen[i]} and {where}")
            seen[i] = where
            pairs.append((i, n))
        out[k] = tuple(pairs)
    return out


def _group(state: CompressionState) -> dist.ProcessGroup:
    return state.process_group if state.process_group is not None else dist.group.WORLD


class _Worker:
    """One thread that runs the compressed buckets' jobs in the order the hook was called.

    DDP calls the hook for the buckets in the same order on every rank, but a
    collective issued from a future's callback (on a backend thread) can
    overtake the next bucket's first collective on one rank and not on
    another, and collectives must be issued in one order everywhere. So each
    bucket's whole exchange (encode, gathers or allreduces, aggregation)
    runs as one job on this thread, in FIFO order, while backward goes on.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pykernels-comm-ddp", daemon=True)
        self._thread.start()
        _live_workers.add(self)

    def submit(self, job: Callable[[], Tensor], fut: torch.futures.Future) -> None:
        self._jobs.put((job, fut))

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the thread once the jobs queued before have run.

        A daemon thread still alive when the interpreter finalizes is ended
        with pthread_exit, whose forced unwinding through torch's C++ frames
        aborts the process ("terminate called without an active exception",
        seen at the exit of DDP processes); so no worker outlives its state
        or the interpreter.
        """
        self._jobs.put(None)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, fut = item
            try:
                result = job()
            except BaseException as e:  # handed to DDP, which raises it in backward
                fut.set_exception(e)
            else:
                fut.set_result(result)


_live_workers: weakref.WeakSet[_Worker] = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    for worker in list(_live_workers):
        worker.stop()


def _worker_of(state: CompressionState) -> _Worker:
    if state._worker is None:
        state._worker = _Worker()
        weakref.finalize(state, state._worker.stop)
    return state._worker


def compress_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: averages the bucket's gradient through ``state.codec``.

    Register with ``ddp_model.register_comm_hook(state, compress_hook)``.
    """
    group = _group(state)
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    sig = (buf.dtype, buf.device.type)
    if sig not in state._checked:
        state.codec.check(buf.dtype, buf.device)  # before any collective, on every rank
        state._checked.add(sig)
    layout = state._layout_of(bucket)  # also numbers the parameters on first sight
    it = state.iter
    last = bucket.is_last()
    if last:
        state.iter += 1
    dense = allreduce_bytes(buf.numel() * buf.element_size(), world)
    if it < state.start_iter:
        state._count(dense, dense)
        return default._allreduce_fut(group, buf)
    index = bucket.index()
    if state.codec.exchange == "powersgd":
        grads = bucket.gradients()
        names = [f"param{i}" for i, _ in layout]

        def job() -> Tensor:
            return _lowrank_exchange(state, names, buf, grads, group, world, it, last, dense)

    else:

        def job() -> Tensor:
            order = state._follow(f"bucket{index}", layout, buf.device)
            if order == layout:
                return _gather_exchange(state, index, buf, group, world, it, last, dense)
            # Compress a copy in the known order, and put the result back in DDP's.
            offsets, off = {}, 0
            for i, n in layout:
                offsets[i] = (off, n)
                off += n
            segs = [buf[offsets[i][0] : offsets[i][0] + n] for i, n in order]
            work = torch.cat(segs)
            _gather_exchange(state, index, work, group, world, it, last, dense)
            off = 0
            for seg in segs:
                seg.copy_(work[off : off + seg.numel()])
                off += seg.numel()
            return buf

    fut: torch.futures.Future = torch.futures.Future(devices=[buf.device] if buf.is_cuda else None)
    _worker_of(state).submit(job, fut)
    # Python's set_exception stores the exception as the future's *value*, and
    # DDP then fails to cast it to a Tensor ("Unable to cast ... to Tensor"). A
    # callback that raises marks the chained future as failed instead, so DDP
    # raises the job's own error (a collective's timeout says so).
    return fut.then(_value)


def _value(fut: torch.futures.Future) -> Tensor:
    return fut.wait()


def _wire_device(group: dist.ProcessGroup, buf: Tensor) -> torch.device:
    """Where the collectives want their tensors: the GPU for NCCL, else the host."""
    return buf.device if dist.get_backend(group) == "nccl" else torch.device("cpu")


def _gather_exchange(
    state: CompressionState,
    index: int,
    buf: Tensor,
    group: dist.ProcessGroup,
    world: int,
    it: int,
    last: bool,
    dense: int,
) -> Tensor:
    """Encodes buf (the bucket, or a reordered copy), all-gathers every rank's payload,
    and averages them into buf."""
    codec = state.codec
    rank = dist.get_rank(group)
    key = f"bucket{index}"
    base = codec.noise_seed
    if base is not None:
        # Independent rounding noise per rank, step and bucket; reproducible on resume.
        payload = codec.encode(buf, key=key, seed=_mix(base, rank, index, it))
    else:
        payload = codec.encode(buf, key=key)
    blob = payload.to_bytes()
    dev = _wire_device(group, buf)
    n = len(blob)
    if codec.fixed_size:
        sizes = [n] * world  # same shape, same parameters: the same size everywhere
        extra = 0
    else:
        size = torch.tensor([n], dtype=torch.int64, device=dev)
        got = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(got, size, group=group)
        sizes = [int(s) for s in got]
        extra = 8
    m = max(sizes)
    data = torch.zeros(m, dtype=torch.uint8)
    data[:n] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    data = data.to(dev)
    outs = [torch.empty_like(data) for _ in range(world)]
    dist.all_gather(outs, data, group=group)
    state._count(allgather_bytes(m + extra, world), dense)
    payloads = [
        payload if r == rank else Payload.from_bytes(outs[r][: sizes[r]].cpu())
        for r in range(world)
    ]
    # The mean, written straight into the bucket (each payload scaled by
    # 1 / world as it is added: no dense temporary, no extra pass).
    if buf.dtype == torch.float32 and buf.is_contiguous():
        sum_into(payloads, buf, scale=1.0 / world, overwrite=True)
    else:
        total = torch.empty(buf.numel(), dtype=torch.float32, device=buf.device)
        buf.copy_(sum_into(payloads, total, scale=1.0 / world, overwrite=True))
    # Every rank sees the same payloads, so every rank decides alike.
    bad = not all(payload_finite(p) for p in payloads)
    state._settle(it, [(key, payload)], bad, last)
    return buf


def _lowrank_exchange(
    state: CompressionState,
    names: list[str],
    buf: Tensor,
    grads: list[Tensor],
    group: dist.ProcessGroup,
    world: int,
    it: int,
    last: bool,
    dense: int,
) -> Tensor:
    """PowerSGD: allreduce [dense tensors | P], orthonormalize P, allreduce Q, decompress."""
    codec: LowRank = state.codec  # type: ignore[assignment]
    plans = [codec.plan(g.shape) for g in grads]
    plain = [g for g, plan in zip(grads, plans, strict=False) if plan is None]
    steps = [
        codec._begin(name, g, plan)
        for name, g, plan in zip(names, grads, plans, strict=False)
        if plan is not None
    ]
    ps = [codec._p(s) for s in steps]
    first = torch.cat(
        [g.reshape(-1).float() for g in plain] + [p.reshape(-1) for p in ps]
        or [torch.zeros(0, device=buf.device)]
    )
    dist.all_reduce(first, group=group)
    # A NaN or inf on any rank is in every rank's sum: all decide alike.
    bad = not all_finite(first)
    sent = allreduce_bytes(first.numel() * 4, world)
    off = 0
    for g in plain:
        g.copy_(first[off : off + g.numel()].view(g.shape).div_(world))
        off += g.numel()
    qs = []
    for s, p in zip(steps, ps, strict=False):
        qs.append(codec._q(s, first[off : off + p.numel()].view(p.shape)))
        off += p.numel()
    kept = []
    if qs:
        second = torch.cat([q.reshape(-1) for q in qs])
        dist.all_reduce(second, group=group)
        bad = bad or not all_finite(second)
        sent += allreduce_bytes(second.numel() * 4, world)
        second.div_(world)
        off = 0
        for s, q in zip(steps, qs, strict=False):
            q_avg = second[off : off + q.numel()].view(q.shape)
            off += q.numel()
            if codec._finish(s, q, q_avg) and codec.error_feedback:
                # What this rank's residual gave up for this tensor: P Q_local^T.
                params = {
                    "rank": q.shape[1],
                    "rows": s.p.shape[0],
                    "cols": q.shape[0],
                    "warm_start": codec.warm_start,
                    "error_feedback": True,
                }
                p_local = Payload("lowrank", s.target.dtype, s.shape, params, {"p": s.p, "q": q})
                kept.append((s.key, p_local))
            if s.target.dtype == torch.float32 and s.target.is_contiguous():
                torch.mm(s.p, q_avg.T, out=s.target)  # no dense temporary
            else:
                s.target.copy_(s.p @ q_avg.T)
    state._settle(it, kept, bad, last)
    state._count(sent, dense)
    return buf
