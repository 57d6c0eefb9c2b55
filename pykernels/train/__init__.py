"""Compression that trains: quantization-aware training (:mod:`.qat`: ``prepare`` /
``convert`` and the ``"qat"`` recipe step), distillation (:mod:`.distill`) and
gradual pruning schedules (:mod:`.schedules`).

``pykernels.qat``, ``pykernels.distill`` and ``pykernels.schedules`` name the
same module objects.
"""

from . import distill, qat, schedules

__all__ = ["distill", "qat", "schedules"]
