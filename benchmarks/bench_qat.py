"""QAT training step vs float training and torch.ao fake quantization.

    pytest benchmarks/bench_qat.py --benchmark-enable

Cases come from pykernels.bench.qat (the same ones `python -m pykernels
bench` runs); add --benchmark-json to keep the figures.
"""

from __future__ import annotations

from _common import DEVICES, parametrize, run

from pykernels.bench import qat as cases

CASES = [c for d in DEVICES for c in cases.cases(d)]


@parametrize(CASES)
def test_qat(benchmark, case, impl):
    run(benchmark, case, impl)
