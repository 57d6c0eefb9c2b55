"""svd family: randomized truncated SVD, rank chosen by error, and batched small SVDs.

The large products are the cost of a randomized SVD: each is the big
matrix A times a block of 8-80 vectors. A BLAS GEMM packs A into panels
before every such product, which at these widths costs about as much as the
product itself, so on the CPU (float32) the extension runs them with
kernels that read A once, unpacked (``svd_dot_rows``, ``svd_combine_rows``,
per ISA: 1.5-3x MKL's sgemm at widths 16-80 on AMD EPYC Zen 5, RESULTS.md);
other devices and dtypes use ``torch.matmul``. The small dense algebra
(Cholesky QR, the eigendecompositions) stays on torch's LAPACK. The
extension also runs the batched SVD of small matrices (one-sided Jacobi,
one matrix per thread), where LAPACK's per-matrix calls, one after
another, are slower; past a measured crossover (16x16 on two threads)
batched_svd calls LAPACK through torch instead.

Algorithm: block Lanczos with full reorthogonalization (a block Krylov
method, Musco & Musco 2015), in blocks of 20-64 columns, 4-8 of them. For
the same passes over A, narrower blocks reach a higher Krylov degree, which
is what slowly decaying spectra (trained weights) need: at the same cost as
``torch.svd_lowrank(q=r+10, niter=2)``'s 6 passes of r + 10 columns it
reaches a smaller error, so at its error it is cheaper. Every step is a
GEMM: Cholesky QR (with a rank-revealing fallback) orthogonalizes the
blocks, and the block tridiagonal T = K^T A A^T K comes from Gram matrices
of the blocks of B = K^T A already made, so the Rayleigh-Ritz step needs
only an eigendecomposition of T.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends
from ..backends.torch import svd as _tsvd
from . import _checks

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --- the Krylov passes ---------------------------------------------------------


def _dot_rows_native(a: Tensor, q: Tensor, out: Tensor) -> Tensor:
    backends.host_call(backends.native.C.svd_dot_rows, a, q, out)
    return out


def _combine_rows_native(a: Tensor, k: Tensor, out: Tensor) -> Tensor:
    backends.host_call(backends.native.C.svd_combine_rows, a, k.T.contiguous(), out)
    return out


def _dot_rows_torch(a: Tensor, q: Tensor, out: Tensor) -> Tensor:
    return torch.matmul(q, a.T, out=out)


def _combine_rows_torch(a: Tensor, k: Tensor, out: Tensor) -> Tensor:
    return torch.matmul(k, a, out=out)


def _native_pass(a: Tensor) -> bool:
    return a.dtype == torch.float32 and (a.shape[1] <= 1 or a.stride(1) == 1)


# The products of a block Krylov method with a [m, n]: out [w, m] = q [w, n]
# a^T, and out [w, n] = k [w, m] a. The native kernels take float32 with
# contiguous rows; anything else (and every other backend) is torch.matmul.
backends.register(
    "svd",
    "dot_rows",
    native_cpu=lambda a, q, out: (_dot_rows_native if _native_pass(a) else _dot_rows_torch)(
        a, q, out
    ),
    any=_dot_rows_torch,
)
backends.register(
    "svd",
    "combine_rows",
    native_cpu=lambda a, k, out: (_combine_rows_native if _native_pass(a) else _combine_rows_torch)(
        a, k, out
    ),
    any=_combine_rows_torch,
)


class _Passes:
    """Products with work = a (or a^T when `transposed`), always reading a
    itself: q @ work.T of a^T is k @ a, so the two kernels trade places."""

    def __init__(self, a: Tensor, transposed: bool) -> None:
        self.a = a
        self.transposed = transposed
        self.dot = backends.impl("svd", "dot_rows", a)
        self.combine = backends.impl("svd", "combine_rows", a)

    def times_t(self, q: Tensor) -> Tensor:
        """q @ work.T, q [w, work's columns]."""
        q = q.contiguous()
        if self.transposed:
            return self.combine(self.a, q, q.new_empty(q.shape[0], self.a.shape[1]))
        return self.dot(self.a, q, q.new_empty(q.shape[0], self.a.shape[0]))

    def times(self, k: Tensor, out: Tensor) -> Tensor:
        """k @ work into out (contiguous), k [w, work's rows]."""
        k = k.contiguous()
        if self.transposed:
            return self.dot(self.a, k, out)
        return self.combine(self.a, k, out)


def _check_matrix(fn: str, a: Tensor, finite: bool = True) -> Tensor:
    if not isinstance(a, Tensor):
        raise TypeError(f"{fn}: a must be a torch.Tensor, got {type(a).__name__}")
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: a must be a float tensor (fp32, fp64, fp16, bf16), got {a.dtype}")
    if a.dim() != 2:
        raise ValueError(f"{fn}: a must be 2-D, got shape {tuple(a.shape)}")
    if finite and not bool(torch.isfinite(a).all()):
        raise ValueError(f"{fn}: a holds NaN or inf")
    return a.detach().float() if a.dtype in (torch.float16, torch.bfloat16) else a.detach()


def _orth(y: Tensor) -> Tensor:
    return torch.linalg.qr(y).Q


class _NotFinite(ValueError):
    """A product with `a` is not finite: a holds NaN or inf (or overflows)."""


def _not_finite(fn: str, a: Tensor) -> ValueError:
    return ValueError(
        f"{fn}: a holds NaN or inf (or values so large that products with it overflow {a.dtype})"
    )


def _project_out(y: Tensor, basis: Tensor | None) -> Tensor:
    return y if basis is None else y - basis @ (basis.T @ y)


def _orth_against(
    y: Tensor, basis: Tensor | None, gen: torch.Generator, noise: float | None = None
) -> Tensor:
    """Orthonormal columns spanning what `y` adds to `basis`, as many as y has,
    orthogonal to `basis`: a rank-revealing orthogonalization.

    A plain QR of a rank-deficient y (an exactly low-rank matrix gives one: all
    ones, a checkerboard, an integer outer product) still returns orthonormal
    columns, but those past y's rank are the directions of its rounding noise,
    which after projection need not be orthogonal to the basis at all: the
    Krylov basis then stops being orthonormal and the factors come out wrong.
    Here the directions y holds only at the noise level are recognised (an SVD
    of QR's small R factor) and replaced by random ones orthogonalized against
    everything kept. ``noise``: the size of y's rounding, where the caller
    knows it better than this bound from y's norm.
    """
    m, w = y.shape
    scale = float(torch.linalg.vector_norm(y))  # what the rounding is relative to
    if not math.isfinite(scale):
        raise _NotFinite()
    if noise is None:
        noise = 16 * torch.finfo(y.dtype).eps * math.sqrt(max(m, w)) * scale
    y = _project_out(y, basis)
    q, r = torch.linalg.qr(y)
    sr = torch.linalg.svdvals(r)
    rank = int((sr > noise).sum())
    kept = q
    if rank < w:  # the directions of y above the noise, in order
        ur = torch.linalg.svd(r).U
        kept = q @ ur[:, :rank]
    if basis is not None and rank:
        # The second pass of Gram-Schmidt ("twice is enough"), on real
        # directions only, so a plain QR after it is safe.
        kept = _orth(_project_out(kept, basis))
    if rank == w:
        return kept
    known = kept if basis is None else torch.cat([basis, kept], dim=1)
    z = torch.randn(m, w - rank, generator=gen, device=y.device, dtype=y.dtype)
    for _ in range(2):
        z = _project_out(z, known)
    return torch.cat([kept, _orth(_project_out(_orth(z), known))], dim=1)


def _rows_orth_robust(
    y: Tensor, basis: Tensor | None, gen: torch.Generator, noise: float
) -> Tensor:
    """:func:`_orth_against` for row vectors: orthonormal rows spanning what y adds to basis."""
    cols = _orth_against(y.T, None if basis is None else basis.T, gen, noise)
    return cols.T.contiguous()


def _cholqr(y: Tensor, floor: float, gram: Tensor | None = None) -> Tensor | None:
    """Rows spanning y's, orthonormal, from y's Gram matrix (``gram`` when the
    caller has it); None where that is unsafe: a row adds less than `floor`
    to the ones before it, or the rows are too far from orthogonal for a Gram
    matrix in y's precision (its condition number is squared there).

    Cholesky QR is two GEMMs and a w x w factorization, where a Householder
    QR of the same tall block spends half its time in BLAS-2 panels; the rare
    block it refuses takes the rank-revealing path instead.
    """
    g = y @ y.T if gram is None else gram
    c, info = torch.linalg.cholesky_ex(g.double())
    if int(info):
        return None
    d = torch.diagonal(c)
    lo, hi = float(d.min()), float(d.max())
    if not lo > max(floor, _GRAM_SAFE[y.dtype] * hi):  # also refuses NaN
        return None
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return torch.linalg.solve_triangular(c, eye, upper=False).to(y.dtype) @ y


# The smallest diagonal of a block's Cholesky factor, relative to its largest,
# for which a Gram matrix in the block's precision still yields rows a second
# pass makes orthonormal (their error is about eps * condition^2).
_GRAM_SAFE = {torch.float32: 3e-3, torch.float64: 3e-7}


def _noise(y: Tensor) -> float:
    """The size of the rounding in a block of rows y = q @ A^T (q orthonormal rows).

    Each row carries about 2 eps times the largest row's norm (measured on
    flat and steep spectra, 600 to 4096 columns), so the block's rounding
    has singular values below sqrt(rows) times that; 16x above it, a
    direction is real. A bound from the block's Frobenius norm and its
    length (_orth_against's) is 500-3000x the rounding and dropped real
    directions 1e-4 below s_1: i^-2 spectra at rank 100 lost 1.8%.
    """
    w = y.shape[0]
    return (
        32
        * torch.finfo(y.dtype).eps
        * math.sqrt(w)
        * float(torch.linalg.vector_norm(y, dim=1).max())
    )


def _orth_block(
    y: Tensor, local: Tensor | None, full: Tensor | None, gen: torch.Generator
) -> Tensor:
    """Orthonormal rows for what the rows of y add to the orthonormal rows `full` (or None).

    The Lanczos structure puts nearly all of y in the last two blocks
    (`local`); after that projection and a Cholesky QR, one projection on the
    whole basis and a second Cholesky QR ("twice is enough") leave the rows
    orthogonal to working precision.
    """
    noise = _noise(y)
    if not math.isfinite(noise):
        raise _NotFinite()
    if local is not None:
        y = y - (y @ local.T) @ local
    q = _cholqr(y, noise)
    if q is not None:
        if full is not None:
            q = q - (q @ full.T) @ full
        # The first pass leaves rows orthonormal only to eps * cond(y)^2.
        q = _cholqr(q, 0.5)
        if q is not None:
            return q
    return _rows_orth_robust(y, full, gen, noise)


def _block_lanczos(
    work: Tensor, rank: int, blocks: int, width: int, gen: torch.Generator, passes: _Passes
) -> tuple[Tensor, Tensor, Tensor]:
    """Top `rank` singular triplets of work [m, n] (m <= n) from a block Krylov space.

    Returns (ut [rank, m], s, vt [rank, n]): work ~ ut.T @ diag(s) @ vt.

    Vectors are rows (K [D, m] holds the basis of the column space, B = K
    work [D, n]); every product with `work` goes through `passes`.
    Block i+1 comes from work @ orth(B_i^T): normalising B_i before the
    product keeps what is new in it at working precision, not at its square
    root. With the basis kept orthonormal, T = B B^T is block tridiagonal
    (K_j^T A A^T K_i = 0 for |i - j| > 1), so T is the blocks B_i B_i^T and
    B_i B_{i-1}^T, and the Rayleigh-Ritz step needs no D x D Gram of B.
    """
    m, n = work.shape
    dt = work.dtype
    d = blocks * width
    k = work.new_empty(d, m)
    b = work.new_empty(d, n)
    t = work.new_zeros(d, d)
    omega = torch.randn(width, n, generator=gen, device=work.device, dtype=dt)
    k[:width] = _orth_block(passes.times_t(omega), None, None, gen)
    for i in range(blocks):
        rows = slice(i * width, (i + 1) * width)
        bi = passes.times(k[rows], b[rows])
        g = bi @ bi.T
        t[rows, rows] = g
        if i:
            t[rows, (i - 1) * width : i * width] = bi @ b[(i - 1) * width : i * width].T
        if i == blocks - 1:
            break
        qb = _cholqr(bi, 0.0, gram=g)
        if qb is None:
            # A block of B too ill-conditioned for Cholesky QR (or zero) still
            # needs a well-conditioned basis to multiply by: its span is kept.
            qb = _rows_orth_robust(bi, None, gen, _noise(bi))
        y = passes.times_t(qb)
        lo = max(0, i - 1) * width
        k[(i + 1) * width : (i + 2) * width] = _orth_block(
            y, k[lo : (i + 1) * width], k[: (i + 1) * width], gen
        )
    if not bool(torch.isfinite(t).all()):
        raise _NotFinite()
    lam, z = torch.linalg.eigh(t)  # its lower triangle
    eps = torch.finfo(dt).eps
    if not float(lam[-rank]) >= 1e3 * eps * float(lam[-1]):
        # T holds B B^T only to about eps * s_1^2: past s_r / s_1 ~ 30
        # sqrt(eps) (a steep spectrum, or rank-deficient) it cannot tell the
        # last Ritz vectors apart, so the Rayleigh-Ritz step takes the SVD of B
        # itself, through a QR of B^T (LAPACK, slower, at full precision).
        qb, rb = torch.linalg.qr(b.T)  # B = rb^T qb^T
        x, sv, yh = torch.linalg.svd(rb.T)
        return x[:, :rank].T @ k, sv[:rank], yh[:rank] @ qb.T
    zr = z[:, -rank:].flip(1)  # the top Ritz vectors, in the basis K
    # eigh's vectors in single precision are orthonormal to about D * eps;
    # one Cholesky QR of the D x rank block takes them to eps.
    zr = zr @ torch.linalg.inv(torch.linalg.cholesky((zr.T @ zr).double())).T.to(dt)
    p = zr.T @ b  # rows s_i v_i^T, up to a rotation
    basis_u = zr.T @ k  # [rank, m], orthonormal rows
    if dt == torch.float32:
        # v_i = p_i / s_i from T would be orthonormal only to eps * (s_1 /
        # s_i)^2. The Gram matrix of p, exact relative to its rows, in float64
        # gives s and v at working precision (double's eps * (s_1 / s_i)^2 is
        # below single's eps for every spectrum that got here).
        mu, rot = torch.linalg.eigh((p @ p.T).double())
        rot_t = rot.flip(1).T.to(dt)
        s = mu.flip(0).clamp_min(0).sqrt().to(dt)
        if float(s[-1]) > 0:
            return rot_t @ basis_u, s, (rot_t @ p) / s[:, None]
    # float64 (a Gram matrix would need quadruple precision) or a zero
    # singular value: the right vectors from a QR of p.
    qp, rp = torch.linalg.qr(p.T)  # p = rp^T qp^T
    x, sv, yh = torch.linalg.svd(rp.T)
    return x.T @ basis_u, sv, yh @ qp.T


def _wrap_seed(seed: int) -> int:
    """A seed as the int64 a custom op carries; torch.Generator reads both alike."""
    return seed - 2**64 if seed >= 2**63 else seed


def _generator(a: Tensor, seed: int) -> torch.Generator:
    gen = torch.Generator(device=a.device)
    gen.manual_seed(seed)
    return gen


def _krylov_shape(rank: int, n_iter: int, oversample: int) -> tuple[int, int]:
    """(blocks, width): n_iter + 1 blocks of equal width, rank + oversample columns or more."""
    blocks = n_iter + 1
    return blocks, -(-(rank + oversample) // blocks)


@torch.library.custom_op("pykernels::randomized_svd", mutates_args=())
def _randomized_svd_op(
    a: Tensor, rank: int, n_iter: int, oversample: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    fn = "randomized_svd"
    m, n = a.shape
    blocks, width = _krylov_shape(rank, n_iter, oversample)
    if blocks * width >= min(m, n):
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"{fn}: a holds NaN or inf")
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous()
    transposed = m > n  # the Krylov basis lives in the smaller dimension
    work = a.T if transposed else a
    try:
        passes = _Passes(a, transposed)
        ut, s, vt = _block_lanczos(work, rank, blocks, width, _generator(a, seed), passes)
    except _NotFinite:
        raise _not_finite(fn, a) from None
    if not bool(torch.isfinite(s).all()):
        raise _not_finite(fn, a)
    if transposed:
        return vt.T.contiguous(), s, ut.contiguous()
    return ut.T.contiguous(), s, vt.contiguous()


@_randomized_svd_op.register_fake
def _(a, rank, n_iter, oversample, seed):
    m, n = a.shape
    return a.new_empty(m, rank), a.new_empty(rank), a.new_empty(rank, n)


def _default_shape(rank: int, k: int, fast: bool) -> tuple[int, int]:
    """(n_iter, oversample) when the caller gives neither (see randomized_svd);
    k = min(m, n)."""
    oversample = max(40, min(3 * rank // 2, 64 + rank // 2))
    if fast:
        return 3, max(8, oversample // 2)
    if 2 * (rank + oversample) > k:
        # Past half of k the tail left out is short: more columns buy little
        # there (768 x 3072 at rank 256: 1.004x optimal at 448 columns, 1.014x
        # at 384, svd_lowrank 1.025x) and more blocks of fewer columns do.
        oversample = max(k // 2 - rank, min(oversample, 128))
    d = rank + oversample
    # Blocks of up to 64 columns keep the GEMMs near full speed; a space of
    # half of k or more has a dense spectrum to separate and needs more steps.
    widest = 64 if 2 * d < k else 32
    return min(8, max(4, -(-d // widest))) - 1, oversample


def randomized_svd(
    a: Tensor,
    rank: int,
    n_iter: int | None = None,
    oversample: int | None = None,
    seed: int = 0,
    fast: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD ``a ~ u @ diag(s) @ vh`` of rank ``rank`` by a randomized block Krylov method.

    Block Lanczos with full reorthogonalization: ``n_iter + 1`` blocks of
    equal width, ``rank + oversample`` columns in all, grown from a Gaussian
    sketch (each block costs two passes over ``a``), then a Rayleigh-Ritz
    step on that space. Fewer columns per block reach a higher Krylov degree
    for the same passes over ``a``, which is what slowly decaying spectra
    need.

    Defaults (both None): ``oversample = max(40, min(3 * rank // 2, 64 +
    rank // 2))``, at most what brings the space to half of min(m, n), and
    4 to 8 blocks of at most 64 columns (32 once the space is half of
    min(m, n)): rank 32 is 4 x 20 columns, rank 128 4 x 64, rank 256 7 x 64
    (8 x 48 for a 768-row matrix). On slowly decaying spectra and trained
    weights the error is then below that of ``torch.svd_lowrank(a, q=rank +
    10, niter=2)`` truncated to ``rank`` and within 1.02x of the optimal
    rank-``rank`` error, in 1.8-2.6x less time on an AVX-512 CPU and
    1.5-2.1x on AVX2 for float32 CPU tensors, whose products with ``a`` run
    on the extension's Krylov-pass kernels (benchmarks/RESULTS.md, AMD EPYC
    Zen 5, 2 threads). ``fast=True`` trades error for speed: 4 blocks and
    half the oversampling, 1.0-1.45x faster again, at 1.004-1.06x the
    optimal error where ``svd_lowrank`` reaches 1.001-1.03x. Either of ``n_iter`` and
    ``oversample`` given overrides the schedule (the other defaults as
    above); ``n_iter=0`` is a plain sketch of ``rank + oversample`` columns.

    Returns u ``[m, rank]`` and vh ``[rank, n]`` with orthonormal columns /
    rows, s ``[rank]`` descending. Deterministic for a seed (on one device
    and torch version). fp32 and fp64; fp16/bf16 are computed in fp32. When
    the Krylov space would cover min(m, n), the exact SVD is used instead.
    Exactly low-rank matrices (rank below ``rank``) factor exactly: blocks
    are orthogonalized rank-revealingly. A cluster of equal singular values
    wider than a block is found a block at a time (random directions fill
    the Krylov blocks it leaves empty). One custom op, so it compiles with
    ``torch.compile(fullgraph=True)`` (its data-dependent steps run inside
    it). No gradient flows through it.
    """
    fn = "randomized_svd"
    # NaN and inf always reach the (small) results, so they are checked there:
    # a full pass over a for it cost 15% of the call.
    a = _check_matrix(fn, a, finite=False)
    m, n = a.shape
    rank = _checks.check_int(fn, "rank", rank, 1)
    if n_iter is not None:
        n_iter = _checks.check_int(fn, "n_iter", n_iter, 0)
    if oversample is not None:
        oversample = _checks.check_int(fn, "oversample", oversample, 0)
    seed = _checks.check_seed(fn, seed)
    fast = _checks.check_bool(fn, "fast", fast)
    if rank > min(m, n):
        raise ValueError(f"{fn}: rank must be <= min(m, n) = {min(m, n)}, got {rank}")
    default_iter, default_over = _default_shape(rank, min(m, n), fast)
    n_iter = default_iter if n_iter is None else n_iter
    oversample = default_over if oversample is None else oversample
    return torch.ops.pykernels.randomized_svd(a, rank, n_iter, oversample, _wrap_seed(seed))


@torch.library.custom_op("pykernels::svd_rank", mutates_args=())
def _svd_rank_op(a: Tensor, target: float, block: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    fn = "svd_rank"
    m, n = a.shape
    transposed = m < n
    work = a.T if transposed else a
    mm, nn = work.shape
    total = float(work.double().pow(2).sum())
    if not math.isfinite(total):
        raise ValueError(f"{fn}: a holds NaN or inf")
    if total == 0.0:
        z = work.new_zeros
        return z(m, 0), z(0), z(0, n)
    gen = _generator(a, seed)
    basis = work.new_zeros(mm, 0)
    rows = []  # blocks of Q^T a, stacked: B = Q^T a
    captured = 0.0
    # Grow until what the basis misses is a small part of the allowed error:
    # that residual counts against every rank read from the small SVD below.
    full = False
    while basis.shape[1] < min(mm, nn):
        if basis.shape[1] + block > min(mm, nn) / 3:
            # The answer is a large part of the dimension: a full SVD is then
            # cheaper than growing the basis further.
            full = True
            break
        b = min(block, min(mm, nn) - basis.shape[1])
        omega = torch.randn(nn, b, generator=gen, device=a.device, dtype=work.dtype)
        y = _project_out(work @ omega, basis)
        for _ in range(2):  # power steps: the basis should hold the top subspace, not just energy
            y = _project_out(work @ (work.T @ _orth(y)), basis)
        try:
            q = _orth_against(y, basis if basis.shape[1] else None, gen)
        except _NotFinite:
            raise _not_finite(fn, a) from None
        r = q.T @ work
        basis = torch.cat([basis, q], dim=1)
        rows.append(r)
        captured += float(r.double().pow(2).sum())
        if (total - captured) / total <= target * 0.2:
            break
    if full:
        basis, rows, captured = None, [work], total
    bmat = torch.cat(rows, dim=0)
    ub, s, vh = torch.linalg.svd(bmat, full_matrices=False)
    tail = torch.flip(torch.cumsum(torch.flip(s.double() ** 2, [0]), 0), [0])  # sum_{i>=j} s_i^2
    residual = total - captured  # what the basis misses altogether
    err = torch.cat([tail[1:], tail.new_zeros(1)]) + residual  # error of keeping s[:j+1]
    ok = (err / total <= target).nonzero()
    r = int(ok[0]) + 1 if ok.numel() else s.numel()
    u = ub[:, :r] if basis is None else basis @ ub[:, :r]
    v = vh[:r].T
    if transposed:
        u, v = v, u
    return u.contiguous(), s[:r].contiguous(), v.T.contiguous()


@_svd_rank_op.register_fake
def _(a, target, block, seed):
    # The rank is read off the data: a size only known when the op has run.
    m, n = a.shape
    bound = min(m, n)  # a static bound only when the shapes are static
    ctx = torch.library.get_ctx()
    r = ctx.new_dynamic_size(max=bound) if isinstance(bound, int) else ctx.new_dynamic_size()
    return a.new_empty(m, r), a.new_empty(r), a.new_empty(r, n)


def svd_rank(
    a: Tensor,
    tol: float | None = None,
    energy: float | None = None,
    block: int = 32,
    seed: int = 0,
) -> tuple[int, Tensor, Tensor, Tensor]:
    """The smallest rank meeting ``tol`` or ``energy``, and its factors, without a full SVD.

    ``tol``: relative Frobenius error ``||a - a_r||_F / ||a||_F <= tol``.
    ``energy``: keep at least that fraction of ``||a||_F^2`` (so ``tol =
    sqrt(1 - energy)``). A blocked adaptive range finder grows an orthonormal
    basis ``Q`` by ``block`` columns at a time, each block refined by two
    power steps, and tracks ``||a - Q Q^T a||_F^2 = ||a||_F^2 - ||Q^T a||_F^2``
    exactly from the products it already has, stopping once the error
    estimate is below the target. The rank is then read off the SVD of the
    small ``Q^T a``. When the basis would pass a third of min(m, n), a full
    SVD is cheaper and is used instead. Returns ``(rank, u, s, vh)``.

    One custom op, so it compiles with ``torch.compile(fullgraph=True)``; the
    rank is then a size known only at run time (an unbacked symbolic int),
    and a meta tensor, whose values are unknown, is refused.
    """
    fn = "svd_rank"
    a = _check_matrix(fn, a, finite=False)  # ||a||^2 below is not finite exactly then
    if (tol is None) == (energy is None):
        raise ValueError(f"{fn}: give exactly one of tol and energy")
    if tol is not None:
        tol = _checks.check_number(fn, "tol", tol)
        if not 0 <= tol < 1:  # also refuses NaN
            raise ValueError(f"{fn}: tol must be in [0, 1), got {tol!r}")
        target = tol**2
    else:
        energy = _checks.check_number(fn, "energy", energy)
        if not 0 < energy <= 1:
            raise ValueError(f"{fn}: energy must be in (0, 1], got {energy!r}")
        target = 1.0 - energy
    block = _checks.check_int(fn, "block", block, 1)
    seed = _checks.check_seed(fn, seed)
    if a.device.type == "meta":
        raise ValueError(f"{fn}: a is a meta tensor: the rank depends on its values")
    u, s, vh = torch.ops.pykernels.svd_rank(a, target, block, _wrap_seed(seed))
    return s.shape[0], u, s, vh


def optimal_error(s_full: Tensor, rank: int) -> float:
    """Frobenius error of the best rank-`rank` approximation, from the full spectrum."""
    return math.sqrt(float((s_full[rank:].double() ** 2).sum()))


# --- batched small SVD -------------------------------------------------------

MAX_BATCHED_DIM = 256


def _lapack_layout(x: Tensor) -> Tensor:
    """x [B, r, c] laid out as LAPACK returns its factors: each matrix column-major."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _batched_cpu(fns, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One-sided Jacobi (in float64) on a CPU backend's buffer functions."""
    b, m, n = a.shape
    k = min(m, n)
    u = torch.empty(b, m, k, dtype=a.dtype)
    s = torch.empty(b, k, dtype=a.dtype)
    vh = torch.empty(b, k, n, dtype=a.dtype)
    sweeps = backends.host_call(fns.batched_svd, a, u, s, vh)
    if sweeps > 60:  # csrc/svd/svd.h kMaxSweeps
        raise RuntimeError("batched_svd: Jacobi did not converge (please report this matrix)")
    # One layout for the op's results whichever method ran: the LAPACK path
    # then returns torch's factors as they are (a copy was 2-4% of its time).
    return _lapack_layout(u), s, _lapack_layout(vh)


def _lapack_us(k: int) -> float:
    """LAPACK's time for one k x k SVD through torch.linalg.svd, in microseconds
    (one thread, fp32, AMD EPYC Zen 5; 0.7 at k = 2, 22 at 16, 75 at 32)."""
    return 0.2 * k**1.7


def _jacobi_wins(batch: int, m: int, n: int, threads: int) -> bool:
    """Whether the native Jacobi beats LAPACK (torch.linalg.svd) on this batch.

    Measured per matrix on one thread each (benchmarks/RESULTS.md), Jacobi's
    time over LAPACK's is about 0.082 k^0.95 (rows / k)^0.3 (k = min(m, n),
    within 0.7-1.4x of that from 2x2 to 128x128 and 256x4): 0.16 at 2x2,
    0.72 at 8x8, 1.4 at 16x16, 4.8 at 64x64. Jacobi runs one matrix per
    thread while torch.linalg.svd runs the batch one matrix after another,
    so it wins while that ratio, taken 1.4x higher to stay on the safe side,
    is below the threads it can use; the ~10 us more that a call to the
    extension costs decide for a few tiny matrices.
    """
    k, rows = min(m, n), max(m, n)
    ratio = 1.4 * 0.082 * k**0.95 * (rows / k) ** 0.3
    t = min(threads, batch)
    return ratio < t and batch * _lapack_us(k) * (1 - ratio / t) > 10.0


def _batched_native(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    b, m, n = a.shape
    fns = backends.native.C
    if _jacobi_wins(b, m, n, fns.get_num_threads()):
        return _batched_cpu(fns, a)
    # Past the crossover LAPACK's bidiagonalization does fewer flops than
    # Jacobi's sweeps: s is then accurate to eps * s_1 rather than relatively.
    return torch.linalg.svd(a, full_matrices=False)


def _batched_reference(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # LAPACK through torch, on the host.
    u, s, vh = torch.linalg.svd(a.cpu(), full_matrices=False)
    return _lapack_layout(u.to(a.device)), s.to(a.device), _lapack_layout(vh.to(a.device))


def _batched_torch(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # Another device's solver may lay its factors out otherwise; the op's
    # fake results promise LAPACK's layout (a no-op where it is that).
    u, s, vh = _tsvd.batched_svd(a)
    return _lapack_layout(u), s, _lapack_layout(vh)


backends.register(
    "svd",
    "batched_svd",
    torch=_batched_torch,
    native_cpu=_batched_native,
    cpu=_batched_cpu,
    reference=_batched_reference,
)


def _batched_run(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # A finite sum proves every entry finite at half the cost of isfinite's
    # pass and its boolean tensor (a tiny batch's check was 7 of its 25 us);
    # only a sum that overflows needs the entry-wise check.
    if not math.isfinite(float(a.sum())) and not bool(torch.isfinite(a).all()):
        raise ValueError("batched_svd: a holds NaN or inf")
    return backends.impl("svd", "batched_svd", a)(a)


@torch.library.custom_op("pykernels::batched_svd", mutates_args=())
def _batched_op(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # The check is inside the op rather than in batched_svd: under
    # torch.compile the values are first known here.
    return _batched_run(a)


@_batched_op.register_fake
def _(a):
    b, m, n = a.shape
    k = min(m, n)
    u = a.new_empty_strided((b, m, k), (m * k, 1, m))
    vh = a.new_empty_strided((b, k, n), (k * n, 1, k))
    return u, a.new_empty(b, k), vh


def batched_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of every matrix in a batch ``[..., m, n]`` of small matrices (min(m, n) <= 256).

    On the CPU, whichever of two exact methods is faster for the batch's
    shape and the threads (the crossover measured against
    ``torch.linalg.svd``, see ``_jacobi_wins``): one-sided Jacobi, one matrix
    per thread, computed in float64 whatever the input (singular values to
    about 1e-6 relative in fp32, small ones included) for small matrices
    (up to 8x8 on one thread, 16x16 on two); LAPACK through
    ``torch.linalg.svd`` in a's dtype above that (singular values to about
    eps * s_1). u and vh orthonormal, s descending either way. Returns ``u
    [..., m, k]``, ``s [..., k]``, ``vh [..., k, n]`` with ``k = min(m, n)``,
    in a's dtype (fp16/bf16 computed and returned in fp32). Other devices
    use ``torch.linalg.svd`` there (the torch backend). NaN or inf in a is
    refused (a ValueError, raised inside the op so that it holds under
    ``torch.compile(fullgraph=True)`` too).
    """
    fn = "batched_svd"
    if not isinstance(a, Tensor):
        raise TypeError(f"{fn}: a must be a torch.Tensor, got {type(a).__name__}")
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: a must be a float tensor, got {a.dtype}")
    if a.dim() < 2:
        raise ValueError(f"{fn}: a must be [..., m, n], got shape {tuple(a.shape)}")
    m, n = a.shape[-2:]
    if min(m, n) > MAX_BATCHED_DIM:
        raise ValueError(
            f"{fn}: for small matrices (min(m, n) <= {MAX_BATCHED_DIM}), got {m} x {n}; "
            "use torch.linalg.svd or pykernels.ops.randomized_svd for large ones"
        )
    lead = a.shape[:-2]
    work = a.detach()
    if work.dtype in (torch.float16, torch.bfloat16):
        work = work.float()
    # The batch size is explicit: with -1, an empty matrix made it ambiguous.
    work = work.reshape(math.prod(lead), m, n).contiguous()
    k = min(m, n)
    if work.shape[0] == 0 or k == 0:
        z = work.new_zeros
        return z(*lead, m, k), z(*lead, k), z(*lead, k, n)
    if backends.skip_dispatcher(work):  # eager: a tiny batch costs little more than the call
        u, s, vh = _batched_run(work)
    else:
        u, s, vh = torch.ops.pykernels.batched_svd(work)
    return u.view(*lead, m, k), s.view(*lead, k), vh.view(*lead, k, n)
