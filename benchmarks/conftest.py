"""Benchmarks time with pytest-benchmark: `pytest benchmarks --benchmark-enable`.

Peers and pykernels run on the same data in one session; each case is one
benchmark group, so pytest-benchmark's table shows them side by side.
"""

import pytest
import torch


def pytest_configure(config):
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _two_threads():
    # PERFORMANCE.md measures with 2 threads for torch and pykernels alike.
    import pykernels as pk

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    pk.set_num_threads(2)
    yield
    torch.set_num_threads(before)
