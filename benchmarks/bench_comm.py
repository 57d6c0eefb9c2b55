"""Update compression: codecs vs the torch way, DDP steps vs torch's hooks.

    pytest benchmarks/bench_comm.py --benchmark-enable

Codec cases come from pykernels.bench.comm (the same ones `python -m
pykernels bench --family comm` runs). The DDP comparison spawns its own
2-process gloo runs and prints its table (-s to see it); it takes a few
minutes.
"""

from __future__ import annotations

import json
import os

from _common import DEVICES, parametrize, run

from pykernels.bench import comm as cases

CASES = [c for d in DEVICES for c in cases.cases(d)]


@parametrize(CASES)
def test_comm(benchmark, case, impl):
    run(benchmark, case, impl)


def test_ddp_step(benchmark):
    """Step time, bytes and projected step of each DDP method; COMM_DDP_JSON=path keeps them."""
    report = benchmark.pedantic(cases.ddp_bench, rounds=1, iterations=1)
    print()
    print(cases.format_ddp(report))
    benchmark.extra_info["ddp"] = report["rows"]
    path = os.environ.get("COMM_DDP_JSON")
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
