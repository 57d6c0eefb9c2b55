"""GPTQ (Frantar et al. 2022): layer-wise quantization with second-order error
compensation, over any per-column grid.

For a Linear with weight ``W [N, K]`` and calibration inputs ``X``, GPTQ
quantizes the columns of ``W`` one at a time and spreads each column's
rounding error over the columns not yet quantized, weighted by the inverse
Hessian ``H^-1`` of ``||X W^T - X Q^T||^2`` (``H = 2 X^T X``). As in the
reference code (``gptq.py`` of IST-DASLab/gptq): damping adds ``damp`` times
the mean of ``diag(H)`` to the diagonal, the updates are done lazily in
blocks of 128 columns, the inverse comes as the upper Cholesky factor of
``H^-1``, and ``act_order`` visits columns by decreasing ``diag(H)``.

What a column quantizes to is a :class:`Grid`: int8 per output channel
(:class:`Int8Grid`), a k-means codebook (:class:`ClusterGrid`) or int4 groups
(:class:`Int4Grid`). GPTQ returns the codes and their dequantization, which
is what the grid maps the codes to, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 128


class Grid:
    """What one weight column quantizes to. ``quantize(w, col)`` takes the current
    values ``w [N]`` of original column ``col`` and returns ``(w_hat [N] float32,
    codes [N] int64)``, ``w_hat`` being exactly what the codes dequantize to.

    A grid whose parameters depend on the weights per group of columns sets
    ``group_size``; GPTQ then calls ``set_group(start, w)`` with the current
    values ``w [N, group_size]`` of columns ``start..`` when it reaches a group
    (or, under ``act_order``, ``prepare(W)`` once with the whole original
    weight, since a group's columns are then not visited together)."""

    group_size: int | None = None

    def use_hessian(self, diag: Tensor) -> None:
        """Gets ``diag(H) [K]`` (float64, original column order) before the first
        column: a grid that searches its parameters may weight columns by it."""

    def prepare(self, w: Tensor) -> None:
        """Sets every group's parameters from ``w [N, K]`` (static groups)."""

    def set_group(self, start: int, w: Tensor) -> None:
        """Sets the parameters of the group that starts at column ``start``."""

    def quantize(self, w: Tensor, col: int) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError


class Int8Grid(Grid):
    """Symmetric int8 with one fixed scale per output channel (``scale [N]``), as
    :class:`pykernels.nn.Int8Linear` stores it: ``q = clamp(round(w / s), -127, 127)``.
    A zero scale (an all-zero row) quantizes everything to 0."""

    def __init__(self, scale: Tensor) -> None:
        self.scale = scale.float()
        self._div = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))

    def quantize(self, w: Tensor, col: int) -> tuple[Tensor, Tensor]:
        # A zero-scale row is all zeros and stays so (its errors are zero): q = 0 there.
        q = torch.round(w / self._div).clamp_(-127, 127)
        return q * self.scale, q.long()


class ClusterGrid(Grid):
    """The nearest centroid of a fixed codebook: ``codebook [N, C]`` (one per output
    channel) or ``[1, C]`` (one per layer), as :class:`pykernels.nn.ClusteredLinear`
    keeps it after k-means."""

    def __init__(self, codebook: Tensor) -> None:
        self.codebook = codebook.float()

    def quantize(self, w: Tensor, col: int) -> tuple[Tensor, Tensor]:
        idx = (w[:, None] - self.codebook).abs().argmin(1)
        cb = self.codebook.expand(w.shape[0], -1)
        return cb.gather(1, idx[:, None])[:, 0], idx


def int4_group_params(w: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    """The int4 contract's scale and zero point of each row of ``w [N, g]``:
    symmetric ``scale = absmax / 7``, zero 8; asymmetric ``scale = (max - min) / 15``
    (over ``min(w, 0)`` and ``max(w, 0)``), ``zero = clamp(round(-min / scale), 0, 15)``;
    an all-zero row gets scale 1 (and codes equal to its zero)."""
    w = w.float()
    if symmetric:
        scale = w.abs().amax(1) / 7
        zero = torch.full_like(scale, 8.0)
    else:
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        scale = (hi - lo) / 15
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / safe).clamp_(0, 15)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


# Clip search: each group's range shrunk by these factors (GPTQ's ``mse`` option
# searches 1 down to 0.2 in 100 steps; over all of MiniLM's weight groups, with a
# grid down to 0.2, no group chose below 0.78, so 0.6 leaves a margin at 21 steps).
CLIP_GRID = tuple(1.0 - 0.02 * i for i in range(21))


def int4_search_params(
    w: Tensor, symmetric: bool, weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Like :func:`int4_group_params`, with each row's range shrunk by the factor of
    :data:`CLIP_GRID` that gives the least ``sum_j weight_j (w_j - q_j)^2`` over the
    row (``weight [g]``: per-column importance, e.g. ``diag(H)``; None: all 1). Factor
    1 is among the candidates and ties keep the earlier (wider) one, so the search
    never has more error than no search."""
    w = w.float()
    best_s, best_z = int4_group_params(w, symmetric)
    wt = None if weight is None else weight.float()[None, :]

    def err(s: Tensor, z: Tensor) -> Tensor:
        q = int4_quantize_group(w, s, z, symmetric)
        off = 8.0 if symmetric else z[:, None]
        d = (q - off) * s[:, None] - w
        d = d * d
        return (d if wt is None else d * wt).sum(1)

    best = err(best_s, best_z)
    for p in CLIP_GRID[1:]:
        s, z = int4_group_params(w * p, symmetric)
        e = err(s, z)
        better = e < best
        best = torch.where(better, e, best)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def int4_quantize_group(w: Tensor, scale: Tensor, zero: Tensor, symmetric: bool) -> Tensor:
    """Codes 0..15 of ``w [N, ...]`` under ``scale``/``zero [N]`` (the contract's rounding)."""
    s, z = scale.reshape(-1, *([1] * (w.dim() - 1))), zero.reshape(-1, *([1] * (w.dim() - 1)))
    if symmetric:
        return torch.round(w / s).clamp_(-8, 7) + 8
    return (torch.round(w / s) + z).clamp_(0, 15)


class Int4Grid(Grid):
    """int4 codes 0..15 with a scale and zero point per row and group of
    ``group_size`` columns (the int4 contract); ``scales`` / ``zeros`` ``[N, K // g]``
    fill in as GPTQ reaches each group.

    ``clip``: ``None`` takes each group's full range (min / max); ``"mse"`` shrinks
    it by the factor that minimizes the group's squared rounding error;
    ``"hessian"`` weights that error by ``diag(H)`` of each column
    (:func:`int4_search_params`)."""

    def __init__(
        self, n: int, k: int, group_size: int, symmetric: bool, clip: str | None = None
    ) -> None:
        if clip not in (None, "mse", "hessian"):
            raise ValueError(f"Int4Grid: clip must be None, 'mse' or 'hessian', got {clip!r}")
        self.group_size = group_size
        self.symmetric = symmetric
        self.clip = clip
        self.scales = torch.ones(n, k // group_size)
        self.zeros = torch.zeros(n, k // group_size)
        self._diag: Tensor | None = None

    def use_hessian(self, diag: Tensor) -> None:
        self._diag = diag

    def set_group(self, start: int, w: Tensor) -> None:
        if self.clip is None:
            s, z = int4_group_params(w, self.symmetric)
        else:
            d = self._diag
            wt = None
            if self.clip == "hessian" and d is not None:
                wt = d[start : start + self.group_size]
            s, z = int4_search_params(w, self.symmetric, wt)
        self.scales[:, start // self.group_size] = s
        self.zeros[:, start // self.group_size] = z

    def prepare(self, w: Tensor) -> None:
        for g in range(w.shape[1] // self.group_size):
            self.set_group(
                g * self.group_size, w[:, g * self.group_size : (g + 1) * self.group_size]
            )

    def quantize(self, w: Tensor, col: int) -> tuple[Tensor, Tensor]:
        g = col // self.group_size
        s, z = self.scales[:, g], self.zeros[:, g]
        q = int4_quantize_group(w, s, z, self.symmetric)
        return (q - z) * s, q.long()


@dataclass
class GPTQResult:
    """``w_hat [N, K]`` float32 (the codes dequantized), ``codes [N, K]`` int64, and
    ``loss``: GPTQ's estimate of the added squared output error, ``sum (w - q)^2 /
    [H^-1]_jj / 2`` over the columns."""

    w_hat: Tensor
    codes: Tensor
    loss: float


def check_gptq_options(damp: object, block_size: object, act_order: object) -> None:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
        raise ValueError(f"gptq: damp must be a number in (0, 1), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq: block_size must be a positive int, got {block_size!r}")
    if not isinstance(act_order, bool):
        raise TypeError(f"gptq: act_order must be a bool, got {type(act_order).__name__}")


def _inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` in float32, as
    the reference computes it; a Hessian too ill-conditioned for that damping gets ten
    times more, up to 1."""
    k = h.shape[0]
    mean = float(torch.diag(h).mean()) or 1.0
    eye = torch.eye(k, dtype=torch.float32)
    h32 = h.float()
    d = damp
    while True:
        # With J the order-reversing permutation and J H J = L L^T, U = J L^-1 J is
        # upper triangular with U^T U = H^-1: the factor the reference gets from a
        # Cholesky, an inverse and a second Cholesky, for one Cholesky and one
        # triangular solve (4x faster at K = 1536, equal to float32 rounding).
        low, info = torch.linalg.cholesky_ex(torch.flip(h32 + (d * mean) * eye, (0, 1)))
        if int(info) == 0:
            inv = torch.linalg.solve_triangular(low, eye, upper=False)
            u = torch.flip(inv, (0, 1))
            if bool(torch.isfinite(u).all()) and bool((torch.diag(u) > 0).all()):
                return u
        if d >= 1.0:
            raise ValueError("gptq: the calibration Hessian is not positive definite even damped")
        d = min(1.0, d * 10)


def gptq(
    weight: Tensor,
    hessian: Tensor,
    grid: Grid,
    *,
    damp: float = 0.01,
    block_size: int = BLOCK,
    act_order: bool = False,
) -> GPTQResult:
    """Quantizes ``weight [N, K]`` column by column onto ``grid`` with GPTQ's error
    compensation under ``hessian [K, K]`` (``2 X^T X / rows`` of the layer's inputs,
    :meth:`InputStats.hessian`).

    ``damp``: fraction of the mean diagonal added to it (0.01, as the paper);
    ``block_size``: columns per lazy update (128; raised to a multiple of the
    grid's group size); ``act_order``: columns by decreasing ``diag(H)`` (groups
    are then fixed from the original weight first: "static groups").
    """
    check_gptq_options(damp, block_size, act_order)
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError("gptq: weight must be a 2-D float tensor")
    n, k = weight.shape
    if not isinstance(hessian, Tensor) or tuple(hessian.shape) != (k, k):
        raise ValueError(f"gptq: hessian must be [{k}, {k}] for a weight of {k} columns")
    if not bool(torch.isfinite(weight).all()) or not bool(torch.isfinite(hessian).all()):
        raise ValueError("gptq: weight and hessian must be finite")
    w = weight.detach().to("cpu", torch.float32, copy=True)
    h = hessian.detach().to("cpu", torch.float64, copy=True)
    # A channel the calibration never excited carries no error information: it is
    # rounded as it is and pulls on no other column.
    # (a dead column's error weighs nothing in a clip search)
    grid.use_hessian(torch.diag(h).clone())
    dead = torch.diag(h) == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    g = grid.group_size
    if g:
        block_size = -(-block_size // g) * g
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        if g:
            grid.prepare(w)
        w = w[:, perm]
        h = h[perm][:, perm]
    hinv = _inverse_cholesky(h, float(damp))
    # Columns as rows ([K, N]): each column's update then touches contiguous memory.
    wt = w.T.contiguous()
    q_all = torch.zeros_like(wt)
    codes = torch.zeros(k, n, dtype=torch.long)
    loss = torch.zeros(())
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            col = int(perm[j]) if perm is not None else j
            if g and perm is None and j % g == 0:
                grid.set_group(j, w1[i : i + g].T)
            wc = w1[i]
            qc, cc = grid.quantize(wc, col)
            q_all[j] = qc
            codes[j] = cc
            d = hinv1[i, i]
            e = (wc - qc) / d
            loss += e.pow(2).sum() / 2
            # Spread this column's error over the block's later columns.
            w1[i + 1 :].sub_(hinv1[i, i + 1 :, None] * e[None, :])
            err1[i] = e
        # The lazy batch update: the whole block's errors on every later column at once.
        if i2 < k:
            wt[i2:].sub_(hinv[i1:i2, i2:].T @ err1)
    q_all, codes = q_all.T, codes.T
    if perm is not None:
        inv = torch.argsort(perm)
        q_all, codes = q_all[:, inv], codes[:, inv]
    q_all, codes = q_all.contiguous(), codes.contiguous()
    dev = weight.device
    return GPTQResult(q_all.to(dev), codes.to(dev), float(loss))
