"""pk.compress: recipes, structured pruning, the report, pk.save / pk.load.

Every compressed model is checked against a reference built by hand from the
original's weights on fresh random data: the pruned model against the
original with the removed units' weights taken out, the int8 model against
the layers converted one by one, the loaded model bit for bit against the
saved one.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as hst
from torch import nn

import pykernels as pk
from pykernels.compress import recipes
from pykernels.nn import Int8Linear, LowRankLinear, SparseLinear


def mlp(gen, d_in=24, hidden=40, d_out=6):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, d_out),
    ).eval()


def kept_rows(small: torch.Tensor, big: torch.Tensor) -> list[int]:
    """Indices of ``big``'s rows that ``small``'s rows are, in order (rows are unique)."""
    idx = []
    for row in small:
        hit = (big == row).all(dim=1).nonzero().flatten()
        assert hit.numel() == 1, "a pruned row is not one of the original rows"
        idx.append(int(hit))
    assert idx == sorted(idx)
    return idx


# --- recipes ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, types",
    [
        ("int8", [recipes.Int8]),
        ("sparse:0.9", [recipes.Sparse]),
        ("sparse:2:4", [recipes.Sparse]),
        ("lowrank:0.9", [recipes.LowRank]),
        ("prune:0.3", [recipes.PruneStructured]),
        ("prune:0.3+int8", [recipes.PruneStructured, recipes.Int8]),
        (
            "prune:0.25:taylor+lowrank:0.95+int8",
            [recipes.PruneStructured, recipes.LowRank, recipes.Int8],
        ),
    ],
)
def test_string_shortcuts_parse_to_steps_that_print_back(text, types):
    steps = recipes.parse(text)
    assert [type(s) for s in steps] == types
    # a step's string is a shortcut for the same step
    again = recipes.parse("+".join(str(s) for s in steps))
    assert [s.spec() for s in again] == [s.spec() for s in steps]


def test_string_shortcuts_carry_their_arguments():
    (s,) = recipes.parse("sparse:2:4")
    assert s.pattern == "2:4" and s.sparsity in (None, 0.5)
    (s,) = recipes.parse("sparse:0.8")
    assert s.sparsity == 0.8 and s.pattern == "unstructured"
    (s,) = recipes.parse("lowrank:0.9")
    assert s.energy == 0.9
    (s,) = recipes.parse("prune:0.3:taylor")
    assert s.ratio == 0.3 and s.importance == "taylor"


@pytest.mark.parametrize(
    "text, bad",
    [
        ("int9", "int9"),
        ("prune:0.3+quantize", "quantize"),
        ("prune:abc", "prune:abc"),
        ("sparse:1.5", "sparse:1.5"),
        ("prune:0.3++int8", ""),
        ("lowrank:", "lowrank:"),
        ("sparse:0.9:block:7", "sparse:0.9:block:7"),
    ],
)
def test_malformed_recipes_name_the_bad_part_and_list_valid_steps(text, bad):
    with pytest.raises(ValueError) as e:
        pk.compress(mlp(torch.Generator().manual_seed(0)), text, torch.randn(2, 24), progress=False)
    msg = str(e.value)
    assert bad in msg
    if bad in ("int9", "quantize"):
        for name in ("int8", "sparse", "lowrank", "prune"):
            assert name in msg


def test_bad_arguments_are_refused_before_any_work(gen):
    m = mlp(gen)
    x = torch.randn(3, 24, generator=gen)
    with pytest.raises(TypeError, match="model"):
        pk.compress("not a model", "int8", x)
    with pytest.raises((TypeError, ValueError), match="recipe"):
        pk.compress(m, 42, x)
    with pytest.raises((TypeError, ValueError), match="recipe is empty"):
        pk.compress(m, "", x)
    with pytest.raises(ValueError, match="example_inputs|does not run"):
        pk.compress(m, "int8", torch.randn(3, 7))
    with pytest.raises(TypeError, match="inplace"):
        pk.compress(m, "int8", x, inplace="yes")


# --- the caller's model, filters -------------------------------------------


def test_the_callers_model_is_untouched_unless_inplace(gen):
    m = mlp(gen).train()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(5, 24, generator=gen)
    out, report = pk.compress(m, "prune:0.5+int8", x, progress=False)
    assert out is not m and m.training and out.training
    assert all(type(a) is type(b) for a, b in zip(m.modules(), mlp(gen).modules(), strict=False))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    out2, _ = pk.compress(m, "int8", x, inplace=True, progress=False)
    assert out2 is m and isinstance(m[0], Int8Linear)


def test_int8_matches_the_layers_converted_one_by_one(gen):
    m = mlp(gen)
    x = torch.randn(9, 24, generator=gen)
    out, _ = pk.compress(m, "int8", x, progress=False)
    by_hand = copy.deepcopy(m)
    for i in (0, 2, 4):
        by_hand[i] = Int8Linear.from_linear(m[i])
    with torch.no_grad():
        assert torch.equal(out(x), by_hand(x))


def test_filter_fn_and_exclude_pick_the_layers(gen):
    m = mlp(gen)
    x = torch.randn(4, 24, generator=gen)
    out, _ = pk.compress(m, "int8", x, filter_fn=lambda mod, fqn: fqn != "2", progress=False)
    assert [type(out[i]) for i in (0, 2, 4)] == [Int8Linear, nn.Linear, Int8Linear]
    out, _ = pk.compress(m, "int8", x, exclude=["0", "re:[24]$"], progress=False)
    assert [type(out[i]) for i in (0, 2, 4)] == [nn.Linear, nn.Linear, nn.Linear]
    out, _ = pk.compress(m, "int8", x, exclude=["re:4"], progress=False)
    assert [type(out[i]) for i in (0, 2, 4)] == [Int8Linear, Int8Linear, nn.Linear]


def test_sparse_and_lowrank_steps_give_their_layers(gen):
    m = mlp(gen, d_in=64, hidden=64)
    x = torch.randn(4, 64, generator=gen)
    out, _ = pk.compress(m, "sparse:0.8", x, progress=False)
    assert isinstance(out[0], SparseLinear)
    dense = out[0].to_dense() if hasattr(out[0], "to_dense") else None
    if dense is not None:
        assert float((dense == 0).float().mean()) >= 0.79
    out, _ = pk.compress(m, "sparse:2:4", x, progress=False)
    assert isinstance(out[0], SparseLinear)
    out, _ = pk.compress(m, recipes.LowRank(rank=4), x, progress=False)
    assert isinstance(out[0], LowRankLinear)
    ref = pk.nn.LowRankLinear.from_linear(m[0], rank=4)
    assert torch.allclose(out[0](x), ref(x), rtol=1e-4, atol=1e-5)


# --- structured pruning ----------------------------------------------------


def test_mlp_neurons_are_removed_and_the_rest_computes_as_before(gen):
    m = mlp(gen, hidden=40)
    x = torch.randn(16, 24, generator=gen)
    out, report = pk.compress(m, "prune:0.5", x, progress=False)
    assert out[0].out_features == 20 and out[2].out_features == 20
    assert out[0].in_features == 24 and out[4].out_features == 6  # model width kept
    # reference: the original with the removed hidden units' rows and columns taken out
    k0 = kept_rows(out[0].weight.detach(), m[0].weight.detach())
    k1 = kept_rows(out[2].weight.detach()[:, :], m[2].weight.detach()[:, k0])
    h = F.relu(F.linear(x, m[0].weight[k0], m[0].bias[k0]))
    h = F.gelu(F.linear(h, m[2].weight[k1][:, k0], m[2].bias[k1]))
    want = F.linear(h, m[4].weight[:, k1], m[4].bias)
    with torch.no_grad():
        assert torch.allclose(out(x), want, rtol=1e-5, atol=1e-6)
    assert report.total["params_after"] == sum(p.numel() for p in out.parameters())
    assert report.total["params_before"] == sum(p.numel() for p in m.parameters())


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        h = self.c2(h).mean(dim=(2, 3))
        return self.head(h)


def test_conv_bn_conv_channels_shrink_and_match_a_hand_built_copy(gen):
    torch.manual_seed(1)
    m = ConvNet().eval()
    with torch.no_grad():
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.normal_()
        m.bn.bias.normal_()
    x = torch.randn(2, 3, 10, 10, generator=gen)
    out, _ = pk.compress(m, "prune:0.5", x, progress=False)
    assert out.c1.out_channels == 8 and out.bn.num_features == 8 and out.c2.in_channels == 8
    keep = kept_rows(out.c1.weight.detach().flatten(1), m.c1.weight.detach().flatten(1))
    ref = copy.deepcopy(m)
    ref.c1 = nn.Conv2d(3, 8, 3, padding=1)
    ref.c1.weight.data, ref.c1.bias.data = m.c1.weight[keep].detach(), m.c1.bias[keep].detach()
    ref.bn = nn.BatchNorm2d(8).eval()
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(ref.bn, name).data = getattr(m.bn, name)[keep].detach().clone()
    ref.c2 = nn.Conv2d(8, 8, 3, padding=1)
    ref.c2.weight.data, ref.c2.bias.data = m.c2.weight[:, keep].detach(), m.c2.bias.detach()
    with torch.no_grad():
        assert torch.allclose(out(x), ref.eval()(x), rtol=1e-5, atol=1e-5)


class Residual(nn.Module):
    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        x = x + self.down(F.relu(self.up(self.norm(x))))
        return self.out(x)


def test_residual_width_is_never_pruned(gen):
    torch.manual_seed(2)
    m = Residual().eval()
    x = torch.randn(7, 32, generator=gen)
    out, report = pk.compress(m, "prune:0.5", x, progress=False)
    assert out.up.out_features == 32 and out.up.in_features == 32
    assert out.down.out_features == 32 and out.norm.normalized_shape == (32,)
    k = kept_rows(out.up.weight.detach(), m.up.weight.detach())
    h = F.relu(F.linear(m.norm(x), m.up.weight[k], m.up.bias[k]))
    want = m.out(x + F.linear(h, m.down.weight[:, k], m.down.bias))
    with torch.no_grad():
        assert torch.allclose(out(x), want, rtol=1e-5, atol=1e-5)
    assert report.skipped, "the residual stream is reported as left alone"


def test_taylor_importance_prunes_too(gen):
    m = mlp(gen)
    x = torch.randn(8, 24, generator=gen)
    out, _ = pk.compress(m, "prune:0.25:taylor", x, progress=False)
    assert out[0].out_features == 30
    with torch.no_grad():
        assert out(x).shape == (8, 6)


# --- the report --------------------------------------------------------------


def test_report_figures_are_the_models_own(gen):
    m = mlp(gen)
    x = torch.randn(8, 24, generator=gen)
    out, r = pk.compress(m, "prune:0.5+int8", x, progress=False)
    t = r.total
    held = [*out.parameters(), *out.buffers()]  # in memory: int8 packed in the kernels' tiles
    assert t["bytes_after"] == sum(b.numel() * b.element_size() for b in held)
    assert t["bytes_before"] == sum(p.numel() * 4 for p in m.state_dict().values())
    assert t["latency_ms_before"] > 0 and t["latency_ms_after"] > 0
    with torch.no_grad():
        y, y_ref = out(x), m(x)
    rel = float((y - y_ref).norm() / y_ref.norm())
    key = next(k for k in t if "rel" in k and "err" in k)
    assert t[key] == pytest.approx(rel, rel=1e-4, abs=1e-7)
    assert {row.name for row in r.layers} == {"0", "2", "4"}
    text = str(r)
    assert "prune:0.5+int8" in text and "latency" in text
    d = r.to_dict()
    assert d["total"]["params_after"] == t["params_after"]


# --- save / load -------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe", ["prune:0.5+int8", "sparse:0.8", "lowrank:0.9", "prune:0.3+sparse:0.5"]
)
def test_save_load_round_trip_is_bit_exact(recipe, gen, tmp_path):
    pytest.importorskip("safetensors")
    m = mlp(gen, d_in=32, hidden=48)
    x = torch.randn(6, 32, generator=gen)
    out, _ = pk.compress(m, recipe, x, progress=False)
    path = tmp_path / "model.safetensors"
    pk.save(out, path)
    fresh = mlp(torch.Generator().manual_seed(99), d_in=32, hidden=48)
    loaded = pk.load(path, fresh)
    with torch.no_grad():
        assert torch.equal(loaded(x), out(x))
    assert [type(a) for a in loaded.modules()] == [type(b) for b in out.modules()]


def test_load_refuses_a_corrupted_file_and_another_architecture(gen, tmp_path):
    pytest.importorskip("safetensors")
    m = mlp(gen)
    x = torch.randn(4, 24, generator=gen)
    out, _ = pk.compress(m, "int8", x, progress=False)
    path = tmp_path / "m.safetensors"
    pk.save(out, path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # a tensor byte
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        pk.load(bad, mlp(gen))
    with pytest.raises(ValueError):
        pk.load(path, mlp(gen, hidden=41))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file at all")
    with pytest.raises(ValueError, match=re.escape(str(junk))):
        pk.load(junk, mlp(gen))


# --- recipes as lists, custom steps, filters ------------------------------------


@pytest.mark.parametrize(
    "step, text",
    [
        (recipes.Int8(), "int8"),
        (recipes.Int8(mode="weight_only"), "int8:weight_only"),
        (recipes.Int8(embeddings=False), "int8:embeddings=False"),
        (recipes.Sparse(0.9), "sparse:0.9"),
        (recipes.Sparse(pattern="2:4"), "sparse:2:4"),
        (recipes.Sparse(0.5, "block"), "sparse:0.5:block"),
        (recipes.LowRank(energy=0.9), "lowrank:0.9"),
        (recipes.LowRank(rank=8), "lowrank:rank=8"),
        (recipes.LowRank(tol=0.1), "lowrank:tol=0.1"),
        (recipes.PruneStructured(0.3), "prune:0.3"),
        (recipes.PruneStructured(0.3, "taylor", round_to=16), "prune:0.3:taylor:round_to=16"),
        (recipes.PruneStructured(0.3, heads=False), "prune:0.3:heads=False"),
    ],
)
def test_each_step_and_its_string_are_the_same_step(step, text):
    (parsed,) = recipes.parse(text)
    assert parsed.spec() == step.spec()
    assert str(step) == text
    assert recipes.from_specs([step.spec()])[0].spec() == step.spec()


def test_a_list_recipe_gives_what_its_string_gives(gen):
    m = mlp(gen)
    x = torch.randn(6, 24, generator=gen)
    a, _ = pk.compress(m, [recipes.PruneStructured(0.5), recipes.Int8()], x, progress=False)
    b, _ = pk.compress(m, "prune:0.5+int8", x, progress=False)
    c, _ = pk.compress(m, ["prune:0.5", recipes.Int8()], x, progress=False)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and torch.equal(a(x), c(x))


@pytest.mark.parametrize(
    "recipe, match",
    [
        ("prune:0.3:l3", "importance"),
        ("prune:0.3:round_to=0", "round_to"),
        ("prune:0.3:speed=2", "unknown argument 'speed'"),
        ("lowrank:rank=0", "rank"),
        ("lowrank:0.9:rank=4", "exactly one"),
        ("int8:fast", "mode"),
        ("sparse:0.3:2:4", "pattern"),
        ("sparse:2:4:sparsity=0.7", "2:4"),
        ("prune:-0.1", "ratio"),
        ("prune:1", "ratio"),
        ("prune:0.3:ratio=0.2", "twice"),
    ],
)
def test_bad_step_arguments_name_the_argument(recipe, match, gen):
    with pytest.raises(ValueError, match=match) as e:
        recipes.parse(recipe)
    assert recipe.split("+")[0] in str(e.value)


def test_bad_recipe_entries_and_unknown_specs():
    with pytest.raises(TypeError, match="recipe entries"):
        recipes.parse([recipes.Int8(), 3])
    with pytest.raises(ValueError, match="recipe is empty"):
        recipes.parse([])
    with pytest.raises(ValueError, match="valid steps"):
        recipes.from_specs([{"step": "teleport"}])


@recipes.register_step
@dataclass
class Halve(recipes.Step):
    """A step from outside pykernels: halves every Linear's weights."""

    factor: float = 0.5
    name: ClassVar[str] = "halve"
    positional: ClassVar[tuple[str, ...]] = ("factor",)

    def apply(self, ctx):
        for fqn, m in ctx.modules((nn.Linear,)):
            if ctx.accept(m, fqn):
                new = copy.deepcopy(m)
                with torch.no_grad():
                    new.weight.mul_(self.factor)
                ctx.replace(fqn, new)


def test_a_registered_step_works_by_name_and_is_listed(gen):
    m = mlp(gen)
    x = torch.randn(3, 24, generator=gen)
    out, r = pk.compress(m, "halve:0.25+int8", x, exclude=["4"], progress=False)
    assert torch.equal(out[4].weight, m[4].weight)
    want = Int8Linear.from_linear(_scaled(m[0], 0.25))
    with torch.no_grad():
        assert torch.equal(out[0](x), want(x))
    assert r.layers[0].steps == ["halve:0.25", "int8"]
    with pytest.raises(ValueError) as e:
        recipes.parse("nope")
    assert "halve" in str(e.value)
    with pytest.raises(ValueError, match="already registered"):

        @recipes.register_step
        @dataclass
        class Other(recipes.Step):
            name: ClassVar[str] = "halve"

    with pytest.raises(TypeError, match="Step subclass"):
        recipes.register_step(int)


def _scaled(lin, f):
    new = copy.deepcopy(lin)
    with torch.no_grad():
        new.weight.mul_(f)
    return new


def test_bad_filters_are_refused_by_name(gen):
    m = mlp(gen)
    x = torch.randn(3, 24, generator=gen)
    with pytest.raises(TypeError, match="filter_fn"):
        pk.compress(m, "int8", x, filter_fn="0", progress=False)
    with pytest.raises(TypeError, match="filter_fn must return a bool"):
        pk.compress(m, "int8", x, filter_fn=lambda mod, fqn: None, progress=False)
    with pytest.raises(ValueError, match="no module of the model"):
        pk.compress(m, "int8", x, exclude=["layer9"], progress=False)
    with pytest.raises(ValueError, match="not a regex"):
        pk.compress(m, "int8", x, exclude=["re:(["], progress=False)
    with pytest.raises(TypeError, match="exclude"):
        pk.compress(m, "int8", x, exclude="0", progress=False)
    with pytest.raises(TypeError, match="example_inputs"):
        pk.compress(m, "int8", {1: x}, progress=False)
    with pytest.raises(TypeError, match="example_inputs"):
        pk.compress(m, "int8", 3.0, progress=False)
    # filter_fn sees every candidate with its fully qualified name
    seen = []
    pk.compress(m, "int8", x, filter_fn=lambda mod, fqn: seen.append(fqn) or True, progress=False)
    assert seen == ["0", "2", "4"]


def test_keyword_and_positional_example_inputs(gen):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.b = nn.Linear(16, 4)

        def forward(self, x, scale=None):
            h = F.relu(self.a(x))
            return self.b(h) * (1 if scale is None else scale)

    m = TwoInputs().eval()
    x, s = torch.randn(3, 8, generator=gen), torch.rand(3, 1, generator=gen)
    out1, _ = pk.compress(m, "prune:0.5", {"x": x, "scale": s}, progress=False)
    out2, _ = pk.compress(m, "prune:0.5", (x, s), progress=False)
    assert out1.a.out_features == out2.a.out_features == 8
    with torch.no_grad():
        assert torch.equal(out1(x, s), out2(x, s))


# --- python -m pykernels compress ------------------------------------------------


def test_the_compress_command_writes_a_loadable_file(gen, tmp_path, capsys):
    pytest.importorskip("safetensors")
    from pykernels.__main__ import main

    torch.manual_seed(11)
    m = mlp(gen)
    src, dst = tmp_path / "model.pt", tmp_path / "model.safetensors"
    torch.save(m, src)  # the whole module, pickled with its classes
    x = torch.randn(5, 24, generator=gen)
    torch.save(x, tmp_path / "x.pt")
    argv = ["compress", str(src), "--recipe", "prune:0.5+int8", "--out", str(dst), "--quiet"]
    # a whole pickled module loads only when the user says they trust it
    assert main([*argv, "--example", str(tmp_path / "x.pt")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not dst.exists()
    argv.append("--trust-pickle")
    assert main([*argv, "--example", str(tmp_path / "x.pt")]) == 0
    printed = capsys.readouterr().out
    assert "CompressionReport: prune:0.5+int8" in printed
    want, _ = pk.compress(m, "prune:0.5+int8", x, progress=False)
    loaded = pk.load(dst, mlp(torch.Generator().manual_seed(1)))
    with torch.no_grad():
        assert torch.equal(loaded(x), want(x))
    assert main([*argv, "--input-shape", "2,24"]) == 0
    capsys.readouterr()
    assert main(["compress", str(tmp_path / "nothing"), "--recipe", "int8", "--out", str(dst)]) == 2
    assert "no such file" in capsys.readouterr().err


# --- issue 20: recipes print back, the caller's modes, unfit layers, odd outputs -----------

FRACTIONS = hst.floats(0, 1, exclude_max=True, allow_nan=False, allow_infinity=False)
POSITIVE = hst.floats(0, 1, exclude_min=True, allow_nan=False, allow_infinity=False)
STEPS = hst.one_of(
    hst.builds(recipes.Int8, hst.just("dynamic"), hst.booleans(), hst.sampled_from([7, 8])),
    hst.builds(recipes.Int8, hst.just("weight_only"), hst.booleans()),
    hst.builds(recipes.Sparse, FRACTIONS, hst.sampled_from(["unstructured", "block"]),
               hst.sampled_from(["layer", "global"])),
    hst.builds(recipes.Sparse, hst.just(None), hst.just("2:4"),
               hst.sampled_from(["layer", "global"])),
    hst.builds(recipes.LowRank, energy=POSITIVE),
    hst.builds(recipes.LowRank, rank=hst.integers(1, 10**6)),
    hst.builds(recipes.LowRank, tol=FRACTIONS),
    hst.builds(recipes.PruneStructured, FRACTIONS, hst.sampled_from(["l2", "taylor"]),
               hst.none() | hst.integers(1, 512), hst.booleans()),
    hst.builds(recipes.Cluster, hst.integers(2, 256), hst.sampled_from(["row", "layer"]),
               hst.sampled_from(["dynamic", "weight_only"])),
    hst.builds(recipes.CP, energy=POSITIVE),
    hst.builds(recipes.CP, rank=hst.integers(1, 10**6)),
    hst.builds(recipes.Tucker, energy=POSITIVE),
    hst.builds(recipes.Tucker, rank=hst.integers(1, 10**6)),
    hst.builds(pk.qat.QAT, hst.sampled_from(["dynamic", "weight_only"])),
)  # fmt: skip


@settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(step=STEPS)
def test_every_step_prints_as_a_string_that_parses_back_to_it(step):
    text = str(step)
    (parsed,) = recipes.parse(text)
    assert parsed == step, text
    assert recipes.from_specs([step.spec()])[0] == step
    assert "+".join([text, text]) == "+".join(str(s) for s in recipes.parse(f"{text}+{text}"))


@pytest.mark.parametrize(
    "step, text",
    [
        (recipes.Sparse(0.123456789), "sparse:0.123456789"),
        (recipes.Sparse(1 / 3), f"sparse:{1 / 3!r}"),
        (recipes.Sparse(pattern="2:4", scope="global"), "sparse:2:4:scope=global"),
        (recipes.LowRank(energy=0.9), "lowrank:0.9"),  # short forms stay short
        (recipes.PruneStructured(0.1 + 0.2), "prune:0.30000000000000004"),
        (recipes.CP(energy=1e-7), "cp:1e-07"),
    ],
)
def test_strings_keep_every_digit_and_option(step, text):
    assert str(step) == text and recipes.parse(text)[0] == step


class FrozenBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 4))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("recipe", ["int8", "sparse:0.5", "prune:0.25", "qat", "lowrank:rank=2"])
def test_every_submodules_mode_is_kept(recipe, inplace, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m = FrozenBN().train()
    m.bn.eval()  # a frozen BatchNorm inside a training model
    m.head[1].eval()
    modes = {fqn: mod.training for fqn, mod in m.named_modules()}
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(8, 12, generator=gen)
    out, _ = pk.compress(m, recipe, x, inplace=inplace, progress=False)
    for fqn, mod in out.named_modules():
        owner = fqn
        while owner not in modes:  # a replacement's own parts take the replaced one's mode
            owner = owner.rpartition(".")[0]
        assert mod.training == modes[owner], fqn
    if not inplace:
        assert {fqn: mod.training for fqn, mod in m.named_modules()} == modes
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_an_unfit_layer_is_skipped_with_its_reason_and_the_rest_converted(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    m = m.eval()
    with torch.no_grad():
        m[4].weight[0, 0] = float("nan")
    x = torch.randn(5, 6, generator=gen)
    cases = {
        "sparse:2:4": {"0": "no multiple of 4"},
        "int8": {"4": "NaN or inf"},
        "cluster:8": {"4": "NaN or inf"},
        "lowrank:rank=1": {"4": "NaN or inf"},
    }
    for recipe, want in cases.items():
        out, report = pk.compress(m, recipe, x, progress=False)
        skipped = {s.fqn: s.reason for s in report.skipped}
        for fqn, reason in want.items():
            assert reason in skipped[fqn], (recipe, skipped)
            assert type(out.get_submodule(fqn)) is nn.Linear
        assert {r.name for r in report.layers} == {"0", "2", "4"} - set(want), recipe
    # the model-level helpers take the same rule and say what they left
    with pytest.warns(UserWarning, match="0: in_features = 6 is no multiple of 4"):
        s = pk.sparsify(m, None, "2:4")
    assert type(s[0]) is nn.Linear and isinstance(s[2], SparseLinear)


@pytest.mark.parametrize("recipe", ["int8", "int8:weight_only", "sparse:0.5", "cluster:8", "qat"])
def test_float64_layers_stay_float64_and_the_model_runs(recipe, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).double().eval()
    x = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    out, report = pk.compress(m, recipe, x, progress=False)
    assert not report.layers and all("float64" in s.reason for s in report.skipped)
    assert torch.equal(out(x), m(x))


@dataclass
class Output:
    note: str
    scores: torch.Tensor
    extra: tuple


class DataclassOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.fc(x)
        return Output("scores", y, (y.sum(), None))


class NoTensorOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return {"n": int(self.fc(x).shape[0])}


def test_dataclass_outputs_are_reported_and_tensorless_ones_refused_first(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m = DataclassOut().eval()
    x = torch.randn(5, 8, generator=gen)
    out, report = pk.compress(m, "int8", x, progress=False)
    with torch.no_grad():
        want = F.cosine_similarity(out(x).scores.double(), m(x).scores.double(), dim=-1).mean()
    assert report.total["output_cosine"] == pytest.approx(float(want), rel=1e-9)
    calls = []
    m2 = NoTensorOut().eval()
    m2.fc.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(TypeError, match="cannot find a tensor in the model's output \\(dict\\)"):
        pk.compress(m2, "int8", x, progress=False)
    assert len(calls) == 1  # refused after the first forward, before any step
