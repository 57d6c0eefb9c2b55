"""The version a build gets and the one pk.__version__ reports (issue 24, points 1 and 10)."""

from __future__ import annotations

import importlib.util
import json
import stat
import sys
from pathlib import Path

import pytest

import pykernels as pk

info_mod = sys.modules["pykernels.info"]  # the module: pk.info is the function

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py as a module: its setup() call runs only as __main__ (as setuptools runs it)."""
    pytest.importorskip("setuptools")
    for var in ("PYKERNELS_CUDA", "PYKERNELS_NO_NATIVE", "CUDACXX"):
        monkeypatch.delenv(var, raising=False)
    spec = importlib.util.spec_from_file_location("pykernels_setup_py", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fake_nvcc(tmp_path, monkeypatch):
    """An nvcc that reports CUDA 13.0, so the rule is checked without a toolkit."""
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CUDACXX", str(nvcc))
    return nvcc


def test_an_auto_build_that_finds_nvcc_keeps_the_plain_version(setup_py, fake_nvcc):
    assert setup_py._nvcc() == str(fake_nvcc)
    assert setup_py._cuda_tag() is None
    assert setup_py._version_config() == {}


def test_a_cuda_build_asked_for_is_tagged_with_its_toolkit(setup_py, fake_nvcc, monkeypatch):
    monkeypatch.setenv("PYKERNELS_CUDA", "1")
    assert setup_py._cuda_tag() == "cu130"
    scm = setup_py._version_config()["use_scm_version"]
    scm_mod = pytest.importorskip("setuptools_scm")
    from setuptools_scm.version import meta

    config = scm_mod.Configuration()
    on_tag = meta("0.2.0", config=config)
    after = meta("0.2.0", distance=3, node="gabc1234", config=config)
    assert scm["local_scheme"](on_tag) == "+cu130"
    assert scm["local_scheme"](after) == "+cu130.gabc1234"
    monkeypatch.setenv("PYKERNELS_NO_NATIVE", "1")
    assert setup_py._cuda_tag() is None  # nothing native, so no CUDA module either


def test_cuda_asked_for_without_nvcc_is_an_error(setup_py, monkeypatch, tmp_path):
    monkeypatch.setenv("PYKERNELS_CUDA", "1")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(setup_py.Path, "is_file", lambda self: False)
    with pytest.raises(RuntimeError, match="no nvcc"):
        setup_py._cuda_tag()


def test_the_version_is_this_copys_own():
    here = Path(info_mod.__file__).resolve().parent
    built = here / "_version.py"
    if built.is_file():
        ns: dict = {}
        exec(built.read_text(), ns)
        assert pk.__version__ == ns["version"]
    else:
        assert pk.__version__ == (
            info_mod._native_version(here) or info_mod._installed_version() or "0+unknown"
        )
    assert pk.info()["version"] == pk.__version__


class _Dist:
    version = "9.9.9"
    files = ()

    def __init__(self, url: str) -> None:
        self.url = url

    def read_text(self, name: str) -> str:
        assert name == "direct_url.json"
        return json.dumps({"dir_info": {"editable": True}, "url": self.url})


def test_an_editable_install_of_another_checkout_does_not_lend_its_version(monkeypatch):
    here = Path(info_mod.__file__).resolve().parent
    monkeypatch.setattr(info_mod.metadata, "distribution", lambda name: _Dist("file:///elsewhere"))
    assert info_mod._installed_version() is None
    mine = _Dist(here.parent.as_uri())
    monkeypatch.setattr(info_mod.metadata, "distribution", lambda name: mine)
    assert info_mod._installed_version() == "9.9.9"


def test_info_names_the_build_and_the_cpu():
    d = pk.info()
    assert d["cpu"] and isinstance(d["cpu"], str)
    if d["native_cuda"]:
        # a CUDA module is named with its status, never as if this were a CUDA build
        assert "not verified" in d["build"] and "opt-in" in d["build"]
        import torch

        if torch.version.cuda is None:
            assert "CPU-only" in d["build"]
    else:
        assert "CUDA" not in d["build"]
