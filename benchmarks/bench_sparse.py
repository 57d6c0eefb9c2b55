"""Sparse weights vs dense F.linear and torch.sparse (CSR, BSR), and a training step.

    pytest benchmarks/bench_sparse.py --benchmark-enable

Cases come from pykernels.bench.sparse (the same ones `python -m pykernels
bench` runs); add --benchmark-json to keep the figures.
"""

from __future__ import annotations

from _common import DEVICES, parametrize, run

from pykernels.bench import sparse as cases

CASES = [c for d in DEVICES for c in cases.cases(d)]


@parametrize(CASES)
def test_sparse(benchmark, case, impl):
    run(benchmark, case, impl)
