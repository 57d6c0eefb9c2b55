"""The old import path of :mod:`pykernels.train.distill`: the same module object, so an
import, an attribute or a monkeypatch through either name is one and the same."""

import sys

from .train import distill as _distill

sys.modules[__name__] = _distill
