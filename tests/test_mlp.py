"""Fused gated MLPs (pykernels.nn.mlp): Int8GatedMLP against the per-Linear int8
path and the float block, recognition by structure and probe, save/load, and
pk.compress on Llama-style decoders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pykernels as pk
from pykernels.nn.mlp import fuse_gated_mlp


class GatedMLP(nn.Module):
    """Llama's MLP under other names, with the Linears declared in another order."""

    def __init__(self, hidden=48, inner=70, act=None, bias=False):
        super().__init__()
        self.w2 = nn.Linear(inner, hidden, bias=bias)
        self.w1 = nn.Linear(hidden, inner, bias=bias)
        self.w3 = nn.Linear(hidden, inner, bias=bias)
        self.act = act or nn.SiLU()

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class NotGated(GatedMLP):
    def forward(self, x):
        return self.w2(self.act(self.w1(x)) + self.w3(x))


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.parametrize(
    "act,name", [(nn.SiLU(), "silu"), (nn.GELU(), "gelu"), (nn.GELU("tanh"), "gelu_tanh")]
)
@pytest.mark.parametrize("bias", [False, True])
def test_fuse_matches_per_linear_int8(act, name, bias, gen):
    torch.manual_seed(0)
    mlp = GatedMLP(act=act, bias=bias).eval()
    fused = fuse_gated_mlp(mlp)
    assert isinstance(fused, pk.nn.Int8GatedMLP), fused
    assert fused.activation == name
    x = torch.randn(3, 9, 48, generator=gen)
    g = pk.nn.Int8Linear.from_linear(mlp.w1)(x)
    u = pk.nn.Int8Linear.from_linear(mlp.w3)(x)
    # The gated product up to the activation's float evaluation; the down
    # projection then quantizes it, where such an ulp may flip one rounding,
    # so the whole block is checked on the fused product itself.
    h = fused.gated(x)
    assert float((h - act(g) * u).abs().max()) <= 2e-6 * (1 + float(h.abs().max()))
    got = fused(x)
    assert torch.equal(got, pk.nn.Int8Linear.from_linear(mlp.w2)(h))
    with torch.no_grad():
        assert _cos(got, mlp(x)) > 0.999
    r = torch.randn(3, 9, 48, generator=gen)
    assert torch.allclose(fused(x, r), got + r, atol=1e-5)
    assert "silu" in repr(fuse_gated_mlp(GatedMLP()))


def test_fuse_declines_what_it_cannot_compute():
    assert "does not compute" in fuse_gated_mlp(NotGated())
    assert "three Linears" in fuse_gated_mlp(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    tanh = GatedMLP(act=nn.Tanh())
    assert isinstance(fuse_gated_mlp(tanh), str)  # tanh is not an epilogue activation
    odd = GatedMLP()
    odd.w3 = nn.Linear(48, 71)  # gate and up of different widths
    assert "shapes" in fuse_gated_mlp(odd)


def test_state_dict_save_load_and_move(tmp_path, gen):
    mlp = GatedMLP(bias=True).eval()
    fused = fuse_gated_mlp(mlp)
    x = torch.randn(5, 48, generator=gen)
    back = pk.nn.Int8GatedMLP(**fused.config())
    back.load_state_dict(fused.state_dict())
    assert torch.equal(back(x), fused(x))
    model = nn.Sequential(GatedMLP(bias=True)).eval()
    model[0].load_state_dict(mlp.state_dict())
    mc, _ = pk.compress(model, "int8:gated=True", (x,), progress=False)
    assert isinstance(mc[0], pk.nn.Int8GatedMLP)
    pk.save(mc, tmp_path / "m")
    loaded = pk.load(tmp_path / "m", nn.Sequential(GatedMLP(bias=True)))
    assert torch.equal(loaded(x), mc(x))
    assert fused.nbytes() < sum(p.numel() * 4 for p in mlp.parameters()) / 3
    with pytest.raises(TypeError, match="gate must be an nn.Linear"):
        pk.nn.Int8GatedMLP.from_linears(nn.Conv1d(2, 2, 1), mlp.w3, mlp.w2)
    with pytest.raises(ValueError, match="same shape"):
        pk.nn.Int8GatedMLP.from_linears(mlp.w1, nn.Linear(48, 3), mlp.w2)


def test_compress_llama_fuses_and_generates(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 300, (2, 12))
    mc, _ = pk.compress(model, "int8:gated=True", (ids,), progress=False)
    assert all(isinstance(layer.mlp, pk.nn.Int8GatedMLP) for layer in mc.model.layers)
    with torch.no_grad():
        assert _cos(mc(ids).logits, model(ids).logits) > 0.999
    # generate() with its KV cache equals greedy decoding without the cache
    out = mc.generate(ids[:1], max_new_tokens=4, do_sample=False)
    seq = ids[:1]
    with torch.no_grad():
        for _ in range(4):
            nxt = mc(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    pk.save(mc, tmp_path / "llama")
    back = pk.load(tmp_path / "llama", transformers.LlamaForCausalLM(cfg).eval())
    with torch.no_grad():
        assert torch.equal(back(ids).logits, mc(ids).logits)
    for recipe in ("int8", "int8:gated=True:fuse=False"):  # the default keeps per-Linear
        unfused, _ = pk.compress(model, recipe, (ids,), progress=False)
        assert isinstance(unfused.model.layers[0].mlp.gate_proj, pk.nn.Int8Linear)
