"""What was built, what this machine has, and which backend each family uses."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import torch

from . import backends
from .backends import native as _native


def version() -> str:
    """The version this package was built as (setuptools-scm, from git).

    The build writes it into ``pykernels/_version.py`` beside this file, which
    is then the truth for the code actually imported; the installed
    distribution's metadata can describe another copy (an editable install of
    one checkout imported from another), so it is only the fallback.
    """
    # Checked by path: an editable install's import hook would otherwise hand this
    # copy another checkout's _version module.
    here = Path(__file__).resolve().parent
    if (here / "_version.py").is_file():
        from ._version import version as built

        return str(built)
    return _native_version(here) or _installed_version() or "0+unknown"


def _native_version(here: Path) -> str | None:
    """The version compiled into this copy's C ABI library (a tree whose native files
    were built, or copied, without the _version.py of that build)."""
    import ctypes

    lib = here / "libpykernels.so"
    if not lib.is_file():
        return None
    try:
        fn = ctypes.CDLL(str(lib)).pk_version
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode() or None


def _installed_version() -> str | None:
    """The installed distribution's version, if that distribution is this very copy."""
    try:
        dist = metadata.distribution("pykernels")
    except metadata.PackageNotFoundError:
        return None
    here = Path(__file__).resolve().parent
    for f in dist.files or ():
        if f.name == "info.py" and Path(str(dist.locate_file(f))).resolve().parent == here:
            return dist.version
    try:
        url = json.loads(dist.read_text("direct_url.json") or "{}")
    except json.JSONDecodeError:
        return None
    if url.get("dir_info", {}).get("editable") and url.get("url", "").startswith("file://"):
        src = Path(unquote(urlparse(url["url"]).path)).resolve()
        if here.parent == src:
            return dist.version
    return None


def cpu_name() -> str:
    """The CPU's model name as the OS reports it (``/proc/cpuinfo`` on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def build() -> str:
    """What this build carries, in words; the CUDA module is named with its status, so
    that nobody takes a build that merely compiled it for a CUDA build."""
    parts = ["native CPU kernels" if _native.C is not None else "no native CPU kernels"]
    if _native.C_cuda is not None:
        cu = _native.C_cuda.cuda_info()
        rt = int(cu["runtime_version"])
        usable = (
            "this torch has CUDA"
            if torch.version.cuda and torch.cuda.is_available()
            else "unused: this torch has no CUDA device"
            if torch.version.cuda
            else "unused: this torch is a CPU-only build"
        )
        parts.append(
            f"CUDA module (CUDA {rt // 1000}.{rt % 1000 // 10}, sm {cu['archs_compiled']}; "
            f"{backends.CUDA_NOT_VERIFIED}; {usable})"
        )
    return " + ".join(parts)


def _amx_kernels() -> str:
    """Whether the AMX-INT8 tile kernel is built and whether it can run here."""
    if _native.C is None:
        return "not available (native CPU kernels not built)"
    cpu = _native.C.cpu_info()
    if _native.is_arm():
        return "not built: AMX tiles are x86 (this aarch64 build has the neon, dotprod, i8mm tiers)"
    if "amx" not in cpu["isa_compiled"]:
        return "not built (the compiler lacks -mamx-int8); AMX CPUs use avx512"
    tiles = cpu.get("amx_tiles", "absent")
    if tiles == "absent":
        return "built (int8 GEMM tiles); this CPU has no AMX, so unused"
    if tiles == "denied":
        return "built (int8 GEMM tiles); the OS refused tile permission: avx512 used instead"
    if cpu["isa_active"] != "amx":
        return f"built (int8 GEMM tiles), OS granted tile permission, off (cap {cpu['isa_cap']})"
    rows = cpu["int8_amx_min_rows"]
    return (
        "built (int8 GEMM tiles), OS granted tile permission, in use "
        f"(int8 GEMMs of >= {rows} rows; fewer rows run avx512 vnni, which is faster there)"
    )


def _int8_act_bits() -> str:
    """Whether Int8Linear's opt-in 7-bit activations pay on this CPU's kernel."""
    if _native.C is None:
        return "no native CPU kernels: act_bits=7 brings no speed"
    cpu = _native.C.cpu_info()
    active = cpu["isa_active"]
    if active == "avx2" or (active in ("avx512", "amx") and not cpu["avx512_vnni"]):
        return (
            "int8 runs the AVX2 kernel here: act_bits=7 (7-bit activations, opt-in) "
            "is about 1.3-1.5x faster at 16+ rows than the exact 8-bit default"
        )
    if active == "portable":
        return "portable kernels: act_bits=7 brings no speed"
    if active in _native.ARM_ISA_NAMES:
        return (
            f"int8 runs the Arm {active} tier here: act_bits=7 brings no speed; "
            "keep the 8-bit default"
        )
    return "int8 runs VNNI/AMX here: act_bits=7 brings no speed; keep the 8-bit default"


def info() -> dict[str, Any]:
    """The same facts ``python -m pykernels info`` prints, as a dict."""
    d: dict[str, Any] = {
        "version": version(),
        "build": build(),
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "native_cpu": _native.C is not None,
        "native_cuda": _native.C_cuda is not None,
    }
    if _native.C is not None:
        cpu = _native.C.cpu_info()
        d.update(
            isa_compiled=list(cpu["isa_compiled"]),
            isa_detected=cpu["isa_detected"],
            isa_cap=cpu["isa_cap"],
            isa_active=cpu["isa_active"],
            avx512_vnni=cpu["avx512_vnni"],
            threads=cpu["threads"],
            threading=cpu["threading"],
        )
    else:
        d.update(native_cpu_error=_native.C_error, threads=torch.get_num_threads())
    d["amx_kernels"] = _amx_kernels()
    d["int8_act_bits"] = _int8_act_bits()
    if _native.C_cuda is not None:
        cu = _native.C_cuda.cuda_info()
        d.update(
            cuda_archs_compiled=cu["archs_compiled"],
            cuda_runtime=cu["runtime_version"],
            cuda_driver=cu["driver_version"],
        )
        enabled = backends.cuda_kernels_enabled()
        d["native_cuda_status"] = f"{backends.CUDA_NOT_VERIFIED}" + (
            f" (enabled by {backends.CUDA_KERNELS_ENV}=1)"
            if enabled
            else f" (set {backends.CUDA_KERNELS_ENV}=1 to use)"
        )
    else:
        d["native_cuda_error"] = _native.C_cuda_error
    d["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    d["backend_forced"] = os.environ.get("PYKERNELS_BACKEND") or None
    d["backends"] = backends.plan()
    return d
