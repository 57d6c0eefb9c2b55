"""Old import paths, kept working after modules moved.

``pykernels._native`` is now ``pykernels.backends.native``, and so on. An old
name is not a copy: it resolves to the very module object of the new name
(submodules included), so ``monkeypatch.setattr(pykernels._native, "C",
None)`` still changes what the backends see.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

# old name -> new name; a name's submodules follow it (pykernels._numba.int8).
ALIASES = {
    "pykernels._native": "pykernels.backends.native",
    "pykernels._cffi": "pykernels.backends.cffi",
    "pykernels._numba": "pykernels.backends.numba",
    "pykernels._torch": "pykernels.backends.torch",
    "pykernels._reference": "pykernels.backends.reference",
    "pykernels.qat": "pykernels.train.qat",
    "pykernels.distill": "pykernels.train.distill",
    "pykernels.schedules": "pykernels.train.schedules",
}


def _target(fullname: str) -> str | None:
    for old, new in ALIASES.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old) :]
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        # The import system keeps an existing module's own __name__ and
        # __spec__ (it sets them only where missing), so this returns the new
        # module itself under the old name.
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed under its own name


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: ARG002
        new = _target(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Puts the alias finder first on sys.meta_path (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())


install()
