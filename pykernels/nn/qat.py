"""QATLinear: an ``nn.Linear`` that trains through int8 fake quantization."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ._module import nbytes_of
from .int8 import MODES, Int8Linear


class QATLinear(nn.Module):
    """``y = fq(x) @ fq(W).T + b``: a float Linear that sees int8 rounding while it trains.

    ``fq`` is :func:`pykernels.ops.fake_quantize_per_row`: the weight is
    fake-quantized per output channel and, in ``mode="dynamic"`` (W8A8), each
    row (token) of x too, with exactly the scales and rounding
    :class:`Int8Linear` uses; ``mode="weight_only"`` (W8A16) leaves x in
    float. Gradients flow by the straight-through estimator (passed where the
    value was inside the clipping range). The parameters are a plain float
    ``weight [N, K]`` and ``bias [N]``, so optimizers, ``state_dict`` and
    checkpoints work as for ``nn.Linear``. :meth:`to_int8` gives the
    :class:`Int8Linear` that computes the same outputs (up to float rounding
    of the final sum). Build it with :meth:`from_linear` or
    :func:`pykernels.qat.prepare`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "dynamic",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"QATLinear: {name} must be a non-negative int, got {v!r}")
        if mode not in MODES:
            raise ValueError(f"QATLinear: mode must be one of {MODES}, got {mode!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        ref = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight = ref.weight
        self.bias = ref.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "dynamic") -> QATLinear:
        """Wraps ``linear``'s own parameters (shared, not copied, as torch.ao's
        ``prepare_qat`` does), so training the QAT layer trains them."""
        if type(linear) is not nn.Linear:
            raise TypeError(
                f"QATLinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}"
            )
        if not linear.weight.is_floating_point():
            raise ValueError(
                f"QATLinear.from_linear: linear.weight must be float, got {linear.weight.dtype}"
            )
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            mode=mode,
            device="meta",
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def fake_quantized_weight(self) -> Tensor:
        """The weight as the int8 layer will hold it: int8 * scale, differentiable (STE)."""
        return ops.fake_quantize_per_row(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        w = self.fake_quantized_weight()
        if self.mode == "dynamic":
            x = ops.fake_quantize_per_row(x)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the (float, unquantized) trained parameters."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def to_int8(self) -> Int8Linear:
        """The :class:`Int8Linear` (same mode) this layer was trained to become."""
        return Int8Linear.from_linear(self.to_linear(), mode=self.mode)

    def nbytes(self) -> int:
        """Bytes this layer holds (float parameters: QAT trains in float)."""
        return nbytes_of(self)

    def extra_repr(self) -> str:
        act = "per-token int8" if self.mode == "dynamic" else "float"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode}, "
            f"fake-quant: weight=per-channel int8, activations={act}"
        )
