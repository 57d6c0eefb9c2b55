"""Whole-model compression: ``pk.compress(model, recipe, example_inputs)``, the
measured :class:`CompressionReport`, and ``pk.save`` / ``pk.load`` (one
``.safetensors`` file with a manifest).

``pk.compress`` is the function :func:`pykernels.compress.api.compress`:
``pykernels/__init__.py`` binds it over this package's name, so
``import pykernels.compress`` also gives the function, while ``from
pykernels.compress import ...`` (and ``pykernels.compress.<module>`` in
that form) imports from this package. The function carries this package's
public names as attributes (``pk.compress.read_manifest``,
``pk.compress.register_step``). Recipe steps live in
:mod:`pykernels.compress.recipes` (``pk.recipes``); new steps register with
:func:`register_step`, new module kinds (for save/load) with
:func:`register_kind`. Which modules a step replaces is decided in one
place, :mod:`pykernels.compress.walk`.
"""

from . import recipes
from .api import compress
from .auto import AutoReport, Budget
from .calibrate import steps as _calibrate_steps  # noqa: F401 - registers awq, smoothquant
from .io import load, read_manifest, save
from .kinds import ModuleKind, count_params, register_kind
from .recipes import Step, register_step
from .report import CompressionReport, LayerRow

__all__ = [
    "AutoReport",
    "Budget",
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

# `pk.compress.<name>` used to reach this package through the callable-module
# trick; the function now carries the same objects.
for _name in __all__:
    if _name != "compress":
        setattr(compress, _name, globals()[_name])
del _name
