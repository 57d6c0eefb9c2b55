"""Which backend runs a call.

Backends, in order of preference:

- ``native-cuda``: the CUDA kernels of ``pykernels._C_cuda``. They have not
  yet passed the CUDA test suite on a GPU, so they are opt-in:
  ``PYKERNELS_CUDA_KERNELS=1``, or ``PYKERNELS_BACKEND=native``.
- ``torch``: torch ops on the tensor's own device (``torch._int_mm``,
  ``torch.topk``, sparse CSR/BSR matmul, ``torch.linalg``). The default for
  CUDA and every other non-CPU device; never a copy to the host. On CPU
  tensors only when forced (the native kernels are faster there), which is how
  the tests check it against the reference.
- ``native-cpu``: the CPU kernels of ``pykernels._C``.
- ``numba``: the Numba fallbacks (CPU).
- ``reference``: the test oracle. It computes on the host, so it runs a
  non-CPU tensor only when forced.

Each declares the families and devices it supports and says why it refuses a
call. ``PYKERNELS_BACKEND`` (``native``, ``torch``, ``numba`` or
``reference``, read at each call) forces one kind; a forced backend that
cannot run raises :class:`BackendUnavailable` naming why.

Each family declares its implementations once, by backend, with
:func:`register` (in its ``ops`` module); an op asks :func:`impl` for the one
to run and never branches on backends itself. CPU backends that share buffer
signatures (native-cpu, numba, reference) can share one implementation, which
gets that backend's buffer functions and calls them through :func:`host_call`.

The modules here: ``native`` (loads ``_C`` / ``_C_cuda``), ``cffi`` (the C
ABI), ``numba`` and ``torch`` (one module per family), ``reference`` (the test
oracle, one module per family).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Not `import torch`: the subpackage backends.torch becomes this package's
# attribute `torch` when it is imported, which would shadow the library here.
import torch as _torch

from . import native as _native

# The kernel families: one module each in pykernels/ops (so a new family is
# found, not listed). The order is the order `info` prints them in.
_ORDER = ("int8", "qat", "sparse", "svd", "topk", "quant", "cluster")
_FOUND = {
    m.name
    for m in pkgutil.iter_modules([str(Path(__file__).resolve().parents[1] / "ops")])
    if not m.name.startswith("_")
}
FAMILIES = tuple(f for f in _ORDER if f in _FOUND) + tuple(sorted(_FOUND - set(_ORDER)))
KINDS = ("native", "torch", "numba", "reference")

# Set to 1 to use the native CUDA kernels by default (see the module docstring).
CUDA_KERNELS_ENV = "PYKERNELS_CUDA_KERNELS"
CUDA_NOT_VERIFIED = "built, not verified on hardware, opt-in"


class BackendUnavailable(RuntimeError):
    """No backend (or not the forced one) can run this call."""


def _numba_error() -> str | None:
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed"
    return None


def cuda_kernels_enabled() -> bool:
    """Whether the native CUDA kernels are chosen without forcing ``native``."""
    return os.environ.get(CUDA_KERNELS_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Backend:
    name: str
    kind: str
    # Device types it runs on; "*" is any device (torch ops run where the data is).
    device_types: tuple[str, ...]
    families: tuple[str, ...]

    def unavailable(self) -> str | None:
        """Why this backend cannot run at all here, or None."""
        if self.name == "native-cpu" and _native.C is None:
            return f"pykernels._C is not available ({_native.C_error})"
        if self.name == "native-cuda":
            if _native.C_cuda is None:
                return f"pykernels._C_cuda is not available ({_native.C_cuda_error})"
            if not _torch.cuda.is_available():
                return "no CUDA device is visible to torch"
        if self.name == "numba":
            return _numba_error()
        return None

    def refuses(self, family: str, device: _torch.device, forced: bool = False) -> str | None:
        """Why this backend will not run `family` on `device`, or None.

        ``forced``: PYKERNELS_BACKEND names this backend's kind, which lifts
        the preferences below (never the hard limits).
        """
        if family not in self.families:
            return f"{self.name} has no {family} kernels"
        if "*" not in self.device_types and device.type not in self.device_types:
            return (
                f"{self.name} runs on {' or '.join(self.device_types)} tensors, not {device.type}"
            )
        why = self.unavailable()
        if why is not None or forced:
            return why
        if self.name == "native-cuda" and not cuda_kernels_enabled():
            return (
                f"{CUDA_NOT_VERIFIED}: set {CUDA_KERNELS_ENV}=1 or PYKERNELS_BACKEND=native to "
                "use them"
            )
        if self.kind == "torch" and device.type == "cpu":
            return "runs cpu tensors only when forced (PYKERNELS_BACKEND=torch)"
        if self.kind == "reference" and device.type != "cpu":
            return f"copies to the host: the test oracle, used on {device.type} only when forced"
        return None


BACKENDS: tuple[Backend, ...] = (
    Backend("native-cuda", "native", ("cuda",), ("topk",)),
    Backend("torch", "torch", ("*",), FAMILIES),
    Backend("native-cpu", "native", ("cpu",), FAMILIES),
    Backend("numba", "numba", ("cpu",), FAMILIES),
    # The reference computes on the host and copies back (cpu or cuda tensors).
    Backend("reference", "reference", ("cpu", "cuda"), FAMILIES),
)


def cpu_functions(backend: Backend, family: str) -> Any:
    """The buffer-level functions of `family` on a CPU backend, as a namespace.

    native-cpu, numba and reference share signatures (NumPy buffers, outputs
    last), so an implementation calls whichever was chosen the same way.
    """
    if backend.name == "native-cpu":
        return _native.C
    if backend.name == "numba":
        return importlib.import_module(f"pykernels.backends.numba.{family}")
    if backend.kind == "reference":
        return importlib.import_module(f"pykernels.backends.reference.{family}")
    raise BackendUnavailable(f"{backend.name} has no CPU buffer functions for {family}")


def cpu_function(backend: Backend, family: str, name: str) -> Callable[..., Any]:
    """One buffer-level function of :func:`cpu_functions`."""
    return getattr(cpu_functions(backend, family), name)


class Bits:
    """Marks a float tensor argument of :func:`host_call` that the buffer
    function takes as raw bits (uint32 for float32, uint16 for 16-bit floats)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: _torch.Tensor) -> None:
        self.tensor = tensor


def host_call(fn: Callable[..., Any], *args: Any) -> Any:
    """Calls a buffer-level `fn` with every tensor argument as a NumPy array.

    The one host copy in the package: a non-CPU tensor (a forced reference or
    Numba backend on a GPU tensor) is copied to the host and, after the call,
    back into the original, since outputs are arguments. A tensor wrapped in
    :class:`Bits` goes as its raw bits. Other arguments (sizes, flags, None,
    NumPy arrays) pass through.
    """
    from .._layout import tensor_bits

    moved: list[tuple[_torch.Tensor, _torch.Tensor]] = []
    out: list[Any] = []
    for a in args:
        bits = isinstance(a, Bits)
        t = a.tensor if bits else a
        if isinstance(t, _torch.Tensor):
            c = t if t.device.type == "cpu" else t.cpu()
            if c is not t:
                moved.append((t, c))
            out.append(tensor_bits(c.detach()) if bits else c.detach().numpy())
        else:
            out.append(a)
    result = fn(*out)
    for t, c in moved:
        t.copy_(c)
    return result


# --- implementations by backend ------------------------------------------------

# Keys of register(): a backend's name with "_" for "-", "cpu" for any backend
# with buffer functions (native-cpu, numba, reference), "any" for all.
_CPU_BUFFER = ("native-cpu", "numba", "reference")
_TABLES: dict[tuple[str, str], dict[str, Callable[..., Any]]] = {}


def register(family: str, op: str, **impls: Callable[..., Any]) -> None:
    """Declares the implementations of `family`.`op` by backend.

    Keys: ``native_cpu``, ``native_cuda``, ``torch``, ``numba``,
    ``reference`` (that backend only), ``cpu`` (native-cpu, numba and
    reference: called as ``fn(fns, *args)`` with ``fns`` the chosen backend's
    buffer functions, see :func:`cpu_functions`) and ``any`` (every backend
    without a more specific entry). The most specific key wins.
    """
    if family not in FAMILIES:
        raise ValueError(f"register: unknown family {family!r} (no pykernels/ops/{family}.py)")
    allowed = {b.name.replace("-", "_") for b in BACKENDS} | {"cpu", "any"}
    unknown = set(impls) - allowed
    if unknown:
        raise ValueError(f"register: unknown backend keys {sorted(unknown)} for {family}.{op}")
    _TABLES.setdefault((family, op), {}).update(impls)
    _bound.cache_clear()


@functools.cache
def _bound(backend: Backend, family: str, op: str) -> Callable[..., Any]:
    table = _TABLES.get((family, op))
    if table is None:
        raise BackendUnavailable(f"no implementations of {family}.{op} are registered")
    key = backend.name.replace("-", "_")
    if key in table:
        return table[key]
    if backend.name in _CPU_BUFFER and "cpu" in table:
        return functools.partial(table["cpu"], cpu_functions(backend, family))
    if "any" in table:
        return table["any"]
    raise BackendUnavailable(f"{backend.name} has no implementation of {family}.{op}")


def impl(family: str, op: str, where: _torch.Tensor | _torch.device | str) -> Callable[..., Any]:
    """The implementation of `family`.`op` for data on `where` (a tensor or a
    device), on the backend :func:`choose` picks now."""
    device = where.device if isinstance(where, _torch.Tensor) else where
    return _bound(choose(family, device), family, op)


def chosen(family: str, where: _torch.Tensor | _torch.device | str) -> Backend:
    """The backend :func:`impl` would use (for reports and tests)."""
    device = where.device if isinstance(where, _torch.Tensor) else where
    return choose(family, device)


def forced_kind() -> str | None:
    kind = os.environ.get("PYKERNELS_BACKEND", "").strip().lower()
    if not kind or kind == "auto":
        return None
    if kind not in KINDS:
        raise BackendUnavailable(
            f"PYKERNELS_BACKEND={kind!r} is not one of auto, {', '.join(KINDS)}"
        )
    return kind


# Choices already made, keyed by everything they depend on (availability does
# not change within a process, except where tests remove the extension): the
# search costs more than a small kernel call.
_CHOSEN: dict[tuple, Backend] = {}


def choose(family: str, device: _torch.device | str) -> Backend:
    """The backend that runs `family` on `device` now."""
    device = _torch.device(device)
    key = (
        family,
        device.type,
        os.environ.get("PYKERNELS_BACKEND", ""),
        os.environ.get(CUDA_KERNELS_ENV, ""),
        _native.C is None,
        _native.C_cuda is None,
    )
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _CHOSEN[key] = _search(family, device)
    return chosen


def _search(family: str, device: _torch.device) -> Backend:
    kind = forced_kind()
    reasons = []
    for b in BACKENDS:
        if kind is not None and b.kind != kind:
            continue
        why = b.refuses(family, device, forced=kind is not None)
        if why is None:
            return b
        reasons.append(f"{b.name}: {why}")
    forced = f" (PYKERNELS_BACKEND={kind})" if kind else ""
    raise BackendUnavailable(
        f"no backend{forced} can run {family} on {device.type}: " + "; ".join(reasons)
    )


def plain(t: _torch.Tensor | None) -> bool:
    """Whether `t` is an ordinary tensor with readable data: not a subclass
    (FakeTensor, FunctionalTensor, DTensor), not wrapped by a functorch
    transform (vmap, grad), not on the meta device."""
    if t is None:
        return True
    return (
        (type(t) is _torch.Tensor or type(t) is _torch.nn.Parameter)
        and t.device.type != "meta"
        and not _torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def skip_dispatcher(*tensors: _torch.Tensor | None) -> bool:
    """Whether an eager op call may run its implementation directly (about 10 us less).

    Only for plain tensors with nothing watching: no tracing (torch.compile,
    export), no gradient wanted from these inputs (the custom op carries or
    refuses the backward), no dispatch or torch-function mode
    (FlopCounterMode, FakeTensorMode, debug modes), no functorch transform
    (vmap, grad) and no profiler: each of those must see the registered op.
    """
    C = _torch._C
    if (
        _torch.compiler.is_compiling()
        or C._len_torch_dispatch_stack()
        or C._is_torch_function_mode_enabled()
        or C._autograd._profiler_enabled()
        or C._functorch.maybe_current_level() is not None
    ):
        return False
    if not all(plain(t) for t in tensors):
        return False
    return not (
        _torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    )


def plan() -> dict[str, dict[str, str]]:
    """For each family and device type, the backend a call would use (or why none)."""
    out: dict[str, dict[str, str]] = {}
    for family in FAMILIES:
        out[family] = {}
        for dev in ("cpu", "cuda"):
            try:
                out[family][dev] = choose(family, dev).name
            except BackendUnavailable as e:
                out[family][dev] = f"none ({e})"
    return out
