"""The old import path of :mod:`pykernels.train.qat`: the same module object, so an
import, an attribute or a monkeypatch through either name is one and the same."""

import sys

from .train import qat as _qat

sys.modules[__name__] = _qat
