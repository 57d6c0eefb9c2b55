"""Top-k sparsification vs torch.topk, torch.kthvalue, numpy.argpartition.

    pytest benchmarks/bench_topk.py --benchmark-enable --benchmark-group-by=group

Cases come from pykernels.bench.topk (the same ones `python -m pykernels
bench` runs); add --benchmark-json to keep the figures.
"""

from __future__ import annotations

import pytest
import torch

from pykernels.bench import topk as topk_cases

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [c for d in DEVICES for c in topk_cases.cases(d)]


@pytest.mark.parametrize(
    "case, impl",
    [(c, i) for c in CASES for i in c.impls],
    ids=[f"{c.device}-{c.name}-{i}" for c in CASES for i in c.impls],
)
def test_topk(benchmark, case, impl):
    benchmark.group = f"topk {case.device} {case.name}"
    benchmark.extra_info["baseline"] = case.baseline
    fn = case.impls[impl]
    if case.device == "cuda":

        def run():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    else:
        benchmark.pedantic(fn, rounds=case.reps, warmup_rounds=1)
