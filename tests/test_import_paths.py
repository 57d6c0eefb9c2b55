"""Old import paths keep working after the moves: pykernels.qat / distill / schedules
are pykernels.train.*, and pk.compress is the function while the package behind it
stays importable."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

import pykernels as pk

MOVED = ("qat", "distill", "schedules")


@pytest.mark.parametrize("name", MOVED)
def test_old_and_new_paths_are_one_module(name):
    old = importlib.import_module(f"pykernels.{name}")
    new = importlib.import_module(f"pykernels.train.{name}")
    assert old is new is getattr(pk, name) is getattr(pk.train, name)
    assert sys.modules[f"pykernels.{name}"] is sys.modules[f"pykernels.train.{name}"]


def test_names_imported_through_either_path_are_the_same_objects():
    from pykernels.distill import DistillLoss, fit
    from pykernels.qat import QATLinear, convert, prepare
    from pykernels.schedules import GradualPruning, Polynomial
    from pykernels.train import distill, qat, schedules

    assert (prepare, convert, QATLinear) == (qat.prepare, qat.convert, qat.QATLinear)
    assert QATLinear is pk.nn.QATLinear
    assert (DistillLoss, fit) == (distill.DistillLoss, distill.fit)
    assert (GradualPruning, Polynomial) == (schedules.GradualPruning, schedules.Polynomial)
    assert pk.qat.prepare is qat.prepare


def test_monkeypatching_either_name_patches_the_one_module(monkeypatch):
    import pykernels.train.qat

    sentinel = object()
    monkeypatch.setattr("pykernels.qat.prepare", sentinel)
    assert pykernels.train.qat.prepare is sentinel and pk.qat.prepare is sentinel
    monkeypatch.setattr(pykernels.train.qat, "convert", sentinel)
    assert pk.qat.convert is sentinel


def test_the_qat_step_is_registered_like_any_other():
    from pykernels.compress import recipes
    from pykernels.train.qat import QAT

    assert "qat" in recipes.step_names()
    (step,) = recipes.parse("qat:weight_only")
    assert type(step) is QAT and step.mode == "weight_only"
    assert recipes.from_specs([step.spec()])[0] == step


def test_old_paths_work_in_a_fresh_interpreter():
    code = (
        "import pykernels.qat as q, pykernels.schedules as s, pykernels.distill as d\n"
        "import pykernels.train as t\n"
        "assert q is t.qat and s is t.schedules and d is t.distill\n"
        "from pykernels.compress import recipes\n"
        "assert 'qat' in recipes.step_names()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pk_compress_is_the_function_and_the_package_still_imports():
    from pykernels.compress import CompressionReport, read_manifest, recipes, register_step
    from pykernels.compress.api import compress
    from pykernels.compress.demo import corpus  # noqa: F401

    assert pk.compress is compress and inspect.isfunction(pk.compress)
    assert "example_inputs" in inspect.signature(pk.compress).parameters
    package = sys.modules["pykernels.compress"]
    assert type(package) is type(sys)  # a plain module, callable through nothing
    # what was reached through the callable package is on the function too
    assert pk.compress.read_manifest is read_manifest
    assert pk.compress.register_step is register_step
    assert pk.compress.recipes is recipes is pk.recipes
    assert pk.compress.CompressionReport is CompressionReport is pk.CompressionReport
    import pykernels.compress

    assert pykernels.compress is compress
