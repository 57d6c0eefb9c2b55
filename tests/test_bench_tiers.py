"""`python -m pykernels bench --isa`: which tiers run, and with which caps."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from pykernels import _native
from pykernels.__main__ import main
from pykernels.bench import tiers


def test_parse_tiers():
    assert tiers.parse(["avx2,native", "avx2", " AVX512 "]) == ["avx2", "native", "avx512"]
    with pytest.raises(ValueError, match="tier must be one of"):
        tiers.parse(["avx3"])


def test_every_tier_caps_ours_and_every_peer_together():
    for tier in ("avx2", "avx512", "amx"):
        env = tiers.caps(tier)
        assert set(env) == set(tiers.CAP_VARS)
        assert env["PYKERNELS_CPU_ISA"] == tier
    assert tiers.caps("native") == {}


# This architecture's lowest tier and two above it (the tests fake a CPU at LOW).
LOW, HIGH, TOP = tiers.ARM_TIERS if _native.is_arm() else tiers.X86_TIERS


def test_a_tier_above_the_cpu_is_skipped(monkeypatch):
    monkeypatch.setattr(tiers, "detected", lambda: (LOW, False))
    assert tiers.unsupported(LOW) is None and tiers.unsupported("native") is None
    assert "cannot run here" in tiers.unsupported(HIGH)
    assert "cannot run here" in tiers.unsupported(TOP)


def test_run_gives_each_child_its_caps(monkeypatch, tmp_path):
    monkeypatch.setattr(tiers, "detected", lambda: (LOW, False))
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")  # a stale cap must not leak
    seen = {}

    def fake_run(cmd, env):
        tier = env.get("PYKERNELS_CPU_ISA", "native")
        seen[tier] = {k: env.get(k) for k in tiers.CAP_VARS}
        out = cmd[cmd.index("--json") + 1]
        with open(out, "w") as f:
            json.dump({"meta": {}, "results": [{"impl": "x"}]}, f)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tiers.subprocess, "run", fake_run)
    path = tmp_path / "t.json"
    assert tiers.run([LOW, HIGH, "native"], ["--family", "topk"], str(path)) == 0
    assert seen[LOW] == {k: tiers.caps(LOW).get(k) for k in tiers.CAP_VARS}
    assert all(v is None for v in seen["native"].values())
    data = json.loads(path.read_text())
    assert set(data["tiers"]) == {LOW, "native"} and HIGH in data["skipped"]
    assert data["tiers"][LOW]["meta"]["tier"] == LOW


def test_the_caps_reach_torch(tmp_path):
    """A child started with a tier's caps really runs torch at that tier."""
    if tiers.unsupported("avx2"):
        pytest.skip("no AVX2 here")
    env = {k: v for k, v in os.environ.items() if k not in tiers.CAP_VARS}
    env.update(tiers.caps("avx2"))
    code = (
        "import torch, pykernels as pk; "
        "print(torch.backends.cpu.get_cpu_capability(), pk.info()['isa_active'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["AVX2", "avx2"]


def test_arm_tiers_cap_ours_exactly_and_the_peers_without_sve():
    assert tiers.parse(["neon,dotprod", "I8MM"]) == ["neon", "dotprod", "i8mm"]
    for tier in tiers.ARM_TIERS:
        assert tiers.caps(tier) == {
            "PYKERNELS_CPU_ISA": tier,
            "ATEN_CPU_CAPABILITY": "default",
            "ONEDNN_MAX_CPU_ISA": "ADVANCED_SIMD",
        }


def test_tiers_of_the_other_architecture_say_they_cannot_run_here(monkeypatch, capsys):
    other = tiers.X86_TIERS if _native.is_arm() else tiers.ARM_TIERS
    for tier in other:
        why = tiers.unsupported(tier)
        assert why is not None and "cannot run it" in why and platform.machine() in why

    def no_child(*a, **k):
        raise AssertionError("a tier that cannot run here was started")

    monkeypatch.setattr(tiers.subprocess, "run", no_child)
    assert main(["bench", "--isa", ",".join(other), "--family", "topk"]) == 0
    out = capsys.readouterr().out
    assert all(f"== tier {t}: skipped" in out for t in other)
    assert "no tier ran" in out


def test_a_tier_that_fails_is_not_reported_as_one_this_cpu_cannot_run(monkeypatch, capsys):
    """A child that crashes (as torch's oneDNN did under qemu -cpu max) is a failure."""
    monkeypatch.setattr(tiers, "detected", lambda: (LOW, False))
    monkeypatch.setattr(
        tiers.subprocess, "run", lambda cmd, env: subprocess.CompletedProcess(cmd, -4)
    )
    assert tiers.run([LOW, HIGH], ["--family", "topk"], None) == -4
    out = capsys.readouterr().out
    assert f"== tier {LOW}: the bench exited with -4" in out
    assert f"{HIGH} cannot run on this machine" in out and f"{LOW} failed" in out
    assert f"{LOW} cannot run" not in out
