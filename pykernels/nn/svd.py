"""Low-rank layers: LowRankLinear (W ~ U S V^T as two thin factors), TuckerConv2d
(Tucker-2 of a convolution kernel) and ``factorize``, which swaps them into a
model where they are smaller."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import _checks
from ..ops import svd as ops_svd
from ._module import nbytes_of, take_loaded_sizes


def _one_of(fn: str, rank, energy, tol) -> None:
    """Exactly one of the three targets, each checked here under `fn`'s name."""
    if sum(v is not None for v in (rank, energy, tol)) != 1:
        raise ValueError(f"{fn}: give exactly one of rank, energy and tol")
    if rank is not None:
        _checks.check_int(fn, "rank", rank, 1)
    if energy is not None and not 0 < _checks.check_number(fn, "energy", energy) <= 1:
        raise ValueError(f"{fn}: energy must be in (0, 1], got {energy!r}")
    if tol is not None and not 0 <= _checks.check_number(fn, "tol", tol) < 1:
        raise ValueError(f"{fn}: tol must be in [0, 1), got {tol!r}")


def _factor(fn: str, w: Tensor, rank: int | None, energy: float | None, tol: float | None):
    """(u, s, vh) of the 2-D w truncated by rank, energy or relative error."""
    if rank is not None:
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise TypeError(f"{fn}: rank must be an int, got {type(rank).__name__} {rank!r}")
        if rank < 1:
            raise ValueError(f"{fn}: rank must be a positive int, got {rank!r}")
        rank = min(rank, min(w.shape))
        if rank == 0:  # an empty weight (no inputs or no outputs): nothing to factor
            z = w.new_zeros
            return z(w.shape[0], 0), z(0), z(0, w.shape[1])
        return ops_svd.randomized_svd(w, rank)
    _, u, s, vh = ops_svd.svd_rank(w, tol=tol, energy=energy)
    return u, s, vh


class LowRankLinear(nn.Module):
    """``y = up(down(x)) + b``: ``down = sqrt(S) V^T`` [rank, in], ``up = U sqrt(S)`` [out, rank].

    The two factors are ordinary parameters (balanced by sqrt(S), which
    trains better than putting S on one side), so fine-tuning works with
    autograd. Inputs of another float dtype than the factors' are computed in
    the factors' dtype and returned in their own, as Int8Linear and
    SparseLinear do. Build it with :meth:`from_linear`.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        for name, v in (
            ("in_features", in_features),
            ("out_features", out_features),
            ("rank", rank),
        ):
            _checks.check_int("LowRankLinear", name, v, 0)
        bias = _checks.check_bool("LowRankLinear", "bias", bias)
        self.in_features, self.out_features = in_features, out_features
        self.down = nn.Parameter(torch.zeros(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.energy_kept = 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | None = None,
        energy: float | None = None,
        tol: float | None = None,
    ) -> LowRankLinear:
        """Truncated SVD of ``linear.weight``: a fixed ``rank``, the smallest rank keeping
        ``energy`` of ``||W||_F^2``, or the smallest with relative error ``<= tol``."""
        if not isinstance(linear, nn.Linear):
            got = type(linear).__name__
            raise TypeError(f"LowRankLinear.from_linear: linear must be an nn.Linear, got {got}")
        _one_of("LowRankLinear.from_linear", rank, energy, tol)
        if linear.weight.device.type == "meta":
            raise ValueError(
                "LowRankLinear.from_linear: linear.weight is a meta tensor: its factors "
                "depend on its values"
            )
        w = linear.weight.detach().float()
        u, s, vh = _factor("LowRankLinear.from_linear", w, rank, energy, tol)
        layer = cls(linear.in_features, linear.out_features, s.numel(), linear.bias is not None)
        root = s.sqrt()
        with torch.no_grad():
            layer.down.copy_(root[:, None] * vh)
            layer.up.copy_(u * root[None, :])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        total = float(w.double().pow(2).sum())
        layer.energy_kept = float(s.double().pow(2).sum()) / total if total else 1.0
        # The factors are computed in float32 and kept in the layer's own dtype: a
        # half-precision model's factors in float32 would hold twice the bytes (and
        # a layer that then does not shrink is left dense).
        return layer.to(linear.weight.device, linear.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_floating_point() and x.dtype != self.down.dtype and not torch.is_autocast_enabled():
            # As the other compressed layers: any float input, output in its dtype.
            y = F.linear(F.linear(x.to(self.down.dtype), self.down), self.up, self.bias)
            return y.to(x.dtype)
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def to_dense(self) -> Tensor:
        """The dense [out, in] weight this layer computes with."""
        with torch.no_grad():
            return self.up @ self.down

    def nbytes(self) -> int:
        return nbytes_of(self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}, "
            f"energy_kept={self.energy_kept:.4f}, nbytes={self.nbytes()}"
        )

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A rank chosen by energy or tol differs between weights: take the loaded
        # one, when the two factors agree on it.
        down, up = state_dict.get(prefix + "down"), state_dict.get(prefix + "up")
        if isinstance(down, Tensor) and isinstance(up, Tensor) and down.shape[0] == up.shape[-1]:
            take_loaded_sizes(self, state_dict, prefix, {"down": 0, "up": 1})
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class TuckerConv2d(nn.Module):
    """Tucker-2 of a Conv2d: 1x1 (in -> r_in), k x k core (r_in -> r_out), 1x1 (r_out -> out).

    The factors are the leading left singular vectors of the kernel unfolded
    along its input and output channels (HOSVD); the core is the kernel
    projected onto them. Stride, padding, dilation and bias are kept.
    """

    def __init__(self, first: nn.Conv2d, core: nn.Conv2d, last: nn.Conv2d) -> None:
        super().__init__()
        self.first, self.core, self.last = first, core, last

    @property
    def ranks(self) -> tuple[int, int]:
        """(r_out, r_in)."""
        return self.core.out_channels, self.core.in_channels

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        ranks: tuple[int, int] | None = None,
        energy: float | None = None,
    ) -> TuckerConv2d:
        """``ranks=(r_out, r_in)``, or the smallest ranks keeping ``energy`` of each unfolding."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"TuckerConv2d.from_conv: conv must be an nn.Conv2d, got {type(conv)}")
        if conv.groups != 1:
            raise ValueError(
                f"TuckerConv2d.from_conv: groups must be 1, got {conv.groups} "
                "(grouped and depthwise convolutions are already factored by channel)"
            )
        if conv.padding_mode != "zeros":
            raise ValueError("TuckerConv2d.from_conv: only padding_mode='zeros' is supported")
        fn = "TuckerConv2d.from_conv"
        if (ranks is None) == (energy is None):
            raise ValueError(f"{fn}: give exactly one of ranks and energy")
        if energy is not None and not 0 < _checks.check_number(fn, "energy", energy) <= 1:
            raise ValueError(f"{fn}: energy must be in (0, 1], got {energy!r}")
        if ranks is not None:
            if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
                raise TypeError(f"{fn}: ranks must be two positive ints, got {ranks!r}")
            for r in ranks:
                _checks.check_int(fn, "ranks", r, 1)
        w = conv.weight.detach().float()  # [O, I, kh, kw]
        o, i = w.shape[:2]
        if ranks is not None:
            r_out, r_in = min(ranks[0], o), min(ranks[1], i)
            u_out = _factor("TuckerConv2d.from_conv", w.reshape(o, -1), r_out, None, None)[0]
            u_in = _factor(
                "TuckerConv2d.from_conv", w.transpose(0, 1).reshape(i, -1), r_in, None, None
            )[0]
        else:
            u_out = _factor("TuckerConv2d.from_conv", w.reshape(o, -1), None, energy, None)[0]
            u_in = _factor(
                "TuckerConv2d.from_conv", w.transpose(0, 1).reshape(i, -1), None, energy, None
            )[0]
        core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)  # [r_out, r_in, kh, kw]
        # In the convolution's own device and dtype (as CPConv2d): float32 factors
        # of a bf16 or float64 convolution would refuse the model's activations.
        dd = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        first = nn.Conv2d(i, u_in.shape[1], 1, bias=False, **dd)
        mid = nn.Conv2d(
            u_in.shape[1],
            u_out.shape[1],
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=False,
            **dd,
        )
        last = nn.Conv2d(u_out.shape[1], o, 1, bias=conv.bias is not None, **dd)
        with torch.no_grad():
            first.weight.copy_(u_in.T[:, :, None, None])
            mid.weight.copy_(core)
            last.weight.copy_(u_out[:, :, None, None])
            if conv.bias is not None:
                last.bias.copy_(conv.bias.detach())
        return cls(first, mid, last)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.core(self.first(x)))

    def nbytes(self) -> int:
        return nbytes_of(self)

    def extra_repr(self) -> str:
        return f"ranks(out, in)={self.ranks}, nbytes={self.nbytes()}"


def factorize(
    model: nn.Module,
    rank: int | None = None,
    energy: float | None = None,
    tol: float | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Replaces each accepted Linear by a LowRankLinear (and Conv2d by a TuckerConv2d).

    Exactly one of ``rank``, ``energy``, ``tol``. Convolutions take ``rank``
    as both Tucker ranks, or ``energy``; with ``tol`` they are left alone.
    This runs the ``"lowrank"`` recipe step, then the ``"tucker"`` one, which
    choose layers as :func:`pykernels.compress` does: a layer whose
    factorization would not be smaller than the original is left alone, and
    so are the output projection of ``nn.MultiheadAttention`` and subclasses
    with their own ``forward`` (see :func:`pykernels.quantize_int8`).
    Deep-copies the model unless ``inplace=True``.
    """
    from ..compress.api import apply_steps
    from ..compress.recipes import LowRank, Tucker

    if not isinstance(model, nn.Module):
        raise TypeError(f"factorize: model must be an nn.Module, got {type(model).__name__}")
    _one_of("factorize", rank, energy, tol)
    _checks.check_callable("factorize", "filter_fn", filter_fn)
    inplace = _checks.check_bool("factorize", "inplace", inplace)
    steps = [LowRank(energy=energy, rank=rank, tol=tol)]
    if tol is None:
        steps.append(Tucker(energy=energy, rank=rank))
    return apply_steps(model, steps, filter_fn, inplace=inplace)
