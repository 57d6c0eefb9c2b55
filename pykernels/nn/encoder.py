"""EncoderBlock: one transformer encoder layer computed the compressed way.

A Hugging Face BERT-family layer (BERT, RoBERTa, MiniLM, ELECTRA), a
DistilBERT block, a ViT layer or an ``nn.TransformerEncoderLayer`` runs, in
eager PyTorch, about a dozen ops per layer: three projections, head
reshapes, attention, a projection, an add, a LayerNorm, a projection, a
GELU, a projection, an add, a LayerNorm. In an int8 model each elementwise op
is a full pass over an activation that the GEMM before it has just written.
An EncoderBlock computes the same function as

- one int8 GEMM for Q, K and V together (their weights concatenated), whose
  output the attention kernel reads in place as three strided head views;
- :func:`pykernels.ops.attention` (or torch's SDPA where that is not built);
- the output projection with the residual added in its epilogue, then the
  LayerNorm;
- the first feed-forward GEMM with the activation (GELU, ReLU, SiLU) in its
  epilogue, the second with the residual in its epilogue, then the LayerNorm.

:func:`fuse_encoder_block` recognizes a layer by its structure (which
Linears and LayerNorms it holds, what its activation computes on a probe,
and whether a float EncoderBlock built from it reproduces its output on
random inputs with and without padding), never by class name alone: a
layer it cannot reproduce is left to the per-Linear path, with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import backends
from ..ops import _checks
from ..ops.attention import attention, padding_mask_to_lengths
from ..ops.int8 import ACTIVATIONS, apply_epilogue
from ._module import nbytes_of
from .int8 import Int8Linear

LAYOUTS = ("hf", "torch")


_last_mask: list = [None, -1, (None, None)]  # (mask, its version, its lengths split)


def _split_mask(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(kv_lengths, remaining mask) for a padding mask; the layers of one forward
    receive the same mask object, so its split is kept for the next layer."""
    if mask is None or mask.dim() != 4 or mask.shape[1] != 1:
        return None, mask
    # An inference tensor has no version counter (and cannot be changed in
    # place outside inference mode): the same object is then taken as unchanged.
    version = -2 if mask.is_inference() else mask._version
    if _last_mask[0] is mask and _last_mask[1] == version:
        return _last_mask[2]
    split = padding_mask_to_lengths(mask)
    _last_mask[:] = [mask, version, split]
    return split


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """softmax(q k^T * scale + mask) v over [B, H, S, D] views with pykernels'
    attention; a right-padding mask becomes key lengths, so padded keys cost
    nothing. The output is laid out [B, S, H, D] (as q, a view of the QKV GEMM's
    output, is), so merging the heads is free."""
    if q.device.type != "cpu" or mask is None or not _checks.has_data(mask):
        return attention(q, k, v, attn_mask=mask, scale=scale)
    lengths, rest = _split_mask(mask)
    return attention(q, k, v, attn_mask=rest, scale=scale, kv_lengths=lengths)


class EncoderBlock(nn.Module):
    """A transformer encoder layer (self-attention, then a feed-forward network; post-
    or pre-LayerNorm) with fused QKV, fused epilogues and pykernels' attention.

    Built by :func:`fuse_encoder_block` (which :func:`pykernels.compress`'s
    ``int8`` step runs on every block it recognizes); inference only. ``layout``
    is the call convention of the layer it replaces: ``"hf"``,
    ``forward(hidden_states, attention_mask=None, **kwargs) -> Tensor`` (the
    mask as Hugging Face passes it to a layer: a bool or additive ``[B, 1, Sq,
    Sk]`` tensor, or None); ``"torch"``, ``nn.TransformerEncoderLayer``'s
    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)``.
    ``quantized=False`` keeps float ``nn.Linear`` projections (the reference the
    conversion checks itself against).
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        ffn: int,
        *,
        norm_first: bool = False,
        activation: str = "gelu",
        eps1: float = 1e-12,
        eps2: float = 1e-12,
        layout: str = "hf",
        batch_first: bool = True,
        qkv_bias: bool = True,
        out_bias: bool = True,
        ffn_bias: bool = True,
        quantized: bool = True,
        act_bits: int = 8,
        inner: int | None = None,
    ) -> None:
        super().__init__()
        inner = hidden if inner is None else inner
        if inner <= 0 or heads <= 0 or inner % heads or hidden <= 0:
            raise ValueError(
                f"EncoderBlock: the attention width ({inner}) must be a positive multiple of "
                f"heads ({heads})"
            )
        if activation not in ACTIVATIONS or activation == "none":
            raise ValueError(f"EncoderBlock: activation must be one of {ACTIVATIONS[1:]}")
        if layout not in LAYOUTS:
            raise ValueError(f"EncoderBlock: layout must be one of {LAYOUTS}, got {layout!r}")
        self.hidden, self.heads, self.ffn, self.inner = hidden, heads, ffn, inner
        self.norm_first, self.activation, self.layout = norm_first, activation, layout
        self.batch_first, self.quantized, self.act_bits = batch_first, quantized, act_bits

        def lin(i: int, o: int, bias: bool, act: str | None = None) -> nn.Module:
            if quantized:
                return Int8Linear(i, o, bias=bias, act_bits=act_bits, activation=act)
            return nn.Linear(i, o, bias=bias)

        self.qkv = lin(hidden, 3 * inner, qkv_bias)
        self.out = lin(inner, hidden, out_bias)
        self.ffn1 = lin(hidden, ffn, ffn_bias, activation)
        self.ffn2 = lin(ffn, hidden, ffn_bias)
        self.norm1 = nn.LayerNorm(hidden, eps=eps1)
        self.norm2 = nn.LayerNorm(hidden, eps=eps2)

    # --- computation --------------------------------------------------------

    def _linear(
        self,
        layer: nn.Module,
        x: Tensor,
        residual: Tensor | None = None,
        act: str = "none",
        norm: nn.Module | None = None,
    ) -> Tensor:
        if isinstance(layer, Int8Linear):
            # Its activation is its own; residual and the block's LayerNorm fused.
            return layer(x, residual, norm)
        y = apply_epilogue(layer(x), act, residual)
        return y if norm is None else norm(y)

    def _attention(self, x: Tensor, mask: Tensor | None) -> Tensor:
        b, s, _ = x.shape
        d = self.inner // self.heads
        qkv = self._linear(self.qkv, x).view(b, s, 3, self.heads, d)
        # Strided [B, H, S, D] views of the one QKV output: no copies.
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        a = _attend(q, k, v, mask, 1.0 / math.sqrt(d))
        return a.transpose(1, 2).reshape(b, s, self.inner)

    def _ffn(self, x: Tensor, residual: Tensor, norm: nn.Module | None = None) -> Tensor:
        """ffn2(act(ffn1(x))) + residual, the activation and the residual in the
        GEMMs' epilogues. (Handing the activation over quantized, with
        ops.int8_linear_quantized_out, was measured 5-8% slower here: its row
        chunks reread the weight from L2 more than this writes and reads the
        float activation; see benchmarks/RESULTS.md.)"""
        f = self._linear(self.ffn1, x, act=self.activation)
        return self._linear(self.ffn2, f, residual=residual, norm=norm)

    def _native_args(self) -> tuple | None:
        """The native layer call's weight arguments (csrc/encoder), or None where
        this block cannot take it: not int8 with packed weights, pre-norm, or mixed
        activation grids. Kept while the weights stay the same tensors."""
        lins = [self.qkv, self.out, self.ffn1, self.ffn2]
        key = tuple(id(t) for lin in lins for t in lin._buffers.values() if t is not None)
        key += tuple(id(t) for n in (self.norm1, self.norm2) for t in n.parameters())
        key += tuple(getattr(n, "eps", None) for n in (self.norm1, self.norm2))
        cached = self.__dict__.get("_native_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        args = None
        if (
            self.quantized
            and not self.norm_first
            and all(
                isinstance(lin, Int8Linear)
                and "weight_packed" in lin._buffers
                and lin.act_bits == self.act_bits
                and lin.activation == (self.activation if lin is self.ffn1 else "none")
                for lin in lins
            )
            and all(
                isinstance(n, nn.LayerNorm) and tuple(n.normalized_shape) == (self.hidden,)
                for n in (self.norm1, self.norm2)
            )
        ):

            def f32(t: Tensor | None):
                return None if t is None else t.detach().float().contiguous().numpy()

            def lin(m: Int8Linear) -> tuple:
                return (
                    m.weight_packed.numpy(),
                    m.weight_comp.numpy(),
                    m.weight_scale.numpy(),
                    f32(m.bias),
                    m.out_features,
                    m.in_features,
                )

            args = (
                *(lin(m) for m in lins),
                f32(self.norm1.weight),
                f32(self.norm1.bias),
                float(self.norm1.eps),
                f32(self.norm2.weight),
                f32(self.norm2.bias),
                float(self.norm2.eps),
                self.heads,
                ACTIVATIONS.index(self.activation),
                self.act_bits,
            )
        self.__dict__["_native_cache"] = (key, args)
        return args

    def _native_block(self, x: Tensor, mask: Tensor | None) -> Tensor | None:
        """The whole layer in one native call (csrc/encoder: the same kernels in
        the same order as the Python path below, so the same result, without the
        Python between them), or None where it does not apply: a tensor something
        is watching (profiler, modes, tracing: they must see each op), not fp32 on
        the CPU, a mask that is more than right padding, or other backends chosen."""
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or not backends.skip_dispatcher(x, mask)
            or backends.choose("int8", x.device).name != "native-cpu"
            or backends.choose("attention", x.device).name != "native-cpu"
            or (mask is not None and x.shape[1] == 0)
        ):
            return None
        lengths = None
        if mask is not None:
            lengths, rest = _split_mask(mask)
            if rest is not None:
                return None
            lengths = lengths.to(torch.int64).contiguous()
        args = self._native_args()
        if args is None:
            return None
        b, s, h = x.shape
        x2 = x.reshape(b * s, h).contiguous()
        y = torch.empty_like(x2)
        backends.native.C.encoder_post_norm(
            x2.numpy(), y.numpy(), b, s, None if lengths is None else lengths.numpy(), *args
        )
        return y.view(b, s, h)

    def _block(self, x: Tensor, mask: Tensor | None) -> Tensor:
        fast = self._native_block(x, mask)
        if fast is not None:
            return fast
        if self.norm_first:
            h = self._linear(self.out, self._attention(self.norm1(x), mask), residual=x)
            return self._ffn(self.norm2(h), h)
        # Post-norm (BERT): each LayerNorm ends its GEMM's epilogue.
        h = self._linear(self.out, self._attention(x, mask), residual=x, norm=self.norm1)
        return self._ffn(h, h, norm=self.norm2)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.layout == "hf":
            return self._forward_hf(*args, **kwargs)
        return self._forward_torch(*args, **kwargs)

    def _forward_hf(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args: Any, **kwargs: Any
    ) -> Tensor:
        extra = [a for a in args if a is not None]
        extra += [k for k, v in kwargs.items() if v is not None and k not in _HF_IGNORED]
        if extra:
            raise ValueError(
                "EncoderBlock: a fused encoder block takes hidden_states and attention_mask "
                f"only (self-attention, no cache or cross-attention); also got {extra}"
            )
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden:
            raise ValueError(
                f"EncoderBlock: hidden_states must be [batch, seq, {self.hidden}], got "
                f"{tuple(hidden_states.shape)}"
            )
        return self._block(hidden_states, attention_mask)

    def _forward_torch(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        if src.dim() != 3 or src.shape[-1] != self.hidden:
            raise ValueError(
                f"EncoderBlock: src must be 3-D with {self.hidden} features, got {tuple(src.shape)}"
            )
        x = src if self.batch_first else src.transpose(0, 1)
        b, s, _ = x.shape
        mask = _torch_mask(src_mask, src_key_padding_mask, is_causal, b, self.heads, s, x.dtype)
        y = self._block(x, mask)
        return y if self.batch_first else y.transpose(0, 1)

    # --- module protocol ------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes this block holds: int8 weights, scales, biases, LayerNorms."""
        return nbytes_of(self)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, heads={self.heads}, "
            + (f"inner={self.inner}, " if self.inner != self.hidden else "")
            + f"ffn={self.ffn}, "
            f"{'pre' if self.norm_first else 'post'}-norm, activation={self.activation}, "
            f"layout={self.layout}, {'int8' if self.quantized else 'float'}"
        )

    def quantize(self, act_bits: int = 8) -> EncoderBlock:
        """An int8 copy of this (float) block: each projection per-channel int8,
        the activation fused into the first feed-forward GEMM."""
        q = EncoderBlock(**{**self.config(), "quantized": True, "act_bits": act_bits})
        for name in ("qkv", "out", "ffn1", "ffn2"):
            src = getattr(self, name)
            act = self.activation if name == "ffn1" else None
            if isinstance(src, Int8Linear):
                raise ValueError("EncoderBlock.quantize: the block is already int8")
            setattr(q, name, Int8Linear.from_linear(src, act_bits=act_bits, activation=act))
        q.norm1.load_state_dict(self.norm1.state_dict())
        q.norm2.load_state_dict(self.norm2.state_dict())
        return q.to(self.norm1.weight.device).train(self.training)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (what :func:`pykernels.save` records)."""
        return {
            "hidden": self.hidden,
            "heads": self.heads,
            "ffn": self.ffn,
            "norm_first": self.norm_first,
            "activation": self.activation,
            "eps1": self.norm1.eps,
            "eps2": self.norm2.eps,
            "layout": self.layout,
            "batch_first": self.batch_first,
            "qkv_bias": self.qkv.bias is not None,
            "out_bias": self.out.bias is not None,
            "ffn_bias": self.ffn1.bias is not None,
            "quantized": self.quantized,
            "act_bits": self.act_bits,
            "inner": self.inner,
        }


# Keyword arguments Hugging Face layers receive that an encoder's self-attention
# ignores (they are None for an encoder, or only select output options).
_HF_IGNORED = {"output_attentions", "position_ids", "head_mask", "use_cache"}


def _torch_mask(
    src_mask: Tensor | None,
    pad: Tensor | None,
    is_causal: bool,
    b: int,
    heads: int,
    s: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """nn.TransformerEncoderLayer's masks (bool True = masked out, or additive) as one
    SDPA-style mask (bool True = attend, or additive) broadcastable to [B, H, S, S]."""
    parts: list[Tensor] = []
    if is_causal and src_mask is None:
        src_mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    for m, shape in ((src_mask, None), (pad, (b, 1, 1, s))):
        if m is None:
            continue
        if shape is None:  # [S, S] or [B * H, S, S]
            m = m.view(1, 1, s, s) if m.dim() == 2 else m.view(b, heads, s, s)
        else:
            m = m.view(shape)
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype).masked_fill(m, float("-inf"))
        parts.append(m.to(dtype))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


# --- recognizing a block -------------------------------------------------------


@dataclass
class _Spec:
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    out: nn.Linear
    ffn1: nn.Linear
    ffn2: nn.Linear
    norm1: nn.LayerNorm
    norm2: nn.LayerNorm
    act: Any
    heads: int
    norm_first: bool
    layout: str
    batch_first: bool = True


# Attribute paths of the Hugging Face encoder layouts: BERT-family
# (BERT, RoBERTa, MiniLM, ELECTRA, XLM-R), DistilBERT, ViT (three spellings across
# transformers releases).
_HF_PATHS = (
    dict(
        q="attention.self.query",
        k="attention.self.key",
        v="attention.self.value",
        out="attention.output.dense",
        norm1="attention.output.LayerNorm",
        ffn1="intermediate.dense",
        act="intermediate.intermediate_act_fn",
        ffn2="output.dense",
        norm2="output.LayerNorm",
        heads="attention.self.num_attention_heads",
        norm_first=False,
    ),
    dict(
        q="attention.q_lin",
        k="attention.k_lin",
        v="attention.v_lin",
        out="attention.out_lin",
        norm1="sa_layer_norm",
        ffn1="ffn.lin1",
        act="ffn.activation",
        ffn2="ffn.lin2",
        norm2="output_layer_norm",
        heads="attention.n_heads",
        norm_first=False,
    ),
    dict(
        q="attention.attention.query",
        k="attention.attention.key",
        v="attention.attention.value",
        out="attention.output.dense",
        norm1="layernorm_before",
        ffn1="mlp.fc1",
        act="mlp.activation_fn",
        ffn2="mlp.fc2",
        norm2="layernorm_after",
        heads="attention.attention.num_attention_heads",
        norm_first=True,
    ),
    dict(
        q="attention.attention.query",
        k="attention.attention.key",
        v="attention.attention.value",
        out="attention.output.dense",
        norm1="layernorm_before",
        ffn1="intermediate.dense",
        act="intermediate.intermediate_act_fn",
        ffn2="output.dense",
        norm2="layernorm_after",
        heads="attention.attention.num_attention_heads",
        norm_first=True,
    ),
    dict(
        q="attention.q_proj",
        k="attention.k_proj",
        v="attention.v_proj",
        out="attention.o_proj",
        norm1="layernorm_before",
        ffn1="mlp.fc1",
        act="mlp.activation_fn",
        ffn2="mlp.fc2",
        norm2="layernorm_after",
        heads="attention.num_attention_heads",
        norm_first=True,
    ),
)


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _spec(module: nn.Module) -> _Spec | str:
    """The pieces of an encoder layer, or why ``module`` is not one we know."""
    if isinstance(module, nn.TransformerEncoderLayer):
        mha = module.self_attn
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            return "its attention has separate key/value sizes"
        if mha.bias_k is not None or mha.add_zero_attn:
            return "its attention adds key/value biases or a zero attention"
        e = mha.embed_dim
        w, bias = mha.in_proj_weight, mha.in_proj_bias
        qkv = []
        for i in range(3):
            lin = nn.Linear(e, e, bias=bias is not None)
            with torch.no_grad():
                lin.weight.copy_(w[i * e : (i + 1) * e])
                if bias is not None:
                    lin.bias.copy_(bias[i * e : (i + 1) * e])
            qkv.append(lin)
        out = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        out.load_state_dict(mha.out_proj.state_dict())
        return _Spec(
            *qkv,
            out,
            module.linear1,
            module.linear2,
            module.norm1,
            module.norm2,
            module.activation,
            mha.num_heads,
            module.norm_first,
            "torch",
            mha.batch_first,
        )
    if getattr(module, "is_decoder", False) or hasattr(module, "crossattention"):
        return "a decoder layer (cache or cross-attention)"
    for paths in _HF_PATHS:
        got = {name: _get(module, p) for name, p in paths.items() if name != "norm_first"}
        if any(v is None for v in got.values()):
            continue
        return _Spec(**got, norm_first=paths["norm_first"], layout="hf")
    return "not a recognized encoder layout"


def _activation_name(act: Any) -> str | None:
    """Which of our activations ``act`` computes, judged on a probe of values
    (none: it is something else, and the block is not fused)."""
    t = torch.linspace(-8, 8, 4001, dtype=torch.float32)
    try:
        with torch.no_grad():
            got = act(t)
    except Exception:  # noqa: BLE001 - anything that is not an elementwise function
        return None
    if not isinstance(got, Tensor) or got.shape != t.shape:
        return None
    for name in ACTIVATIONS[1:]:
        want = apply_epilogue(t, name, None)
        if torch.allclose(got.float(), want, rtol=1e-5, atol=1e-6):
            return name
    return None


def _check_types(s: _Spec) -> str | None:
    for name in ("q", "k", "v", "out", "ffn1", "ffn2"):
        m = getattr(s, name)
        if type(m) is not nn.Linear:
            return f"its {name} projection is a {type(m).__name__}, not a plain nn.Linear"
        if m._forward_hooks or m._forward_pre_hooks:
            return f"its {name} projection has hooks"
        if not m.weight.is_floating_point() or m.weight.device.type == "meta":
            return f"its {name} projection has no float weight"
    for name in ("norm1", "norm2"):
        m = getattr(s, name)
        if type(m) is not nn.LayerNorm or not m.elementwise_affine or m.bias is None:
            return f"its {name} is not an affine nn.LayerNorm with bias"
    return None


def _float_block(s: _Spec, act: str) -> EncoderBlock:
    h = s.q.in_features
    block = EncoderBlock(
        h,
        int(s.heads),
        s.ffn1.out_features,
        norm_first=s.norm_first,
        activation=act,
        eps1=s.norm1.eps,
        eps2=s.norm2.eps,
        layout=s.layout,
        batch_first=s.batch_first,
        qkv_bias=s.q.bias is not None,
        out_bias=s.out.bias is not None,
        ffn_bias=s.ffn1.bias is not None,
        quantized=False,
        inner=s.q.out_features,
    )
    dev = s.q.weight.device
    block = block.to(dev)
    with torch.no_grad():
        block.qkv.weight.copy_(torch.cat([s.q.weight, s.k.weight, s.v.weight]).float())
        if s.q.bias is not None:
            block.qkv.bias.copy_(torch.cat([s.q.bias, s.k.bias, s.v.bias]).float())
        for name in ("out", "ffn1", "ffn2", "norm1", "norm2"):
            getattr(block, name).load_state_dict(
                {k: v.float() for k, v in getattr(s, name).state_dict().items()}
            )
    return block


def _probe_inputs(block: EncoderBlock, gen: torch.Generator) -> list[tuple[tuple, dict]]:
    """Calls that exercise what a layer of this layout receives: no mask, a padding
    mask (bool and additive for Hugging Face), for 2 sequences of 7 tokens."""
    b, s, h = 2, 7, block.hidden
    x = torch.randn(b, s, h, generator=gen)
    dev = block.norm1.weight.device
    x = x.to(dev)
    if block.layout == "hf":
        keep = torch.ones(b, 1, s, s, dtype=torch.bool, device=dev)
        keep[1, :, :, 4:] = False
        additive = torch.zeros(b, 1, s, s, device=dev).masked_fill(~keep, torch.finfo().min)
        return [((x,), {}), ((x, keep), {}), ((x, additive), {})]
    xs = x if block.batch_first else x.transpose(0, 1)
    pad = torch.zeros(b, s, dtype=torch.bool, device=dev)
    pad[1, 4:] = True
    return [((xs,), {}), ((xs,), {"src_key_padding_mask": pad})]


def fuse_encoder_block(module: nn.Module, act_bits: int = 8) -> EncoderBlock | str:
    """An int8 :class:`EncoderBlock` computing what ``module`` computes, or a string
    saying why ``module`` is not fused (it then keeps the per-Linear path).

    ``module`` must be one of the layouts named in this module's docstring,
    with plain Linears and affine LayerNorms, and an activation that is one of
    ``relu``, ``gelu``, ``gelu_tanh``, ``silu`` on a probe of values; then a
    float EncoderBlock built from its weights must reproduce its output (in
    eval mode, to 1e-4 relative) on random inputs, with and without a padding
    mask, before the int8 block is made. ``module`` is not modified.
    """
    spec = _spec(module)
    if isinstance(spec, str):
        return spec
    why = _check_types(spec)
    if why:
        return why
    act = _activation_name(spec.act)
    if act is None:
        return f"its activation ({spec.act!r}) is not one the int8 epilogue fuses"
    inner = spec.q.out_features
    if (
        inner % int(spec.heads)
        or spec.k.out_features != inner
        or spec.v.out_features != inner
        or spec.out.in_features != inner
        or spec.out.out_features != spec.q.in_features
    ):
        return "its attention's projections do not have one width per head"
    block = _float_block(spec, act)
    gen = torch.Generator().manual_seed(0)
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            for args, kwargs in _probe_inputs(block, gen):
                want = module(*args, **kwargs)
                if not isinstance(want, Tensor):
                    return f"it returns a {type(want).__name__}, not a tensor"
                got = block(*args, **kwargs)
                err = float((got - want.float()).norm() / want.float().norm().clamp_min(1e-30))
                if not err <= 1e-4:
                    return f"a fused block does not reproduce it (relative error {err:.2g})"
    except Exception as e:  # noqa: BLE001 - a layer that cannot be called this way
        return f"calling it as an encoder layer failed ({type(e).__name__}: {e})"
    finally:
        module.train(was)
    return block.quantize(act_bits).train(was)
