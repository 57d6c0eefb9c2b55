"""pk.save / pk.load: one .safetensors file with a manifest; the loaded model's
outputs equal the compressed model's bit for bit, for every recipe, and a file
that does not fit is refused with ValueError."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pykernels as pk

st = pytest.importorskip("safetensors.torch")
safetensors = pytest.importorskip("safetensors")


def seeded(seed: int):
    torch.manual_seed(seed)


def mlp():
    return nn.Sequential(
        nn.Embedding(50, 32),
        nn.Linear(32, 64),
        nn.ReLU(),
        nn.Linear(64, 64),
        nn.GELU(),
        nn.Linear(64, 8),
    ).eval()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        h = F.adaptive_avg_pool2d(F.relu(self.c2(h)), 2)
        return self.head(torch.flatten(h, 1))


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def run(m, x):
    with torch.no_grad():
        y = m(**x) if isinstance(x, dict) else m(x)
    return getattr(y, "last_hidden_state", y)


def ids(gen, shape=(5, 7), hi=50):
    return torch.randint(0, hi, shape, generator=gen)


RECIPES = [
    "int8",
    "int8:weight_only",
    "int8:act_bits=7",
    "sparse:0.8",
    "sparse:2:4",
    "sparse:0.75:block",
    "lowrank:0.9",
    "lowrank:rank=4",
    "prune:0.5",
    "prune:0.5+int8",
    "prune:0.3:taylor+sparse:0.5",
    "prune:0.25:round_to=16+lowrank:0.95+int8",
]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_round_trips_bit_exact(recipe, gen, tmp_path):
    seeded(1)
    m = mlp()
    x = ids(gen)
    out, _ = pk.compress(m, recipe, x, progress=False)
    path = tmp_path / "m.safetensors"
    pk.save(out, path)
    seeded(2)  # another initialization: every value must come from the file
    loaded = pk.load(path, mlp())
    assert [type(a) for a in loaded.modules()] == [type(b) for b in out.modules()]
    for a, b in zip(loaded.modules(), out.modules(), strict=True):
        assert getattr(a, "act_bits", 8) == getattr(b, "act_bits", 8)
    x2 = ids(gen, (3, 11))
    assert torch.equal(run(loaded, x), run(out, x))
    assert torch.equal(run(loaded, x2), run(out, x2))
    manifest = pk.compress.read_manifest(path)
    assert manifest["recipe"] == str("+".join(str(s) for s in pk.recipes.parse(recipe)))
    assert manifest["pykernels_version"] == pk.version()
    assert set(manifest["modules"]) == set(out._pk_compression["modules"])
    # the file is one plain safetensors file: any reader sees the tensors
    tensors = st.load_file(str(path))
    assert set(tensors) <= set(out.state_dict())


def test_pruned_cnn_round_trips(gen, tmp_path):
    seeded(3)
    m = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    out, _ = pk.compress(m, "prune:0.5+int8", x, progress=False)
    assert out.c1.out_channels == 8 and out.bn.num_features == 8
    pk.save(out, tmp_path / "c.safetensors")
    seeded(4)
    loaded = pk.load(tmp_path / "c.safetensors", ConvNet().eval())
    assert loaded.c1.out_channels == 8 and loaded.bn.running_mean.shape == (8,)
    assert torch.equal(run(loaded, x), run(out, x))


@pytest.mark.parametrize("int8", ["int8:fuse=False", "int8"])
def test_pruned_bert_heads_round_trip(gen, tmp_path, int8):
    seeded(5)
    m = tiny_bert()
    x = {"input_ids": ids(gen, (2, 9), 120), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    out, _ = pk.compress(m, f"prune:0.5+{int8}", x, progress=False)
    pk.save(out, tmp_path / "b.safetensors")
    seeded(6)
    loaded = pk.load(tmp_path / "b.safetensors", tiny_bert())
    for layer in loaded.encoder.layer:
        if isinstance(layer, pk.nn.EncoderBlock):  # fused: the pruned widths are its own
            assert (layer.heads, layer.inner) == (2, 16)
        else:
            assert layer.attention.self.num_attention_heads == 2
            assert layer.attention.self.all_head_size == 16
    assert torch.equal(run(loaded, x), run(out, x))


def test_a_model_built_by_hand_saves_too(gen, tmp_path):
    seeded(7)
    m = mlp()
    m[1] = pk.nn.Int8Linear.from_linear(m[1])
    pk.save(m, tmp_path / "h.safetensors")
    seeded(8)
    loaded = pk.load(tmp_path / "h.safetensors", mlp())
    x = ids(gen)
    assert isinstance(loaded[1], pk.nn.Int8Linear) and torch.equal(run(loaded, x), run(m, x))


# --- refusals ----------------------------------------------------------------------


@pytest.fixture
def saved(gen, tmp_path):
    seeded(9)
    out, _ = pk.compress(mlp(), "prune:0.5+int8", ids(gen), progress=False)
    path = tmp_path / "ok.safetensors"
    pk.save(out, path)
    return path


def rewrite(path, dst, edit, sign=True):
    """A copy of ``path`` with its manifest changed by ``edit(manifest)`` and, with
    ``sign``, its digest recomputed (a forgery made on purpose: what the checks after
    the digest's must catch)."""
    from pykernels.compress import io

    tensors = st.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    manifest = json.loads(meta["pykernels"])
    edit(manifest)
    if sign:
        manifest["sha256"] = io._digest(tensors, manifest)
    meta["pykernels"] = json.dumps(manifest)
    st.save_file(tensors, str(dst), metadata=meta)
    return dst


def test_corrupted_bytes_are_refused(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0x10  # a tensor byte
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        pk.load(bad, mlp())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut.safetensors"):
        pk.load(cut, mlp())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.safetensors"):
        pk.load(junk, mlp())
    with pytest.raises(FileNotFoundError):
        pk.load(tmp_path / "absent.safetensors", mlp())


def test_another_architecture_is_refused(saved):
    other = mlp()
    other[3] = nn.Linear(64, 65)
    with pytest.raises(ValueError, match="another architecture"):
        pk.load(saved, other)
    with pytest.raises(ValueError, match="another architecture"):
        pk.load(saved, mlp().double())


def test_manifest_problems_are_refused(saved, tmp_path):
    def unknown_kind(m):
        m["modules"]["1"]["kind"] = "QuantumLinear"

    def unknown_module(m):
        m["modules"]["9"] = m["modules"]["1"]

    def bad_attr(m):
        m["attrs"]["1"] = {"in_features": "many"}

    def no_modules(m):
        del m["modules"]

    def tensors_differ(m):
        m["modules"]["1"]["config"]["out_features"] = 7

    cases = [
        (unknown_kind, "QuantumLinear"),
        (unknown_module, "'9'"),
        (bad_attr, "in_features"),
        (no_modules, "modules"),
        (tensors_differ, "do not fit"),
    ]
    for i, (edit, match) in enumerate(cases):
        path = rewrite(saved, tmp_path / f"e{i}.safetensors", edit)
        with pytest.raises(ValueError, match=match):
            pk.load(path, mlp())
    plain = tmp_path / "plain.safetensors"
    st.save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(ValueError, match="no pykernels manifest"):
        pk.load(plain, mlp())


def test_a_module_without_a_kind_is_refused_at_save(gen, tmp_path):
    class Mine(nn.Module):
        def forward(self, x):
            return x

    out, _ = pk.compress(mlp(), "int8", ids(gen), progress=False)
    out[1] = Mine()  # a module compress changed, now of a type save cannot describe
    with pytest.raises(ValueError, match="register_kind"):
        pk.save(out, tmp_path / "x.safetensors")


# --- the manifest is covered by the digest --------------------------------------------


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["modules"]["1"]["config"].update(mode="weight_only"),
        lambda m: m["modules"]["1"]["config"].update(act_bits=7),
        lambda m: m.update(recipe="int8"),
        lambda m: m["attrs"].setdefault("1", {}).update(out_features=5),
        lambda m: m.update(aliases={"1.bias": "1.weight_scale"}),
        lambda m: m.update(model_class="other.Model"),
    ],
    ids=["mode", "act_bits", "recipe", "attrs", "aliases", "model_class"],
)
def test_an_edited_manifest_is_refused(saved, tmp_path, edit):
    bad = rewrite(saved, tmp_path / "edited.safetensors", edit, sign=False)
    with pytest.raises(ValueError, match="edited.safetensors.*corrupted.*manifest"):
        pk.load(bad, mlp())
    # the same file with only its layout changed (key order, spacing) still loads
    same = rewrite(saved, tmp_path / "same.safetensors", lambda m: None, sign=False)
    pk.load(same, mlp())


def test_format_1_files_still_load(saved, tmp_path):
    from pykernels.compress import io

    def as_v1(m):
        m["format_version"] = 1
        del m["shared"]

    tensors = st.load_file(str(saved))
    old = rewrite(saved, tmp_path / "v1.safetensors", as_v1, sign=False)
    with safetensors.safe_open(str(old), framework="pt") as f:
        meta = dict(f.metadata())
    manifest = json.loads(meta["pykernels"])
    manifest["sha256"] = io._digest(tensors)  # format 1: the tensors only
    meta["pykernels"] = json.dumps(manifest)
    st.save_file(tensors, str(old), metadata=meta)
    x = torch.randint(0, 50, (5, 7))
    want = run(pk.load(saved, mlp()), x)
    assert torch.equal(run(pk.load(old, mlp()), x), want)
    # a format-2 file relabelled as format 1 keeps its full digest, which then fails
    relabelled = rewrite(saved, tmp_path / "r.safetensors", as_v1, sign=False)
    with pytest.raises(ValueError, match="corrupted"):
        pk.load(relabelled, mlp())
    for version in (0, 3, "2", True, None):
        bad = rewrite(
            saved, tmp_path / "v.safetensors", lambda m, v=version: m.update(format_version=v)
        )
        with pytest.raises(ValueError, match="manifest format"):
            pk.load(bad, mlp())


# --- where the file goes ------------------------------------------------------------------


def test_save_into_a_missing_directory_names_it(gen, tmp_path):
    m = mlp()
    target = tmp_path / "no" / "such" / "m.safetensors"
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no" / "such")):
        pk.save(m, target)
    assert not (tmp_path / "no").exists()  # pk.save creates no directory, as torch.save
    with pytest.raises(IsADirectoryError, match="directory"):
        pk.save(m, tmp_path)
    for bad in (3, None, ["m.safetensors"]):
        with pytest.raises(TypeError, match="path must be"):
            pk.save(m, bad)
    with pytest.raises(ValueError, match="empty"):
        pk.save(m, "")
    # str, Path and bytes paths all write the same file
    x = ids(gen)
    for path in (str(tmp_path / "a.safetensors"), tmp_path / "b.safetensors"):
        pk.save(m, path)
        assert torch.equal(run(pk.load(path, mlp()), x), run(m, x))
    pk.save(m, bytes(tmp_path / "c.safetensors"))
    assert torch.equal(run(pk.load(bytes(tmp_path / "c.safetensors"), mlp()), x), run(m, x))
    for bad in (3, None, ["m.safetensors"]):
        with pytest.raises(TypeError, match="pk.load: path must be"):
            pk.load(bad, mlp())


# --- tied weights and shared modules ------------------------------------------------------


class TiedLM(nn.Module):
    """An output projection tied to the embedding, as Hugging Face decoders tie them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.relu(self.body(self.emb(x))))


def shared_mlp():
    lin = nn.Linear(16, 16)
    return nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(16, 4))


def tensor_ties(model):
    """Groups of state_dict names that are one tensor (by identity of the attribute)."""
    by_id = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(name)
    return sorted(sorted(v) for v in by_id.values() if len(v) > 1)


def module_ties(model):
    by_id = {}
    for name, m in model.named_modules(remove_duplicate=False):
        by_id.setdefault(id(m), []).append(name)
    return sorted(sorted(v) for v in by_id.values() if len(v) > 1)


TIE_CASES = [
    ("tied_lm", TiedLM, lambda: torch.randint(0, 50, (3, 5))),
    ("shared_mlp", shared_mlp, lambda: torch.randn(3, 16)),
]
TIE_RECIPES = ["qat", "int8", "int8:embeddings=False", "sparse:0.5", "lowrank:rank=2",
               "cluster:8", "qat:weight_only"]  # fmt: skip


@pytest.mark.parametrize("recipe", TIE_RECIPES)
@pytest.mark.parametrize("name, make, inputs", TIE_CASES, ids=[c[0] for c in TIE_CASES])
def test_ties_survive_save_and_load(name, make, inputs, recipe, tmp_path):
    seeded(3)
    model = make().eval()
    x = inputs()
    c, _ = pk.compress(model, recipe, x, progress=False)
    pk.save(c, tmp_path / "t.safetensors")
    seeded(4)  # other weights: everything must come from the file
    back = pk.load(tmp_path / "t.safetensors", make().eval())
    assert torch.equal(run(back, x), run(c, x))
    assert tensor_ties(back) == tensor_ties(c)
    assert module_ties(back) == module_ties(c)
    assert [type(m) for m in back.modules()] == [type(m) for m in c.modules()]


def test_a_tied_qat_model_trains_as_one_weight_after_load(tmp_path):
    seeded(5)
    q = pk.qat.prepare(TiedLM())
    assert q.head.weight is q.emb.weight
    pk.save(q, tmp_path / "q.safetensors")
    back = pk.load(tmp_path / "q.safetensors", TiedLM())
    assert isinstance(back.head, pk.nn.QATLinear) and back.head.weight is back.emb.weight
    x = torch.randint(0, 50, (3, 5))
    back(x).square().mean().backward()
    q(x).square().mean().backward()
    # one parameter, one gradient: both uses summed, as in the saved model
    torch.testing.assert_close(back.emb.weight.grad, q.emb.weight.grad)


def test_weights_untied_after_construction_load_untied(gen, tmp_path):
    seeded(6)
    m = TiedLM().eval()
    m.head.weight = nn.Parameter(m.emb.weight.detach() * 2)  # the caller untied them
    pk.save(m, tmp_path / "u.safetensors")
    back = pk.load(tmp_path / "u.safetensors", TiedLM())
    assert back.head.weight is not back.emb.weight
    x = torch.randint(0, 50, (3, 5))
    assert torch.equal(run(back, x), run(m, x))
    # a module shared under two names that the file stores apart cannot be split
    seeded(7)
    apart = shared_mlp()
    apart[2] = nn.Linear(16, 16)
    pk.save(apart, tmp_path / "apart.safetensors")
    with pytest.raises(ValueError, match="one tensor in this model but two in the file"):
        pk.load(tmp_path / "apart.safetensors", shared_mlp())
