"""Build driver: setuptools calls CMake for the native parts.

Environment variables:
  PYKERNELS_NO_NATIVE=1   install pure Python (Numba and reference backends)
  PYKERNELS_CUDA=auto|1|0 build pykernels._C_cuda (auto: when nvcc is found)
  PYKERNELS_CUDA_ARCHS    CUDA architectures, default "80;90a"
  PYKERNELS_BUILD_JOBS    parallel compile jobs, default: CPU count
"""

from __future__ import annotations

import os
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


native = os.environ.get("PYKERNELS_NO_NATIVE", "0") not in ("1", "true", "yes")

setup(
    ext_modules=[CMakeExtension("pykernels._C")] if native else [],
    cmdclass={"build_ext": CMakeBuild} if native else {},
)
