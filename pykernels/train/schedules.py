"""Pruning schedules: sparsity that ramps up while a model fine-tunes.

:class:`Polynomial` is Zhu & Gupta's schedule ("To prune, or not to prune",
2017), the one TF-MOT's ``PolynomialDecay`` implements: from ``initial`` at
``begin_step`` to ``final`` at ``end_step``, fast at first and slowly at the
end, where the remaining weights matter most::

    s(t) = final + (initial - final) * (1 - (t - begin_step) / (end_step - begin_step)) ** power

evaluated only every ``frequency`` steps. :class:`GradualPruning` drives
:func:`pykernels.prune`'s magnitude masks with it during training and turns
the layers into :class:`pykernels.nn.SparseLinear` at the end::

    sched = pk.schedules.Polynomial(0.0, 0.9, begin_step=0, end_step=2000, frequency=100)
    pruner = pk.schedules.GradualPruning(model, sched)
    for step, (x, y) in enumerate(loader):
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        pruner.step()        # masks the weights; new masks every `frequency` steps
    model = pruner.finish()  # nn.Linear -> SparseLinear
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..ops import sparse as sp

__all__ = ["GradualPruning", "Polynomial"]


def _as_int(v: Any) -> int | None:
    """``v`` as a Python int when it is an integer of any kind a training loop counts
    in (int, a NumPy integer, a 0-d integer tensor), else None. Bools and floats are
    no step counts."""
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
        return None
    if isinstance(v, torch.Tensor) and (v.dim() != 0 or v.is_floating_point() or v.is_complex()):
        return None
    try:
        return operator.index(v)
    except (TypeError, RuntimeError):  # RuntimeError: a meta tensor has no value
        return None


def _int(name: str, v: Any, lo: int) -> int:
    i = _as_int(v)
    if i is None or i < lo:
        raise ValueError(f"Polynomial: {name} must be an int >= {lo}, got {v!r}")
    return i


def _step(v: Any) -> int:
    i = _as_int(v)
    if i is None:
        raise TypeError(
            f"Polynomial: step must be an int (or a NumPy integer, or a 0-d integer tensor), "
            f"got {v!r}"
        )
    return i


class Polynomial:
    """Sparsity ``s(step)`` rising from ``initial`` to ``final`` (Zhu & Gupta, power 3).

    Before ``begin_step`` it is ``initial``, from ``end_step`` on ``final``;
    in between it changes only at ``begin_step + j * frequency`` (and at
    ``end_step``), the steps where :meth:`updates` is true.
    """

    def __init__(
        self,
        initial: float = 0.0,
        final: float = 0.9,
        begin_step: int = 0,
        end_step: int = 1000,
        frequency: int = 100,
        power: float = 3.0,
    ) -> None:
        for name, v in (("initial", initial), ("final", final)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"Polynomial: {name} must be a sparsity in [0, 1), got {v!r}")
        if final < initial:
            raise ValueError(f"Polynomial: final ({final}) must be >= initial ({initial})")
        self.begin_step = _int("begin_step", begin_step, 0)
        self.end_step = _int("end_step", end_step, 0)
        if self.end_step <= self.begin_step:
            raise ValueError(
                f"Polynomial: steps out of order: end_step ({end_step}) must be after "
                f"begin_step ({begin_step})"
            )
        self.frequency = _int("frequency", frequency, 1)
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not power > 0:
            raise ValueError(f"Polynomial: power must be > 0, got {power!r}")
        self.initial, self.final, self.power = float(initial), float(final), float(power)

    def updates(self, step: int) -> bool:
        """Whether the masks are recomputed at ``step``."""
        step = _step(step)
        if step < self.begin_step or step > self.end_step:
            return False
        return step == self.end_step or (step - self.begin_step) % self.frequency == 0

    def __call__(self, step: int) -> float:
        """The target sparsity at ``step`` (held between update steps)."""
        step = _step(step)
        if step < self.begin_step:
            return self.initial
        if step >= self.end_step:
            return self.final
        t = self.begin_step + (step - self.begin_step) // self.frequency * self.frequency
        frac = (t - self.begin_step) / (self.end_step - self.begin_step)
        # initial + (final - initial) * (1 - (1 - frac)^p): the same value, written so
        # that it is exactly `initial` at begin_step and never decreases.
        return self.initial + (self.final - self.initial) * (1.0 - (1.0 - frac) ** self.power)

    def __repr__(self) -> str:
        return (
            f"Polynomial(initial={self.initial}, final={self.final}, begin_step={self.begin_step}, "
            f"end_step={self.end_step}, frequency={self.frequency}, power={self.power})"
        )


class GradualPruning:
    """Magnitude masks on a model's ``nn.Linear`` weights that follow a schedule.

    ``filter_fn(module, fqn)`` picks the layers (default: every plain
    ``nn.Linear``). Call :meth:`step` after each optimizer step: it counts
    the step, recomputes each layer's mask when the schedule updates (the
    ``s(step)`` smallest-magnitude weights of each layer pruned, as
    :func:`pykernels.prune` does; ``pattern`` ``"unstructured"`` or
    ``"block"``), and zeroes the pruned weights (the optimizer may have moved
    them). :meth:`finish` swaps the layers for :class:`SparseLinear` holding
    exactly the kept weights.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: Polynomial,
        filter_fn: Callable[[nn.Module, str], bool] | None = None,
        pattern: str = "unstructured",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"GradualPruning: model must be an nn.Module, got {type(model).__name__}"
            )
        if not isinstance(schedule, Polynomial):
            raise TypeError(
                f"GradualPruning: schedule must be a Polynomial, got {type(schedule).__name__}"
            )
        if pattern not in ("unstructured", "block"):
            raise ValueError(
                f"GradualPruning: pattern must be 'unstructured' or 'block', got {pattern!r}"
            )
        self.model, self.schedule, self.pattern = model, schedule, pattern
        self.layers: dict[str, nn.Linear] = {
            fqn: m
            for fqn, m in model.named_modules()
            if type(m) is nn.Linear and (filter_fn is None or filter_fn(m, fqn))
        }
        if not self.layers:
            raise ValueError("GradualPruning: no nn.Linear layer to prune")
        self.masks: dict[str, torch.Tensor] = {}
        self.step_count = 0
        self.sparsity = 0.0
        self._update(0)

    def _update(self, step: int) -> None:
        s = self.schedule(step)
        if self.schedule.updates(step) or (step == 0 and s > 0):
            self.sparsity = s
            for fqn, m in self.layers.items():
                self.masks[fqn] = sp.prune_mask(m.weight.detach().float(), s, self.pattern)
        with torch.no_grad():
            for fqn, m in self.layers.items():
                if fqn in self.masks:
                    m.weight.mul_(self.masks[fqn].to(m.weight.dtype))

    def step(self) -> float:
        """Advances one training step; returns the sparsity now in force."""
        self.step_count += 1
        self._update(self.step_count)
        return self.sparsity

    def finish(self) -> nn.Module:
        """Applies the final masks and swaps each pruned layer for a SparseLinear
        (in place); returns the model."""
        from ..nn import SparseLinear

        final = self.schedule.final
        with torch.no_grad():
            for m in self.layers.values():
                mask = sp.prune_mask(m.weight.detach().float(), final, self.pattern)
                m.weight.mul_(mask.to(m.weight.dtype))
        for fqn, m in self.layers.items():
            new = SparseLinear.from_linear(m, sparsity=None, pattern=self.pattern)
            if fqn == "":
                return new
            parent_name, _, name = fqn.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, name, new)
        return self.model

    def __repr__(self) -> str:
        return (
            f"GradualPruning({len(self.layers)} layers, step={self.step_count}, "
            f"sparsity={self.sparsity:.3f}, pattern={self.pattern}, {self.schedule!r})"
        )
