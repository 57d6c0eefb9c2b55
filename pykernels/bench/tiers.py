"""CPU tiers for ``python -m pykernels bench --isa``: ours and the peers capped together.

A tier runs in a child process whose environment caps pykernels
(``PYKERNELS_CPU_ISA``) and every library the peers use: ATen's vectorised
kernels (``ATEN_CPU_CAPABILITY``), oneDNN (``ONEDNN_MAX_CPU_ISA``), fbgemm
(``FBGEMM_ENABLE_INSTRUCTIONS``) and MKL (``MKL_ENABLE_INSTRUCTIONS``), which
all read them once at load. So an AVX-512 machine measures an honest AVX2
tier. A tier above what this CPU runs is skipped, never emulated: the capped
libraries would execute instructions the CPU lacks.

On aarch64 the tiers are neon, dotprod and i8mm. Ours is capped exactly; the
peers are capped at Advanced SIMD without SVE (ATen's default kernels, oneDNN's
ADVANCED_SIMD), which none of our tiers uses, but no library offers a cap
between NEON, dotprod and i8mm, so at each Arm tier the peers use whichever of
those the CPU has. A tier of the other architecture is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from typing import Any

X86_TIERS = ("avx2", "avx512", "amx")
ARM_TIERS = ("neon", "dotprod", "i8mm")
TIERS = (*X86_TIERS, *ARM_TIERS, "native")
CAP_VARS = (
    "PYKERNELS_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "FBGEMM_ENABLE_INSTRUCTIONS",
    "MKL_ENABLE_INSTRUCTIONS",
)


def caps(tier: str, vnni: bool = True) -> dict[str, str]:
    """The environment that caps ours and the peers at `tier` ({} for native)."""
    if tier == "avx2":
        return {
            "PYKERNELS_CPU_ISA": "avx2",
            "ATEN_CPU_CAPABILITY": "avx2",
            "ONEDNN_MAX_CPU_ISA": "AVX2",
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        }
    if tier == "avx512":
        return {
            "PYKERNELS_CPU_ISA": "avx512",
            "ATEN_CPU_CAPABILITY": "avx512",
            "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI" if vnni else "AVX512_CORE",
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1" if vnni else "AVX512",
            "MKL_ENABLE_INSTRUCTIONS": "AVX512",
        }
    if tier == "amx":
        return {
            "PYKERNELS_CPU_ISA": "amx",
            "ATEN_CPU_CAPABILITY": "avx512",
            "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX",
            "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1",
            "MKL_ENABLE_INSTRUCTIONS": "AVX512_E4",
        }
    if tier in ARM_TIERS:
        return {
            "PYKERNELS_CPU_ISA": tier,
            "ATEN_CPU_CAPABILITY": "default",
            "ONEDNN_MAX_CPU_ISA": "ADVANCED_SIMD",
        }
    if tier == "native":
        return {}
    raise ValueError(f"--isa: tier must be one of {', '.join(TIERS)}, got {tier!r}")


def detected() -> tuple[str, bool]:
    """(best ISA of this CPU and OS, has AVX-512 VNNI): portable/avx2/avx512/amx on
    x86-64, portable/neon/dotprod/i8mm on aarch64."""
    from ..backends import native as _native

    if _native.C is not None:
        cpu = _native.C.cpu_info()
        return cpu["isa_detected"], bool(cpu["avx512_vnni"])
    if _native.is_arm():
        return "neon", False  # the AArch64 baseline; without the extension, nothing finer
    import torch

    cap = torch.backends.cpu.get_cpu_capability().lower()
    return ("avx512" if "avx512" in cap else "avx2" if "avx2" in cap else "portable"), False


def unsupported(tier: str) -> str | None:
    """Why this CPU cannot run `tier`, or None."""
    if tier == "native":
        return None
    from ..backends import native as _native

    order = _native.ISA_NAMES
    if tier not in order:
        arch = "an aarch64" if tier in ARM_TIERS else "an x86-64"
        return (
            f"{tier} is {arch} tier: this {platform.machine()} machine cannot run it "
            f"(its tiers are {', '.join(order[1:])})"
        )
    best, _ = detected()
    if order.index(tier) > order.index(best):
        return f"this CPU's best instruction set is {best}: the {tier} tier cannot run here"
    return None


def parse(spec: list[str]) -> list[str]:
    """Tiers from repeated and comma-separated --isa values, in order, deduplicated."""
    out: list[str] = []
    for item in spec:
        for t in item.split(","):
            t = t.strip().lower()
            if not t:
                continue
            caps(t)  # validates the name
            if t not in out:
                out.append(t)
    return out


def run(tiers: list[str], child_args: list[str], json_path: str | None) -> int:
    """Runs `python -m pykernels bench CHILD_ARGS` once per tier; collects the JSON."""
    _, vnni = detected()
    combined: dict[str, Any] = {"tiers": {}, "skipped": {}, "failed": {}}
    status = 0
    for tier in tiers:
        why = unsupported(tier)
        if why is not None:
            print(f"\n== tier {tier}: skipped ({why})", flush=True)
            combined["skipped"][tier] = why
            continue
        env = {k: v for k, v in os.environ.items() if k not in CAP_VARS}
        env.update(caps(tier, vnni))
        shown = " ".join(f"{k}={v}" for k, v in caps(tier, vnni).items()) or "no caps"
        print(f"\n== tier {tier} ({shown})", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "tier.json")
            cmd = [sys.executable, "-m", "pykernels", "bench", *child_args, "--json", out]
            rc = subprocess.run(cmd, env=env).returncode
            if rc != 0:
                print(f"== tier {tier}: the bench exited with {rc}", flush=True)
                combined["failed"][tier] = rc
                status = rc
                continue
            with open(out) as f:
                data = json.load(f)
        data["meta"]["tier"] = tier
        combined["tiers"][tier] = data
    if tiers and not combined["tiers"]:
        # A tier that started and failed is no tier "this machine cannot run".
        why = []
        if combined["skipped"]:
            why.append(
                f"{', '.join(combined['skipped'])} cannot run on this machine "
                f"({platform.machine()}, best tier {detected()[0]})"
            )
        if combined["failed"]:
            why.append(f"{', '.join(combined['failed'])} failed (exit status above)")
        print(f"\n== no tier ran: {'; '.join(why)}", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(combined, f, indent=2)
        print(f"wrote {json_path}", file=sys.stderr)
    return status
