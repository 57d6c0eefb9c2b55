"""int8 against its peers on PERFORMANCE.md's shapes (M x K x N, Y = X W^T).

* ``gemm``: ``pk.ops.int8_gemm`` vs ``torch._int_mm`` (both exact int32).
* ``linear``: ``pk.nn.Int8Linear`` forward, activation quantization and
  dequantization included, vs ``torch.ao.quantization.quantize_dynamic``
  with each engine (x86, fbgemm, onednn; ratios are over the fastest in the
  same run), bf16 and fp32 ``F.linear``. Weight-only mode is shown where it
  is meant to be used (M <= 16); ``act_bits=7`` (the opt-in 7-bit
  activations: three instructions per multiply-add on AVX2, not four)
  everywhere.
* ``linear cold``: the same with several weight copies rotated per call (as
  a model's many layers are), so no weight is still in cache.
* ``gated mlp``: a Llama-style MLP ``down(silu(gate(x)) * up(x))`` (M x hidden
  x inner): :class:`pykernels.nn.Int8GatedMLP` (gate and up in one GEMM, the
  product in its epilogue) against the same three Int8Linears unfused, the
  MLP through quantize_dynamic, and bf16 / fp32.
* ``linear+norm``: a post-norm block's end ``LayerNorm(x W^T + b + r)``:
  ``Int8Linear(x, r, norm)`` (LayerNorm in the epilogue) against Int8Linear
  then ``F.layer_norm``, quantize_dynamic + add + LayerNorm, and fp32.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..nn import Int8GatedMLP, Int8Linear
from . import Case, inference

SHAPES = [
    (1, 4096, 4096),
    (16, 4096, 4096),
    (128, 4096, 4096),
    (512, 1024, 1024),
    (2048, 768, 3072),
]
ENGINES = ("x86", "fbgemm", "onednn")
# M x hidden x inner: Llama-style MLPs (the 1B-class decoder of issue 21; M = 1
# and 16 decode, 128 prefill) and a smaller one.
GATED_SHAPES = [(1, 2048, 5632), (16, 2048, 5632), (128, 2048, 5632), (512, 1024, 2816)]
# M x K x N of a block's last GEMM + residual + LayerNorm: MiniLM's and BERT-base's FFN2
# at 32 x 128 and 8 x 128 tokens.
NORM_SHAPES = [(4096, 1536, 384), (1024, 3072, 768)]
COLD_COPIES = 4  # 4 x 16 MiB of int8 weights (64 MiB fp32 each) > the 32 MiB L3 here


def engines() -> list[str]:
    """The quantize_dynamic engines this torch build supports, of x86, fbgemm, onednn."""
    return [e for e in ENGINES if e in torch.backends.quantized.supported_engines]


def quantize_dynamic_layer(lin: torch.nn.Linear, engine: str) -> Callable[[Tensor], Tensor]:
    """A quantize_dynamic copy of `lin` packed with `engine`, as a call that runs it there.

    The peer of Int8Linear in the benchmarks and in the accuracy test.
    """
    from torch.ao.quantization import quantize_dynamic

    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = quantize_dynamic(
                torch.nn.Sequential(copy.deepcopy(lin)), {torch.nn.Linear}, dtype=torch.qint8
            )
    finally:
        torch.backends.quantized.engine = previous

    def run(x: Tensor) -> Tensor:
        before = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            return q(x)
        finally:
            torch.backends.quantized.engine = before

    return run


def _rotating(calls):
    """One callable that runs calls[0], calls[1], ... in turn."""
    state = {"i": 0}

    def run():
        i = state["i"]
        state["i"] = (i + 1) % len(calls)
        return calls[i]()

    return run


def _linear_case(m: int, k: int, n: int, copies: int, reps: int, gen) -> Case:
    lins = []
    for _ in range(copies):
        lin = torch.nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
        lins.append(lin)
    x = torch.randn(m, k, generator=gen)
    xb = x.bfloat16()
    impls = {}
    with torch.no_grad():
        w32 = [(lin.weight.detach(), lin.bias.detach()) for lin in lins]
        w16 = [(w.bfloat16(), b.bfloat16()) for w, b in w32]
        impls["fp32 F.linear"] = _rotating([lambda w=w, b=b: F.linear(x, w, b) for w, b in w32])
        impls["bf16 F.linear"] = _rotating([lambda w=w, b=b: F.linear(xb, w, b) for w, b in w16])
        for engine in engines():
            qs = [quantize_dynamic_layer(lin, engine) for lin in lins]
            impls[f"quantize_dynamic {engine}"] = _rotating([lambda q=q: q(x) for q in qs])
        dyn = [Int8Linear.from_linear(lin) for lin in lins]
        impls["pk Int8Linear"] = _rotating([lambda q=q: q(x) for q in dyn])
        # Its own copies: the cold cases must not find the fp32 row's weights
        # still in L3.
        dynb = [Int8Linear.from_linear(lin) for lin in lins] if copies > 1 else dyn
        impls["pk Int8Linear bf16"] = _rotating([lambda q=q: q(xb) for q in dynb])
        dyn7 = [Int8Linear.from_linear(lin, act_bits=7) for lin in lins]
        impls["pk Int8Linear act_bits=7"] = _rotating([lambda q=q: q(x) for q in dyn7])
        if m <= 16:
            wo = [Int8Linear.from_linear(lin, mode="weight_only") for lin in lins]
            impls["pk Int8Linear weight_only"] = _rotating([lambda q=q: q(x) for q in wo])
    label = "linear cold" if copies > 1 else "linear"
    return Case(
        family="int8",
        name=f"{label} {m}x{k}x{n}",
        device="cpu",
        impls={name: inference(fn) for name, fn in impls.items()},
        baseline=tuple(f"quantize_dynamic {e}" for e in engines()),
        bytes_moved=m * k * 4 + n * k + m * n * 4,
        reps=reps,
        notes={"copies": str(copies)},
    )


class _MLP(torch.nn.Module):
    def __init__(self, hidden: int, inner: int, gen) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inner, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inner, bias=False)
        self.down_proj = torch.nn.Linear(inner, hidden, bias=False)
        with torch.no_grad():
            for lin in (self.gate_proj, self.up_proj, self.down_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _gated_case(m: int, hidden: int, inner: int, reps: int, gen) -> Case:
    mlp = _MLP(hidden, inner, gen).eval()
    x = torch.randn(m, hidden, generator=gen)
    impls = {"fp32": lambda: mlp(x)}
    mlp16 = copy.deepcopy(mlp).bfloat16()
    xb = x.bfloat16()
    impls["bf16"] = lambda: mlp16(xb)
    for engine in engines():
        qs = [quantize_dynamic_layer(lin, engine) for lin in mlp.children()]
        impls[f"quantize_dynamic {engine}"] = lambda qs=qs: qs[2](F.silu(qs[0](x)) * qs[1](x))
    g, u, d = (Int8Linear.from_linear(lin) for lin in mlp.children())
    impls["pk Int8Linear x3 unfused"] = lambda: d(F.silu(g(x)) * u(x))
    fused = Int8GatedMLP.from_linears(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    impls["pk Int8GatedMLP"] = lambda: fused(x)
    return Case(
        family="int8",
        name=f"gated mlp {m}x{hidden}x{inner}",
        device="cpu",
        impls={name: inference(fn) for name, fn in impls.items()},
        baseline=tuple(f"quantize_dynamic {e}" for e in engines()),
        bytes_moved=3 * hidden * inner + 2 * m * hidden * 4,
        reps=reps,
    )


def _norm_case(m: int, k: int, n: int, reps: int, gen) -> Case:
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.02)
    ln = torch.nn.LayerNorm(n)
    x, r = torch.randn(m, k, generator=gen), torch.randn(m, n, generator=gen)
    impls = {"fp32": lambda: ln(lin(x) + r)}
    for engine in engines():
        q = quantize_dynamic_layer(lin, engine)
        impls[f"quantize_dynamic {engine}"] = lambda q=q: ln(q(x) + r)
    il = Int8Linear.from_linear(lin)
    impls["pk Int8Linear + F.layer_norm"] = lambda: ln(il(x, r))
    impls["pk Int8Linear norm fused"] = lambda: il(x, r, ln)
    return Case(
        family="int8",
        name=f"linear+norm {m}x{k}x{n}",
        device="cpu",
        impls={name: inference(fn) for name, fn in impls.items()},
        baseline=tuple(f"quantize_dynamic {e}" for e in engines()),
        bytes_moved=m * k * 4 + n * k + 2 * m * n * 4,
        reps=reps,
    )


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []  # no CUDA int8 kernels yet
    gen = torch.Generator().manual_seed(0)
    shapes = SHAPES[:3] if quick else SHAPES
    reps = 3 if quick else 7
    out = []
    for m, k, n in shapes:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
        bt = b.t()
        out.append(
            Case(
                family="int8",
                name=f"gemm {m}x{k}x{n}",
                device=device,
                impls={
                    "torch._int_mm": lambda a=a, bt=bt: torch._int_mm(a, bt),
                    "pk int8_gemm": lambda a=a, b=b: ops.int8_gemm(a, b),
                },
                baseline="torch._int_mm",
                bytes_moved=m * k + n * k + 4 * m * n,
                reps=reps,
            )
        )
    for m, k, n in shapes:
        out.append(_linear_case(m, k, n, 1, reps, gen))
    if not quick:
        for m, k, n in SHAPES[:2]:  # where the weight, not the arithmetic, is the cost
            out.append(_linear_case(m, k, n, COLD_COPIES, reps, gen))
    for m, h, i in GATED_SHAPES[1:3] if quick else GATED_SHAPES:
        out.append(_gated_case(m, h, i, reps, gen))
    for m, k, n in NORM_SHAPES[:1] if quick else NORM_SHAPES:
        out.append(_norm_case(m, k, n, reps, gen))
    return out
