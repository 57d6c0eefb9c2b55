"""Corrupted structures and state dicts: every backend refuses each the same way.

A sparse weight's row pointers and column indices, and a packed int8 weight,
are read by kernels that trust them. Each corruption here must be refused
with the same exception type and a message naming the same part on native,
torch, numba and reference, before a kernel reads anything (and a corrupted
SparseLinear state dict at load time, not at the first forward).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import CPU_BACKENDS, _available
from torch import nn

import pykernels as pk
from pykernels.ops import sparse as sp

BACKENDS = [b for b in CPU_BACKENDS if _available(b)]


def each_backend(monkeypatch, fn):
    """(type name, message) of what fn() raises on each backend (None if it returns)."""
    out = {}
    for b in BACKENDS:
        monkeypatch.setenv("PYKERNELS_BACKEND", b)
        try:
            fn()
            out[b] = None
        except Exception as e:  # noqa: BLE001 - the type is what is compared
            out[b] = (type(e).__name__, str(e))
    monkeypatch.delenv("PYKERNELS_BACKEND")
    return out


def fresh_sparse(gen, n=45, k=130, block=1, density=0.3):
    w = torch.randn(n, k, generator=gen)
    if block == 1:
        w[torch.rand(n, k, generator=gen) >= density] = 0
    else:
        keep = torch.rand(-(-n // 4), -(-k // 4), generator=gen) < density
        keep[0, 0] = keep[-1, -1] = True
        w = w * sp.expand_block_mask(keep, n, k)
    return sp.to_sparse(w, block)


def _set(t, i, v, dtype=None):
    t = t.clone() if dtype is None else t.to(dtype)
    t[i] = v
    return t


# (name, corruption of a CSR SparseWeight, exception, the part the message names)
CSR_CORRUPTIONS = [
    (
        "row_ptr past the end",
        lambda sw: sw._replace(row_ptr=_set(sw.row_ptr, 10, 10**7)),
        ValueError,
        "row_ptr",
    ),
    (
        "row_ptr last past nnz",
        lambda sw: sw._replace(row_ptr=_set(sw.row_ptr, -1, 10**6)),
        ValueError,
        "row_ptr",
    ),
    (
        "row_ptr not from 0",
        lambda sw: sw._replace(row_ptr=_set(sw.row_ptr, 0, 1)),
        ValueError,
        "row_ptr",
    ),
    (
        "row_ptr decreasing",
        lambda sw: sw._replace(row_ptr=_set(sw.row_ptr, 5, 0)),
        ValueError,
        "row_ptr",
    ),
    (
        "negative row_ptr",
        lambda sw: sw._replace(row_ptr=_set(sw.row_ptr, 3, -5)),
        ValueError,
        "row_ptr",
    ),
    (
        "int32 column 50,000,000",
        lambda sw: sw._replace(col=_set(sw.col, 3, 50_000_000, torch.int32)),
        ValueError,
        "col",
    ),
    (
        "negative int32 column",
        lambda sw: sw._replace(col=_set(sw.col, 3, -1, torch.int32)),
        ValueError,
        "col",
    ),
    ("int16 column past K", lambda sw: sw._replace(col=_set(sw.col, 0, 130)), ValueError, "col"),
    (
        "int16 column read unsigned",
        lambda sw: sw._replace(col=_set(sw.col, 0, -1)),
        ValueError,
        "col",
    ),
    (
        "duplicate column in a row",
        lambda sw: sw._replace(col=_set(sw.col, 1, int(sw.col[0]))),
        ValueError,
        "col",
    ),
    (
        "unsorted row",
        lambda sw: sw._replace(col=torch.cat([sw.col[1:2], sw.col[:1], sw.col[2:]])),
        ValueError,
        "col",
    ),
    ("row_ptr too short", lambda sw: sw._replace(row_ptr=sw.row_ptr[:-1]), ValueError, "row_ptr"),
    ("row_ptr int32", lambda sw: sw._replace(row_ptr=sw.row_ptr.int()), TypeError, "row_ptr"),
    ("col int64", lambda sw: sw._replace(col=sw.col.long()), TypeError, "col"),
    ("col 2-D", lambda sw: sw._replace(col=sw.col[None]), ValueError, "col"),
    ("values short", lambda sw: sw._replace(values=sw.values[:-1]), ValueError, "values"),
    ("values int", lambda sw: sw._replace(values=sw.values.int()), TypeError, "values"),
    ("values a list", lambda sw: sw._replace(values=sw.values.tolist()), TypeError, "values"),
    ("n negative", lambda sw: sw._replace(n=-1), ValueError, "n"),
    ("n a float", lambda sw: sw._replace(n=45.0), TypeError, "n"),
    ("n mismatching row_ptr", lambda sw: sw._replace(n=44), ValueError, "row_ptr"),
    ("k smaller than a column", lambda sw: sw._replace(k=3), ValueError, "col"),
    ("block 2", lambda sw: sw._replace(block=2), ValueError, "block"),
    ("col on meta", lambda sw: sw._replace(col=sw.col.to("meta")), ValueError, "col"),
]


@pytest.mark.parametrize(
    "corrupt, exc, part", [c[1:] for c in CSR_CORRUPTIONS], ids=[c[0] for c in CSR_CORRUPTIONS]
)
def test_corrupted_csr_is_refused_alike_on_every_backend(corrupt, exc, part, gen, monkeypatch):
    bad = corrupt(fresh_sparse(gen))
    x = torch.randn(9, bad.k if isinstance(bad.k, int) and bad.k > 0 else 130, generator=gen)
    got = each_backend(monkeypatch, lambda: pk.ops.sparse_linear(x, bad))
    first = got[BACKENDS[0]]
    assert first is not None and first[0] == exc.__name__, got
    assert f"w_sparse.{part}" in first[1], first
    assert all(v == first for v in got.values()), got  # same type, same message
    with pytest.raises(exc, match=f"to_dense: w_sparse.{part}"):
        pk.ops.to_dense(bad)


BSR_CORRUPTIONS = [
    ("block column out of range", lambda sw: sw._replace(col=_set(sw.col, 0, 33)), "col"),
    (
        "int32 block column far out",
        lambda sw: sw._replace(col=_set(sw.col, 0, 50_000_000, torch.int32)),
        "col",
    ),
    ("row_ptr decreasing", lambda sw: sw._replace(row_ptr=_set(sw.row_ptr, 2, 0)), "row_ptr"),
    ("values flat", lambda sw: sw._replace(values=sw.values.reshape(-1)), "values"),
    (
        "row_ptr counts rows, not block rows",
        lambda sw: sw._replace(row_ptr=torch.zeros(sw.n + 1, dtype=torch.int64)),
        "row_ptr",
    ),
]


@pytest.mark.parametrize(
    "corrupt, part", [c[1:] for c in BSR_CORRUPTIONS], ids=[c[0] for c in BSR_CORRUPTIONS]
)
def test_corrupted_bsr_is_refused_alike_on_every_backend(corrupt, part, gen, monkeypatch):
    # K = 130: 33 block columns, the last one half padding. The reference used
    # to drop an out-of-range block column silently.
    bad = corrupt(fresh_sparse(gen, 45, 130, block=4))
    x = torch.randn(6, 130, generator=gen)
    got = each_backend(monkeypatch, lambda: pk.ops.sparse_linear(x, bad))
    first = got[BACKENDS[0]]
    assert first is not None and first[0] == "ValueError" and f"w_sparse.{part}" in first[1], got
    assert all(v == first for v in got.values()), got


def test_bsr_nan_in_padding_past_k_is_ignored_on_every_backend(gen, monkeypatch):
    # Entries of an edge block past K do not exist in the matrix: whatever a
    # corrupted file stores there (NaN included) must not reach the output.
    sw = fresh_sparse(gen, 8, 10, block=4, density=1.0)
    vals = sw.values.clone()
    last = sp.col_as_int64(sw.col) == 2  # block column 2 covers columns 8..11; K = 10
    vals[last, :, 2:] = float("nan")
    bad = sw._replace(values=vals)
    x = torch.randn(3, 10, generator=gen)
    ref = x.double() @ sw.to_dense().double().T
    for b in BACKENDS:
        monkeypatch.setenv("PYKERNELS_BACKEND", b)
        torch.testing.assert_close(pk.ops.sparse_linear(x, bad).double(), ref, rtol=1e-5, atol=1e-5)


def test_the_issue_snippet_is_refused_at_load_on_every_backend(monkeypatch):
    for b in BACKENDS:
        monkeypatch.setenv("PYKERNELS_BACKEND", b)
        m = pk.nn.SparseLinear.from_linear(nn.Linear(130, 45), 0.8)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        sd = m.state_dict()
        sd["row_ptr"] = sd["row_ptr"].clone()
        sd["row_ptr"][10] = 10**7
        with pytest.raises(ValueError, match=r"load_state_dict: state_dict\['row_ptr'\]"):
            m.load_state_dict(sd)
        # Refused before anything was copied: the layer still works as it was.
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
        x = torch.randn(9, 130)
        torch.testing.assert_close(m(x), x @ m.to_dense().T + m.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "key, value, exc",
    [
        ("col", lambda sd: _set(sd["col"], 0, 5000), ValueError),
        ("col", lambda sd: _set(sd["col"], 0, -7, torch.int32), ValueError),
        ("row_ptr", lambda sd: sd["row_ptr"].flip(0), ValueError),
        ("row_ptr", lambda sd: sd["row_ptr"].float(), TypeError),
        ("values", lambda sd: sd["values"][:3], ValueError),  # then col and values disagree
    ],
)
def test_corrupted_state_dict_is_refused_at_load(key, value, exc, gen):
    m = pk.nn.SparseLinear.from_linear(nn.Linear(130, 45), 0.8)
    sd = m.state_dict()
    sd[key] = value(sd)
    with pytest.raises(exc, match="SparseLinear.load_state_dict: state_dict"):
        m.load_state_dict(sd)


def test_corrupted_block_state_dict_in_a_model(gen):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    sparse = pk.sparsify(model, 0.5, pattern="block")
    sd = sparse.state_dict()
    sd["2.col"] = _set(sd["2.col"], 0, 8)  # 32 / 4 = 8 block columns: one past
    with pytest.raises(ValueError, match=r"state_dict\['2.col'\]"):
        sparse.load_state_dict(sd)


def test_good_state_dicts_still_load_with_a_new_count(gen):
    a = pk.nn.SparseLinear.from_linear(nn.Linear(64, 16), 0.9)
    b = pk.nn.SparseLinear.from_linear(nn.Linear(64, 16), 0.5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.to_dense(), a.to_dense())


def test_writes_that_bypass_the_version_counter_meet_the_second_check(gen, monkeypatch):
    # The first check's result is kept while the tensors' version counters do
    # not move; a write through a NumPy view does not move them, and the
    # native binding and the Numba backend check the structure again.
    for b in [b for b in ("native", "numba") if b in BACKENDS]:
        monkeypatch.setenv("PYKERNELS_BACKEND", b)
        sw = fresh_sparse(gen)
        sw = sw._replace(col=sw.col.int())
        x = torch.randn(4, 130, generator=gen)
        pk.ops.sparse_linear(x, sw)  # checked and remembered
        sw.col.numpy()[2] = 50_000_000
        with pytest.raises(ValueError, match="col"):
            pk.ops.sparse_linear(x, sw)


def test_an_in_place_change_voids_the_check(gen, monkeypatch):
    monkeypatch.setenv("PYKERNELS_BACKEND", "reference")
    sw = fresh_sparse(gen)
    x = torch.randn(4, 130, generator=gen)
    pk.ops.sparse_linear(x, sw)
    sw.col[0] = 200  # bumps the version counter
    with pytest.raises(ValueError, match="w_sparse.col"):
        pk.ops.sparse_linear(x, sw)


def test_structure_check_runs_under_torch_compile(gen):
    layer = pk.nn.SparseLinear.from_linear(nn.Linear(64, 16), 0.7)
    f = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 64, generator=gen)
    torch.testing.assert_close(f(x), layer(x))
    with torch.no_grad():
        layer.col[0] = 64  # past K, after compiling
    with pytest.raises(ValueError, match="sparse_linear: w_sparse.col"):
        f(x)


# --- packed int8 weights -------------------------------------------------------


def packed(gen, n=20, k=37):
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    return w, pk.ops.pack_int8_weight(w)


PACKED_CORRUPTIONS = [
    (
        "comp off by one",
        lambda p: p._replace(comp=_set(p.comp, 0, int(p.comp[0]) + 1)),
        ValueError,
        "w_q.comp",
    ),
    (
        "padding not zero",
        lambda p: p._replace(packed=_set(p.packed, -1, 5)),
        ValueError,
        "w_q.packed",
    ),
    ("comp short", lambda p: p._replace(comp=p.comp[:-1]), ValueError, "w_q.comp"),
    ("packed 2-D", lambda p: p._replace(packed=p.packed[None]), ValueError, "w_q.packed"),
    (
        "packed uint8",
        lambda p: p._replace(packed=p.packed.view(torch.uint8)),
        TypeError,
        "w_q.packed",
    ),
    ("n a float", lambda p: p._replace(n=20.0), TypeError, "w_q.n"),
    ("k too large", lambda p: p._replace(k=1 << 20), ValueError, "w_q.k"),
]


@pytest.mark.parametrize(
    "corrupt, exc, part",
    [c[1:] for c in PACKED_CORRUPTIONS],
    ids=[c[0] for c in PACKED_CORRUPTIONS],
)
def test_corrupted_packed_weight_is_refused_alike(corrupt, exc, part, gen, monkeypatch):
    w, p = packed(gen)
    bad = corrupt(p)
    x = torch.randn(5, 37, generator=gen)
    s = torch.rand(20, generator=gen)
    got = each_backend(monkeypatch, lambda: pk.ops.int8_linear(x, bad, s))
    first = got[BACKENDS[0]]
    assert first is not None and first[0] == exc.__name__ and part in first[1], got
    assert all(v == first for v in got.values()), got
    # A good one gives every backend the same answer as the row-major weight.
    good = each_backend(monkeypatch, lambda: pk.ops.int8_linear(x, p, s))
    assert all(v is None for v in good.values()), good


@pytest.mark.skipif(os.environ.get("PYKERNELS_NO_NATIVE") == "1", reason="needs _C")
def test_packed_weight_from_pack_is_not_rechecked_but_a_copy_is(gen):
    w, p = packed(gen)
    from pykernels.ops import _checks

    assert _checks.is_checked((p.packed, p.comp), ("int8-packed", 20, 37))
    q = p._replace(packed=p.packed.clone(), comp=p.comp.clone())
    assert not _checks.is_checked((q.packed, q.comp), ("int8-packed", 20, 37))
    pk.ops.int8_linear(torch.randn(2, 37), q, torch.ones(20))
    assert _checks.is_checked((q.packed, q.comp), ("int8-packed", 20, 37))
