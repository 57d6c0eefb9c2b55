"""Files pykernels writes follow the umask, as any program's do (issue 24, point 9)."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest
import torch

import pykernels as pk
from pykernels import _files

pytest.importorskip("safetensors")


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002], ids=oct)
def test_umask_is_read_without_changing_it(mask):
    with umask(mask):
        assert _files.umask() == mask
        assert _files.umask() == mask


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o027], ids=oct)
def test_pk_save_files_get_the_mode_open_gives(tmp_path, mask):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    small, _ = pk.compress(model, "int8", torch.randn(2, 8), progress=False)
    with umask(mask):
        plain = tmp_path / "plain.txt"
        plain.write_text("made by open()")
        file = tmp_path / "m.safetensors"
        pk.save(small, file)
    assert mode(file) == mode(plain) == 0o666 & ~mask
    # and the file still loads
    again = pk.load(file, torch.nn.Sequential(torch.nn.Linear(8, 8)))
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
