"""Loads the compiled extensions. Never makes ``import pykernels`` fail.

``C`` is ``pykernels._C`` (CPU kernels) or None, ``C_cuda`` is
``pykernels._C_cuda`` (CUDA kernels) or None; ``C_error`` / ``C_cuda_error``
say why one is missing.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from types import ModuleType

ISA_NAMES = ("portable", "avx2", "avx512", "amx")


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(f"pykernels.{name}"), None
    except ImportError as e:  # not built, or built for another Python
        return None, f"{type(e).__name__}: {e}"


C, C_error = _load("_C")
C_cuda, C_cuda_error = _load("_C_cuda")

_isa = os.environ.get("PYKERNELS_CPU_ISA", "")
if _isa and _isa not in ISA_NAMES:
    warnings.warn(
        f"PYKERNELS_CPU_ISA={_isa!r} is not one of {', '.join(ISA_NAMES)}; ignoring it",
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
