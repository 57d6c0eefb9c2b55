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

from .. import _reference, backends

BLOCK = 4  # BSR block: 4 x 4 (csrc/sparse/sparse.h says why)
PATTERNS = ("unstructured", "block", "2:4")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    block holding a non-zero (zeros inside kept blocks are stored).
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"to_sparse: w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"to_sparse: w must be a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    if block not in (1, BLOCK):
        raise ValueError(f"to_sparse: block must be 1 or {BLOCK}, got {block!r}")
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
    """The dense float32 [n, k] weight of a SparseWeight, bit-exact."""
    _check_weight("to_dense", sw)
    dev = sw.values.device
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
    n or k are left out. Backward runs on this form.
    """
    dev = sw.values.device
    nb = -(-sw.n // BLOCK)
    counts = sw.row_ptr[1:] - sw.row_ptr[:-1]  # blocks per block row
    brow = torch.repeat_interleave(torch.arange(nb, device=dev), counts)  # [nblocks]
    bcol = col_as_int64(sw.col)
    j = torch.arange(sw.values.shape[0], device=dev)
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
    csr = SparseWeight(
        sw.values.reshape(-1)[perm].float(),
        col.to(torch.int32).to(_col_dtype(sw.k, 1)),
        row_ptr,
        sw.n,
        sw.k,
        1,
    )
    return csr, perm


def _check_weight(fn: str, sw: SparseWeight) -> None:
    if not isinstance(sw, SparseWeight):
        raise TypeError(f"{fn}: w_sparse must be a SparseWeight, got {type(sw).__name__}")
    rows = sw.n if sw.block == 1 else -(-sw.n // BLOCK)
    if sw.block not in (1, BLOCK):
        raise ValueError(f"{fn}: w_sparse.block must be 1 or {BLOCK}, got {sw.block}")
    if sw.row_ptr.dtype != torch.int64 or sw.row_ptr.shape != (rows + 1,):
        raise ValueError(f"{fn}: w_sparse.row_ptr must be int64 of shape ({rows + 1},)")
    per = 1 if sw.block == 1 else BLOCK * BLOCK
    if sw.col.dtype not in (torch.int16, torch.int32) or sw.col.dim() != 1:
        raise ValueError(f"{fn}: w_sparse.col must be a 1-D int16 or int32 tensor")
    if sw.values.numel() != sw.col.numel() * per or not sw.values.is_floating_point():
        raise ValueError(f"{fn}: w_sparse.values must hold {per} float(s) per column index")


# --- buffers for the native kernels ------------------------------------------


def _col_np(col: Tensor) -> np.ndarray:
    a = col.numpy()
    return a.view(np.uint16) if col.dtype == torch.int16 else a


def _forward_impl(
    x: Tensor, values: Tensor, col: Tensor, row_ptr: Tensor, bias: Tensor | None, n: int, block: int
) -> Tensor:
    m, k = x.shape
    backend = backends.choose("sparse", x.device)
    sw = SparseWeight(values, col, row_ptr, n, k, block)
    if backend.name == "native-cpu":
        y = torch.empty(m, n, dtype=torch.float32)
        backends.cpu_function(backend, "sparse", "sparse_linear")(
            x.numpy(),
            row_ptr.numpy(),
            _col_np(col),
            values.reshape(-1).numpy(),
            block,
            n,
            None if bias is None else bias.numpy(),
            y.numpy(),
        )
        return y
    if backend.kind == "torch":
        from .._torch import sparse as ts

        return ts.sparse_linear(x, values, col_as_int64(col), row_ptr, bias, n, block)
    if backend.name == "numba":
        from .._numba import sparse as nb

        csr = bsr_to_csr(sw)[0] if block != 1 else sw
        y = torch.empty(m, n, dtype=torch.float32)
        nb.sparse_linear(
            x.numpy(),
            csr.row_ptr.numpy(),
            col_as_int64(csr.col).numpy(),
            csr.values.numpy(),
            None if bias is None else bias.numpy(),
            y.numpy(),
        )
        return y
    csr = bsr_to_csr(sw)[0] if block != 1 else sw
    return _reference.sparse_linear(x, csr.row_ptr, col_as_int64(csr.col), csr.values, n, bias)


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
    backend = backends.choose("sparse", x.device)
    dx = torch.empty(m if need_dx else 0, k, dtype=torch.float32, device=x.device)
    dv = torch.empty(values.numel() if need_dv else 0, dtype=torch.float32, device=x.device)
    if backend.name == "native-cpu":
        backends.cpu_function(backend, "sparse", "sparse_linear_backward")(
            dy.numpy(),
            x.numpy(),
            row_ptr.numpy(),
            _col_np(col),
            values.numpy(),
            n,
            dx.numpy() if need_dx else None,
            dv.numpy() if need_dv else None,
        )
        return dx, dv
    if backend.kind == "torch":
        from .._torch import sparse as ts

        return ts.sparse_linear_backward(
            dy, x, values, col_as_int64(col), row_ptr, n, need_dx, need_dv
        )
    if backend.name == "numba":
        from .._numba import sparse as nb

        nb.sparse_linear_backward(
            dy.numpy(),
            x.numpy(),
            row_ptr.numpy(),
            col_as_int64(col).numpy(),
            values.numpy(),
            dx.numpy() if need_dx else None,
            dv.numpy() if need_dv else None,
        )
        return dx, dv
    sw = SparseWeight(values, col, row_ptr, n, k, 1)
    rdx, rdv = _reference.sparse_linear_backward(dy, x, to_dense(sw), sw.row_ptr, col_as_int64(col))
    if need_dx:
        dx.copy_(rdx)
    if need_dv:
        dv.copy_(rdv)
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
    """
    fn = "sparse_linear"
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: x must be float32, float16 or bfloat16, got {x.dtype}")
    _check_weight(fn, w_sparse)
    n, k = w_sparse.n, w_sparse.k
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{fn}: x must have K = {k} in its last dimension, got {tuple(x.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"{fn}: bias must be a float tensor or None")
        if bias.shape != (n,):
            raise ValueError(f"{fn}: bias must have shape ({n},), got {tuple(bias.shape)}")
    for name, t in (
        ("x", x),
        ("bias", bias),
        ("w_sparse.col", w_sparse.col),
        ("w_sparse.row_ptr", w_sparse.row_ptr),
    ):
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
    op = (
        _forward_impl
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
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("prune: weight must be a 2-D float tensor")
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
