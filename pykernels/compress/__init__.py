"""Whole-model compression: ``pk.compress(model, recipe, example_inputs)``, the
measured :class:`CompressionReport`, and ``pk.save`` / ``pk.load`` (one
``.safetensors`` file with a manifest).

This package is itself callable: ``pk.compress(...)`` is
:func:`pykernels.compress.api.compress`, and ``pykernels.compress.<module>``
still imports its parts. Recipe steps live in
:mod:`pykernels.compress.recipes` (``pk.recipes``); new steps register with
:func:`register_step`, new module kinds (for save/load) with
:func:`register_kind`.
"""

import inspect as _inspect
import sys as _sys
import types as _types

from . import recipes
from .api import compress
from .io import load, read_manifest, save
from .kinds import ModuleKind, count_params, register_kind
from .recipes import Step, register_step
from .report import CompressionReport, LayerRow


class _CallableModule(_types.ModuleType):
    """Lets ``pk.compress`` be both the function and this package (DESIGN's layout)."""

    def __call__(self, *args, **kwargs):
        return compress(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
__signature__ = _inspect.signature(compress)
__wrapped__ = compress

__all__ = [
    "CompressionReport",
    "LayerRow",
    "ModuleKind",
    "Step",
    "compress",
    "count_params",
    "load",
    "read_manifest",
    "recipes",
    "register_kind",
    "register_step",
    "save",
]
