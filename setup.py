"""Build driver: setuptools calls CMake for the native parts.

Environment variables:
  PYKERNELS_NO_NATIVE=1   install pure Python (Numba and reference backends)
  PYKERNELS_CUDA=auto|1|0 build pykernels._C_cuda (auto: when nvcc is found)
  PYKERNELS_CUDA_ARCHS    CUDA architectures, default "80;90a"
  PYKERNELS_BUILD_JOBS    parallel compile jobs, default: CPU count

The version comes from git (setuptools-scm, pyproject.toml). A build asked
for CUDA on purpose (PYKERNELS_CUDA=1, as the release's CUDA wheel is) gets a
local version tag naming the toolkit, as torch's own CUDA wheels do
(0.2.0+cu130): the CPU wheel and the CUDA wheel of one release then differ in
name. An `auto` build that merely finds nvcc compiles the CUDA module too, but
keeps the plain version: its kernels are opt-in and not verified on a GPU, and
the torch it will run with may have no CUDA at all, so the name must not
promise CUDA. `python -m pykernels info` says what the build carries.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        version = self.distribution.get_version()
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPYKERNELS_CUDA={os.environ.get('PYKERNELS_CUDA', 'auto')}",
            f"-DPYKERNELS_CUDA_ARCHS={os.environ.get('PYKERNELS_CUDA_ARCHS', '80;90a')}",
            f"-DPYKERNELS_VERSION={version}",
        ]
        try:
            import ninja

            # Name the program: a cached path from an earlier, since-deleted
            # isolated build environment would otherwise be reused.
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}"]
        except ImportError:
            pass
        jobs = os.environ.get("PYKERNELS_BUILD_JOBS", str(os.cpu_count() or 1))
        # --fresh: each pip build may run in a new build environment.
        subprocess.run(["cmake", "--fresh", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)
        if self.inplace or getattr(self, "editable_mode", False):
            # setuptools copies only the declared extension back into the source
            # tree; the CUDA module and the C ABI library must come along.
            pkg = ROOT / "pykernels"
            for lib in out_dir.iterdir():
                if lib.suffix == ".so" and not lib.name.startswith("_C."):
                    shutil.copy2(lib, pkg / lib.name)


def _nvcc() -> str | None:
    """The nvcc CMake would find (CUDACXX, PATH, or the default toolkit path)."""
    for cand in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


def _cuda_tag() -> str | None:
    """'cu130' for a build asked for CUDA on purpose (PYKERNELS_CUDA=1, nvcc 13.0),
    else None: `auto` builds keep the plain version (see the module docstring)."""
    flag = os.environ.get("PYKERNELS_CUDA", "auto").strip().lower()
    if not _native() or flag not in ("1", "on", "true", "yes"):
        return None
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("PYKERNELS_CUDA=1 but no nvcc was found (set CUDACXX or PATH)")
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise RuntimeError(f"cannot read the CUDA version from `{nvcc} --version`")
    return f"cu{match.group(1)}{match.group(2)}"


def _version_config() -> dict:
    tag = _cuda_tag()
    if tag is None:
        return {}

    def local_scheme(version) -> str:
        from setuptools_scm.version import get_local_node_and_date

        rest = get_local_node_and_date(version)  # "+gHASH[.dDATE]" off a tag, else ""
        return f"+{tag}" + (f".{rest[1:]}" if rest else "")

    return {"use_scm_version": {"local_scheme": local_scheme}}


def _native() -> bool:
    return os.environ.get("PYKERNELS_NO_NATIVE", "0") not in ("1", "true", "yes")


# setuptools runs this file as __main__; tests import it to check the version rule.
if __name__ == "__main__":
    setup(
        ext_modules=[CMakeExtension("pykernels._C")] if _native() else [],
        cmdclass={"build_ext": CMakeBuild} if _native() else {},
        **_version_config(),
    )
