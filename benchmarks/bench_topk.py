"""Top-k sparsification vs torch.topk, torch.kthvalue, numpy.argpartition.

    pytest benchmarks/bench_topk.py --benchmark-enable

Cases come from pykernels.bench.topk (the same ones `python -m pykernels
bench` runs); add --benchmark-json to keep the figures.
"""

from __future__ import annotations

from _common import DEVICES, parametrize, run

from pykernels.bench import topk as cases

CASES = [c for d in DEVICES for c in cases.cases(d)]


@parametrize(CASES)
def test_topk(benchmark, case, impl):
    run(benchmark, case, impl)
