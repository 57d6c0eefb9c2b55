"""The ``awq`` and ``smoothquant`` recipe steps (registered on import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..context import Context
from ..recipes import Step, register_step, weight_unfit


@register_step
@dataclass
class AWQ(Step):
    """Activation-aware per-input-channel scales for the weight quantization after it
    (``"awq+int4"``, ``"awq+int8"``): ``s = mean|x|^alpha`` with ``alpha`` searched
    over 0, 0.1, ..., 1 for the least output error of each layer (group of layers
    sharing an input) after that step's round to nearest, on the ``calibration=``
    batches; ``1 / s`` folded into the op in front where one can take it, else kept
    as an explicit input scale (:class:`pykernels.compress.calibrate.scaling.InputScaled`).
    The float model computes what it did. See :mod:`pykernels.compress.calibrate.scaling`."""

    name: ClassVar[str] = "awq"

    def apply(self, ctx: Context) -> None:
        from .scaling import run_scaling

        run_scaling(ctx, self, "awq")

    def unfit(self, module: nn.Module) -> str | None:
        return weight_unfit(module)


@register_step
@dataclass
class SmoothQuant(Step):
    """SmoothQuant's migration of activation outliers into the weights, for W8A8
    (``"smoothquant+int8"``): ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` per input
    channel, ``alpha`` given (``"smoothquant:0.5"``) or searched over 0.1, 0.2, ..., 0.9 for
    the least W8A8 output error on a sample of the ``calibration=`` rows; folded like
    :class:`AWQ`'s scales. The float model computes what it did."""

    alpha: float | None = None
    name: ClassVar[str] = "smoothquant"
    positional: ClassVar[tuple[str, ...]] = ("alpha",)

    def __post_init__(self) -> None:
        a = self.alpha
        if a is not None and (
            isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1
        ):
            raise ValueError(f"alpha must be a number in [0, 1] or None (searched), got {a!r}")
        if a is not None:
            self.alpha = float(a)

    def apply(self, ctx: Context) -> None:
        from .scaling import run_scaling

        run_scaling(ctx, self, "smoothquant")

    def unfit(self, module: nn.Module) -> str | None:
        return weight_unfit(module)
