"""pykernels.nn.Int8Embedding: a row-wise symmetric int8 lookup table.

Checked against the quantization written out here (scale = max|row| / 127,
round half to even, clamp to +-127) on fresh random tables, on every CPU
backend the row quantizer has.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels.nn import Int8Embedding, Int8Linear


def table(gen, rows=300, dim=48, padding_idx=None, dtype=torch.float32):
    emb = nn.Embedding(rows, dim, padding_idx=padding_idx)
    with torch.no_grad():
        # rows of very different magnitudes: one scale per row must follow each
        emb.weight.copy_(
            torch.randn(rows, dim, generator=gen) * torch.rand(rows, 1, generator=gen) * 3
        )
        if padding_idx is not None:
            emb.weight[padding_idx] = 0
    return emb.to(dtype)


def by_hand(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale[:, None] > 0, torch.round(w / safe[:, None]).clamp(-127, 127), 0)
    return q, scale


def test_rows_are_quantized_with_their_own_scale(gen, backend):
    emb = table(gen, padding_idx=0)
    q = Int8Embedding.from_embedding(emb)
    want_q, want_scale = by_hand(emb.weight)
    assert q.weight.dtype == torch.int8 and q.weight_scale.dtype == torch.float32
    assert torch.equal(q.weight.float(), want_q)
    assert torch.allclose(q.weight_scale, want_scale, rtol=1e-6, atol=0)
    ids = torch.randint(0, 300, (5, 7), generator=gen)
    got = q(ids)
    assert got.shape == (5, 7, 48) and got.dtype == torch.float32
    assert torch.allclose(got, (want_q * want_scale[:, None])[ids], rtol=1e-6, atol=0)
    # each entry within half a step of its row's scale
    assert bool(((got - emb(ids)).abs() <= want_scale[ids][..., None] / 2 + 1e-6).all())
    assert torch.equal(q.dequantized_weight()[ids], got)


def test_padding_and_zero_rows_stay_zero(gen):
    emb = table(gen, rows=50, dim=8, padding_idx=-1)
    with torch.no_grad():
        emb.weight[3] = 0
    q = Int8Embedding.from_embedding(emb)
    assert q.padding_idx == 49 == emb.padding_idx
    assert q.weight_scale[3] == 0 and q.weight_scale[49] == 0
    assert torch.equal(q(torch.tensor([3, 49])), torch.zeros(2, 8))
    assert "padding_idx=49" in repr(q) and "int8" in repr(q)


def test_int32_ids_and_empty_lookups(gen):
    q = Int8Embedding.from_embedding(table(gen, rows=20, dim=4))
    ids = torch.randint(0, 20, (3, 2), generator=gen)
    assert torch.equal(q(ids.int()), q(ids))
    assert q(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_tables_keep_their_dtype(gen, dtype):
    emb = table(gen, rows=64, dim=16, dtype=dtype)
    q = Int8Embedding.from_embedding(emb)
    ids = torch.randint(0, 64, (9,), generator=gen)
    got = q(ids)
    assert got.dtype == dtype and q.weight_scale.dtype == torch.float32
    want_q, want_scale = by_hand(emb.weight)
    assert torch.equal(q.weight.float(), want_q)
    assert torch.equal(got, (want_q[ids] * want_scale[ids][:, None].to(dtype)).to(dtype))


def test_converting_the_layer_moves_the_output_dtype_not_the_scales(gen):
    q = Int8Embedding.from_embedding(table(gen, rows=30, dim=8))
    ids = torch.randint(0, 30, (4,), generator=gen)
    full = q(ids)
    h = copy.deepcopy(q).half()
    assert h.weight.dtype == torch.int8 and h.weight_scale.dtype == torch.float32
    assert h(ids).dtype == torch.float16
    assert torch.allclose(h(ids).float(), full, rtol=1e-3, atol=1e-3)


def test_a_quarter_of_the_bytes(gen):
    emb = table(gen, rows=1000, dim=64)
    q = Int8Embedding.from_embedding(emb)
    assert q.nbytes() == 1000 * 64 + 1000 * 4
    assert q.nbytes() < 0.27 * emb.weight.numel() * 4


def test_state_dict_round_trip_is_bit_exact(gen):
    q = Int8Embedding.from_embedding(table(gen, rows=40, dim=12, padding_idx=2))
    fresh = Int8Embedding(40, 12, padding_idx=2)
    fresh.load_state_dict(q.state_dict())
    ids = torch.randint(0, 40, (6, 3), generator=gen)
    assert torch.equal(fresh(ids), q(ids))
    assert set(q.state_dict()) == {"weight", "weight_scale"}


def test_the_source_embedding_is_not_modified(gen):
    emb = table(gen, rows=20, dim=6)
    before = emb.weight.detach().clone()
    Int8Embedding.from_embedding(emb)
    assert torch.equal(emb.weight, before)


def test_bad_input_is_refused_by_name(gen):
    q = Int8Embedding.from_embedding(table(gen, rows=10, dim=4))
    with pytest.raises(TypeError, match="embedding"):
        Int8Embedding.from_embedding(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="max_norm"):
        Int8Embedding.from_embedding(nn.Embedding(4, 4, max_norm=1.0))
    bad = nn.Embedding(4, 4)
    with torch.no_grad():
        bad.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Int8Embedding.from_embedding(bad)
    with pytest.raises(TypeError, match="input"):
        q(torch.zeros(3))
    with pytest.raises(TypeError, match="input"):
        q([1, 2])
    # out-of-range ids: the same error nn.Embedding gives
    for ids in (torch.tensor([10]), torch.tensor([-1])):
        with pytest.raises(IndexError):
            nn.Embedding(10, 4)(ids)
        with pytest.raises(IndexError):
            q(ids)
    with pytest.raises(ValueError, match="num_embeddings"):
        Int8Embedding(-1, 4)
    with pytest.raises(ValueError, match="padding_idx"):
        Int8Embedding(4, 4, padding_idx=4)
    with pytest.raises(ValueError, match="dtype"):
        Int8Embedding(4, 4, dtype=torch.int32)


def test_the_int8_recipe_converts_embeddings_and_linears(gen):
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 16)
            self.fc = nn.Linear(16, 4)

        def forward(self, ids):
            return self.fc(self.emb(ids).mean(1))

    m = Tiny().eval()
    ids = torch.randint(0, 100, (3, 5), generator=gen)
    out, r = pk.compress(m, "int8", ids, progress=False)
    assert isinstance(out.emb, Int8Embedding) and isinstance(out.fc, Int8Linear)
    assert torch.equal(out.emb(ids), Int8Embedding.from_embedding(m.emb)(ids))
    assert out.emb.nbytes() == 100 * 16 + 100 * 4
    assert r.total["bytes_after"] < 0.4 * r.total["bytes_before"]
    # embeddings=False keeps tables in float
    out, _ = pk.compress(m, pk.recipes.Int8(embeddings=False), ids, progress=False)
    assert type(out.emb) is nn.Embedding and isinstance(out.fc, Int8Linear)
    # a max_norm table is left in float and listed, never broken
    m.emb.max_norm = 1.0
    out, r = pk.compress(m, "int8", ids, progress=False)
    assert type(out.emb) is nn.Embedding
    assert any(s.fqn == "emb" and "max_norm" in s.reason for s in r.skipped)
