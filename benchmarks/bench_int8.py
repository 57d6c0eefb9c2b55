"""int8 GEMM vs torch._int_mm.

    pytest benchmarks/bench_int8.py --benchmark-enable

Cases come from pykernels.bench.int8 (the same ones `python -m pykernels
bench` runs); add --benchmark-json to keep the figures.
"""

from __future__ import annotations

from _common import DEVICES, parametrize, run

from pykernels.bench import int8 as cases

CASES = [c for d in DEVICES for c in cases.cases(d)]


@parametrize(CASES)
def test_int8(benchmark, case, impl):
    run(benchmark, case, impl)
