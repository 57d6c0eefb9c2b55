"""pykernels: native kernels for model compression.

``pk.ops`` holds the functional API (custom ops that work under
``torch.compile``), ``pk.info()`` says what was built and which backend each
family will use. See README.md.
"""

# First: installs the finder that keeps old module paths (pykernels._native,
# pykernels.qat, ...) working.
from . import _compat  # noqa: F401, I001
from . import backends, comm, distill, nn, ops, qat, schedules

# `pk.compress` is the function; the package stays importable by name
# (`from pykernels.compress import ...`), and the function carries the package's
# public names (`pk.compress.read_manifest`).
from .compress import Budget, CompressionReport, compress, load, recipes, save
from .info import info, version
from .nn import factorize, quantize_int8, sparsify
from .ops.sparse import prune

__version__ = version()


def max_threads() -> int:
    """The most threads :func:`set_num_threads` takes: 1024, or 4x the CPUs if more."""
    import os

    return max(1024, 4 * (os.cpu_count() or 1))


def set_num_threads(n: int) -> None:
    """Threads the native CPU kernels use, independent of torch's.

    ``n`` is an int in ``[1, max_threads()]``: the thread runtime (torch's OpenMP,
    or our pool) would try to start every thread asked for, so a huge count is
    refused rather than passed on.
    """
    from .backends import native as _native
    from .ops import _checks

    if not _checks.is_int(n):
        raise TypeError(f"set_num_threads: n must be a positive int, got {type(n).__name__}")
    if not 1 <= n <= max_threads():
        raise ValueError(f"set_num_threads: n must be a positive int <= {max_threads()}, got {n}")
    n = int(n)
    if _native.C is not None:
        _native.C.set_num_threads(n)


__all__ = [
    "Budget",
    "CompressionReport",
    "backends",
    "comm",
    "compress",
    "distill",
    "factorize",
    "info",
    "load",
    "max_threads",
    "nn",
    "ops",
    "prune",
    "qat",
    "quantize_int8",
    "recipes",
    "save",
    "schedules",
    "set_num_threads",
    "sparsify",
    "version",
    "__version__",
]
