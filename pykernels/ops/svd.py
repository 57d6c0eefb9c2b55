"""svd family: randomized truncated SVD, rank chosen by error, and batched small SVDs.

The large products are the cost of a randomized SVD, and they run on the
BLAS torch already carries (MKL or OpenBLAS on CPU, cuBLAS on GPU) through
``torch.matmul``. Linking a second BLAS into the torch-free extension would
put two thread pools in one process and add a large wheel for the same GEMM.
What the extension adds is the batched small SVD (one-sided Jacobi), where
LAPACK's per-matrix calls are slow.

Algorithm: a block Krylov range finder (Musco & Musco 2015). Each pass over
A adds an orthonormalised block ``(A A^T)^i A Omega``, kept rather than
overwritten, and the products with A^T made along the way give
``B = K^T A`` with no extra pass. One step (4 passes over A) is about as
accurate as simultaneous iteration with two (6 passes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends
from ..backends.torch import svd as _tsvd
from . import _checks

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


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


def _orth_against(y: Tensor, basis: Tensor | None, gen: torch.Generator) -> Tensor:
    """Orthonormal columns spanning what `y` adds to `basis`, as many as y has,
    orthogonal to `basis`: a rank-revealing orthogonalization.

    A plain QR of a rank-deficient y (an exactly low-rank matrix gives one: all
    ones, a checkerboard, an integer outer product) still returns orthonormal
    columns, but those past y's rank are the directions of its rounding noise,
    which after projection need not be orthogonal to the basis at all: the
    Krylov basis then stops being orthonormal and the factors come out wrong.
    Here the directions y holds only at the noise level are recognised (an SVD
    of QR's small R factor) and replaced by random ones orthogonalized against
    everything kept.
    """
    m, w = y.shape
    scale = float(torch.linalg.vector_norm(y))  # what the rounding is relative to
    if not math.isfinite(scale):
        raise _NotFinite()
    y = _project_out(y, basis)
    q, r = torch.linalg.qr(y)
    sr = torch.linalg.svdvals(r)
    noise = 16 * torch.finfo(y.dtype).eps * math.sqrt(max(m, w)) * scale
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


def _krylov_factors(a: Tensor, width: int, steps: int, gen: torch.Generator):
    """(K, Bt): K [m, (steps+1) * width] orthonormal, Bt = A^T K."""
    n = a.shape[1]
    omega = torch.randn(n, width, generator=gen, device=a.device, dtype=a.dtype)
    blocks = [_orth_against(a @ omega, None, gen)]
    products = []
    for _ in range(steps):
        w = a.T @ blocks[-1]
        products.append(w)
        basis = torch.cat(blocks, dim=1)
        blocks.append(_orth_against(a @ _orth(w), basis, gen))
    products.append(a.T @ blocks[-1])
    return torch.cat(blocks, dim=1), torch.cat(products, dim=1)


def _small_svd(k: Tensor, bt: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top `rank` of the SVD of B = K^T A from bt = B^T [n, w]: (u [m, r], s, v [n, r]).

    Through the w x w Gram matrix B B^T in float64 (a GEMM and a small eigh),
    not a Householder QR of the n x w bt, which cost as much as the products.
    V = B^T U / s loses orthogonality when s_r is tiny next to s_1, so that
    case takes the QR path.
    """
    g = (bt.T @ bt).double()
    evals, evecs = torch.linalg.eigh(g)
    evals, evecs = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
    s = evals.clamp_min(0).sqrt()
    if float(s[-1]) > 1e-3 * float(s[0]):
        us = evecs.to(bt.dtype)
        v = (bt @ us) / s.to(bt.dtype)
        return k @ us, s.to(bt.dtype), v
    qb, rb = torch.linalg.qr(bt)  # B = rb^T qb^T
    us, sv, vhs = torch.linalg.svd(rb.T)
    return k @ us[:, :rank], sv[:rank], qb @ vhs[:rank].T


def _wrap_seed(seed: int) -> int:
    """A seed as the int64 a custom op carries; torch.Generator reads both alike."""
    return seed - 2**64 if seed >= 2**63 else seed


def _generator(a: Tensor, seed: int) -> torch.Generator:
    gen = torch.Generator(device=a.device)
    gen.manual_seed(seed)
    return gen


@torch.library.custom_op("pykernels::randomized_svd", mutates_args=())
def _randomized_svd_op(
    a: Tensor, rank: int, n_iter: int, oversample: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    fn = "randomized_svd"
    m, n = a.shape
    width = rank + oversample
    if (n_iter + 1) * width >= min(m, n):
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"{fn}: a holds NaN or inf")
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].contiguous()
    transposed = m < n  # the Krylov basis lives in the smaller dimension
    work = a.T if transposed else a
    try:
        k, bt = _krylov_factors(work, width, n_iter, _generator(a, seed))
    except _NotFinite:
        raise _not_finite(fn, a) from None
    if not bool(torch.isfinite(bt).all()):
        raise _not_finite(fn, a)
    u, s, v = _small_svd(k, bt, rank)
    if transposed:
        u, v = v, u
    return u.contiguous(), s[:rank].contiguous(), v.T.contiguous()


@_randomized_svd_op.register_fake
def _(a, rank, n_iter, oversample, seed):
    m, n = a.shape
    return a.new_empty(m, rank), a.new_empty(rank), a.new_empty(rank, n)


def randomized_svd(
    a: Tensor, rank: int, n_iter: int = 1, oversample: int = 8, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD ``a ~ u @ diag(s) @ vh`` of rank ``rank`` by a randomized block Krylov method.

    ``n_iter`` Krylov steps (each two passes over ``a``) on a sketch of
    ``rank + oversample`` columns. Returns u ``[m, rank]`` and vh ``[rank, n]``
    with orthonormal columns / rows, s ``[rank]`` descending. Deterministic
    for a seed (on one device and torch version). fp32 and fp64; fp16/bf16
    are computed in fp32. When the sketch would cover min(m, n), the exact
    SVD is used instead. Exactly low-rank matrices (rank below ``rank``)
    factor exactly: the sketch is orthogonalized rank-revealingly. One custom
    op, so it compiles with ``torch.compile(fullgraph=True)`` (its
    data-dependent steps run inside it). No gradient flows through it.
    """
    fn = "randomized_svd"
    # NaN and inf always reach the (small) results, so they are checked there:
    # a full pass over a for it cost 15% of the call.
    a = _check_matrix(fn, a, finite=False)
    m, n = a.shape
    rank = _checks.check_int(fn, "rank", rank, 1)
    n_iter = _checks.check_int(fn, "n_iter", n_iter, 0)
    oversample = _checks.check_int(fn, "oversample", oversample, 0)
    seed = _checks.check_seed(fn, seed)
    if rank > min(m, n):
        raise ValueError(f"{fn}: rank must be <= min(m, n) = {min(m, n)}, got {rank}")
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


def _batched_cpu(fns, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    b, m, n = a.shape
    k = min(m, n)
    u = torch.empty(b, m, k, dtype=a.dtype)
    s = torch.empty(b, k, dtype=a.dtype)
    vh = torch.empty(b, k, n, dtype=a.dtype)
    sweeps = backends.host_call(fns.batched_svd, a, u, s, vh)
    if sweeps > 60:  # csrc/svd/svd.h kMaxSweeps
        raise RuntimeError("batched_svd: Jacobi did not converge (please report this matrix)")
    return u, s, vh


def _batched_reference(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # LAPACK through torch, on the host.
    u, s, vh = torch.linalg.svd(a.cpu(), full_matrices=False)
    return u.to(a.device), s.to(a.device), vh.to(a.device)


backends.register(
    "svd", "batched_svd", torch=_tsvd.batched_svd, cpu=_batched_cpu, reference=_batched_reference
)


@torch.library.custom_op("pykernels::batched_svd", mutates_args=())
def _batched_op(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # Here rather than in batched_svd: under torch.compile the values are
    # first known here.
    if not bool(torch.isfinite(a).all()):
        raise ValueError("batched_svd: a holds NaN or inf")
    return backends.impl("svd", "batched_svd", a)(a)


@_batched_op.register_fake
def _(a):
    b, m, n = a.shape
    k = min(m, n)
    return a.new_empty(b, m, k), a.new_empty(b, k), a.new_empty(b, k, n)


def batched_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of every matrix in a batch ``[..., m, n]`` of small matrices (min(m, n) <= 256).

    One-sided Jacobi on the CPU, computed in float64 whatever the input:
    relative accuracy about 1e-6 in fp32, u and vh orthonormal, s descending.
    Returns ``u [..., m, k]``, ``s [..., k]``, ``vh [..., k, n]`` with
    ``k = min(m, n)``, in a's dtype (fp16/bf16 computed and returned in
    fp32). Other devices use ``torch.linalg.svd`` there (the torch backend).
    NaN or inf in a is refused (a ValueError, raised inside the op so that
    it holds under ``torch.compile(fullgraph=True)`` too).
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
    u, s, vh = torch.ops.pykernels.batched_svd(work)
    return u.view(*lead, m, k), s.view(*lead, k), vh.view(*lead, k, n)
