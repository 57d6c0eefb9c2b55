"""``pk.compress(model, recipe, example_inputs)``, and the same steps without a report
for ``pk.quantize_int8`` / ``pk.sparsify`` / ``pk.factorize`` / ``pk.qat``."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from . import io, recipes
from .calibrate.activations import check_calibration
from .context import (
    Context,
    FilterFn,
    Selector,
    call_model,
    check_example_inputs,
    output_tensor,
    restore_training_flags,
    training_flags,
)
from .report import CompressionReport, measure
from .walk import guard_fused_paths


def run_steps(ctx: Context, steps: list[recipes.Step]) -> None:
    """Applies ``steps`` in order to ``ctx.model``: the one loop both entry points share."""
    for step in steps:
        ctx.step = str(step)
        step.apply(ctx)
        # A step may have swapped a Linear a fused transformer path reads.
        guard_fused_paths(ctx.model)


def apply_steps(
    model: nn.Module,
    steps: list[recipes.Step],
    filter_fn: FilterFn | None = None,
    *,
    inplace: bool = False,
) -> nn.Module:
    """``steps`` on ``model`` without example inputs, report or progress bars: what the
    model-level helpers (``pk.quantize_int8``, ``pk.sparsify``, ``pk.factorize``,
    ``pk.qat.prepare`` / ``convert``) run, so they choose layers exactly as
    :func:`compress` does. ``filter_fn``'s answer is taken for its truth value, as
    those helpers always have. Steps that need example inputs (prune) cannot run
    here. Returns the converted model (a new module when ``model`` itself was
    replaced)."""
    if not inplace:
        model = copy.deepcopy(model)
    accept = None if filter_fn is None else (lambda m, fqn: bool(filter_fn(m, fqn)))
    ctx = Context(model, None, Selector(model, accept, None), progress=False)
    run_steps(ctx, steps)
    if ctx.unfit:
        # These helpers return no report: say what the caller asked for and did not get.
        listed = "; ".join(f"{s.fqn or '(model)'}: {s.reason}" for s in ctx.unfit[:8])
        more = f" (and {len(ctx.unfit) - 8} more)" if len(ctx.unfit) > 8 else ""
        warnings.warn(
            f"pykernels: {len(ctx.unfit)} layer(s) left as they were: {listed}{more}",
            stacklevel=3,
        )
    return ctx.model


def compress(
    model: nn.Module,
    recipe: Any,
    example_inputs: Any,
    *,
    filter_fn: FilterFn | None = None,
    exclude: list[str] | None = None,
    inplace: bool = False,
    progress: bool = True,
    budget: Any = None,
    calibration: Any = None,
    holdout: Any = None,
) -> tuple[nn.Module, CompressionReport]:
    """Compresses ``model`` by ``recipe`` and measures what that cost.

    Args:
        model: any ``nn.Module``.
        recipe: steps applied in order: a list of :mod:`pykernels.recipes` steps
            (``Int8``, ``Sparse``, ``LowRank``, ``PruneStructured``), or the same
            as a string joined by ``+``: ``"prune:0.3+int8"``, ``"sparse:0.9"``,
            ``"sparse:2:4"``, ``"lowrank:0.9"``.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of
            keyword inputs (a Hugging Face batch): used for tracing, Taylor
            importance and the report.
        filter_fn: ``filter_fn(module, fqn) -> bool``, as in torchao: a step
            touches only the modules it accepts.
        exclude: fully qualified names (a name excludes the module and all under
            it) or ``"re:<regex>"`` patterns matched from the start of the name.
        inplace: compress ``model`` itself; otherwise a deep copy, and ``model``
            is never changed.
        progress: tqdm progress bars on anything that takes more than a second.
        budget: for ``recipe="auto"`` only: a :class:`pykernels.Budget` (a floor on
            output fidelity on the held-out batches, and what to minimize); the
            auto recipe picks a step per layer to meet it
            (:mod:`pykernels.compress.auto`) and returns an
            :class:`~pykernels.compress.auto.AutoReport`.
        calibration: batches of inputs (each as ``example_inputs`` is given: a
            tensor, a tuple or a dict; a list, a DataLoader or any iterable of
            them, read once; one tensor or dict is one batch) for the steps that
            read activations: ``int8:gptq``, ``int4:gptq``, ``cluster:16:gptq``,
            ``awq``, ``smoothquant`` (they refuse to run without it; see
            :mod:`pykernels.compress.calibrate`), and for ``auto``, which
            measures each layer's sensitivity on them.
        holdout: an iterable of batches shaped like ``example_inputs`` that
            ``auto`` checks the budget on (default: the second half of
            ``calibration``).

    Returns:
        ``(compressed_model, report)``: the model with each submodule in the
        training mode it had in ``model`` (a replaced module's in the mode of
        the one it replaced), and a :class:`CompressionReport`. ``model``
        comes back as it was, modes included.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(recipe, str) and recipe.strip().lower() == "auto":
        from .auto import compress_auto

        if budget is None:
            raise ValueError(
                'compress: recipe "auto" needs budget=pk.Budget(cosine=..., rel_error=... or '
                "metric=(fn, floor))"
            )
        if inplace:
            raise ValueError('compress: recipe "auto" does not compress in place')
        if not isinstance(progress, bool):
            raise TypeError("compress: inplace and progress must be bool")
        check_example_inputs(example_inputs)
        return compress_auto(
            model,
            example_inputs,
            budget=budget,
            calibration=calibration,
            holdout=holdout,
            filter_fn=filter_fn,
            exclude=exclude,
            progress_bars=progress,
        )
    if budget is not None or holdout is not None:
        raise ValueError('compress: budget= and holdout= are for recipe "auto"')
    steps = recipes.parse(recipe)
    check_example_inputs(example_inputs)
    batches = check_calibration(calibration)
    # Every step and the report read values: a model without any (built on the
    # meta device) is refused here rather than by whichever step meets it first.
    meta = next(
        (n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None
    )
    if meta is not None:
        raise ValueError(
            f"compress: model holds meta tensors, which have no values ({meta!r}); load its "
            "weights first (e.g. load_state_dict(..., assign=True) or to_empty + a checkpoint)"
        )
    if not isinstance(inplace, bool) or not isinstance(progress, bool):
        raise TypeError("compress: inplace and progress must be bool")
    selector = Selector(model, filter_fn, exclude)
    flags = training_flags(model)
    model.eval()
    try:
        try:
            with torch.no_grad():
                out = call_model(model, example_inputs)
        except Exception as e:
            raise ValueError(
                f"compress: the model does not run on example_inputs: {type(e).__name__}: {e}"
            ) from e
        output_tensor(out)  # the report compares it: refuse now, not after every step
        # The reference must stay uncompressed: the caller's model, or a copy of it.
        reference = copy.deepcopy(model) if inplace else model
        work = model if inplace else copy.deepcopy(model)
        ctx = Context(work, example_inputs, selector, progress)
        ctx.calibration = batches
        for i, step in enumerate(steps):
            ctx.remaining = steps[i + 1 :]
            run_steps(ctx, [step])
            ctx.model.eval()  # the next step's forwards and the report run in eval mode
        work = ctx.model
        text = "+".join(str(s) for s in steps)
        report = measure(reference, work, ctx, text)
        io.record(work, steps, reference, ctx.changes, ctx.attrs)
    finally:
        restore_training_flags(model, flags)
    restore_training_flags(work, flags)
    return work, report
