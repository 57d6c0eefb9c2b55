"""sparse family: pruned weights stored sparse, and Y = X W^T that runs faster for it.

Formats (:class:`SparseWeight`): CSR for unstructured and 2:4 patterns, BSR
with 4x4 blocks for the block pattern. Column indices are 16-bit when K <=
65536 (stored as int16 bits, read as unsigned), else int32; values are
float32. ``sparse_linear`` is a ``torch.library`` custom op with autograd:
backward gives dX = dY W (a transposed SpMM) and the gradient of the stored
values only (dY^T X sampled at the non-zeros, an SDDMM), never a dense
weight gradient. CPU runs the native kernels (AVX-512, AVX2 or portable),
else Numba, else the reference; other devices run torch's own sparse
matmuls there (the torch backend).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .. import backends
from ..backends.reference import sparse as _ref
from ..backends.torch import sparse as _ts
from . import _checks

BLOCK = 4  # BSR block: 4 x 4 (csrc/sparse/sparse.h says why)
PATTERNS = ("unstructured", "block", "2:4")


class SparseWeight(NamedTuple):
    """A sparse [n, k] weight.

    ``block == 1`` (CSR): ``values [nnz]``, ``col [nnz]``, ``row_ptr [n + 1]``.
    ``block == 4`` (BSR): ``values [nblocks, 4, 4]``, ``col [nblocks]`` (block
    columns), ``row_ptr [ceil(n / 4) + 1]``; blocks at the edges hold zeros
    past n and k. ``col`` is int16 holding unsigned 16-bit indices when k <=
    65536, else int32. Build one with :func:`to_sparse`.
    """

    values: Tensor
    col: Tensor
    row_ptr: Tensor
    n: int
    k: int
    block: int = 1

    def to_dense(self) -> Tensor:
        """The dense float32 [n, k] weight, exactly."""
        return to_dense(self)

    def nnz(self) -> int:
        """Stored values (for BSR, 16 per block, including zeros inside blocks)."""
        return int(self.values.numel())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.col, self.row_ptr))


def _col_dtype(k: int, block: int) -> torch.dtype:
    return torch.int16 if -(-k // block) <= 65536 else torch.int32


def col_as_int64(col: Tensor) -> Tensor:
    """Column indices as int64 (16-bit storage is read as unsigned)."""
    c = col.long()
    return c & 0xFFFF if col.dtype == torch.int16 else c


def to_sparse(w: Tensor, block: int = 1) -> SparseWeight:
    """The sparse form of a dense [n, k] weight, keeping exactly its non-zeros.

    ``block=1``: CSR of the non-zero entries. ``block=4``: BSR of every 4x4
    block holding a non-zero (zeros inside kept blocks are stored). NaN and
    inf count as non-zeros; -0.0 counts as a zero and is not stored (pruning
    by multiplying with a 0/1 mask leaves -0.0 behind, which should not cost
    storage), so it comes back from :func:`to_dense` as +0.0.
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"to_sparse: w must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"to_sparse: w must be a float tensor, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"to_sparse: w must be 2-D [n, k], got shape {tuple(w.shape)}")
    if _checks.check_int("to_sparse", "block", block) not in (1, BLOCK):
        raise ValueError(f"to_sparse: block must be 1 or {BLOCK}, got {block!r}")
    if w.device.type == "meta":
        raise ValueError("to_sparse: w is a meta tensor: which entries are non-zero is unknown")
    w = w.detach()
    n, k = w.shape
    if block == 1:
        mask = w != 0
        counts = mask.sum(dim=1)
        row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=w.device)
        row_ptr[1:] = torch.cumsum(counts, 0)
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order: columns ascend per row
        values = w[rows, cols].float()
        col = cols.to(torch.int32).to(_col_dtype(k, 1))
        return SparseWeight(values.contiguous(), col.contiguous(), row_ptr, n, k, 1)
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    padded = w.new_zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, BLOCK, kb, BLOCK).permute(0, 2, 1, 3)  # [nb, kb, 4, 4]
    keep = (blocks != 0).flatten(2).any(dim=2)
    row_ptr = torch.zeros(nb + 1, dtype=torch.int64, device=w.device)
    row_ptr[1:] = torch.cumsum(keep.sum(dim=1), 0)
    brow, bcol = keep.nonzero(as_tuple=True)
    values = blocks[brow, bcol].contiguous()
    col = bcol.to(torch.int32).to(_col_dtype(k, BLOCK))
    return SparseWeight(values, col.contiguous(), row_ptr, n, k, BLOCK)


def to_dense(sw: SparseWeight) -> Tensor:
    """The dense float32 [n, k] weight of a SparseWeight.

    Every stored value comes back bit-exact (NaN payloads included); entries
    not stored are +0.0. :func:`to_sparse` stores the non-zeros only (for
    BSR, every entry of a block holding one), and -0.0 is a zero:
    ``to_dense(to_sparse(w))`` equals ``w`` (``torch.equal``, NaN aside) with
    each -0.0 that was not stored turned to +0.0.
    """
    _check_weight("to_dense", sw)
    dev = sw.values.device
    if dev.type == "meta":
        return torch.empty(sw.n, sw.k, dtype=torch.float32, device=dev)
    cols = col_as_int64(sw.col)
    if sw.block == 1:
        rows = torch.repeat_interleave(
            torch.arange(sw.n, device=dev), sw.row_ptr[1:] - sw.row_ptr[:-1]
        )
        out = torch.zeros(sw.n, sw.k, dtype=torch.float32, device=dev)
        out[rows, cols] = sw.values.float()
        return out
    nb, kb = -(-sw.n // BLOCK), -(-sw.k // BLOCK)
    brows = torch.repeat_interleave(torch.arange(nb, device=dev), sw.row_ptr[1:] - sw.row_ptr[:-1])
    blocks = torch.zeros(nb, kb, BLOCK, BLOCK, dtype=torch.float32, device=dev)
    blocks[brows, cols] = sw.values.float()
    return blocks.permute(0, 2, 1, 3).reshape(nb * BLOCK, kb * BLOCK)[: sw.n, : sw.k].contiguous()


def bsr_to_csr(sw: SparseWeight) -> tuple[SparseWeight, Tensor]:
    """A BSR weight as CSR over every stored entry, and the map from CSR to BSR values.

    ``csr.values == sw.values.flatten()[perm]``; entries of edge blocks past
    n or k are left out. Backward runs on this form. The structure (columns,
    row pointers, ``perm``) depends only on ``sw.col`` and ``sw.row_ptr`` and
    is remembered for them until either changes: building it (an argsort over
    every stored entry) cost more than the backward kernels themselves on
    every training step of a block-sparse layer.
    """
    col, row_ptr, perm = _csr_structure(sw)
    return SparseWeight(sw.values.reshape(-1)[perm].float(), col, row_ptr, sw.n, sw.k, 1), perm


# Expanded structures by id of the BSR column tensor, as ops/_checks.py keeps
# its fingerprints: weak references to the very tensors (a reused id never
# matches), their version counters and data pointers (an in-place change or a
# swap voids the entry), and the entry goes when the column tensor does.
_EXPANDED: dict[int, tuple] = {}


def _structure_state(t: Tensor) -> tuple:
    try:
        version = t._version
    except RuntimeError:  # inference tensors keep no version counter
        version = -1
    return (version, t.data_ptr(), t.numel(), t.dtype, t.device)


def _csr_structure(sw: SparseWeight) -> tuple[Tensor, Tensor, Tensor]:
    import weakref

    try:
        state = (_structure_state(sw.col), _structure_state(sw.row_ptr), sw.n, sw.k)
    except (RuntimeError, NotImplementedError):  # fake or functional tensors: no storage
        return _expand_structure(sw)
    key = id(sw.col)
    hit = _EXPANDED.get(key)
    if hit is not None:
        rcol, rrow, hstate, value = hit
        if rcol() is sw.col and rrow() is sw.row_ptr and hstate == state:
            return value
    value = _expand_structure(sw)
    try:
        rcol = weakref.ref(sw.col, lambda _r, key=key: _EXPANDED.pop(key, None))
        rrow = weakref.ref(sw.row_ptr)
    except TypeError:
        return value
    _EXPANDED[key] = (rcol, rrow, state, value)
    return value


def _expand_structure(sw: SparseWeight) -> tuple[Tensor, Tensor, Tensor]:
    dev = sw.values.device
    nb = -(-sw.n // BLOCK)
    counts = sw.row_ptr[1:] - sw.row_ptr[:-1]  # blocks per block row
    brow = torch.repeat_interleave(torch.arange(nb, device=dev), counts)  # [nblocks]
    bcol = col_as_int64(sw.col)
    j = torch.arange(bcol.shape[0], device=dev)
    rr = torch.arange(BLOCK, device=dev)
    # entry (block j, row rr, col kk) -> row 4*brow+rr, col 4*bcol+kk, value j*16+rr*4+kk
    row = (brow[:, None, None] * BLOCK + rr[None, :, None]).expand(-1, BLOCK, BLOCK)
    col = (bcol[:, None, None] * BLOCK + rr[None, None, :]).expand(-1, BLOCK, BLOCK)
    idx = j[:, None, None] * BLOCK * BLOCK + rr[None, :, None] * BLOCK + rr[None, None, :]
    valid = (row < sw.n) & (col < sw.k)
    row, col, idx = row[valid], col[valid], idx[valid]
    order = torch.argsort(row * (sw.k + 1) + col, stable=True)
    row, col, perm = row[order], col[order], idx[order]
    row_ptr = torch.zeros(sw.n + 1, dtype=torch.int64, device=dev)
    row_ptr[1:] = torch.cumsum(torch.bincount(row, minlength=sw.n), 0)
    return col.to(torch.int32).to(_col_dtype(sw.k, 1)), row_ptr, perm


def _structure_problem(row_ptr: Tensor, col: Tensor, kcols: int) -> str | None:
    """What is wrong with a CSR/BSR structure whose shapes and dtypes are right, or None.

    The invariants every backend relies on (torch's sparse tensors check the
    same ones): row_ptr starts at 0, never decreases and ends at the number of
    column indices; every column index is in [0, kcols); within a row the
    indices strictly increase (sorted, no duplicates: a duplicate would be
    summed by the products but not by to_dense).
    """
    nnz = col.numel()
    steps = row_ptr[1:] - row_ptr[:-1]
    c = col.to(torch.int32)
    if col.dtype == torch.int16:
        c = c & 0xFFFF
    flags = [row_ptr[0] != 0, (steps < 0).any(), row_ptr[-1] != nnz]
    if nnz:
        flags += [c.min() < 0, c.max() >= kcols]
    bad = torch.stack(flags).tolist() if flags else []
    if bad[0]:
        return f"row_ptr must start at 0, got {int(row_ptr[0])}"
    if bad[1]:
        r = int((steps < 0).nonzero()[0])
        return f"row_ptr must not decrease, got row_ptr[{r}] > row_ptr[{r + 1}]"
    if bad[2]:
        return f"row_ptr must end at the number of column indices ({nnz}), got {int(row_ptr[-1])}"
    if nnz and (bad[3] or bad[4]):
        lo, hi = int(c.min()), int(c.max())
        return (
            f"col holds an index out of range: indices span [{lo}, {hi}], not within [0, {kcols})"
        )
    if nnz > 1:
        # A row starts at row_ptr[r] of every non-empty row r; elsewhere a
        # column must exceed the one before it.
        starts = torch.zeros(nnz, dtype=torch.bool, device=col.device)
        starts[row_ptr[:-1][steps > 0]] = True
        unsorted = (c[1:] <= c[:-1]) & ~starts[1:]
        if bool(unsorted.any()):
            j = int(unsorted.nonzero()[0]) + 1
            return (
                f"col must increase strictly within each row (sorted, no duplicates), "
                f"got col[{j - 1}] = {int(c[j - 1])} then col[{j}] = {int(c[j])}"
            )
    return None


def check_structure(
    fn: str,
    values: Tensor,
    col: Tensor,
    row_ptr: Tensor,
    n: int,
    k: int,
    block: int,
    name=lambda field: f"w_sparse.{field}",
) -> None:
    """Checks a sparse weight's parts against each other: what every backend needs.

    Shapes, dtypes and devices always; the contents (row pointers, column
    range and order) whenever the values can be read, once per structure
    (the result is kept until a tensor changes). ``name(field)`` names a part
    in the messages. Raises TypeError or ValueError; the native bindings
    check the contents again.
    """
    if (
        not torch.compiler.is_compiling()  # data pointers do not trace
        and type(n) is int  # noqa: E721 - exactly int: a float 20.0 would pass ==
        and type(k) is int  # noqa: E721
        and type(block) is int  # noqa: E721
        and isinstance(values, Tensor)
        and _checks.is_checked((col, row_ptr), ("sparse", n, k, block))
        and values.device == col.device
        and values.is_floating_point()
        and values.shape == ((col.numel(),) if block == 1 else (col.numel(), BLOCK, BLOCK))
    ):
        return  # this structure passed in full and has not changed since
    n = _checks.check_int(fn, name("n"), n, 0)
    k = _checks.check_int(fn, name("k"), k, 0)
    if _checks.check_int(fn, name("block"), block) not in (1, BLOCK):
        raise ValueError(f"{fn}: {name('block')} must be 1 or {BLOCK}, got {block}")
    for field, t in (("values", values), ("col", col), ("row_ptr", row_ptr)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name(field)} must be a torch.Tensor, got {type(t).__name__}")
    if not values.is_floating_point():
        raise TypeError(f"{fn}: {name('values')} must be a float tensor, got {values.dtype}")
    if col.dtype not in (torch.int16, torch.int32):
        raise TypeError(f"{fn}: {name('col')} must be int16 or int32, got {col.dtype}")
    if row_ptr.dtype != torch.int64:
        raise TypeError(f"{fn}: {name('row_ptr')} must be int64, got {row_ptr.dtype}")
    rows = n if block == 1 else -(-n // BLOCK)
    kcols = k if block == 1 else -(-k // BLOCK)
    if row_ptr.shape != (rows + 1,):
        raise ValueError(
            f"{fn}: {name('row_ptr')} must have shape ({rows + 1},) for {n} rows"
            f"{'' if block == 1 else ' in 4-row blocks'}, got {tuple(row_ptr.shape)}"
        )
    if col.dim() != 1:
        raise ValueError(f"{fn}: {name('col')} must be 1-D, got shape {tuple(col.shape)}")
    want = (col.numel(),) if block == 1 else (col.numel(), BLOCK, BLOCK)
    if values.shape != want:
        raise ValueError(
            f"{fn}: {name('values')} must have shape {want} (one "
            f"{'value' if block == 1 else '4x4 block'} per column index), "
            f"got {tuple(values.shape)}"
        )
    if col.dtype == torch.int16 and kcols > 65536:
        raise ValueError(
            f"{fn}: {name('col')} is int16, which addresses 65536 "
            f"{'columns' if block == 1 else 'block columns'}; K = {k} needs int32"
        )
    for field, t in (("col", col), ("row_ptr", row_ptr)):
        if t.device != values.device:
            raise ValueError(
                f"{fn}: {name(field)} is on {t.device} but {name('values')} is on {values.device}"
            )
    if not _checks.has_data(values, col, row_ptr):
        return
    key = ("sparse", n, k, block)
    if _checks.is_checked((col, row_ptr), key):
        return
    problem = _structure_problem(row_ptr, col, kcols)
    if problem is not None:
        field, _, rest = problem.partition(" ")
        raise ValueError(f"{fn}: {name(field)} {rest}")
    _checks.mark_checked((col, row_ptr), key)


def _check_weight(fn: str, sw: SparseWeight) -> None:
    if not isinstance(sw, SparseWeight):
        raise TypeError(f"{fn}: w_sparse must be a SparseWeight, got {type(sw).__name__}")
    check_structure(fn, sw.values, sw.col, sw.row_ptr, sw.n, sw.k, sw.block)


# --- buffers for the native kernels ------------------------------------------


def _col_np(col: Tensor) -> np.ndarray:
    a = col.numpy()
    return a.view(np.uint16) if col.dtype == torch.int16 else a


def _forward_impl(
    x: Tensor, values: Tensor, col: Tensor, row_ptr: Tensor, bias: Tensor | None, n: int, block: int
) -> Tensor:
    # Every backend reads the structure it is given: checked here too (once
    # per structure), since under torch.compile this is the first place its
    # contents are known.
    check_structure("sparse_linear", values, col, row_ptr, n, x.shape[1], block)
    return _forward_checked(x, values, col, row_ptr, bias, n, block)


def _forward_native(x, values, col, row_ptr, bias, n, block) -> Tensor:
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    args = (_col_np(col), values.reshape(-1), block, n, bias, y)
    backends.host_call(backends.native.C.sparse_linear, x, row_ptr, *args)
    return y


def _forward_torch(x, values, col, row_ptr, bias, n, block) -> Tensor:
    return _ts.sparse_linear(x, values, col_as_int64(col), row_ptr, bias, n, block)


def _as_csr(x, values, col, row_ptr, n, block) -> SparseWeight:
    sw = SparseWeight(values, col, row_ptr, n, x.shape[1], block)
    return bsr_to_csr(sw)[0] if block != 1 else sw


def _forward_numba(x, values, col, row_ptr, bias, n, block) -> Tensor:
    from ..backends.numba import sparse as nb

    csr = _as_csr(x, values, col, row_ptr, n, block)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    args = (csr.row_ptr, col_as_int64(csr.col), csr.values, bias, y)
    backends.host_call(nb.sparse_linear, x, *args)
    return y


def _forward_reference(x, values, col, row_ptr, bias, n, block) -> Tensor:
    csr = _as_csr(x, values, col, row_ptr, n, block)
    return _ref.sparse_linear(x, csr.row_ptr, col_as_int64(csr.col), csr.values, n, bias)


def _backward_native(dy, x, values, col, row_ptr, n, dx, dv) -> None:
    args = (_col_np(col), values, n, dx, dv)
    backends.host_call(backends.native.C.sparse_linear_backward, dy, x, row_ptr, *args)


def _backward_torch(dy, x, values, col, row_ptr, n, dx, dv) -> None:
    rdx, rdv = _ts.sparse_linear_backward(
        dy, x, values, col_as_int64(col), row_ptr, n, dx is not None, dv is not None
    )
    _fill(dx, rdx, dv, rdv)


def _backward_numba(dy, x, values, col, row_ptr, n, dx, dv) -> None:  # noqa: ARG001
    from ..backends.numba import sparse as nb

    backends.host_call(nb.sparse_linear_backward, dy, x, row_ptr, col_as_int64(col), values, dx, dv)


def _backward_reference(dy, x, values, col, row_ptr, n, dx, dv) -> None:
    sw = SparseWeight(values, col, row_ptr, n, x.shape[1], 1)
    rdx, rdv = _ref.sparse_linear_backward(dy, x, to_dense(sw), sw.row_ptr, col_as_int64(col))
    _fill(dx, rdx, dv, rdv)


def _fill(dx, rdx, dv, rdv) -> None:
    if dx is not None:
        dx.copy_(rdx)
    if dv is not None:
        dv.copy_(rdv)


backends.register(
    "sparse",
    "linear",
    native_cpu=_forward_native,
    torch=_forward_torch,
    numba=_forward_numba,
    reference=_forward_reference,
)
backends.register(
    "sparse",
    "linear_backward",
    native_cpu=_backward_native,
    torch=_backward_torch,
    numba=_backward_numba,
    reference=_backward_reference,
)


def _forward_checked(
    x: Tensor, values: Tensor, col: Tensor, row_ptr: Tensor, bias: Tensor | None, n: int, block: int
) -> Tensor:
    col, row_ptr = col.contiguous(), row_ptr.contiguous()
    return backends.impl("sparse", "linear", x)(x, values, col, row_ptr, bias, n, block)


def _backward_impl(
    dy: Tensor,
    x: Tensor,
    values: Tensor,
    col: Tensor,
    row_ptr: Tensor,
    n: int,
    need_dx: bool,
    need_dv: bool,
) -> tuple[Tensor, Tensor]:
    """(dx [M, K], dvalues [nnz]) for a CSR weight; a side not needed is empty."""
    m, k = x.shape
    dx = torch.empty(m if need_dx else 0, k, dtype=torch.float32, device=x.device)
    dv = torch.empty(values.numel() if need_dv else 0, dtype=torch.float32, device=x.device)
    run = backends.impl("sparse", "linear_backward", x)
    run(dy, x, values, col, row_ptr, n, dx if need_dx else None, dv if need_dv else None)
    return dx, dv


@torch.library.custom_op("pykernels::sparse_linear", mutates_args=())
def _linear_op(
    x: Tensor, values: Tensor, col: Tensor, row_ptr: Tensor, bias: Tensor | None, n: int, block: int
) -> Tensor:
    return _forward_impl(x, values, col, row_ptr, bias, n, block)


@_linear_op.register_fake
def _(x, values, col, row_ptr, bias, n, block):
    return x.new_empty(x.shape[0], n, dtype=torch.float32)


@torch.library.custom_op("pykernels::sparse_linear_backward", mutates_args=())
def _backward_op(
    dy: Tensor,
    x: Tensor,
    values: Tensor,
    col: Tensor,
    row_ptr: Tensor,
    n: int,
    need_dx: bool,
    need_dv: bool,
) -> tuple[Tensor, Tensor]:
    return _backward_impl(dy, x, values, col, row_ptr, n, need_dx, need_dv)


@_backward_op.register_fake
def _(dy, x, values, col, row_ptr, n, need_dx, need_dv):
    m, k = x.shape
    return (
        x.new_empty(m if need_dx else 0, k, dtype=torch.float32),
        x.new_empty(values.numel() if need_dv else 0, dtype=torch.float32),
    )


def _setup(ctx, inputs, output) -> None:
    x, values, col, row_ptr, bias, n, block = inputs
    ctx.save_for_backward(x, values, col, row_ptr)
    ctx.n, ctx.block, ctx.has_bias = n, block, bias is not None


def _grad(ctx, dy):
    x, values, col, row_ptr = ctx.saved_tensors
    need_dx, need_dv, need_db = (
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        ctx.needs_input_grad[4],
    )
    dy = dy.float().contiguous()
    dx = dv = db = None
    if need_dx or need_dv:
        if ctx.block == 1:
            csr, perm = SparseWeight(values, col, row_ptr, ctx.n, x.shape[1], 1), None
        else:
            csr, perm = bsr_to_csr(SparseWeight(values, col, row_ptr, ctx.n, x.shape[1], ctx.block))
        gx, gv = torch.ops.pykernels.sparse_linear_backward(
            dy, x, csr.values, csr.col, csr.row_ptr, ctx.n, need_dx, need_dv
        )
        if need_dx:
            dx = gx
        if need_dv:
            if perm is None:
                dv = gv.view(values.shape)
            else:
                dv = torch.zeros(values.numel(), dtype=torch.float32, device=gv.device)
                dv[perm] = gv
                dv = dv.view(values.shape)
    if need_db and ctx.has_bias:
        db = dy.sum(dim=0)
    return dx, dv, None, None, db, None, None


torch.library.register_autograd("pykernels::sparse_linear", _grad, setup_context=_setup)


def sparse_linear(x: Tensor, w_sparse: SparseWeight, bias: Tensor | None = None) -> Tensor:
    """``x @ W.T + bias`` for a sparse weight W, differentiable in x, W's values and bias.

    ``x``: float ``[..., K]`` (fp32, fp16 or bf16; computed in fp32 on the
    CPU, returned in x's dtype); ``w_sparse``: a :class:`SparseWeight`;
    ``bias``: ``[N]`` or None. NaN in x reaches only the outputs whose rows
    of W hold a non-zero in that column.

    Reproducibility: the output and the gradient of the stored values are
    the same bit for bit at every thread count. The gradient of x is not in
    its last bits on the native CPU backend: each thread sums the rows of W
    it owns into a private buffer and the buffers are added after, so the
    order of that sum follows the thread count (as torch's own parallel
    reductions do); fix ``pykernels.set_num_threads`` (and the CPU) to
    repeat a training run bit for bit.
    """
    fn = "sparse_linear"
    _checks.check_float_input(fn, x)
    _check_weight(fn, w_sparse)
    n, k = w_sparse.n, w_sparse.k
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{fn}: x must have K = {k} in its last dimension, got {tuple(x.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"{fn}: bias must be a float tensor or None")
        if bias.shape != (n,):
            raise ValueError(f"{fn}: bias must have shape ({n},), got {tuple(bias.shape)}")
    for name, t in (("x", x), ("bias", bias)):
        if t is not None and t.device != w_sparse.values.device:
            raise ValueError(
                f"{fn}: {name} is on {t.device} but w_sparse.values is on {w_sparse.values.device}"
            )
    lead = x.shape[:-1]
    if math.prod(lead) == 0 or n == 0:
        return x.new_zeros(*lead, n)
    x2 = x.reshape(math.prod(lead), k).float().contiguous()
    values = w_sparse.values.float()
    b32 = None if bias is None else bias.float()
    # Called directly (the structure was checked above), or through the op,
    # which checks it again where it runs (compiled code).
    op = (
        _forward_checked
        if backends.skip_dispatcher(x2, values, b32)
        else torch.ops.pykernels.sparse_linear
    )
    y = op(x2, values.contiguous(), w_sparse.col, w_sparse.row_ptr, b32, n, w_sparse.block)
    return y.to(x.dtype).view(*lead, n)


# --- pruning ----------------------------------------------------------------


def _keep_count(total: int, sparsity: float) -> int:
    return total - int(math.floor(sparsity * total))


def _check_sparsity(fn: str, sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{fn}: sparsity must be a float in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{fn}: sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def block_norms(w: Tensor) -> Tensor:
    """Frobenius norm of each 4x4 block of w (zero-padded at the edges): [ceil(n/4), ceil(k/4)]."""
    n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    padded = w.new_zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32)
    padded[:n, :k] = w.detach().float()
    return padded.view(nb, BLOCK, kb, BLOCK).pow(2).sum(dim=(1, 3)).sqrt()


def expand_block_mask(keep: Tensor, n: int, k: int) -> Tensor:
    return keep.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]


def mask_2_4(w: Tensor) -> Tensor:
    """Keeps the two largest |w| of every 4 consecutive entries along K (ties: lower index)."""
    n, k = w.shape
    if k % 4:
        raise ValueError(f"prune: the 2:4 pattern needs K divisible by 4, got K = {k}")
    groups = w.detach().abs().float().view(n, k // 4, 4)
    # Stable descending sort, so equal magnitudes keep the lower index first.
    order = torch.sort(groups, dim=2, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order, True)
    return mask.view(n, k)


def magnitude_keep(scores: Tensor, keep: int) -> Tensor:
    """Boolean mask of the `keep` largest scores (exact, ties to the lower index)."""
    flat = scores.reshape(-1).float()
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if keep > 0:
        from .topk import topk_sparsify

        _, idx = topk_sparsify(flat.cpu(), k=keep)
        mask[idx.to(flat.device)] = True
    return mask.view(scores.shape)


def prune_mask(weight: Tensor, sparsity: float | None, pattern: str = "unstructured") -> Tensor:
    """The boolean keep-mask :func:`prune` applies (see there)."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"prune: weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"prune: weight must be a 2-D float tensor, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(
            f"prune: weight must be a 2-D float tensor, got shape {tuple(weight.shape)}"
        )
    if weight.device.type == "meta":
        raise ValueError("prune: weight is a meta tensor: its magnitudes are unknown")
    if pattern not in PATTERNS:
        raise ValueError(f"prune: pattern must be one of {PATTERNS}, got {pattern!r}")
    if pattern == "2:4":
        if sparsity is not None and _check_sparsity("prune", sparsity) != 0.5:
            raise ValueError(f"prune: the 2:4 pattern has sparsity 0.5, got {sparsity}")
        return mask_2_4(weight)
    if sparsity is None:
        raise ValueError(f"prune: the {pattern} pattern needs a sparsity")
    sparsity = _check_sparsity("prune", sparsity)
    n, k = weight.shape
    if pattern == "unstructured":
        return magnitude_keep(weight.detach().abs(), _keep_count(n * k, sparsity))
    norms = block_norms(weight)
    keep = magnitude_keep(norms, _keep_count(norms.numel(), sparsity))
    return expand_block_mask(keep, n, k)


def prune(weight: Tensor, sparsity: float | None = None, pattern: str = "unstructured") -> Tensor:
    """Magnitude pruning: ``weight`` with the pruned entries set to zero (a new tensor).

    - ``"unstructured"``: one magnitude threshold over the whole tensor; exactly
      ``numel - floor(sparsity * numel)`` entries are kept (ties to the lower
      flat index).
    - ``"block"``: whole aligned 4x4 blocks kept or dropped by their Frobenius
      norm; ``sparsity`` is the fraction of blocks dropped.
    - ``"2:4"``: the two largest |w| of every four along K (K must divide by 4);
      ``sparsity`` must be None or 0.5.
    """
    mask = prune_mask(weight, sparsity, pattern)
    return torch.where(mask, weight.detach(), torch.zeros_like(weight))
