"""pk.info() and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pykernels as pk
from pykernels import _native
from pykernels.__main__ import main


def test_info_fields():
    d = pk.info()
    for key in ("version", "torch", "native_cpu", "native_cuda", "threads", "gpu", "backends"):
        assert key in d
    assert d["version"] == pk.__version__
    assert set(d["backends"]["topk"]) == {"cpu", "cuda"}
    if _native.C is not None:
        assert d["isa_active"] in d["isa_compiled"]
        assert "portable" in d["isa_compiled"]


def test_cli_info_prints_the_same_facts(tmp_path):
    # From another directory, so the installed package is what runs.
    out = subprocess.run(
        [sys.executable, "-m", "pykernels", "info", "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["version"] == pk.info()["version"]
    assert d["backends"] == pk.info()["backends"]


def test_cli_bench_writes_json(tmp_path, monkeypatch, capsys):
    import pykernels.bench.topk as bench_topk

    # A small problem keeps the test fast; the real shapes run in `bench`.
    real_cases = bench_topk.cases

    def small_cases(device, quick=False):
        cs = real_cases(device, quick=True)[:1]
        for c in cs:
            c.reps = 1
        return cs

    monkeypatch.setattr(bench_topk, "cases", small_cases)
    path = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--quick", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    impls = {r["impl"] for r in data["results"]}
    assert {"torch.topk", "pk exact", "pk approx", "numpy.argpartition"} <= impls
    assert all(r["median_ms"] > 0 for r in data["results"])
    base = [r for r in data["results"] if r["impl"] == "torch.topk"][0]
    assert base["speedup"] == 1.0
    table = capsys.readouterr().out
    assert "pk exact" in table and "x baseline" in table


def test_info_says_whether_7_bit_activations_pay(cpu_isa):
    """The AVX2 kernel (and only it) has the faster 7-bit path."""
    says = pk.info()["int8_act_bits"]
    vnni = _native.C.cpu_info()["avx512_vnni"]
    avx2_kernel = cpu_isa == "avx2" or (cpu_isa in ("avx512", "amx") and not vnni)
    assert ("faster" in says) == avx2_kernel, (cpu_isa, says)
