"""What was built, what this machine has, and which backend each family uses."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import torch

from . import _native, backends


def version() -> str:
    try:
        return metadata.version("pykernels")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def info() -> dict[str, Any]:
    """The same facts ``python -m pykernels info`` prints, as a dict."""
    d: dict[str, Any] = {
        "version": version(),
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
    # No AMX tile kernel is shipped: none has been run on an AMX machine yet,
    # and an untested tile kernel could be silently wrong. AMX CPUs run the
    # AVX-512 VNNI kernels.
    d["amx_kernels"] = "not built (untested: no AMX machine yet); AMX CPUs use avx512"
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
