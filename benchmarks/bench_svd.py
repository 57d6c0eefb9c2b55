"""Randomized / rank-revealing / batched SVD and LowRankLinear vs torch.

    pytest benchmarks/bench_svd.py --benchmark-enable

Cases come from pykernels.bench.svd (the same ones `python -m pykernels
bench` runs); add --benchmark-json to keep the figures.
"""

from __future__ import annotations

from _common import DEVICES, parametrize, run

from pykernels.bench import svd as cases

CASES = [c for d in DEVICES for c in cases.cases(d)]


@parametrize(CASES)
def test_svd(benchmark, case, impl):
    run(benchmark, case, impl)
