"""pykernels: native kernels for model compression.

``pk.ops`` holds the functional API (custom ops that work under
``torch.compile``), ``pk.info()`` says what was built and which backend each
family will use. See README.md.
"""

from . import backends, compress, distill, nn, ops, qat, schedules
from .compress import CompressionReport, load, recipes, save
from .info import info, version
from .nn import factorize, quantize_int8, sparsify
from .ops.sparse import prune

__version__ = version()


def set_num_threads(n: int) -> None:
    """Threads the native CPU kernels use (their own pool), independent of torch's."""
    from . import _native

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int, got {n!r}")
    if _native.C is not None:
        _native.C.set_num_threads(n)


__all__ = [
    "CompressionReport",
    "backends",
    "compress",
    "distill",
    "factorize",
    "info",
    "load",
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
