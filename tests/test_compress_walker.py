"""One model walker: pk.compress's steps and pk.quantize_int8 / sparsify / factorize /
pk.qat choose layers the same way, on models holding torch's own attention layers
(nn.MultiheadAttention, nn.TransformerEncoderLayer with and without its fused
inference path, nn.Transformer) and Linear subclasses with a forward of their own."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pykernels as pk


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.mha(h, h, h, need_weights=False)[0])


def encoder_layer():
    # batch_first, an even head count, relu: the fused fast path is eligible in eval + no_grad
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
    return nn.Sequential(layer, nn.Linear(32, 8))


def encoder_stack():
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True))


class Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.t(x, x)


class Scaled(nn.Linear):
    """A Linear subclass that computes something else than nn.Linear."""

    def forward(self, x):
        return 2.0 * super().forward(x) + 1.0


class Plain(nn.Linear):
    """A Linear subclass with nn.Linear's own computation."""


class WithSubclass(nn.Module):
    def __init__(self):
        super().__init__()
        self.scaled = Scaled(32, 32)
        self.plain = Plain(32, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        return self.out(torch.relu(self.plain(self.scaled(x))))


MODELS = {
    "mha": Attn,
    "encoder_layer": encoder_layer,
    "encoder_stack": encoder_stack,
    "transformer": Seq2Seq,
    "linear_subclass": WithSubclass,
}
RECIPES = ["int8", "int8:weight_only", "sparse:0.5", "sparse:2:4", "lowrank:0.9", "cluster:16"]
# W8A8 and dynamic cluster quantize activations too; the rest compute the dense twin exactly.
TOL = {"int8": 3e-2, "cluster:16": 3e-2}


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]()


def dense_weight(layer: nn.Module) -> torch.Tensor | None:
    for attr in ("dequantized_weight", "to_dense"):
        if hasattr(layer, attr):
            return getattr(layer, attr)()
    return None


def dense_twin(model: nn.Module, converted: nn.Module) -> nn.Module:
    """The float model with each converted Linear's weight replaced by the dense weight
    the converted layer computes with: what the converted model must compute."""
    twin = copy.deepcopy(model)
    names = dict(converted.named_modules())
    with torch.no_grad():
        for fqn, m in twin.named_modules():
            if isinstance(m, nn.Linear) and not isinstance(names[fqn], nn.Linear):
                m.weight.copy_(dense_weight(names[fqn]).to(m.weight.dtype))
    return twin


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def run_all_paths(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs under no_grad and inference_mode (torch's fused attention / encoder paths
    are eligible there in eval mode) and with grad enabled (the module-by-module path)."""
    out = []
    for ctx in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with ctx():
            out.append(model(x).detach().clone())
    return out


# The caller's training mode matters where torch has a fused path: the encoders.
CASES = [(name, False) for name in MODELS] + [("encoder_layer", True), ("encoder_stack", True)]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize(
    ("name", "train"), CASES, ids=[f"{n}-{'train' if t else 'eval'}" for n, t in CASES]
)
def test_recipes_on_torch_attention_and_subclasses(name, train, recipe):
    model = make(name).train(train)
    x = torch.randn(2, 6, 32)
    compressed, report = pk.compress(model, recipe, x, progress=False)
    assert compressed.training == train and model.training == train
    model.eval()
    compressed.eval()
    got = run_all_paths(compressed, x)
    want = run_all_paths(model, x)
    twin = run_all_paths(dense_twin(model, compressed), x)
    tol = TOL.get(recipe, 1e-4)
    for g, w, t in zip(got, want, twin, strict=True):
        assert torch.isfinite(g).all()
        scale = float(t.abs().max())
        assert float((g - t).abs().max()) <= tol * scale, (recipe, float((g - t).abs().max()))
        if recipe.startswith("int8"):
            assert cosine(g, w) > 0.99
    if recipe.startswith("int8"):
        assert report.total["output_cosine"] > 0.99
    skipped = {s.fqn: s.reason for s in report.skipped}
    assert all(reason for reason in skipped.values())
    for fqn, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out_proj = compressed.get_submodule(f"{fqn}.out_proj")
            assert type(out_proj) is type(m.out_proj)
            assert torch.equal(out_proj.weight, m.out_proj.weight)
            assert "MultiheadAttention" in skipped[f"{fqn}.out_proj"]
    if name == "linear_subclass":
        assert type(compressed.scaled) is Scaled
        assert torch.equal(compressed.scaled.weight, model.scaled.weight)
        assert "overrides Linear.forward" in skipped["scaled"]
        # nn.Linear's own computation under another class name converts exactly
        assert not isinstance(compressed.plain, nn.Linear) or "plain" in skipped
    changed = {row.name for row in report.layers}
    assert not changed & set(skipped)


@pytest.mark.parametrize("name", list(MODELS))
def test_helpers_and_steps_choose_the_same_layers(name):
    model = make(name).eval()
    x = torch.randn(2, 6, 32)

    def converted(m: nn.Module) -> set[str]:
        return {f for f, mod in m.named_modules() if type(mod).__module__.startswith("pykernels.")}

    for helper, recipe in (
        (lambda m: pk.quantize_int8(m), "int8"),
        (lambda m: pk.quantize_int8(m, mode="weight_only"), "int8:weight_only"),
        (lambda m: pk.sparsify(m, 0.5), "sparse:0.5"),
        (lambda m: pk.sparsify(m, 0.5, scope="global"), "sparse:0.5:scope=global"),
        (lambda m: pk.factorize(m, energy=0.9), "lowrank:0.9+tucker:0.9"),
        (lambda m: pk.qat.prepare(m), "qat"),
    ):
        by_helper = helper(model)
        by_step, _ = pk.compress(model, recipe, x, progress=False)
        assert converted(by_helper) == converted(by_step), recipe
        torch.testing.assert_close(by_helper(x), by_step(x), rtol=0, atol=0)


def test_filter_fn_sees_the_candidates_and_still_cannot_force_an_unsafe_swap():
    model = make("mha").eval()
    asked = []

    def take_all(m, fqn):
        asked.append(fqn)
        return True

    q = pk.quantize_int8(model, filter_fn=take_all)
    assert asked == ["inp", "mha.out_proj", "out"]
    assert type(q.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(q.inp, pk.nn.Int8Linear) and isinstance(q.out, pk.nn.Int8Linear)
    _, report = pk.compress(
        model, "int8", torch.randn(2, 6, 32), filter_fn=lambda m, f: f != "out", progress=False
    )
    assert [r.name for r in report.layers] == ["inp"]
    assert [s.fqn for s in report.skipped] == ["mha.out_proj"]


@pytest.mark.parametrize("recipe", ["int8", "sparse:0.5", "cluster:16"])
def test_saved_encoder_loads_and_runs_its_fused_path_guarded(tmp_path, recipe):
    pytest.importorskip("safetensors")
    model = make("encoder_stack").eval()
    x = torch.randn(2, 6, 32)
    compressed, _ = pk.compress(model, recipe, x, progress=False)
    pk.save(compressed, tmp_path / "m.safetensors")
    back = pk.load(tmp_path / "m.safetensors", make("encoder_stack", seed=1)).eval()
    for g, w in zip(run_all_paths(back, x), run_all_paths(compressed, x), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_qat_prepare_and_convert_on_a_transformer_encoder():
    model = make("encoder_stack").eval()
    x = torch.randn(2, 6, 32)
    prepared = pk.qat.prepare(model).eval()
    layer = prepared[0].layers[0]
    assert isinstance(layer.linear1, pk.nn.QATLinear)
    assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    fake = run_all_paths(prepared, x)
    # the fused path would read the float weights and skip the fake quantization
    for out in fake[1:]:
        torch.testing.assert_close(out, fake[0], rtol=1e-5, atol=1e-5)
    converted = pk.qat.convert(prepared).eval()
    assert isinstance(converted[0].layers[0].linear1, pk.nn.Int8Linear)
    for out in run_all_paths(converted, x):
        torch.testing.assert_close(out, fake[0], rtol=1e-4, atol=1e-4)


def test_a_shared_linear_is_converted_once_and_stays_shared():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    model = nn.Sequential(lin, nn.ReLU(), lin).eval()
    x = torch.randn(3, 16)
    q = pk.quantize_int8(model)
    assert isinstance(q[0], pk.nn.Int8Linear) and q[0] is q[2]
    c, report = pk.compress(model, "int8", x, progress=False)
    assert isinstance(c[0], pk.nn.Int8Linear) and c[0] is c[2]
    torch.testing.assert_close(c(x), q(x), rtol=0, atol=0)
    # a name the filter turns down keeps the original module
    c2, _ = pk.compress(model, "int8", x, filter_fn=lambda m, f: f != "2", progress=False)
    assert isinstance(c2[0], pk.nn.Int8Linear) and type(c2[2]) is nn.Linear


def test_tucker_step_and_sparse_scope_round_trip():
    from pykernels.compress import recipes

    for text in ("tucker:0.9", "tucker:rank=4", "sparse:0.9:scope=global"):
        (step,) = recipes.parse(text)
        assert str(step) == text
        assert recipes.from_specs([step.spec()])[0] == step
    # a layer-scoped sparse step records the spec it always did
    assert recipes.parse("sparse:0.5")[0].spec() == {
        "step": "sparse",
        "sparsity": 0.5,
        "pattern": "unstructured",
    }
    with pytest.raises(ValueError, match="scope must be one of"):
        recipes.parse("sparse:0.5:scope=model")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, groups=4)).eval()
    x = torch.randn(1, 16, 8, 8)
    c, report = pk.compress(model, "tucker:rank=4", x, progress=False)
    assert isinstance(c[0], pk.nn.TuckerConv2d) and type(c[1]) is nn.Conv2d
    assert "groups=4" in report.skipped[0].reason
