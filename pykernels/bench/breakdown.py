"""Where a compressed model's forward goes: pykernels' own ops against everything else.

pykernels' kernels are torch custom ops in the ``pykernels::`` namespace, so
``torch.profiler`` records each call as an event of that name. :func:`breakdown`
profiles a few calls of ``fn`` (after a warm-up) and splits their wall time three
ways:

- ``pykernels``: the CPU time of every outermost ``pykernels::`` event, with what
  it calls inside (its allocations, a nested pykernels op): our kernels' time;
- ``other ops``: the CPU time of every other outermost op (aten::linear of a layer
  left in fp32, aten::scaled_dot_product_attention, aten::gelu, aten::layer_norm,
  aten::add, ...);
- ``outside ops``: the wall time no op accounts for (Python between the ops, the
  module calls, the profiler's own cost).

The three shares are over the profiled wall time and sum to 1. An op's CPU time is
the wall time its calling thread spends in it, so an op parallelised over threads
counts once, as the forward's own wall time does. ``top`` lists the other ops by
self time (their own time, not their children's).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

PREFIX = "pykernels::"


@dataclass
class Breakdown:
    wall_ms: float  # per call, under the profiler
    ours_ms: float  # per call, outermost pykernels:: ops (inclusive)
    other_ms: float  # per call, every other outermost op (inclusive)
    ours_by_op: dict[str, float] = field(default_factory=dict)  # ms per call
    top: list[tuple[str, float]] = field(default_factory=list)  # other ops, self ms per call
    unprofiled_ms: float | None = None  # per call, the same calls without the profiler

    @property
    def outside_ms(self) -> float:
        return max(0.0, self.wall_ms - self.ours_ms - self.other_ms)

    @property
    def shares(self) -> dict[str, float]:
        """Fractions of the profiled wall time; they sum to 1."""
        total = self.ours_ms + self.other_ms + self.outside_ms
        return {
            "pykernels": self.ours_ms / total,
            "other ops": self.other_ms / total,
            "outside ops": self.outside_ms / total,
        }

    def line(self, top: int = 5) -> str:
        s = self.shares
        ops = ", ".join(f"{k} {v:.1f}" for k, v in self.top[:top])
        wall = f"{self.wall_ms:.1f} ms profiled"
        if self.unprofiled_ms is not None:
            wall += f" ({self.unprofiled_ms:.1f} ms without the profiler)"
        return (
            f"pykernels ops {s['pykernels']:.1%} ({self.ours_ms:.1f} ms), other ops "
            f"{s['other ops']:.1%} ({self.other_ms:.1f} ms), outside ops "
            f"{s['outside ops']:.1%} of {wall}; top other ops (self ms): {ops}"
        )


def _outermost(events: list[Any], keep: Callable[[Any], bool]) -> list[Any]:
    """Events for which ``keep`` holds and no ancestor does (their times contain
    their descendants' already)."""
    out = []
    for e in events:
        if not keep(e):
            continue
        p, nested = e.cpu_parent, False
        while p is not None:
            if keep(p):
                nested = True
                break
            p = p.cpu_parent
        if not nested:
            out.append(e)
    return out


def _inside(e: Any, pred: Callable[[Any], bool]) -> bool:
    p = e.cpu_parent
    while p is not None:
        if pred(p):
            return True
        p = p.cpu_parent
    return False


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null: kineto writes a line to it as the profiler starts
    and another as it stops ("USDT: ... profiler_start"), into the table's output."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def breakdown(fn: Callable[[], Any], calls: int = 3, warmup: int = 1) -> Breakdown:
    """Profile ``calls`` calls of ``fn`` (under inference_mode, after ``warmup`` calls)
    and split their time between pykernels' ops and the rest (module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        plain = (time.perf_counter() - t0) * 1e3 / calls
        prof = profile(activities=[ProfilerActivity.CPU])
        with _quiet_stderr():
            prof.start()
        try:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            wall = (time.perf_counter() - t0) * 1e3 / calls
        finally:
            with _quiet_stderr():
                prof.stop()
    events = [e for e in prof.events() if not e.is_async and e.device_type.name == "CPU"]
    thread = {e.thread for e in events if e.cpu_parent is None and e.name.startswith("aten::")}
    # the calling thread's events only (the profiler may see a worker's too)
    main = [e for e in events if not thread or e.thread in thread]

    def ours(e: Any) -> bool:
        return e.name.startswith(PREFIX)

    roots = [e for e in main if e.cpu_parent is None]
    total_us = sum(e.cpu_time_total for e in roots)
    ours_ev = _outermost(main, ours)
    ours_us = sum(e.cpu_time_total for e in ours_ev)
    by_op: dict[str, float] = defaultdict(float)
    for e in ours_ev:
        by_op[e.name] += e.cpu_time_total / 1e3 / calls
    self_us: dict[str, float] = defaultdict(float)
    for e in main:
        if not ours(e) and not _inside(e, ours):
            self_us[e.name] += e.self_cpu_time_total
    top = sorted(((k, v / 1e3 / calls) for k, v in self_us.items()), key=lambda kv: -kv[1])
    return Breakdown(
        wall_ms=wall,
        ours_ms=ours_us / 1e3 / calls,
        other_ms=max(0.0, total_us - ours_us) / 1e3 / calls,
        ours_by_op=dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        top=top,
        unprofiled_ms=plain,
    )


__all__ = ["Breakdown", "PREFIX", "breakdown"]
