"""Argument checks every op shares: ints, shapes, seeds, written-to tensors, and
the cache that lets a structure (a sparse weight, a packed int8 weight) be
checked once rather than on every call.

Each check raises TypeError (wrong kind of value) or ValueError (right kind,
wrong value) naming the function and the argument, before any kernel runs and
whatever the backend.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import backends


def is_int(v: Any) -> bool:
    """A Python or NumPy integer (not a bool), or a symbolic int while tracing."""
    return isinstance(v, (int, np.integer, torch.SymInt)) and not isinstance(v, (bool, np.bool_))


def check_int(fn: str, name: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``v`` as an int in ``[lo, hi]``: TypeError if not an int, ValueError if out of range."""
    if not is_int(v):
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__} {v!r}")
    if isinstance(v, torch.SymInt):
        return v  # type: ignore[return-value]
    return check_range(fn, name, int(v), lo, hi, what="an int ")


def check_range(
    fn: str, name: str, v: Any, lo: Any = None, hi: Any = None, *, what: str = ""
) -> Any:
    """``v`` itself when ``lo <= v <= hi`` (either bound may be None), else ValueError.

    ``what`` goes before the bound ("must be an int >= 1"); callers whose
    messages say only "must be >= 1" leave it empty.
    """
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        want = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
        raise ValueError(f"{fn}: {name} must be {what}{want}, got {v}")
    return v


def check_number(fn: str, name: str, v: Any) -> float:
    """``v`` as a float: TypeError for anything but a real number (bool included)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(v).__name__} {v!r}")
    return float(v)


def check_bool(fn: str, name: str, v: Any) -> bool:
    """A flag: True or False (a NumPy bool too); TypeError for anything else
    (a tensor's truth value is ambiguous, and a string is always true)."""
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(v).__name__}")
    return bool(v)


def check_callable(fn: str, name: str, v: Any) -> None:
    if v is not None and not callable(v):
        raise TypeError(f"{fn}: {name} must be callable or None, got {type(v).__name__}")


def check_shape(fn: str, name: str, shape: Any) -> tuple[int, ...]:
    """A shape as a tuple of non-negative ints.

    Accepts an int (a 1-D shape), ``torch.Size`` or any sequence of ints;
    a string, a float or anything else is a TypeError (``"55"`` is not the
    shape ``(5, 5)``, nor ``(2.7,)`` the shape ``(2,)``).
    """
    if is_int(shape):
        shape = (shape,)
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)):
        raise TypeError(f"{fn}: {name} must be a sequence of ints, got {type(shape).__name__}")
    out = []
    for s in shape:
        if not is_int(s):
            raise TypeError(
                f"{fn}: {name} must be a sequence of ints, got {type(s).__name__} {s!r} in it"
            )
        if not isinstance(s, torch.SymInt) and int(s) < 0:
            raise ValueError(f"{fn}: {name} must be non-negative, got {tuple(shape)}")
        out.append(s if isinstance(s, torch.SymInt) else int(s))
    return tuple(out)


# torch.Generator.manual_seed takes this range (negative seeds wrap).
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def check_seed(fn: str, seed: Any) -> int:
    return check_int(fn, "seed", seed, _SEED_MIN, _SEED_MAX)


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_input(fn: str, x: Any, min_dim: int = 0, name: str = "x") -> None:
    """x: a float32, float16 or bfloat16 tensor of at least ``min_dim`` dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{fn}: {name} must have at least {min_dim} dimension")


def check_bias(fn: str, bias: Any, n: int) -> None:
    """bias: None, or a float tensor of shape (n,)."""
    if bias is None:
        return
    if not isinstance(bias, Tensor):
        raise TypeError(f"{fn}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: bias must be a float tensor, got {bias.dtype}")
    if bias.shape != (n,):
        raise ValueError(f"{fn}: bias must have shape ({n},), got {tuple(bias.shape)}")


def has_data(*tensors: Tensor | None) -> bool:
    """Whether the values of these tensors can be read now: not while tracing
    (torch.compile, export: the values are not known yet), not on meta, not
    fake or wrapped by a transform (FakeTensorMode, vmap)."""
    if torch.compiler.is_compiling():
        return False
    return all(backends.plain(t) for t in tensors)


def _overlaps(shape: Sequence[int], strides: Sequence[int]) -> bool | None:
    """Whether a layout puts two elements at one address: True, False, or None
    when the strides alone do not settle it (interleaved dimensions)."""
    if any(sz == 0 for sz in shape):
        return False  # no elements, nothing to share
    dims = sorted((st, sz) for sz, st in zip(shape, strides, strict=False) if sz > 1)
    if any(st == 0 for st, _ in dims):
        return True
    reach = 0  # the largest offset the smaller-stride dimensions reach
    for st, sz in dims:
        if st <= reach:
            return None
        reach += (sz - 1) * st
    return False


def _offsets_overlap(t: Tensor) -> bool:
    """Whether two elements of `t` share memory, by enumerating their offsets."""
    off = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride(), strict=False):
        off = off.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride
    flat = off.reshape(-1)
    return flat.unique().numel() != flat.numel()


def check_writable(fn: str, name: str, t: Tensor) -> None:
    """A tensor an op writes into must not overlap itself (an expanded,
    zero-stride view has many elements at one address): refused before any
    kernel runs, rather than failing half-way after it."""
    if t.is_contiguous():
        return
    overlap = _overlaps(t.shape, t.stride())
    if overlap is None and not torch.compiler.is_compiling():
        overlap = _offsets_overlap(t)
    if overlap:
        raise ValueError(
            f"{fn}: {name} is written in place, so its elements must not share memory; got "
            f"strides {tuple(t.stride())} for shape {tuple(t.shape)} (an expanded view?): "
            "pass a tensor of its own (.contiguous() or .clone())"
        )


# --- structures checked once -------------------------------------------------
#
# A structure (a sparse weight's row pointers and column indices, a packed
# int8 weight) is checked in full the first time an op sees it; the tensors
# then carry a fingerprint of what was checked. Any in-place change bumps a
# tensor's version counter and so voids the fingerprint. Writes that bypass
# the counter (through a NumPy view) are caught by the native kernels' own
# checks and the Numba backend's second check.

# Fingerprints by id of the first tensor; an entry goes when that tensor does
# (a weak reference's callback), and a reused id never matches since the entry
# holds weak references to the very tensors checked. Kept outside the tensors:
# an attribute on a tensor would be pickled with it.
_CHECKED: dict[int, tuple] = {}


def _state(tensors: Sequence[Tensor]) -> tuple:
    out = []
    for t in tensors:
        try:
            version = t._version
        except RuntimeError:
            # Inference tensors keep no version counter (they can only change
            # inside inference_mode); the other fields still catch a swap.
            version = -1
        out.append((version, t.data_ptr(), t.numel(), t.dtype))
    return tuple(out)


def is_checked(tensors: Sequence[Tensor], extra: tuple) -> bool:
    """Whether `tensors` passed a check for `extra` and have not changed since."""
    if not isinstance(tensors[0], Tensor):
        return False
    mark = _CHECKED.get(id(tensors[0]))
    if mark is None:
        return False
    refs, state, what = mark
    if what != extra or len(refs) != len(tensors):
        return False
    if any(r() is not t for r, t in zip(refs, tensors, strict=False)):
        return False
    return state == _state(tensors)


def mark_checked(tensors: Sequence[Tensor], extra: tuple) -> None:
    key = id(tensors[0])
    refs = [weakref.ref(tensors[0], lambda _r, key=key: _CHECKED.pop(key, None))]
    refs += [weakref.ref(t) for t in tensors[1:]]
    _CHECKED[key] = (tuple(refs), _state(tensors), extra)
