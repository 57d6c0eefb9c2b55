"""Int4Linear: a drop-in group-wise int4 replacement for ``nn.Linear`` in inference."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import _checks
from ..ops.int4 import GROUP_SIZES, MODES, check_group_size, check_mode, check_quantized
from ._module import nbytes_of

__all__ = ["GROUP_SIZES", "Int4Linear", "MODES"]


class Int4Linear(nn.Module):
    """``y = x @ W.T + b`` with W stored as group-wise 4-bit codes.

    Every ``group_size`` (32, 64 or 128) consecutive input columns of an output
    row share one float32 scale and one integer zero point in 0..15:
    ``W[n, k] ~ (q[n, k] - zeros[n, k // g]) * scales[n, k // g]`` (format in
    :mod:`pykernels.ops.int4`). ``mode="auto"`` (the default) runs the
    weight-only kernel for calls of at most
    :data:`pykernels.ops.int4.AUTO_WEIGHT_ONLY_ROWS` rows (decode) and W4A8
    above (prefill, batches), each call with the numerics of the mode it ran.
    ``mode="dynamic"`` (W4A8) quantizes each row
    of x to int8 on the fly and sums each group exactly in int32 (the faster
    mode from a few rows up); ``mode="weight_only"`` (W4A16) keeps x in float
    and dequantizes the weight in registers (the decode case: one to a few
    rows, where the time is the weight's half a byte per value read from
    memory; differentiable in x, so adapters can train over it).

    Build it with :meth:`from_linear` (round-to-nearest) or
    :meth:`from_quantized` (codes calibrated elsewhere, e.g. GPTQ). Buffers,
    all persistent, are the format itself: ``packed`` uint8 ``[N, K // 2]``,
    ``scales`` float32 and ``zeros`` uint8 ``[N, K // g]``, and ``bias``
    float32 ``[N]`` (or None); the saved file does not depend on the CPU or
    the kernel version. The native CPU kernels read this layout as it is.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 128,
        symmetric: bool = False,
        mode: str = "auto",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        fn = "Int4Linear"
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            _checks.check_int(fn, name, v, 0)
        bias = _checks.check_bool(fn, "bias", bias)
        self.group_size = check_group_size(fn, group_size, int(in_features))
        self.symmetric = _checks.check_bool(fn, "symmetric", symmetric)
        self.mode = check_mode(fn, mode)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        n, k, g = self.out_features, self.in_features, self.group_size
        zero = 8 if self.symmetric else 0
        self.register_buffer("packed", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(n, k // g, dtype=torch.float32, device=device))
        self.register_buffer(
            "zeros", torch.full((n, k // g), zero, dtype=torch.uint8, device=device)
        )
        if bias:
            self.register_buffer("bias", torch.zeros(n, dtype=torch.float32, device=device))
        else:
            self.bias = None

    # --- construction ---------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 128,
        symmetric: bool = False,
        mode: str = "auto",
    ) -> Int4Linear:
        """Round-to-nearest int4 of ``linear``'s weight
        (:func:`pykernels.ops.int4_quantize_weight`); the bias is kept in float32.
        ``in_features`` must be a multiple of ``group_size`` (ValueError naming
        it); ``linear`` is not modified."""
        fn = "Int4Linear.from_linear"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{fn}: linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if not w.is_floating_point() or w.device.type == "meta":
            raise ValueError(
                f"{fn}: linear.weight must be a float tensor with data, got {w.dtype} on {w.device}"
            )
        check_group_size(fn, group_size, linear.in_features)
        check_mode(fn, mode)
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{fn}: linear.weight holds NaN or inf")
        with torch.no_grad():
            packed, scales, zeros = ops.int4_quantize_weight(w.float(), group_size, symmetric)
        b = None if linear.bias is None else linear.bias.detach()
        layer = cls.from_quantized(packed, scales, zeros, group_size, bias=b, mode=mode)
        layer.symmetric = bool(symmetric)
        return layer

    @classmethod
    def from_quantized(
        cls,
        packed: Tensor,
        scales: Tensor,
        zeros: Tensor,
        group_size: int,
        bias: Tensor | None = None,
        mode: str = "auto",
    ) -> Int4Linear:
        """A layer over an int4 weight already in the format (calibrated codes
        from GPTQ or another tool). The tensors are copied; ``symmetric`` is
        recorded as whether every zero point is 8."""
        fn = "Int4Linear.from_quantized"
        n, k, g = check_quantized(fn, packed, scales, zeros, group_size)
        check_mode(fn, mode)
        _checks.check_bias(fn, bias, n)
        if bias is not None and bias.device != packed.device:
            raise ValueError(f"{fn}: bias is on {bias.device} but packed is on {packed.device}")
        symmetric = bool((zeros == 8).all()) if zeros.numel() else False
        layer = cls(k, n, bias is not None, g, symmetric, mode, device=packed.device)
        with torch.no_grad():
            layer.packed.copy_(packed)
            layer.scales.copy_(scales)
            layer.zeros.copy_(zeros)
            if bias is not None:
                layer.bias.copy_(bias.float())
        return layer

    def dequantized_weight(self) -> Tensor:
        """The float32 ``[N, K]`` weight this layer computes with."""
        return ops.int4_dequantize_weight(self.packed, self.scales, self.zeros, self.group_size)

    # --- forward ----------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        return ops.int4_linear(
            x, self.packed, self.scales, self.zeros, self.group_size, self.bias, self.mode
        )

    # --- module protocol ---------------------------------------------------

    def nbytes(self) -> int:
        """Bytes this layer holds: codes (half a byte each), scales, zero points, bias."""
        return nbytes_of(self)

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode}, "
            f"weight=int4 g{self.group_size} {kind}, nbytes={self.nbytes()}"
        )

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        # .half() / .to(dtype) convert float buffers; the kernels want float32
        # scales, and the bias is kept in float32 (converted per call anyway).
        if self.scales.dtype != torch.float32:
            self.scales = self.scales.float()
        if self.bias is not None and self.bias.dtype != torch.float32:
            self.bias = self.bias.float()
        return self

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if not error_msgs and prefix + "zeros" in state_dict and self.zeros.numel():
            if bool((self.zeros > 15).any()):
                error_msgs.append(f"{prefix}zeros: zero points must lie in 0..15")
