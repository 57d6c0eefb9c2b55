"""Loads the compiled extensions. Never makes ``import pykernels`` fail.

``C`` is ``pykernels._C`` (CPU kernels) or None, ``C_cuda`` is
``pykernels._C_cuda`` (CUDA kernels) or None; ``C_error`` / ``C_cuda_error``
say why one is missing.
"""

from __future__ import annotations

import importlib
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

# The CPU tiers of each architecture, in order (common/cpu_features.h).
X86_ISA_NAMES = ("portable", "avx2", "avx512", "amx")
ARM_ISA_NAMES = ("portable", "neon", "dotprod", "i8mm")


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(f"pykernels.{name}"), None
    except ImportError as e:  # not built, or built for another Python
        return None, f"{type(e).__name__}: {e}"


C, C_error = _load("_C")
C_cuda, C_cuda_error = _load("_C_cuda")


def is_arm() -> bool:
    """Whether this is an aarch64 process (the Arm tiers), else the x86 names apply."""
    return platform.machine().lower() in ("aarch64", "arm64")


def _isa_names() -> tuple[str, ...]:
    # The extension's own list where it has one: it was built for this machine.
    if C is not None and "isa_names" in (info := C.cpu_info()):
        return tuple(info["isa_names"])
    return ARM_ISA_NAMES if is_arm() else X86_ISA_NAMES


# This architecture's tier names, in order: what PYKERNELS_CPU_ISA may say here.
ISA_NAMES = _isa_names()

_isa = os.environ.get("PYKERNELS_CPU_ISA", "")
if _isa and _isa not in ISA_NAMES:
    # A cap of the other architecture (a shared CI setting, say) is ignored as any
    # unknown name is, and said so with the names that apply.
    _other = ARM_ISA_NAMES if ISA_NAMES != ARM_ISA_NAMES else X86_ISA_NAMES
    _what = (
        f"a tier of {'aarch64' if _other == ARM_ISA_NAMES else 'x86-64'}, not of this "
        f"{platform.machine()} machine ({', '.join(ISA_NAMES)})"
        if _isa in _other
        else f"not one of {', '.join(ISA_NAMES)}"
    )
    warnings.warn(
        f"PYKERNELS_CPU_ISA={_isa!r} is {_what}; ignoring it",
        RuntimeWarning,
        stacklevel=2,
    )

_hint = ""
if (Path(__file__).resolve().parents[2] / "setup.py").exists():
    # Python put the current directory first and found the source checkout.
    _hint = (
        f" (this is the source checkout at {Path(__file__).resolve().parents[1]}: "
        "build it in place with `pip install -e .`, or run from another directory)"
    )

if C is None and os.environ.get("PYKERNELS_NO_NATIVE", "0") != "1":
    warnings.warn(
        f"pykernels: native CPU kernels unavailable ({C_error}){_hint}; "
        "falling back to the Numba and reference backends",
        RuntimeWarning,
        stacklevel=2,
    )
