"""PowerSGD-style low-rank compression (Vogels, Karimireddy and Jaggi, 2019).

A tensor M (viewed as ``shape[0] x rest``) is sent as two thin factors:
``P = M Q``, ``P <- orthonormalize(P)``, ``Q = M^T P``, decoded as ``P Q^T``.
With warm start, the next call starts from this call's Q (one step of power
iteration per call, which tracks the dominant subspace across steps); with
error feedback, ``M - P Q^T`` is added to the next update of the same key.
In DDP the two products are separated by allreduces of P and of Q
(:mod:`pykernels.comm.ddp`); ``encode`` is the single-worker version.

Orthonormalization is ``torch.linalg.qr`` (LAPACK Householder): composing a
Cholesky-QR or Gram-Schmidt from torch ops was measured slower at the shapes
that matter here (n x 4, n >= 4096; see the comm benchmark), and the QR
handles rank-deficient P (a zero gradient) without NaN.

Wire body (codec id 3)::

    flags u8 | rank u32 | rows u64 | cols u64 | P: rows x rank f32 | Q: cols x rank f32
    (decoded: P @ Q.T, rows * cols == numel)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..ops._checks import check_bool, check_int, check_range
from . import wire
from .base import Codec, _key, _mix, all_finite, key_hash, to_dtype
from .wire import Payload

# flag bits
LOWRANK_WARM, LOWRANK_EF = 1, 2

_LOWRANK = struct.Struct("<BIQQ")


def orthonormalize(p: Tensor) -> Tensor:
    """An orthonormal basis of the columns of ``p`` [n, r] (n >= r), same shape."""
    return torch.linalg.qr(p).Q


@dataclass
class _Step:
    """One tensor's compression in progress (DDP runs it in three pieces)."""

    key: str
    target: Tensor  # the gradient itself, [rows, cols] view
    m: Tensor  # fp32 [rows, cols]: target + residual (a new tensor when EF)
    q: Tensor  # fp32 [cols, r], the starting Q
    shape: tuple[int, ...] = ()  # the tensor's own shape, the residual's
    p: Tensor | None = None  # orthonormal P once known


class LowRank(Codec):
    """Rank-``rank`` PowerSGD compression with warm start and error feedback.

    Args:
        rank: columns of P and Q, ``>= 1`` (capped at the matrix's smaller side).
        warm_start: start each call from the previous call's Q for the key.
        error_feedback: keep ``M - P Q^T`` per key (``P Q^T`` as decode returns
            it, in the tensor's dtype) and add it next time. A step whose
            ``M`` (or P or Q) holds NaN or inf keeps neither residual nor warm-start
            Q: the payload decodes to NaN and the state stays as it was.
        min_compression_rate: compress a tensor only if ``(rows + cols) * rank
            * min_compression_rate < rows * cols``; others (and tensors of
            fewer than 2 dimensions) are sent dense, as torch's PowerSGD does.
        seed: seed of the initial random Q (the same in every process, as
            DDP needs, and per key).

    Payload: P and Q in fp32, ``4 * (rows + cols) * rank`` bytes.
    """

    name = "lowrank"
    wire_id = 3
    payload_params = ("rank", "rows", "cols", "warm_start", "error_feedback")
    payload_parts = ("p", "q")
    dtypes = tuple(wire.DTYPES)
    exchange = "powersgd"
    batch_sum = True  # one product of rank (workers x r) for all payloads
    _fields = {"residual": torch.float32, "q": torch.float32, "step": torch.int64}

    def __init__(
        self,
        rank: int = 4,
        *,
        warm_start: bool = True,
        error_feedback: bool = True,
        min_compression_rate: float = 2.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.rank = check_range("LowRank", "rank", check_int("LowRank", "rank", rank), 1)
        self.warm_start = check_bool("LowRank", "warm_start", warm_start)
        self.error_feedback = check_bool("LowRank", "error_feedback", error_feedback)
        if isinstance(min_compression_rate, bool) or not isinstance(
            min_compression_rate, (int, float)
        ):
            raise TypeError("LowRank: min_compression_rate must be a number")
        if not min_compression_rate > 0:
            raise ValueError(
                f"LowRank: min_compression_rate must be > 0, got {min_compression_rate}"
            )
        self.min_compression_rate = float(min_compression_rate)
        seed = check_int("LowRank", "seed", seed)
        self.seed = check_range("LowRank", "seed", seed, 0, (1 << 63) - 1)

    def __repr__(self) -> str:
        return (
            f"LowRank(rank={self.rank}, warm_start={self.warm_start}, "
            f"error_feedback={self.error_feedback}, "
            f"min_compression_rate={self.min_compression_rate})"
        )

    @property
    def stateful(self) -> bool:
        return True  # the initial Q follows a per-key counter without warm start

    @property
    def keeps_tensor_state(self) -> bool:
        return self.warm_start or self.error_feedback

    def plan(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, int, int] | None:
        """(rows, cols, rank) when a tensor of `shape` is compressed, None if sent dense."""
        if len(shape) < 2:
            return None
        rows = int(shape[0])
        cols = 1
        for s in shape[1:]:
            cols *= int(s)
        r = min(self.rank, rows, cols)
        if r == 0 or (rows + cols) * r * self.min_compression_rate >= rows * cols:
            return None
        return rows, cols, r

    def _validate_state(self, owner: str, name: str, field: str, t: Tensor) -> None:
        super()._validate_state(owner, name, field, t)
        if field == "q" and (t.dim() != 2 or t.shape[1] > self.rank):
            raise ValueError(
                f"{owner}: {name} must be [cols, r] with r <= rank={self.rank}, "
                f"got {tuple(t.shape)}"
            )
        if field == "q" and not all_finite(t):
            raise ValueError(f"{owner}: {name} holds NaN or inf; a warm-start Q must be finite")

    # --- the three pieces ------------------------------------------------------
    def _begin(self, key: str, t: Tensor, plan: tuple[int, int, int]) -> _Step:
        rows, cols, r = plan
        target = t.reshape(rows, cols)
        if self.error_feedback:
            # Out of place: the residual is replaced at the end only if the step
            # was finite (a NaN step, on this worker or any other, leaves it).
            m = self._residual(key, t).view(rows, cols) + target.to(torch.float32)
        else:
            m = target.float()
        fields = self._state.setdefault(key, {})
        q = fields.get("q") if self.warm_start else None
        if q is not None and tuple(q.shape) != (cols, r):
            raise ValueError(
                f"LowRank: the warm-start Q of key {key!r} is {tuple(q.shape)}, "
                f"the tensor needs {(cols, r)}; give each tensor its own key="
            )
        if q is None:
            step = 0
            if not self.warm_start:
                s = fields.get("step")
                step = 0 if s is None else int(s)
                fields["step"] = torch.tensor(step + 1, dtype=torch.int64)
            gen = torch.Generator().manual_seed(_mix(self.seed, key_hash(key), step))
            q = torch.randn(cols, r, generator=gen)
        return _Step(key, target, m, q.to(m.device, torch.float32), tuple(t.shape))

    @staticmethod
    def _p(step: _Step) -> Tensor:
        """P = M Q, before aggregation."""
        return step.m @ step.q

    @staticmethod
    def _q(step: _Step, p: Tensor) -> Tensor:
        """Orthonormalizes the (aggregated) P and returns this worker's Q = M^T P."""
        step.p = orthonormalize(p)
        # (P^T M)^T, not M^T P: with M row-major, MKL runs the first 5-6x
        # faster (10 vs 60 ms for 4096 x 4096, rank 4, 2 threads).
        return (step.p.T @ step.m).T.contiguous()

    def _finish(self, step: _Step, q_local: Tensor, q_shared: Tensor) -> bool:
        """Keeps M - P Q_local^T as the residual, and Q_shared for the next warm start.

        Only when both are finite (returns whether they were kept): a step
        with NaN or inf anywhere (P and Q are allreduced in DDP, so one
        worker's NaN reaches all) changes no state. The product is taken as
        decode returns it, in the tensor's dtype.
        """
        ok = not self.warm_start or all_finite(q_shared)
        if self.error_feedback and ok:
            dtype = step.target.dtype
            if dtype in (torch.float16, torch.bfloat16):
                step.m.sub_(to_dtype(step.p @ q_local.T, dtype).float())
            else:
                step.m.addmm_(step.p, q_local.T, alpha=-1.0)
            ok = all_finite(step.m)
        if not ok:
            return False
        fields = self._state.setdefault(step.key, {})
        if self.error_feedback:
            fields["residual"] = step.m.view(step.shape)
        if self.warm_start:
            fields["q"] = q_shared.detach().clone()
        return True

    # --- codec interface -------------------------------------------------------
    def encode(self, tensor: Tensor, key: str | None = None) -> Payload:
        """P and Q of ``tensor (+ residual of key)``, or the tensor itself if too small."""
        t = self._check_tensor(tensor)
        key = _key(key)
        plan = self.plan(t.shape)
        if plan is None:
            return Payload("dense", t.dtype, tuple(t.shape), {}, {"data": t.clone()})
        step = self._begin(key, t, plan)
        q = self._q(step, self._p(step))
        kept = self._finish(step, q, q)
        params = {
            "rank": plan[2],
            "rows": plan[0],
            "cols": plan[1],
            "warm_start": self.warm_start,
            "error_feedback": self.error_feedback and kept,
        }
        return Payload("lowrank", t.dtype, tuple(t.shape), params, {"p": step.p, "q": q})

    # --- payloads ----------------------------------------------------------------
    @classmethod
    def write_body(cls, payload: Payload, out: list) -> None:
        q = payload.params
        flags = (LOWRANK_WARM if q["warm_start"] else 0) | (
            LOWRANK_EF if q["error_feedback"] else 0
        )
        out.append(_LOWRANK.pack(flags, q["rank"], q["rows"], q["cols"]))
        out.append(wire.raw_bytes(payload.parts["p"].float()))
        out.append(wire.raw_bytes(payload.parts["q"].float()))

    @classmethod
    def read_body(
        cls, reader: wire.Reader, dtype: torch.dtype, numel: int
    ) -> tuple[dict[str, Any], dict[str, wire.Part]]:
        flags, rank, rows, cols = reader.unpack(_LOWRANK.format)
        if rows * cols != numel:
            raise ValueError(f"payload: lowrank {rows} x {cols} does not match numel {numel}")
        if not 1 <= rank <= min(rows, cols):
            raise ValueError(f"payload: lowrank rank {rank} not in [1, min({rows}, {cols})]")
        if flags & ~(LOWRANK_WARM | LOWRANK_EF):
            raise ValueError(f"payload: unknown lowrank flags {flags:#x}")
        pm = reader.array(rows * rank, "<f4", "lowrank P")
        qm = reader.array(cols * rank, "<f4", "lowrank Q")
        params = {
            "rank": rank,
            "rows": rows,
            "cols": cols,
            "warm_start": bool(flags & LOWRANK_WARM),
            "error_feedback": bool(flags & LOWRANK_EF),
        }
        parts = {
            "p": wire.host_tensor(pm, torch.float32).view(rows, rank),
            "q": wire.host_tensor(qm, torch.float32).view(cols, rank),
        }
        return params, parts

    @classmethod
    def decode_payload(cls, payload: Payload, device: torch.device) -> Tensor:
        p = payload
        m = p.parts["p"].to(device).float() @ p.parts["q"].to(device).float().T
        return to_dtype(m, p.dtype).reshape(p.shape)

    @classmethod
    def add_payloads(
        cls, payloads: Sequence[Payload], out: Tensor, scale: float, overwrite: bool
    ) -> None:
        if overwrite:
            out.zero_()
        if not payloads:
            return
        # One product of rank (workers x r): sum_i P_i Q_i^T = [P_1 .. P_w] [Q_1 .. Q_w]^T.
        dev = out.device
        rows, cols = payloads[0].params["rows"], payloads[0].params["cols"]
        if any((q.params["rows"], q.params["cols"]) != (rows, cols) for q in payloads):
            raise ValueError("aggregate: lowrank payloads of different matrix shapes")
        pc = torch.cat([q.parts["p"].to(dev).float() for q in payloads], dim=1)
        qc = torch.cat([q.parts["q"].to(dev).float() for q in payloads], dim=1)
        out.view(rows, cols).addmm_(pc, qc.T, alpha=scale)
