"""EncoderBlock: recognizing encoder layers, reproducing them, and the int8 block
against its fake-quantized float twin, on every layout it fuses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pykernels as pk
from pykernels.nn.encoder import EncoderBlock, fuse_encoder_block

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _hf(kind: str, act: str = "gelu") -> nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=99,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            hidden_act=act,
        )
        return transformers.BertModel(cfg).eval()
    if kind == "roberta":
        cfg = transformers.RobertaConfig(
            vocab_size=99,
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=80,
            hidden_act=act,
        )
        return transformers.RobertaModel(cfg).eval()
    if kind == "distilbert":
        cfg = transformers.DistilBertConfig(
            vocab_size=99, dim=64, n_layers=2, n_heads=4, hidden_dim=96, activation=act
        )
        return transformers.DistilBertModel(cfg).eval()
    cfg = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        image_size=32,
        patch_size=8,
        hidden_act=act,
    )
    return transformers.ViTModel(cfg).eval()


def _inputs(kind: str, gen: torch.Generator) -> dict:
    if kind == "vit":
        return {"pixel_values": torch.randn(3, 3, 32, 32, generator=gen)}
    ids = torch.randint(0, 99, (3, 11), generator=gen)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _fake_twin(block: EncoderBlock) -> EncoderBlock:
    """The fused block with each int8 projection as float weights and per-token
    fake-quantized activations: what the int8 block computes, in float."""

    class FakeQuant(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.w = lin.dequantized_weight()
            self.b = lin.bias

        def forward(self, x):
            return F.linear(pk.ops.fake_quantize_per_row(x.float()), self.w, self.b)

    twin = copy.deepcopy(block)
    for name in ("qkv", "out", "ffn1", "ffn2"):
        setattr(twin, name, FakeQuant(getattr(block, name)))
    return twin


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "vit"])
@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_new", "silu"])
def test_hf_layouts_fuse_and_match(kind, act, gen):
    model = _hf(kind, act)
    inputs = _inputs(kind, gen)
    want = _out(model, inputs)
    out, report = pk.compress(copy.deepcopy(model), "int8", inputs, progress=False)
    blocks = [m for m in out.modules() if isinstance(m, EncoderBlock)]
    assert len(blocks) == sum(
        1 for m in model.modules() if not isinstance(fuse_encoder_block(m), str)
    )
    assert len(blocks) >= 1
    assert {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh", "silu": "silu"}[act] == (
        blocks[0].activation
    )
    got = _out(out, inputs)
    # The fused model against the per-Linear int8 model and the float one.
    unfused = _out(
        pk.compress(copy.deepcopy(model), "int8:fuse=False", inputs, progress=False)[0], inputs
    )
    assert _cos(got, want) > 0.995
    assert _cos(got, unfused) > 0.995
    assert report.total["output_rel_error"] < 0.1


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_torch_encoder_layer(norm_first, batch_first, activation, gen):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(
        48,
        4,
        80,
        dropout=0.0,
        activation=activation,
        batch_first=batch_first,
        norm_first=norm_first,
    ).eval()
    block = fuse_encoder_block(layer)
    assert isinstance(block, EncoderBlock), block
    x = torch.randn(2, 9, 48, generator=gen)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(9)
    twin = _fake_twin(block)
    with torch.no_grad():
        for kwargs in ({}, {"src_key_padding_mask": pad}, {"src_mask": causal}):
            y = block(x, **kwargs)
            assert y.shape == x.shape
            ref = twin(x, **kwargs)
            assert float((y - ref).norm() / ref.norm()) < 1e-3
            if "src_key_padding_mask" not in kwargs:  # torch's fast path drops padded rows
                assert _cos(y, layer(x, **kwargs)) > 0.995


def test_float_block_reproduces_the_layer_exactly(gen):
    model = _hf("bert")
    layer = model.encoder.layer[0]
    block = fuse_encoder_block(layer)
    assert isinstance(block, EncoderBlock)
    float_block = EncoderBlock(**{**block.config(), "quantized": False})
    spec_block = pk.nn.encoder._float_block(pk.nn.encoder._spec(layer), "gelu")
    float_block.load_state_dict(spec_block.state_dict())
    x = torch.randn(2, 13, 64, generator=gen)
    keep = torch.ones(2, 1, 13, 13, dtype=torch.bool)
    keep[0, ..., 7:] = False
    with torch.no_grad():
        for mask in (None, keep):
            assert torch.allclose(float_block(x, mask), layer(x, mask), rtol=1e-5, atol=1e-5)


def test_int8_block_equals_its_fake_quant_twin(gen):
    block = fuse_encoder_block(_hf("bert").encoder.layer[1])
    x = torch.randn(3, 17, 64, generator=gen)
    with torch.no_grad():
        y, ref = block(x), _fake_twin(block)(x)
    assert float((y - ref).norm() / ref.norm()) < 1e-3


def test_unfusable_layers_keep_the_per_linear_path(gen):
    model = _hf("bert")
    model.encoder.layer[0].intermediate.intermediate_act_fn = nn.Tanh()  # no fused tanh
    model.encoder.layer[1].attention.self.query.register_forward_hook(lambda m, a, o: o * 2)
    inputs = _inputs("bert", gen)
    out, report = pk.compress(copy.deepcopy(model), "int8", inputs, progress=False)
    assert not any(isinstance(m, EncoderBlock) for m in out.modules())
    assert isinstance(out.encoder.layer[0].intermediate.dense, pk.nn.Int8Linear)
    assert "activation" in fuse_encoder_block(model.encoder.layer[0])
    # excluding one projection leaves its layer unfused, the other fused
    model = _hf("bert")
    out, _ = pk.compress(
        copy.deepcopy(model),
        "int8",
        inputs,
        exclude=["encoder.layer.0.output.dense"],
        progress=False,
    )
    assert not isinstance(out.encoder.layer[0], EncoderBlock)
    assert isinstance(out.encoder.layer[0].output.dense, nn.Linear)
    assert isinstance(out.encoder.layer[1], EncoderBlock)


def test_compose_with_prune_and_sparse(gen):
    model = _hf("bert")
    inputs = _inputs("bert", gen)
    out, _ = pk.compress(copy.deepcopy(model), "prune:0.25+int8", inputs, progress=False)
    blocks = [m for m in out.modules() if isinstance(m, EncoderBlock)]
    assert blocks and blocks[0].ffn < 96  # pruned widths carried into the fused block
    assert torch.isfinite(_out(out, inputs)).all()
    out, _ = pk.compress(copy.deepcopy(model), "sparse:0.5+int8", inputs, progress=False)
    assert not any(isinstance(m, EncoderBlock) for m in out.modules())  # per-Linear there


def test_save_load_round_trip(tmp_path, gen):
    model = _hf("distilbert")
    inputs = _inputs("distilbert", gen)
    out, _ = pk.compress(copy.deepcopy(model), "int8", inputs, progress=False)
    pk.save(out, tmp_path / "m.safetensors")
    back = pk.load(tmp_path / "m.safetensors", _hf("distilbert")).eval()
    assert isinstance(back.transformer.layer[0], EncoderBlock)
    assert torch.equal(_out(back, inputs), _out(out, inputs))


def test_bad_calls_and_arguments():
    block = fuse_encoder_block(_hf("bert").encoder.layer[0])
    x = torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match="cross-attention"):
        block(x, None, encoder_hidden_states=x)
    with pytest.raises(ValueError, match="hidden_states"):
        block(torch.randn(4, 64))
    with pytest.raises(ValueError, match="multiple of heads"):
        EncoderBlock(64, 5, 32)
    with pytest.raises(ValueError, match="activation"):
        EncoderBlock(64, 4, 32, activation="tanh")
    assert "int8" in repr(block) and "post-norm" in repr(block)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
@pytest.mark.parametrize("recipe", ["int8", "int8:act_bits=7"])
def test_native_layer_call_equals_the_python_path(kind, recipe, gen, monkeypatch):
    from pykernels import backends

    model = _hf(kind, "gelu" if recipe == "int8" else "relu")
    inputs = _inputs(kind, gen)  # right-padded rows: key lengths
    out, _ = pk.compress(copy.deepcopy(model), recipe, inputs, progress=False)
    calls = []
    native = backends.native.C.encoder_post_norm

    def counting(*args):
        calls.append(args[2:4])
        return native(*args)

    monkeypatch.setattr(backends.native.C, "encoder_post_norm", counting)
    with torch.inference_mode():
        fast = _out(out, inputs)
    assert len(calls) == sum(isinstance(m, EncoderBlock) for m in out.modules()) >= 1
    with monkeypatch.context() as m:
        m.setattr(EncoderBlock, "_native_block", lambda self, x, mask: None)
        with torch.inference_mode():
            slow = _out(out, inputs)
    assert torch.equal(fast, slow)  # the same kernels in the same order
    # Watched calls take the per-op path, so the profiler sees each op.
    calls.clear()
    with torch.profiler.profile() as prof, torch.inference_mode():
        _out(out, inputs)
    assert not calls
    assert any("pykernels::int8_linear" in e.key for e in prof.key_averages())
    # A mask that is not right padding, and bf16 inputs, take the Python path too.
    block = next(m for m in out.modules() if isinstance(m, EncoderBlock))
    x = torch.randn(2, 5, 64, generator=gen)
    extra = torch.randn(2, 1, 5, 5, generator=gen)
    calls.clear()
    with torch.inference_mode():
        got = block._block(x, extra)
        assert not calls
        assert block._block(x.bfloat16(), None).dtype == torch.bfloat16 and not calls
        y0 = block._block(x, None)
        assert len(calls) == 1
    with monkeypatch.context() as m, torch.inference_mode():
        m.setattr(EncoderBlock, "_native_block", lambda self, x, mask: None)
        assert torch.equal(y0, block._block(x, None))
    assert torch.isfinite(got).all()


def test_native_layer_call_refuses_bad_buffers(gen):
    from pykernels import backends

    model = _hf("bert")
    out, _ = pk.compress(copy.deepcopy(model), "int8", _inputs("bert", gen), progress=False)
    block = next(m for m in out.modules() if isinstance(m, EncoderBlock))
    args = block._native_args()
    x = torch.randn(6, 64, generator=gen)
    y = torch.empty_like(x)
    C = backends.native.C
    with pytest.raises(ValueError, match="batch \\* seq"):
        C.encoder_post_norm(x.numpy(), y.numpy(), 2, 4, None, *args)
    with pytest.raises(ValueError, match="hidden"):
        C.encoder_post_norm(x[:, :32].contiguous().numpy(), y.numpy(), 2, 3, None, *args)
    with pytest.raises(ValueError, match="qkv"):
        C.encoder_post_norm(x.numpy(), y.numpy(), 2, 3, None, args[0][:3], *args[1:])
    with pytest.raises(ValueError, match="kv_len"):
        C.encoder_post_norm(x.numpy(), y.numpy(), 2, 3, torch.ones(3).numpy(), *args)
    bad = list(args)
    bad[1] = args[2]  # ffn1's weight where the output projection's belongs
    with pytest.raises(ValueError, match="out: expected"):
        C.encoder_post_norm(x.numpy(), y.numpy(), 2, 3, None, *bad)
    # and a reload of the weights rebuilds the cached arguments
    block.norm1.weight = nn.Parameter(block.norm1.weight.detach() * 2)
    assert block._native_args()[4] is not args[4]
