"""AWQ and SmoothQuant: per-input-channel scales that make a Linear easier to quantize.

Both rewrite ``y = x W^T`` as ``y = (x / s) (W diag(s))^T`` with one factor
``s_j`` per input channel, which leaves the float model's function as it was:

- **AWQ** (Lin et al. 2023, activation-aware weight quantization): ``s =
  mean|x|^alpha`` (normalized), ``alpha`` searched on a grid for the least
  output error of the layer after the *next* step's weight quantization
  (``int4`` or ``int8``, round to nearest). The error of a weight change
  ``dW`` on the calibration inputs is ``tr(dW X^T X dW^T)``, so the search
  reads only ``X^T X``, never the activations themselves.
- **SmoothQuant** (Xiao et al. 2022): ``s_j = max|X_j|^alpha / max|W_j|^(1 -
  alpha)`` moves activation outliers into the weights for W8A8;
  ``alpha`` given (``smoothquant:0.5``) or searched on a sample of calibration
  rows for the least W8A8 output error (per-token int8 activations, what
  :class:`pykernels.nn.Int8Linear` ships).

Where ``x`` comes from an op that can absorb ``1 / s`` it is folded there:
the LayerNorm in front of a pre-norm block's attention or feed-forward
input, the value projection in front of attention's output projection
(attention is linear in ``V`` per channel), a LayerNorm or Linear directly
before the Linear in an ``nn.Sequential``. Elsewhere (a post-norm block's
projections, whose input also feeds the residual; the second feed-forward
Linear, behind a nonlinearity) the layer becomes an :class:`InputScaled`
holding the explicit ``1 / s`` and the scaled Linear, which the next step
quantizes in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..context import Context
from ..kinds import module_kind_named, module_kind_of, register_kind
from .activations import InputStats, collect
from .gptq import int4_group_params, int4_quantize_group

SQ_GRID = [i / 10 for i in range(1, 10)]  # SmoothQuant's search: alpha in 0.1 ... 0.9
AWQ_GRID = [i / 10 for i in range(11)]  # AWQ's search: each point costs a K x K product
SAMPLE_ROWS = 512  # calibration rows kept per layer for SmoothQuant's search


class InputScaled(nn.Module):
    """``inner(x * input_scale)``: a Linear (or its compressed replacement) whose
    input is scaled per channel first, where AWQ or SmoothQuant found no op to fold
    the scale into. The scale is a float32 buffer ``[in_features]``."""

    #: the report and the recipe's record see through it to ``inner``
    pk_transparent = True

    def __init__(self, inner: nn.Module, input_scale: Tensor) -> None:
        super().__init__()
        k = int(getattr(inner, "in_features", input_scale.numel()))
        if input_scale.dim() != 1 or input_scale.numel() != k:
            raise ValueError(f"InputScaled: input_scale must have shape [{k}]")
        self.inner = inner
        self.in_features = k
        self.out_features = int(getattr(inner, "out_features", 0))
        self.register_buffer("input_scale", input_scale.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x * self.input_scale.to(x.dtype))

    def nbytes(self) -> int:
        from ...nn._module import nbytes_of

        return nbytes_of(self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, input_scale=per-channel"


def _scaled_describe(m: InputScaled) -> dict[str, Any]:
    mk = module_kind_of(m.inner)
    if mk is None:
        raise ValueError(f"InputScaled holds a {type(m.inner).__name__}, which has no kind")
    return {
        "in_features": m.in_features,
        "inner": {"kind": mk.name, "config": mk.describe(m.inner)},
    }


def _scaled_build(c: dict[str, Any]) -> nn.Module:
    mk = module_kind_named(c["inner"]["kind"])
    if mk is None:
        raise ValueError(f"unknown module kind {c['inner']['kind']!r}")
    return InputScaled(mk.build(c["inner"]["config"]), torch.ones(int(c["in_features"])))


register_kind(InputScaled, _scaled_describe, _scaled_build)


@dataclass
class Group:
    """Linears that read one input, and what can absorb ``1 / s`` of it (None: the
    scale stays explicit, one :class:`InputScaled` per Linear)."""

    linears: list[tuple[str, nn.Linear]]
    fold: nn.Module | None = None


def _groups(ctx: Context, targets: list[tuple[str, nn.Linear]]) -> list[Group]:
    from ...nn.encoder import _spec

    by_id = {id(m): (fqn, m) for fqn, m in targets}
    taken: set[int] = set()
    groups: list[Group] = []

    def add(linears: list[nn.Module], fold: nn.Module | None) -> None:
        if not linears or any(id(m) not in by_id or id(m) in taken for m in linears):
            return
        k = {m.in_features for m in linears}
        if len(k) != 1:
            return
        taken.update(id(m) for m in linears)
        groups.append(Group([by_id[id(m)] for m in linears], fold))

    for _, layer in ctx.model.named_modules():
        spec = _spec(layer)
        if isinstance(spec, str) or spec.layout == "torch":
            continue  # torch's layers hold q/k/v in one in_proj parameter
        if spec.norm_first:
            add([spec.q, spec.k, spec.v], spec.norm1)
            add([spec.ffn1], spec.norm2)
        if spec.v.out_features == spec.out.in_features:
            add([spec.out], spec.v)
    for _, seq in ctx.model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        mods = list(seq)
        for prev, cur in zip(mods, mods[1:], strict=False):
            ok = isinstance(prev, nn.LayerNorm) and prev.elementwise_affine
            ok = ok and tuple(prev.normalized_shape) == (getattr(cur, "in_features", -1),)
            ok = ok or (
                isinstance(prev, nn.Linear) and prev.out_features == getattr(cur, "in_features", -1)
            )
            if ok and isinstance(cur, nn.Linear):
                add([cur], prev)
    for _, m in targets:
        if id(m) not in taken:
            add([m], None)
    return groups


def _fold(fold: nn.Module, s: Tensor) -> None:
    """Divides ``fold``'s output channel j by ``s_j``, in place."""
    with torch.no_grad():
        if isinstance(fold, nn.LayerNorm):
            fold.weight.div_(s.to(fold.weight.dtype))
            if fold.bias is not None:
                fold.bias.div_(s.to(fold.bias.dtype))
        else:
            fold.weight.div_(s.to(fold.weight.dtype)[:, None])
            if fold.bias is not None:
                fold.bias.div_(s.to(fold.bias.dtype))


def apply_scales(ctx: Context, group: Group, s: Tensor) -> None:
    """``W[:, j] *= s_j`` for each Linear of the group and ``1 / s`` folded into the
    group's op, or each Linear wrapped in an :class:`InputScaled`."""
    s = s.float()
    for fqn, m in group.linears:
        with torch.no_grad():
            m.weight.mul_(s.to(m.weight.dtype)[None, :])
        if group.fold is None:
            ctx.replace(fqn, InputScaled(m, 1.0 / s))
        else:
            ctx.scaled(fqn, in_scale=1.0 / s)
    if group.fold is not None:
        _fold(group.fold, s)
        fold_fqn = next((n for n, x in ctx.model.named_modules() if x is group.fold), None)
        if fold_fqn is not None and isinstance(group.fold, nn.Linear):
            ctx.scaled(fold_fqn, out_scale=s)


# --- the weight quantizer each search judges by -------------------------------------------


def rtn_quantizer(step: Any) -> Callable[[Tensor], Tensor] | None:
    """What the step after AWQ makes of a float weight (round to nearest, dequantized),
    for the steps AWQ knows; None for others."""
    name = getattr(step, "name", "")
    if name == "int8":
        return _rtn_int8
    if name == "int4":
        g, sym = int(step.group_size), bool(step.symmetric)
        return lambda w: rtn_int4(w, g, sym)
    return None


def rtn_module(step: Any, linear: nn.Linear) -> nn.Module | None:
    """What ``step`` (int8 or int4, uncalibrated) would make of ``linear`` as it is now:
    the round-to-nearest baseline the report compares a calibrated layer with."""
    import copy

    name = getattr(step, "name", "")
    if name == "int8":
        from ...nn import Int8Linear

        return Int8Linear.from_linear(linear, mode=step.mode, act_bits=step.act_bits)
    if name == "int4":
        try:
            from ...nn import Int4Linear  # type: ignore[attr-defined]
        except ImportError:
            Int4Linear = None
        if Int4Linear is not None:
            return Int4Linear.from_linear(
                linear, group_size=step.group_size, symmetric=step.symmetric, mode=step.mode
            )
        sim = copy.deepcopy(linear)
        with torch.no_grad():
            sim.weight.copy_(
                rtn_int4(linear.weight.detach().float(), step.group_size, step.symmetric)
            )
        return sim
    return None


def _rtn_int8(w: Tensor) -> Tensor:
    s = w.abs().amax(1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(w / s).clamp_(-127, 127) * s


def rtn_int4(w: Tensor, group_size: int, symmetric: bool) -> Tensor:
    """The int4 contract's round to nearest, dequantized (``[N, K]`` float32)."""
    n, k = w.shape
    wg = w.reshape(-1, group_size)
    s, z = int4_group_params(wg, symmetric)
    q = int4_quantize_group(wg, s, z, symmetric)
    return ((q - z[:, None]) * s[:, None]).reshape(n, k)


def _per_token_int8(x: Tensor) -> Tensor:
    s = x.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(x / s).clamp_(-127, 127) * s


def _per_tensor_int8(x: Tensor) -> Tensor:
    s = x.abs().amax() / 127
    s = s if s > 0 else torch.ones_like(s)
    return torch.round(x / s).clamp_(-127, 127) * s


def w8a8_error(x: Tensor, w: Tensor, s: Tensor, per_tensor: bool = False) -> float:
    """Relative output error of ``x W^T`` after smoothing by ``s`` and W8A8 (int8 per
    output channel; int8 activations per token or, ``per_tensor``, one scale)."""
    ref = x @ w.T
    xs, ws = x / s, w * s
    xq = _per_tensor_int8(xs) if per_tensor else _per_token_int8(xs)
    y = xq @ _rtn_int8(ws).T
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


# --- the two searches -------------------------------------------------------------------


def _normalize(s: Tensor) -> Tensor:
    s = s.clamp_min(1e-5)
    return s / (s.max() * s.min()).sqrt()


def awq_scales(
    linears: list[nn.Linear], st: InputStats, quant: Callable[[Tensor], Tensor]
) -> tuple[Tensor, float, float, float]:
    """AWQ's scale for a group: ``(s, alpha, error at s, error at s = 1)``, errors the
    relative output error ``sqrt(sum tr(dW H dW^T) / sum tr(W H W^T))`` over the group."""
    h = st.hessian().float()
    ws = [m.weight.detach().float() for m in linears]
    den = sum(float(((w @ h) * w).sum()) for w in ws) or 1.0
    mean = st.abs_mean().float()
    best = (torch.ones_like(mean), 0.0, math.inf)
    first = math.nan
    for a in AWQ_GRID:
        s = _normalize(mean.pow(a)) if a else torch.ones_like(mean)
        num = 0.0
        for w in ws:
            dw = quant(w * s) / s - w
            num += float(((dw @ h) * dw).sum())
        err = math.sqrt(max(num, 0.0) / den)
        if a == 0:
            first = err
        if err < best[2]:
            best = (s, a, err)
    return best[0], best[1], best[2], first


def smoothquant_scales(
    linears: list[nn.Linear], st: InputStats, alpha: float | None
) -> tuple[Tensor, float]:
    """SmoothQuant's ``s`` for a group and the alpha used (searched when None)."""
    xmax = st.abs_max.float().clamp_min(1e-5)
    wmax = torch.stack([m.weight.detach().float().abs().amax(0) for m in linears]).amax(0)
    wmax = wmax.clamp_min(1e-5)

    def make(a: float) -> Tensor:
        return (xmax.pow(a) / wmax.pow(1 - a)).clamp_min(1e-5)

    if alpha is not None:
        return make(alpha), alpha
    x = st.sample.float()
    w = torch.cat([m.weight.detach().float() for m in linears])
    best = (torch.ones_like(xmax), 0.0, w8a8_error(x, w, torch.ones_like(xmax)))
    for a in SQ_GRID:
        s = make(a)
        err = w8a8_error(x, w, s)
        if err < best[2]:
            best = (s, a, err)
    return best[0], best[1]


def run_scaling(ctx: Context, step: Any, kind: str) -> None:
    """The ``awq`` / ``smoothquant`` steps (``kind``): collect statistics, search, fold."""
    from . import batches_for

    batches = batches_for(ctx, step)
    quant = None
    if kind == "awq":
        nxt = next((s for s in ctx.remaining if rtn_quantizer(s) is not None), None)
        if nxt is None:
            raise ValueError(
                f"recipe step {str(step)!r} searches its scales for the weight quantization "
                "that follows it: put an int4 or int8 step after it (e.g. 'awq+int4')"
            )
        quant = rtn_quantizer(nxt)
    targets = ctx.targets((nn.Linear,), step.unfit)
    groups = _groups(ctx, targets)
    want = ("hessian", "absmean") if kind == "awq" else ("absmax", "sample")
    reps = {str(i): g.linears[0][1] for i, g in enumerate(groups)}
    stats = collect(
        ctx.model,
        batches,
        reps,
        want,
        ctx.show_progress,
        f"{kind}: calibration",
        sample_rows=SAMPLE_ROWS,
    )
    if ctx.remaining:
        # Before any scale moves: a fold changes the Linear in front of another.
        for fqn, m in targets:
            base = rtn_module(ctx.remaining[0], m)
            if base is not None:
                ctx.baselines.setdefault(fqn, base)
    for i, g in ctx.progress(list(enumerate(groups)), kind):
        st = stats[str(i)]
        if not st.rows:
            for fqn, _ in g.linears:
                ctx.skip(fqn, "the calibration batches never reach it")
            continue
        linears = [m for _, m in g.linears]
        if kind == "awq":
            s = awq_scales(linears, st, quant)[0]
        else:
            s = smoothquant_scales(linears, st, step.alpha)[0]
        apply_scales(ctx, g, s)
