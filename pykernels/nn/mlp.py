"""Fused gated MLPs (Llama, Mistral, Qwen, Gemma): ``down(act(gate(x)) * up(x))``
with the gate and up projections as one int8 GEMM whose epilogue forms the
product (:func:`pykernels.ops.int8_linear_gated`), and the down projection an
:class:`Int8Linear`.

:func:`fuse_gated_mlp` recognizes such a block by its structure, not its class
name: a module whose direct children are exactly three plain ``nn.Linear``
(two of the same shape, the third reading their width) plus parameter-free
activation modules, and which computes ``c(act(a(x)) * b(x))`` for one of our
activations on a probe of random inputs (checked against a float copy, so a
block that does something else is never fused).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import _checks
from ..ops.int8 import ACTIVATIONS, Int8GatedWeight, apply_epilogue, check_activation
from ._module import nbytes_of
from .int8 import Int8Linear, check_int8_options


class Int8GatedMLP(nn.Module):
    """``down(act(x W_g^T + b_g) * (x W_u^T + b_u)) (+ residual)`` in int8 (dynamic W8A8).

    The gate and up weights (``[inner, hidden]`` each, per-channel int8) are
    stored stacked as ``gate_up_weight [2 * inner, hidden]`` (gate rows first)
    with ``gate_up_scale`` and ``gate_up_bias``; the kernel reads them
    interleaved and packed (rebuilt after loading or moving). x is quantized
    once for both, and the product is formed in the GEMM's epilogue. ``down``
    is an :class:`Int8Linear`. Build it with :meth:`from_linears` or
    :func:`fuse_gated_mlp`. Inference only.
    """

    def __init__(
        self,
        hidden: int,
        inner: int,
        out_features: int | None = None,
        gate_up_bias: bool = False,
        down_bias: bool = False,
        activation: str = "silu",
        act_bits: int = 8,
    ) -> None:
        super().__init__()
        fn = "Int8GatedMLP"
        out_features = hidden if out_features is None else out_features
        for name, v in (("hidden", hidden), ("inner", inner), ("out_features", out_features)):
            _checks.check_int(fn, name, v, 1)
        gate_up_bias = _checks.check_bool(fn, "gate_up_bias", gate_up_bias)
        down_bias = _checks.check_bool(fn, "down_bias", down_bias)
        self.act_bits = check_int8_options(fn, "dynamic", act_bits)
        self.activation = check_activation(fn, activation)
        self.hidden, self.inner, self.out_features = hidden, inner, out_features
        self.register_buffer("gate_up_weight", torch.zeros(2 * inner, hidden, dtype=torch.int8))
        self.register_buffer("gate_up_scale", torch.zeros(2 * inner))
        if gate_up_bias:
            self.register_buffer("gate_up_bias", torch.zeros(2 * inner))
        else:
            self.gate_up_bias = None
        self.down = Int8Linear(inner, out_features, bias=down_bias, act_bits=self.act_bits)
        self._packed: Int8GatedWeight | None = None

    @classmethod
    def from_linears(
        cls,
        gate: nn.Linear,
        up: nn.Linear,
        down: nn.Linear,
        activation: str = "silu",
        act_bits: int = 8,
    ) -> Int8GatedMLP:
        """Quantizes ``gate``, ``up`` and ``down`` per output channel (as
        :meth:`Int8Linear.from_linear`). The Linears are not modified."""
        fn = "Int8GatedMLP.from_linears"
        for name, lin in (("gate", gate), ("up", up), ("down", down)):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{fn}: {name} must be an nn.Linear, got {type(lin).__name__}")
        if gate.weight.shape != up.weight.shape:
            raise ValueError(
                f"{fn}: gate and up must have the same shape, got {tuple(gate.weight.shape)} "
                f"and {tuple(up.weight.shape)}"
            )
        if (gate.bias is None) != (up.bias is None):
            raise ValueError(f"{fn}: gate and up must both have a bias or neither")
        if down.in_features != gate.out_features:
            raise ValueError(
                f"{fn}: down must read gate's {gate.out_features} outputs, got in_features "
                f"{down.in_features}"
            )
        layer = cls(
            gate.in_features,
            gate.out_features,
            down.out_features,
            gate_up_bias=gate.bias is not None,
            down_bias=down.bias is not None,
            activation=activation,
            act_bits=act_bits,
        )
        gu = Int8Linear.from_linear(_stack(gate, up))
        with torch.no_grad():
            layer.gate_up_weight.copy_(gu.weight_int8())
            layer.gate_up_scale.copy_(gu.weight_scale)
            if gu.bias is not None:
                layer.gate_up_bias.copy_(gu.bias)
        layer.down = Int8Linear.from_linear(down, act_bits=act_bits)
        return layer.to(gate.weight.device)

    def dequantized_weight(self) -> Tensor:
        """The float32 ``[2 * inner, hidden]`` gate and up weights (gate rows first)
        this block computes with: int8 * scale."""
        return self.gate_up_weight.float() * self.gate_up_scale[:, None]

    def _weight(self) -> Int8GatedWeight:
        p = self._packed
        if p is None or p.packed.device != self.gate_up_weight.device:
            p = ops.pack_int8_gated_weight(
                self.gate_up_weight, self.gate_up_scale, self.gate_up_bias
            )
            self._packed = p
        return p

    def gated(self, x: Tensor) -> Tensor:
        """``act(x W_g^T + b_g) * (x W_u^T + b_u)``: the input of ``down``."""
        return ops.int8_linear_gated(
            x, self._weight(), activation=self.activation, act_bits=self.act_bits
        )

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.down(self.gated(x), residual)

    def nbytes(self) -> int:
        """Bytes this block holds (stored weights, scales, biases; not the packed cache)."""
        return nbytes_of(self)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, inner={self.inner}, out_features={self.out_features}, "
            f"activation={self.activation}, "
            + (f"act_bits={self.act_bits}, " if self.act_bits != 8 else "")
            + "int8 gate+up fused"
        )

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (what :func:`pykernels.save` records)."""
        return {
            "hidden": self.hidden,
            "inner": self.inner,
            "out_features": self.out_features,
            "gate_up_bias": self.gate_up_bias is not None,
            "down_bias": self.down.bias is not None,
            "activation": self.activation,
            "act_bits": self.act_bits,
        }

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        self._packed = None
        for name in ("gate_up_scale", "gate_up_bias"):
            t = getattr(self, name)
            if t is not None and t.dtype != torch.float32:
                setattr(self, name, t.float())
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[override]
        self._packed = None
        super()._load_from_state_dict(*args, **kwargs)


def _stack(gate: nn.Linear, up: nn.Linear) -> nn.Linear:
    """One Linear whose rows are gate's, then up's (a float copy)."""
    lin = nn.Linear(gate.in_features, 2 * gate.out_features, bias=gate.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(torch.cat([gate.weight, up.weight]).float())
        if gate.bias is not None:
            lin.bias.copy_(torch.cat([gate.bias, up.bias]).float())
    return lin.to(gate.weight.device)


def gated_mlp_linears(module: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | str:
    """The three Linears of a gated-MLP-shaped module, in the order the children
    are declared, or a string saying why ``module`` is not one (structure only)."""
    linears, other = [], []
    for child in module.children():
        (linears if isinstance(child, nn.Linear) else other).append(child)
    if len(linears) != 3:
        return "it does not hold exactly three Linears"
    if any(type(lin) is not nn.Linear for lin in linears):
        return "a Linear subclass may compute something else"
    if any(any(True for _ in c.parameters()) for c in other):
        return "it holds other modules with parameters"
    return linears[0], linears[1], linears[2]


def _candidates(
    lins: tuple[nn.Linear, nn.Linear, nn.Linear],
) -> list[tuple[nn.Linear, nn.Linear, nn.Linear]]:
    """(gate, up, down) orders whose shapes fit."""
    out = []
    for d in range(3):
        a, b = (lins[i] for i in range(3) if i != d)
        down = lins[d]
        if a.weight.shape == b.weight.shape and down.in_features == a.out_features:
            out += [(a, b, down), (b, a, down)]
    return out


def fuse_gated_mlp(module: nn.Module, act_bits: int = 8) -> Int8GatedMLP | str:
    """An :class:`Int8GatedMLP` computing what ``module`` computes, or a string
    saying why it is not fused (it then keeps the per-Linear path).

    ``module`` must hold exactly three plain Linears (see the module docstring)
    and compute ``down(act(gate(x)) * up(x))`` for one of our activations: each
    shape-compatible assignment of the Linears and each activation is tried
    on random inputs against ``module``'s own output (in eval mode, to 1e-4
    relative), and the first that reproduces it is quantized. ``module`` is not
    modified."""
    lins = gated_mlp_linears(module)
    if isinstance(lins, str):
        return lins
    cands = _candidates(lins)
    if not cands:
        return "its Linears do not have a gated MLP's shapes"
    hidden = cands[0][0].in_features
    w = cands[0][0].weight
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, hidden, generator=gen) * 2).to(w.device, torch.float32)
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            want = module(x.to(w.dtype))
            if not isinstance(want, Tensor) or want.shape[:-1] != x.shape[:-1]:
                return "it does not return one tensor per token"
            want = want.float()
            scale = want.norm().clamp_min(1e-30)
            for gate, up, down in cands:
                g, u = gate(x.to(w.dtype)).float(), up(x.to(w.dtype)).float()
                for act in ACTIVATIONS[1:]:
                    got = down((apply_epilogue(g, act, None) * u).to(w.dtype)).float()
                    if float((got - want).norm() / scale) <= 1e-4:
                        return Int8GatedMLP.from_linears(gate, up, down, act, act_bits).train(was)
    except Exception as e:  # noqa: BLE001 - a module that cannot be called on one tensor
        return f"calling it on one tensor failed ({type(e).__name__}: {e})"
    finally:
        module.train(was)
    return "it does not compute down(act(gate(x)) * up(x)) for a fused activation"
