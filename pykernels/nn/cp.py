"""CPConv2d: a convolution as four small ones from its CP decomposition
(Lebedev et al., "Speeding-up convolutional neural networks using fine-tuned
CP-decomposition", ICLR 2015), and the CP-ALS that computes it."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops import _checks
from ._module import nbytes_of

_LETTERS = "abcdefgh"


def _mttkrp(t: Tensor, factors: list[Tensor], mode: int) -> Tensor:
    """t unfolded along `mode` times the Khatri-Rao product of the other factors."""
    d = t.dim()
    ins = [_LETTERS[:d]] + [_LETTERS[i] + "r" for i in range(d) if i != mode]
    return torch.einsum(
        ",".join(ins) + "->" + _LETTERS[mode] + "r",
        t,
        *[f for i, f in enumerate(factors) if i != mode],
    )


def cp_reconstruct(weights: Tensor, factors: list[Tensor]) -> Tensor:
    """sum_r weights[r] * outer(factors[0][:, r], factors[1][:, r], ...)."""
    d = len(factors)
    ins = ["r"] + [_LETTERS[i] + "r" for i in range(d)]
    return torch.einsum(",".join(ins) + "->" + _LETTERS[:d], weights, *factors)


def cp_als(
    t: Tensor, rank: int, iters: int = 100, tol: float = 1e-6, seed: int = 0
) -> tuple[Tensor, list[Tensor], float]:
    """Rank-``rank`` CP decomposition of ``t`` by alternating least squares.

    Returns ``(weights [R], factors [dim_i x R] with unit columns, relative
    error ||t - t_hat|| / ||t||)``, in float64. Factors start from each
    unfolding's leading singular vectors (random columns past its rank), the
    usual deterministic start; iteration stops after ``iters`` sweeps or when
    the error moves by less than ``tol``.
    """
    t = t.detach().double()
    norm = float(t.norm()) or 1.0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    factors = []
    for mode in range(t.dim()):
        unf = t.movedim(mode, 0).reshape(t.shape[mode], -1)
        u = torch.linalg.svd(unf, full_matrices=False).U[:, :rank]
        if u.shape[1] < rank:
            extra = torch.randn(t.shape[mode], rank - u.shape[1], generator=gen, dtype=t.dtype)
            u = torch.cat([u, extra], dim=1)
        factors.append(u.to(t.device))
    weights = torch.ones(rank, dtype=t.dtype, device=t.device)
    err_prev = math.inf
    err = 1.0
    grams = [f.T @ f for f in factors]
    for _ in range(iters):
        for mode in range(t.dim()):
            gram = torch.ones(rank, rank, dtype=t.dtype, device=t.device)
            for i, g in enumerate(grams):
                if i != mode:
                    gram = gram * g
            m = _mttkrp(t, factors, mode)
            f = torch.linalg.lstsq(gram, m.T).solution.T  # m @ pinv(gram), gram symmetric
            weights = f.norm(dim=0)
            factors[mode] = f / torch.where(weights > 0, weights, torch.ones_like(weights))
            grams[mode] = factors[mode].T @ factors[mode]
        # ||t - t_hat||^2 = ||t||^2 - 2 <t, t_hat> + ||t_hat||^2 from the last
        # mode's MTTKRP and the Gram matrices: no reconstruction per sweep.
        inner = float((m * factors[-1]).sum(dim=0) @ weights)
        full = torch.ones(rank, rank, dtype=t.dtype, device=t.device)
        for g in grams:
            full = full * g
        sq = norm**2 - 2 * inner + float(weights @ full @ weights)
        err = math.sqrt(max(sq, 0.0)) / norm
        if abs(err_prev - err) < tol:
            break
        err_prev = err
    err = float((t - cp_reconstruct(weights, factors)).norm()) / norm
    return weights, factors, err


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class CPConv2d(nn.Module):
    """A ``kh x kw`` convolution ``Cin -> Cout`` as four (Lebedev et al. 2015):
    pointwise ``Cin -> R``, a vertical ``kh x 1`` depthwise, a horizontal
    ``1 x kw`` depthwise (each carrying its axis' stride, padding and
    dilation), and pointwise ``R -> Cout`` with the bias. The weight is the
    rank-R CP decomposition ``W[o, i, u, v] = sum_r A[o, r] B[i, r] C[u, r]
    D[v, r]``: ``R (Cin + kh + kw + Cout)`` values instead of ``Cin Cout kh kw``.
    Build it with :meth:`from_conv`; it trains like any module.
    """

    def __init__(
        self, first: nn.Conv2d, vertical: nn.Conv2d, horizontal: nn.Conv2d, last: nn.Conv2d
    ) -> None:
        super().__init__()
        self.first, self.vertical, self.horizontal, self.last = first, vertical, horizontal, last
        self.rel_error: float | None = None

    @property
    def rank(self) -> int:
        return self.first.out_channels

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        rank: int | None = None,
        energy: float | None = None,
        iters: int = 100,
        seed: int = 0,
    ) -> CPConv2d:
        """CP-ALS of ``conv``'s weight at ``rank``, or the smallest rank whose
        relative error is at most ``sqrt(1 - energy)`` (``energy``: the share of
        ``||W||^2`` kept; found by bisection, one CP-ALS per rank tried, up to
        the rank where the factors stop being smaller than W)."""
        fn = "CPConv2d.from_conv"
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{fn}: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(
                f"{fn}: groups must be 1, got {conv.groups} (grouped and depthwise convolutions "
                "are already factored by channel)"
            )
        if (rank is None) == (energy is None):
            raise ValueError(f"{fn}: give exactly one of rank and energy")
        if rank is not None:
            rank = _checks.check_int(fn, "rank", rank, 1)
        if energy is not None and not 0 < _checks.check_number(fn, "energy", energy) <= 1:
            raise ValueError(f"{fn}: energy must be in (0, 1], got {energy!r}")
        iters = _checks.check_int(fn, "iters", iters, 1)
        w = conv.weight.detach()
        if not w.is_floating_point() or w.device.type == "meta":
            raise ValueError(f"{fn}: conv.weight must be a float tensor with data")
        if not torch.isfinite(w).all():
            raise ValueError(f"{fn}: conv.weight holds NaN or inf")
        if rank is not None:
            weights, factors, err = _best_of_starts(w, rank, iters, seed)
        else:
            weights, factors, err = _search_rank(w, float(energy), iters, seed)
        layer = cls._build(conv, weights, factors)
        layer.rel_error = err
        return layer

    @classmethod
    def _build(cls, conv: nn.Conv2d, weights: Tensor, factors: list[Tensor]) -> CPConv2d:
        o, i, kh, kw = conv.weight.shape
        r = weights.shape[0]
        (sh, sw), (dh, dw) = _pair(conv.stride), _pair(conv.dilation)
        if isinstance(conv.padding, str):
            pv = ph = conv.padding  # 'valid' or 'same' (stride 1): per axis, as the full conv
        else:
            p0, p1 = _pair(conv.padding)
            pv, ph = (p0, 0), (0, p1)
        dev, dt = conv.weight.device, conv.weight.dtype
        mode = conv.padding_mode
        first = nn.Conv2d(i, r, 1, bias=False, device=dev, dtype=dt)
        vert = nn.Conv2d(r, r, (kh, 1), (sh, 1), pv, (dh, 1), r, False, mode, device=dev, dtype=dt)
        horiz = nn.Conv2d(r, r, (1, kw), (1, sw), ph, (1, dw), r, False, mode, device=dev, dtype=dt)
        last = nn.Conv2d(r, o, 1, bias=conv.bias is not None, device=dev, dtype=dt)
        a, b, c, d = factors
        # Each factor gets weights^(1/4): balanced magnitudes keep float32 exact.
        s = weights.clamp_min(0) ** 0.25
        with torch.no_grad():
            first.weight.copy_((b * s).T[:, :, None, None])
            vert.weight.copy_((c * s).T[:, None, :, None])
            horiz.weight.copy_((d * s).T[:, None, None, :])
            last.weight.copy_((a * s)[:, :, None, None])
            if conv.bias is not None:
                last.bias.copy_(conv.bias.detach())
        return cls(first, vert, horiz, last)

    def dense_weight(self) -> Tensor:
        """The ``[Cout, Cin, kh, kw]`` weight these four convolutions compute with."""
        a = self.last.weight[:, :, 0, 0]
        b = self.first.weight[:, :, 0, 0].T
        c = self.vertical.weight[:, 0, :, 0].T
        d = self.horizontal.weight[:, 0, 0, :].T
        return torch.einsum("or,ir,ur,vr->oiuv", a, b, c, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))

    def nbytes(self) -> int:
        return nbytes_of(self)

    def extra_repr(self) -> str:
        err = "" if self.rel_error is None else f", rel_error={self.rel_error:.4f}"
        return f"rank={self.rank}{err}, nbytes={self.nbytes()}"


def max_useful_rank(shape: tuple[int, ...]) -> int:
    """The largest rank whose factors hold fewer values than the tensor."""
    return max(1, (math.prod(shape) - 1) // sum(shape))


def _best_of_starts(
    w: Tensor, rank: int, iters: int, seed: int, restarts: int = 2, good: float = 0.0
):
    """cp_als at `rank`, and when the rank is above some dimension of w (where
    the start has random columns and ALS can stall in a swamp) and the error
    is above `good`, again from `restarts` other seeds: the lowest error."""
    best = cp_als(w, rank, iters, seed=seed)
    if rank > min(w.shape):
        for attempt in range(1, 1 + restarts):
            if best[2] <= max(good, 1e-9):
                break
            res = cp_als(w, rank, iters, seed=seed + attempt)
            if res[2] < best[2]:
                best = res
    return best


def _search_rank(w: Tensor, energy: float, iters: int, seed: int):
    """The smallest rank (bisection) with relative error <= sqrt(1 - energy);
    the largest useful rank if none reaches it.

    A rank that misses the target from the first start is retried by
    _best_of_starts before it counts as too small (from one start, 7% of
    random exact rank-5 8x6x3x3 tensors missed at rank 5)."""
    target = math.sqrt(max(0.0, 1.0 - energy))
    lo, hi = 1, max_useful_rank(tuple(w.shape))
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        res = _best_of_starts(w, mid, iters, seed, good=target)
        if res[2] <= target + 1e-12:
            best, hi = res, mid - 1
        else:
            lo = mid + 1
    return (
        best if best is not None else cp_als(w, max_useful_rank(tuple(w.shape)), iters, seed=seed)
    )
