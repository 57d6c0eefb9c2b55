"""Checks what a release artifact holds: python .ci/check_dist.py ARTIFACT [--cuda ARCHS].

sdist: everything the build needs (csrc/, CMakeLists.txt, setup.py, pyproject.toml).
wheel: the package and its native modules only (no tests, benchmarks, sources or
build files), no vendored OpenMP runtime, under 2 MB for a CPU wheel; a CUDA
wheel is tagged +cuXYZ and carries _C_cuda.
"""

from __future__ import annotations

import os
import re
import sys
import tarfile
import zipfile

CPU_WHEEL_LIMIT = 2 * 1024 * 1024


def fail(msg: str) -> None:
    sys.exit(f"check_dist: {msg}")


def check_sdist(path: str) -> None:
    with tarfile.open(path) as tf:
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
    for need in (
        "CMakeLists.txt",
        "setup.py",
        "pyproject.toml",
        "csrc/bindings.cpp",
        "csrc/common/parallel.cpp",
        "csrc/include/pykernels.h",
        "pykernels/__init__.py",
    ):
        if need not in names:
            fail(f"{path} lacks {need}: a build from it cannot configure")
    print(f"sdist ok: {len(names)} files, csrc/ and CMakeLists.txt included")


def check_wheel(path: str, cuda: bool) -> None:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    bad = [
        n
        for n in names
        if re.match(r"(tests|benchmarks|csrc|build)/", n)
        or n.endswith(("CMakeLists.txt", ".cpp", ".cu", ".h"))
    ]
    if bad:
        fail(f"{path} holds files a wheel must not: {bad[:5]}")
    if not any(re.match(r"pykernels/_C\..*\.so$", n) for n in names):
        fail(f"{path} lacks the native module pykernels/_C")
    if not any(n.endswith("pykernels/libpykernels.so") for n in names):
        fail(f"{path} lacks the C ABI library libpykernels.so")
    omp = [n for n in names if re.search(r"lib(gomp|iomp5|omp)[-.]", n.rsplit("/", 1)[-1])]
    if omp:
        fail(f"{path} vendors an OpenMP runtime {omp}: the kernels must use torch's")
    has_cuda = any(re.match(r"pykernels/_C_cuda\..*\.so$", n) for n in names)
    tagged = "+cu" in path.rsplit("/", 1)[-1]
    if cuda and not (has_cuda and tagged):
        fail(f"{path}: a CUDA wheel must carry _C_cuda and a +cuXYZ version tag")
    if not cuda and (has_cuda or tagged):
        fail(
            f"{path}: the CPU wheel must not carry _C_cuda or a +cu tag "
            "(build with PYKERNELS_CUDA=0)"
        )
    size = sum(i.file_size for i in infos)
    packed = os.path.getsize(path)
    if not cuda and packed > CPU_WHEEL_LIMIT:
        fail(f"{path} is {packed / 1e6:.2f} MB: the CPU wheel must stay under 2 MB")
    print(
        f"wheel ok: {path.rsplit('/', 1)[-1]}, {packed / 1e6:.2f} MB ({size / 1e6:.2f} MB unpacked)"
    )


def main() -> None:
    args = sys.argv[1:]
    cuda = "--cuda" in args
    for a in (a for a in args if not a.startswith("--")):
        if a.endswith(".tar.gz"):
            check_sdist(a)
        elif a.endswith(".whl"):
            check_wheel(a, cuda)
        else:
            fail(f"unknown artifact {a}")


if __name__ == "__main__":
    main()
