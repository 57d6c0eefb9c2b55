"""Quantization-aware training: train through int8 rounding, then run int8.

``prepare(model)`` swaps each ``nn.Linear`` for a :class:`pykernels.nn.QATLinear`
(weights fake-quantized per output channel, activations per token, with the
scales and rounding :class:`pykernels.nn.Int8Linear` uses; straight-through
gradients); train as usual; ``convert(model)`` turns each QATLinear into the
Int8Linear that computes what was trained::

    model = pk.qat.prepare(model)
    ...  # fine-tune a few epochs
    model = pk.qat.convert(model)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..compress.api import apply_steps
from ..compress.context import Context
from ..compress.recipes import Step, register_step, weight_unfit
from ..nn.int8 import MODES
from ..nn.qat import QATLinear

__all__ = ["QAT", "QATLinear", "convert", "prepare"]

FilterFn = Callable[[nn.Module, str], bool]


@register_step
@dataclass
class QAT(Step):
    """Linear layers -> :class:`QATLinear`, ready for quantization-aware fine-tuning
    (``"prune:0.3+qat"``); :func:`convert` afterwards gives the int8 model."""

    mode: str = "dynamic"
    name: ClassVar[str] = "qat"
    positional: ClassVar[tuple[str, ...]] = ("mode",)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    def apply(self, ctx: Context) -> None:
        for fqn, m in ctx.progress(ctx.targets((nn.Linear,), self.unfit), "qat"):
            ctx.replace(fqn, QATLinear.from_linear(m, mode=self.mode))

    def unfit(self, module: nn.Module) -> str | None:
        # QATLinear shares the Linear's own parameters: only a plain one has
        # exactly the parameters and forward it assumes.
        if type(module) is not nn.Linear:
            return f"{type(module).__name__} is not a plain nn.Linear"
        # Training goes on after prepare: NaN and inf weights are the caller's to fix.
        return weight_unfit(module, finite=False)


@dataclass
class _ToInt8(Step):
    """What :func:`convert` runs: each QATLinear -> its Int8Linear. Not a recipe step
    (a recipe never holds a trained QAT model), so not registered."""

    name: ClassVar[str] = "qat-convert"

    def apply(self, ctx: Context) -> None:
        for fqn, m in ctx.targets((QATLinear,)):
            ctx.replace(fqn, m.to_int8())


def prepare(
    model: nn.Module,
    filter_fn: FilterFn | None = None,
    *,
    mode: str = "dynamic",
    inplace: bool = False,
) -> nn.Module:
    """Swaps ``nn.Linear`` layers for :class:`QATLinear` (sharing their parameters).

    ``filter_fn(module, fqn)`` picks the layers (``fqn``: dotted name,
    ``""`` for the model itself); without it every plain ``nn.Linear`` is
    prepared. It is asked about every module that holds parameters of its
    own: accepting one that is not an ``nn.Linear`` (a convolution, an
    embedding, a Linear subclass such as attention's ``out_proj``, an
    already compressed layer) raises TypeError, since there is no int8 layer
    for it to become. ``mode``: ``"dynamic"`` (W8A8, activations per token)
    or ``"weight_only"`` (W8A16). The layers are chosen and swapped by the
    ``"qat"`` recipe step, as :func:`pykernels.compress` does (torch's fused
    transformer path, which would skip the fake quantization, is turned off
    where it would read a QATLinear). The model is deep-copied first unless
    ``inplace=True``. Returns the prepared model (a QATLinear when ``model``
    is itself a Linear). Build the optimizer after preparing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare: model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("prepare: filter_fn must be callable or None")
    if mode not in MODES:
        raise ValueError(f"prepare: mode must be one of {MODES}, got {mode!r}")

    def accept(m: nn.Module, fqn: str) -> bool:
        if isinstance(m, QATLinear):
            return False
        if filter_fn is None:
            return type(m) is nn.Linear
        if next(m.parameters(recurse=False), None) is None and type(m) is not nn.Linear:
            return False  # containers: their layers are asked one by one
        if not filter_fn(m, fqn):
            return False
        if type(m) is not nn.Linear:
            raise TypeError(
                f"prepare: QAT supports nn.Linear layers only; filter_fn accepted "
                f"{fqn or 'the model'} ({type(m).__name__})"
            )
        return True

    if (
        type(model) is not nn.Linear
        and filter_fn is None
        and not any(type(m) is nn.Linear for m in model.modules())
    ):
        raise TypeError(
            f"prepare: {type(model).__name__} holds no nn.Linear: "
            "QAT supports nn.Linear layers only"
        )
    if not inplace:
        model = copy.deepcopy(model)
    if filter_fn is not None:
        # The walk asks only about Linears; a filter that takes a convolution or
        # a compressed layer is a mistake to report, not a layer to skip.
        for fqn, m in model.named_modules():
            if not isinstance(m, nn.Linear):
                accept(m, fqn)
    return apply_steps(model, [QAT(mode)], accept, inplace=True)


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Turns every :class:`QATLinear` into the :class:`pykernels.nn.Int8Linear` it was
    trained to become (same mode). Its output equals the QAT model's
    fake-quantized forward up to float rounding of each sum. Deep-copies first
    unless ``inplace=True``; raises ValueError when the model holds no QATLinear.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, QATLinear) for m in model.modules()):
        raise ValueError("convert: model holds no QATLinear (call pykernels.qat.prepare first)")
    return apply_steps(model, [_ToInt8()], inplace=inplace)
