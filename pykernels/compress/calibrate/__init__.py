"""Calibrated compression: steps that read activations of ``calibration=`` batches.

- :mod:`.activations`: hooks that sum each Linear's input statistics
  (``X^T X``, mean and max ``|x|`` per channel) over the batches;
- :mod:`.gptq`: GPTQ over a per-column grid (int8 per channel, k-means
  codebooks, int4 groups), used by the ``:gptq`` option of the ``int8``,
  ``cluster`` and ``int4`` recipe steps;
- :mod:`.scaling`: AWQ and SmoothQuant, per-input-channel scales folded into
  the preceding LayerNorm or Linear where one exists (the ``awq`` and
  ``smoothquant`` recipe steps).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..context import Context, call_model
from .activations import InputStats, check_calibration, collect
from .gptq import ClusterGrid, GPTQResult, Grid, Int4Grid, Int8Grid, gptq

# Hessians gathered in one pass over the batches, at most this many bytes of them
# at a time (a model with more runs the batches once per chunk of its Linears).
HESSIAN_BYTES = 1 << 30


def batches_for(ctx: Context, step: Any) -> list[Any]:
    """The calibration batches, or a ValueError naming the step that needs them."""
    batches = getattr(ctx, "calibration", None)
    if not batches:
        raise ValueError(
            f"recipe step {str(step)!r} needs calibration data: call "
            "pk.compress(model, recipe, example_inputs, calibration=batches) with batches "
            "of inputs like example_inputs (e.g. a list of tokenized batches)"
        )
    return batches


def gptq_options(step: Any) -> None:
    """Checks a step's ``gptq`` / ``act_order`` / ``damp`` fields (ValueError)."""
    if not isinstance(step.gptq, bool):
        raise ValueError(f"gptq must be a bool, got {step.gptq!r}")
    if not isinstance(step.act_order, bool):
        raise ValueError(f"act_order must be a bool, got {step.act_order!r}")
    d = step.damp
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d < 1:
        raise ValueError(f"damp must be a number in (0, 1), got {d!r}")
    if (step.act_order or d != 0.01) and not step.gptq:
        raise ValueError("act_order and damp are GPTQ options: add gptq (e.g. 'int8:gptq')")


def gptq_args(args: list[str]) -> list[str]:
    """A recipe's bare ``gptq`` / ``act_order`` words as ``key=True``, wherever they stand."""
    return [f"{a}=True" if a in ("gptq", "act_order") else a for a in args]


def hessians(ctx: Context, step: Any, layers: list[nn.Linear], desc: str) -> dict[int, InputStats]:
    """Each Linear's input statistics (``X^T X``) over the calibration batches, keyed by
    ``id(linear)``; Linears chunked so their Hessians stay under ``HESSIAN_BYTES``."""
    batches = batches_for(ctx, step)
    out: dict[int, InputStats] = {}
    unique = list({id(m): m for m in layers}.values())
    chunk: list[nn.Linear] = []
    size = 0
    chunks = []
    for m in unique:
        b = 8 * m.in_features**2
        if chunk and size + b > HESSIAN_BYTES:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(m)
        size += b
    if chunk:
        chunks.append(chunk)
    for i, ch in enumerate(chunks):
        label = desc if len(chunks) == 1 else f"{desc} ({i + 1}/{len(chunks)})"
        got = collect(
            ctx.model,
            batches,
            {str(id(m)): m for m in ch},
            ("hessian",),
            ctx.show_progress,
            label,
        )
        out.update({int(k): v for k, v in got.items()})
    return out


def call_groups(
    model: nn.Module, batch: Any, layers: list[nn.Linear]
) -> list[list[nn.Linear]] | None:
    """``layers`` in the order ``model`` calls them on ``batch``, consecutive calls on
    the same input tensor in one group (an attention's query, key and value): the
    steps of sequential GPTQ. Layers the batch does not reach come last, as one
    group. None when a layer is called more than once per forward (a shared
    module: no single point in the forward where it is done)."""
    seen: list[tuple[nn.Linear, Any]] = []
    hooks = []
    for m in layers:

        def hook(mod, args):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor):
                # the tensor itself is kept so its memory cannot be reused by a later
                # input and mistaken for it
                seen.append((mod, (x, x.data_ptr(), tuple(x.shape), x.stride())))
            else:
                seen.append((mod, None))

        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, batch)
    except Exception as e:
        raise ValueError(
            f"calibration: the model does not run on calibration batch 0: {type(e).__name__}: {e}"
        ) from e
    finally:
        for h in hooks:
            h.remove()
    if len({id(m) for m, _ in seen}) != len(seen):
        return None
    groups: list[list[nn.Linear]] = []
    prev = None
    for m, key in seen:
        same = key is not None and prev is not None and key[1:] == prev[1:]
        if same:
            groups[-1].append(m)
        else:
            groups.append([m])
        prev = key
    reached = {id(m) for m, _ in seen}
    rest = [m for m in layers if id(m) not in reached]
    if rest:
        groups.append(rest)
    return groups


def _frozen_forward(m: nn.Linear, w_hat: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    w = w_hat.detach().to(m.weight.device, m.weight.dtype)
    b = None if m.bias is None else m.bias.detach()
    return lambda x: torch.nn.functional.linear(x, w, b)


def run_gptq(
    ctx: Context,
    step: Any,
    layers: list[nn.Linear],
    make_grid: Callable[[nn.Linear], Grid],
    desc: str,
    act_order: bool | None = None,
    damp: float | None = None,
    sequential: bool | None = None,
) -> dict[int, tuple[GPTQResult, Grid]]:
    """GPTQ of each Linear onto ``make_grid(linear)``, keyed by ``id(linear)``. A Linear
    the calibration batches never reach is rounded to nearest (identity Hessian).

    ``sequential`` (default: the step's ``sequential``, else False): each Linear's
    Hessian comes from the inputs it gets once the Linears before it in the forward
    compute with their quantized weights (the GPTQ paper's sequential mode, group by
    group of Linears sharing an input, see :func:`call_groups`), so a layer makes
    up for the error of those before it; False: every Hessian from the float model,
    in one pass. A model that calls a Linear twice per forward runs one pass."""
    batches = batches_for(ctx, step)
    if act_order is None:
        act_order = step.act_order
    if damp is None:
        damp = step.damp
    if sequential is None:
        sequential = bool(getattr(step, "sequential", False))
    unique = list({id(m): m for m in layers}.values())
    groups = call_groups(ctx.model, batches[0], unique) if sequential else None
    out: dict[int, tuple[GPTQResult, Grid]] = {}

    def solve(m: nn.Linear, st: InputStats) -> GPTQResult:
        w = m.weight.detach().float()
        h = st.hessian() if st.rows else torch.eye(m.in_features, dtype=torch.float64)
        grid = make_grid(m)
        r = gptq(w, h, grid, damp=damp, act_order=act_order)
        out[id(m)] = (r, grid)
        return r

    if groups is None:
        stats = hessians(ctx, step, unique, f"{desc}: calibration")
        for m in ctx.progress(unique, desc):
            solve(m, stats[id(m)])
        return out
    try:
        for i, group in enumerate(ctx.progress(groups, desc)):
            nxt = groups[i + 1][0] if i + 1 < len(groups) else None
            got = collect(
                ctx.model,
                batches,
                {str(id(m)): m for m in group},
                ("hessian",),
                stop_before=nxt,
            )
            for m in group:
                r = solve(m, got[str(id(m))])
                # The later groups see this Linear quantized; an instance attribute
                # leaves the parameters (perhaps tied to another module) untouched.
                m.forward = _frozen_forward(m, r.w_hat)
    finally:
        for m in unique:
            m.__dict__.pop("forward", None)
    return out


def int8_gptq(ctx: Context, step: Any) -> None:
    """The ``int8:gptq`` step: per-channel scales as round-to-nearest chooses them, the
    codes by GPTQ; fused encoder blocks as the plain step fuses them, with the GPTQ codes
    of their projections. The round-to-nearest result is kept for the report."""
    from ... import ops
    from ...nn import Int8Embedding, Int8Linear
    from ...nn.encoder import _spec, fuse_encoder_block
    from .. import walk

    types: tuple[type, ...] = (nn.Linear, nn.Embedding) if step.embeddings else (nn.Linear,)
    blocks = ctx.blocks() if step.fuse and step.mode == "dynamic" else []
    found, _ = walk.targets(ctx.model, (nn.Linear,), ctx.accept)
    layers = [m for _, m in found if step.unfit(m) is None]
    specs = {}
    for fqn, layer in blocks:
        spec = _spec(layer)
        if not isinstance(spec, str):
            specs[fqn] = spec
            layers += [spec.q, spec.k, spec.v, spec.out, spec.ffn1, spec.ffn2]

    def grid(m: nn.Linear) -> Grid:
        return Int8Grid(ops.quantize_per_row(m.weight.detach().float())[1])

    res = run_gptq(ctx, step, layers, grid, "int8 gptq")

    def codes(m: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        r, g = res[id(m)]
        return r.codes.to(torch.int8), g.scale

    for fqn, layer in ctx.progress(blocks, "int8 blocks"):
        fused = fuse_encoder_block(layer, act_bits=step.act_bits)
        if isinstance(fused, str):
            continue
        rtn = copy.deepcopy(fused)
        spec = specs.get(fqn)
        parts = {
            "qkv": [spec.q, spec.k, spec.v],
            "out": [spec.out],
            "ffn1": [spec.ffn1],
            "ffn2": [spec.ffn2],
        }
        for name, srcs in parts.items():
            old = getattr(fused, name)
            if any(id(s) not in res for s in srcs):
                continue
            got = [codes(s) for s in srcs]
            new = Int8Linear.from_quantized(
                torch.cat([q for q, _ in got]),
                torch.cat([s for _, s in got]),
                old.bias,
                act_bits=old.act_bits,
                activation=None if old.activation == "none" else old.activation,
            )
            setattr(fused, name, new)
        ctx.replace(fqn, fused)
        ctx.baselines.setdefault(fqn, rtn)
    for fqn, m in ctx.progress(ctx.targets(types, step.unfit), "int8"):
        if isinstance(m, nn.Linear):
            q, s = codes(m)
            new = Int8Linear.from_quantized(q, s, m.bias, mode=step.mode, act_bits=step.act_bits)
            ctx.replace(fqn, new)
            rtn = Int8Linear.from_linear(m, mode=step.mode, act_bits=step.act_bits)
            ctx.baselines.setdefault(fqn, rtn)
        else:
            ctx.replace(fqn, Int8Embedding.from_embedding(m))


def cluster_gptq(ctx: Context, step: Any) -> None:
    """The ``cluster:N:gptq`` step: k-means codebooks as the plain step makes them, each
    weight's code chosen by GPTQ (nearest centroid of the error-compensated weight)."""
    from ... import ops
    from ...nn import ClusteredLinear

    targets = ctx.targets((nn.Linear,), step.unfit)
    rtn = {
        id(m): ClusteredLinear.from_linear(m, step.n_clusters, step.per, mode=step.mode)
        for _, m in targets
    }
    res = run_gptq(
        ctx,
        step,
        [m for _, m in targets],
        lambda m: ClusterGrid(rtn[id(m)].codebook.detach()),
        "cluster gptq",
    )
    for fqn, m in targets:
        base = rtn[id(m)]
        new = copy.deepcopy(base)
        with torch.no_grad():
            new.codes.copy_(ops.pack_cluster_codes(res[id(m)][0].codes, new.bits))
        ctx.replace(fqn, new)
        ctx.baselines.setdefault(fqn, base)


# The ``int4:g128:gptq`` step's GPTQ settings, chosen on all-MiniLM-L6-v2's held-out
# text (benchmarks/RESULTS.md, issue 21 second pass): act_order with static groups
# and each group's range clipped to the least squared rounding error gave the best
# embedding cosine. Damping 0.1 brings the worst layer down (0.86x -> 0.80x of round
# to nearest) but the cosine too; sequential Hessians gained +0.0002 of cosine for
# 25 partial calibration forwards instead of one.
INT4_GPTQ = {"act_order": True, "clip": "mse", "damp": 0.01, "sequential": False}


def int4_gptq(step: Any, ctx: Context, targets: list[tuple[str, nn.Linear]]):
    """The ``int4:g128:gptq`` quantizer (registered with the int4 step), with the
    settings of :data:`INT4_GPTQ` unless the step carries its own (``act_order``,
    ``damp``, ``clip``, ``sequential`` attributes): each group's scale and zero point
    fixed from the original weights before the permuted pass (static groups), their
    range clipped to the least squared rounding error, the codes by GPTQ. Yields
    ``(fqn, (packed, scales, zeros))`` in :mod:`pykernels.ops.int4`'s format, and
    keeps round to nearest's layer for the report."""
    from ...nn import Int4Linear

    opts = {k: getattr(step, k, v) for k, v in INT4_GPTQ.items()}
    g, sym = int(step.group_size), bool(step.symmetric)
    res = run_gptq(
        ctx,
        step,
        [m for _, m in targets],
        lambda m: Int4Grid(m.out_features, m.in_features, g, sym, opts["clip"]),
        "int4 gptq",
        act_order=bool(opts["act_order"]),
        damp=float(opts["damp"]),
        sequential=bool(opts["sequential"]),
    )
    for fqn, m in targets:
        r, grid = res[id(m)]
        q = r.codes.to(torch.uint8)
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
        ctx.baselines.setdefault(fqn, Int4Linear.from_linear(m, g, sym, step.mode))
        yield fqn, (packed, grid.scales.float(), grid.zeros.to(torch.uint8))


def _register() -> None:
    from .. import recipes

    if hasattr(recipes, "register_int4_quantizer"):  # the int4 step is there
        recipes.register_int4_quantizer("gptq", int4_gptq)


_register()

__all__ = [
    "ClusterGrid",
    "GPTQResult",
    "INT4_GPTQ",
    "Grid",
    "InputStats",
    "Int4Grid",
    "Int8Grid",
    "batches_for",
    "call_groups",
    "check_calibration",
    "collect",
    "gptq",
    "run_gptq",
]
