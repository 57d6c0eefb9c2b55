"""The old import path of :mod:`pykernels.train.schedules`: the same module object, so an
import, an attribute or a monkeypatch through either name is one and the same."""

import sys

from .train import schedules as _schedules

sys.modules[__name__] = _schedules
