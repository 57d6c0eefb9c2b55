"""Benchmark cases shared by ``python -m pykernels bench`` and ``benchmarks/``.

Each family module defines ``cases(device, quick)`` returning :class:`Case`
objects: one problem, several implementations (pykernels and its peers) run
on the same data, and the peer that ratios are quoted against.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import backends

# What `bench --family` takes: every kernel family that has a module here (a
# new family's benchmark is one file, pykernels/bench/<family>.py), then the
# benchmarks of whole workflows.
WORKFLOWS = ("cp", "comm", "model", "llm")
FAMILIES = (
    *(f for f in backends.FAMILIES if importlib.util.find_spec(f"pykernels.bench.{f}")),
    *WORKFLOWS,
)


@dataclass
class Case:
    family: str
    name: str  # the problem, e.g. "n=16000000 k=1%"
    device: str
    impls: dict[str, Callable[[], Any]]
    # impl the ratios divide by; a tuple means the fastest of those impls in
    # this run (e.g. the best of quantize_dynamic's three engines)
    baseline: str | tuple[str, ...]
    bytes_moved: int = 0  # fewest bytes an implementation must move (floor)
    reps: int = 5
    notes: dict[str, str] = field(default_factory=dict)
    # time the impls in alternating rounds (one call of each per round) instead of
    # all of one impl's calls in a row: on a shared host whose speed drifts over a
    # long case (whole models), every impl then sees the same phases
    interleave: bool = False


@dataclass
class Result:
    family: str
    case: str
    device: str
    impl: str
    median_ms: float
    speedup: float  # baseline time / this time
    gbps: float | None


def inference(fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run under torch.inference_mode: forward passes timed without autograd."""

    def run():
        with torch.inference_mode():
            return fn()

    return run


def time_call(fn: Callable[[], Any], device: str, reps: int, warmup: bool = True) -> float:
    """Median milliseconds of `reps` calls after one warm-up call (unless not `warmup`)."""
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_rounds(impls: dict[str, Callable[[], Any]], device: str, reps: int) -> dict[str, float]:
    """Median milliseconds of each impl over ``reps`` rounds, each round calling every
    impl once (after one warm-up call of each)."""
    for fn in impls.values():
        fn()
    laps: dict[str, list[float]] = {k: [] for k in impls}
    for _ in range(reps):
        for k, fn in impls.items():
            laps[k].append(time_call(fn, device, 1, warmup=False))
    return {k: statistics.median(v) for k, v in laps.items()}


def collect_cases(families: tuple[str, ...], device: str, quick: bool) -> list[Case]:
    import importlib

    out: list[Case] = []
    for fam in families:
        mod = importlib.import_module(f"pykernels.bench.{fam}")
        out.extend(mod.cases(device, quick))
    return out


def run(cases: list[Case], progress: bool = True) -> list[Result]:
    results: list[Result] = []
    total = sum(len(c.impls) for c in cases)
    done = 0
    for case in cases:
        times: dict[str, float] = {}
        if case.interleave:
            if progress:
                print(
                    f"[{done + 1}-{done + len(case.impls)}/{total}] {case.family} {case.name}: "
                    f"{len(case.impls)} impls in {case.reps} alternating rounds ...",
                    file=sys.stderr,
                    flush=True,
                )
            done += len(case.impls)
            times = time_rounds(case.impls, case.device, case.reps)
        for impl, fn in case.impls.items() if not case.interleave else ():
            done += 1
            if progress:
                print(
                    f"[{done}/{total}] {case.family} {case.name} {impl} ...",
                    file=sys.stderr,
                    flush=True,
                )
            times[impl] = time_call(fn, case.device, case.reps)
        names = (case.baseline,) if isinstance(case.baseline, str) else case.baseline
        base = min(times[b] for b in names)
        for impl, ms in times.items():
            gbps = case.bytes_moved / (ms * 1e6) if case.bytes_moved else None
            results.append(Result(case.family, case.name, case.device, impl, ms, base / ms, gbps))
    return results


def table(results: list[Result], baselines: dict[str, str | tuple[str, ...]]) -> str:
    """Aligned text table; with a tuple baseline, ratios are over its fastest member."""
    rows = [("family", "case", "device", "impl", "median ms", "x baseline", "GB/s")]
    for r in results:
        rows.append(
            (
                r.family,
                r.case,
                r.device,
                r.impl + (" (baseline)" if _is_baseline(r.impl, baselines.get(r.case)) else ""),
                f"{r.median_ms:.3f}",
                f"{r.speedup:.2f}",
                "" if r.gbps is None else f"{r.gbps:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_baseline(impl: str, baseline: str | tuple[str, ...] | None) -> bool:
    return impl == baseline if isinstance(baseline, str) else impl in (baseline or ())


def write_json(path: str, results: list[Result], meta: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [r.__dict__ for r in results]}, f, indent=2)


def plot(path: str, results: list[Result]) -> None:
    """Bar chart of speedups over each case's baseline (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'pykernels[plot]'") from e
    cases = list(dict.fromkeys((r.family, r.case, r.device) for r in results))
    fig, axes = plt.subplots(len(cases), 1, figsize=(8, 2.2 * len(cases)), squeeze=False)
    for ax, (fam, case, dev) in zip(axes[:, 0], cases, strict=False):
        rs = [r for r in results if (r.family, r.case, r.device) == (fam, case, dev)]
        ax.barh([r.impl for r in rs], [r.speedup for r in rs], color="tab:blue")
        ax.set_xscale("log")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{fam}: {case} ({dev}) - speedup over baseline", fontsize=9)
        for i, r in enumerate(rs):
            ax.text(r.speedup, i, f" {r.speedup:.2f}x", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
