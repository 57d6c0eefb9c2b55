"""Smoke tests of an installed pykernels (a wheel), run from outside the checkout.

Usage: python .ci/smoke.py CHECKOUT  (the checkout only provides the test files;
the package under test is the installed one, which this checks first).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

TESTS = [
    "tests/test_backends.py",
    "tests/test_info.py",
    "tests/test_parallel.py",
    "tests/test_cffi.py",
]
# One fast check of each family's kernels against the reference.
SELECTED = {
    "tests/test_int8.py": "exact",
    "tests/test_topk.py": "matches_reference and not cuda",
    "tests/test_sparse.py": "forward_and_backward_match_dense",
    "tests/test_svd.py": "batched_svd_matches_reference",
}


def main() -> int:
    root = os.path.abspath(sys.argv[1])
    import pykernels

    where = os.path.dirname(os.path.abspath(pykernels.__file__))
    if where.startswith(root + os.sep):
        print(f"smoke: imported the checkout ({where}), not the installed package")
        return 1
    info = pykernels.info()
    print(f"smoke: pykernels {pykernels.__version__} from {where}")
    print(
        f"smoke: isa {info.get('isa_active')} of {info.get('isa_compiled')}, "
        f"threading {info.get('threading')}, cuda {info.get('cuda_archs_compiled')}"
    )
    if not info["native_cpu"]:
        print(f"smoke: the native extension did not load: {info.get('native_cpu_error')}")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        ini = os.path.join(tmp, "pytest.ini")
        with open(ini, "w") as f:  # the checkout's config wants plugins a user lacks
            f.write("[pytest]\nmarkers =\n    cuda: needs a GPU\n    bigmem: several GiB\n")
        base = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            ini,
            "--rootdir",
            tmp,
            "--import-mode=importlib",
            "-m",
            "not bigmem",
        ]
        rc = subprocess.call([*base, *[os.path.join(root, t) for t in TESTS]], cwd=tmp)
        for test, expr in SELECTED.items():
            rc = rc or subprocess.call([*base, os.path.join(root, test), "-k", expr], cwd=tmp)
    return rc


if __name__ == "__main__":
    sys.exit(main())
