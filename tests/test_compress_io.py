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


def test_pruned_bert_heads_round_trip(gen, tmp_path):
    seeded(5)
    m = tiny_bert()
    x = {"input_ids": ids(gen, (2, 9), 120), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    out, _ = pk.compress(m, "prune:0.5+int8", x, progress=False)
    pk.save(out, tmp_path / "b.safetensors")
    seeded(6)
    loaded = pk.load(tmp_path / "b.safetensors", tiny_bert())
    for layer in loaded.encoder.layer:
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


def rewrite(path, dst, edit):
    """A copy of ``path`` with its manifest changed by ``edit(manifest)``."""
    tensors = st.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    manifest = json.loads(meta["pykernels"])
    edit(manifest)
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
