"""What every bench_<family>.py does with its cases from pykernels.bench."""

from __future__ import annotations

import pytest
import torch

from pykernels.bench import Case

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def parametrize(cases: list[Case]):
    """One benchmark per (case, implementation)."""
    pairs = [(c, i) for c in cases for i in c.impls]
    return pytest.mark.parametrize(
        "case, impl", pairs, ids=[f"{c.device}-{c.name}-{i}" for c, i in pairs]
    )


def run(benchmark, case: Case, impl: str) -> None:
    """Times one implementation; each case is one group, peers side by side."""
    benchmark.group = f"{case.family} {case.device} {case.name}"
    benchmark.extra_info["baseline"] = case.baseline
    fn = case.impls[impl]
    if case.device == "cuda":

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=10, warmup_rounds=2)
    else:
        benchmark.pedantic(fn, rounds=case.reps, warmup_rounds=1)
