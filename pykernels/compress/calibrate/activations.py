"""Per-Linear input statistics over calibration batches, gathered by forward hooks.

Nothing keeps the activations themselves: each batch's inputs are folded into
running sums (``X^T X`` for GPTQ's Hessian, the mean and max of ``|x|`` per
input channel for AWQ and SmoothQuant) and dropped, so memory is
``K x K`` per layer whatever the number of batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..context import call_model, progress

STATS = ("hessian", "absmean", "absmax", "sample")


class _Stop(Exception):
    """Ends a calibration forward early (``collect(stop_before=...)``)."""


@dataclass
class InputStats:
    """What one Linear saw on its input, over every calibration row (a row is one
    token: all leading dimensions flattened).

    ``xtx``: float64 ``[K, K]`` sum of ``x^T x`` (None unless asked for);
    ``abs_sum`` / ``abs_max``: float64 ``[K]`` sum and max of ``|x|`` per input
    channel; ``sample``: float32 rows drawn evenly from each batch (at most
    ``sample_per_batch`` of each), for searches that need the activations
    themselves; ``rows``: how many rows were summed.
    """

    in_features: int
    rows: int = 0
    xtx: Tensor | None = None
    abs_sum: Tensor | None = None
    abs_max: Tensor | None = None
    sample: Tensor | None = None
    wanted: tuple[str, ...] = field(default=STATS)
    sample_per_batch: int = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features)
        if not x.shape[0]:
            return
        # Finiteness is read off the per-channel sums below (a NaN or inf input makes
        # its channel's sum of squares or of |x| non-finite): no pass over x for it.
        sums = []
        if "hessian" in self.wanted:
            # One float32 product per batch (fast), summed in float64 so that many
            # batches lose nothing to rounding.
            xf = x.float()
            part = (xf.T @ xf).double()
            sums.append(part.diagonal())
        a = x.abs().double() if ("absmean" in self.wanted or "absmax" in self.wanted) else None
        if a is not None:
            col = a.sum(0)
            sums.append(col)
        if "sample" in self.wanted and self.sample_per_batch:
            step = max(1, x.shape[0] // self.sample_per_batch)
            part_s = x[::step][: self.sample_per_batch].float().clone()
            sums.append(part_s.sum(0))
        if not all(bool(torch.isfinite(t).all()) for t in sums):
            raise ValueError(
                "calibration: an input to a Linear holds NaN or inf; the calibration batches "
                "must be inputs the model computes finite values on"
            )
        self.rows += x.shape[0]
        if "hessian" in self.wanted:
            self.xtx = part if self.xtx is None else self.xtx.add_(part)
        if "absmean" in self.wanted:
            self.abs_sum = col if self.abs_sum is None else self.abs_sum.add_(col)
        if "absmax" in self.wanted:
            m = a.amax(0)
            self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        if "sample" in self.wanted and self.sample_per_batch:
            self.sample = part_s if self.sample is None else torch.cat([self.sample, part_s])

    def hessian(self) -> Tensor:
        """GPTQ's ``H = 2 X^T X / rows`` (float64 ``[K, K]``)."""
        if self.xtx is None or not self.rows:
            raise ValueError("calibration: this layer received no calibration rows")
        return self.xtx * (2.0 / self.rows)

    def abs_mean(self) -> Tensor:
        if self.abs_sum is None or not self.rows:
            raise ValueError("calibration: this layer received no calibration rows")
        return self.abs_sum / self.rows


def check_calibration(calibration: Any, fn: str = "compress") -> list[Any] | None:
    """``calibration`` as a list of batches (None stays None), each a tensor, a tuple
    of positional inputs or a dict of keyword inputs, as ``example_inputs`` is.

    A single tensor or dict is one batch; a list, tuple or any other iterable
    (a DataLoader, a generator) is a sequence of batches, read once here."""
    if calibration is None:
        return None
    if isinstance(calibration, (Tensor, Mapping)):
        batches = [calibration]
    elif isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError(
            f"{fn}: calibration must be an iterable of batches (each a tensor, a tuple of "
            f"positional inputs or a dict of keyword inputs), got {type(calibration).__name__}"
        )
    else:
        batches = list(calibration)
    if not batches:
        raise ValueError(f"{fn}: calibration holds no batches")
    for i, b in enumerate(batches):
        if isinstance(b, Tensor):
            ok = True
        elif isinstance(b, Mapping):
            ok = all(isinstance(k, str) for k in b)
        else:
            ok = isinstance(b, (tuple, list))
        if not ok:
            raise TypeError(
                f"{fn}: calibration batch {i} must be a tensor, a tuple of positional inputs or "
                f"a dict with str keys (a Hugging Face batch), got {type(b).__name__}"
            )
    return batches


def collect(
    model: nn.Module,
    batches: list[Any],
    layers: Mapping[str, nn.Module],
    stats: Iterable[str] = STATS,
    show_progress: bool = False,
    desc: str = "calibrating",
    sample_rows: int = 2048,
    stop_before: nn.Module | None = None,
) -> dict[str, InputStats]:
    """Runs ``model`` on every batch with hooks on ``layers`` (fqn -> module with an
    ``in_features``) and returns each one's :class:`InputStats` (``stats``: which of
    ``"hessian"``, ``"absmean"``, ``"absmax"``, ``"sample"``; about ``sample_rows``
    rows in all are sampled over the batches).

    ``stop_before``: a module whose call ends each batch's forward there (the
    statistics wanted come before it in the model: sequential GPTQ saves the rest
    of the forward). A layer the batches never reach comes back with ``rows == 0``.
    A batch the model cannot run on raises ValueError naming it."""
    wanted = tuple(stats)
    bad = [s for s in wanted if s not in STATS]
    if bad:
        raise ValueError(f"collect: unknown statistics {bad}; choose from {STATS}")
    per = max(1, sample_rows // max(1, len(batches)))
    out = {
        fqn: InputStats(int(m.in_features), wanted=wanted, sample_per_batch=per)
        for fqn, m in layers.items()
    }
    hooks = []
    for fqn, m in layers.items():

        def hook(mod, args, st=out[fqn]):
            if args and isinstance(args[0], Tensor) and args[0].is_floating_point():
                st.add(args[0])

        hooks.append(m.register_forward_pre_hook(hook))
    if stop_before is not None:

        def stop(mod, args):
            raise _Stop

        # Registered after the statistics hooks: a module both observed and the stop
        # point still records its input.
        hooks.append(stop_before.register_forward_pre_hook(stop))
    try:
        with torch.no_grad():
            for i, b in enumerate(progress(batches, desc, show_progress)):
                try:
                    call_model(model, b)
                except _Stop:
                    pass
                except Exception as e:
                    if str(e).startswith("calibration:"):
                        raise
                    raise ValueError(
                        f"calibration: the model does not run on calibration batch {i}: "
                        f"{type(e).__name__}: {e}"
                    ) from e
    finally:
        for h in hooks:
            h.remove()
    return out
