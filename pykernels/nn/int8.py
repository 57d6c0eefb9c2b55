"""Int8Linear: a drop-in int8 replacement for ``nn.Linear`` in inference, and
``quantize_int8``, which swaps it into a model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import _checks
from ..ops.int8 import Int8PackedWeight, apply_epilogue, check_act_bits, check_activation
from ._module import nbytes_of

MODES = ("dynamic", "weight_only")


def norm_spec(fn: str, norm: nn.Module | None, n: int) -> tuple:
    """``(kind, weight, bias, eps)`` of a row norm module for the fused epilogue:
    an ``nn.LayerNorm`` or ``nn.RMSNorm`` over the last ``n`` features (or None)."""
    if norm is None:
        return ("none", None, None, 1e-5)
    if isinstance(norm, nn.LayerNorm):
        kind, eps = "layer", norm.eps
    elif isinstance(norm, nn.RMSNorm):
        kind = "rms"
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
    else:
        raise TypeError(
            f"{fn}: norm must be an nn.LayerNorm, an nn.RMSNorm or None, got {type(norm).__name__}"
        )
    if tuple(norm.normalized_shape) != (n,):
        raise ValueError(
            f"{fn}: norm must normalize the {n} output features, got normalized_shape "
            f"{tuple(norm.normalized_shape)}"
        )
    w = norm.weight.detach() if norm.weight is not None else None
    b = getattr(norm, "bias", None)
    return (kind, w, None if b is None else b.detach(), float(eps))


def check_int8_options(fn: str, mode: object, act_bits: object) -> int:
    """The ``mode`` / ``act_bits`` pair an Int8Linear takes, checked under ``fn``'s name
    (ValueError / TypeError); returns ``act_bits`` as an int."""
    if mode not in MODES:
        raise ValueError(f"{fn}: mode must be one of {MODES}, got {mode!r}")
    bits = check_act_bits(fn, act_bits)
    if bits != 8 and mode != "dynamic":
        raise ValueError(
            f"{fn}: act_bits={bits} needs mode='dynamic' (weight_only keeps x in float)"
        )
    return bits


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W stored as int8 and one float32 scale per output channel.

    ``mode="dynamic"`` (W8A8) quantizes each row of x on the fly and runs an
    exact int8 GEMM (:func:`pykernels.ops.int8_linear`); ``mode="weight_only"``
    (W8A16) keeps x in float and dequantizes W in registers
    (:func:`pykernels.ops.int8_weight_linear`), the more accurate choice for
    one to a few rows. Build it with :meth:`from_linear`.

    ``act_bits=7`` (dynamic mode, opt-in) quantizes each row of x to 7 bits
    over ``[min(row, 0), max(row, 0)]`` (:func:`pykernels.ops.quantize_per_row`
    with ``bits=7``), as quantize_dynamic's ``reduce_range`` does: on CPUs
    with AVX2 but no VNNI a multiply-add then costs three instructions, not
    four (about 1.3x at M >= 16); as accurate for one-sided inputs (after
    ReLU/GELU), about one bit coarser for symmetric ones. Results are the
    same on every CPU and backend for either setting.

    ``activation`` (``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or None)
    is applied to the output inside the kernel, and ``forward(x, residual)``
    adds ``residual`` after it (``act(x W^T + b) + residual``): the fused
    epilogue of :func:`pykernels.ops.int8_linear`, which
    :func:`pykernels.compress` uses for the feed-forward and output
    projections of the transformer blocks it fuses.

    Storage: in dynamic mode the weight is held only in the packed layout the
    kernels read (prepacked once, here); in weight-only mode it is the int8
    ``[N, K]`` matrix itself. ``state_dict`` always stores the plain int8
    ``weight [N, K]``, ``weight_scale [N]`` (float32) and ``bias``, whatever
    the layout, and loading repacks: the saved file does not depend on the
    CPU, the device or the kernel version. Inference only: backward raises.
    """

    act_bits: int = 8  # class default: a layer pickled before act_bits existed
    activation: str = "none"  # likewise, before the fused epilogue

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "dynamic",
        device: torch.device | str | None = None,
        act_bits: int = 8,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            _checks.check_int("Int8Linear", name, v, 0)
        bias = _checks.check_bool("Int8Linear", "bias", bias)
        act_bits = check_int8_options("Int8Linear", mode, act_bits)
        self.activation = check_activation("Int8Linear", activation)
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.act_bits = act_bits
        w = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self._set_weight(w)
        self.register_buffer(
            "weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device)
        )
        if bias:
            self.register_buffer(
                "bias", torch.zeros(out_features, dtype=torch.float32, device=device)
            )
        else:
            self.bias = None

    # --- weight storage -------------------------------------------------

    def _set_weight(self, w_q: Tensor) -> None:
        """Stores an int8 [N, K] weight in the layout this mode and device read
        (non-persistent buffers).

        Dynamic mode on the CPU keeps only the packed layout the native kernels
        read; everywhere else (weight-only mode, or a GPU, where torch ops read
        the row-major weight) it is the [N, K] matrix itself.
        """
        for name in ("weight", "weight_packed", "weight_comp"):
            self._buffers.pop(name, None)
        if self._packs(w_q.device):
            p = ops.pack_int8_weight(w_q)
            self.register_buffer("weight_packed", p.packed, persistent=False)
            self.register_buffer("weight_comp", p.comp, persistent=False)
        else:
            self.register_buffer("weight", w_q.contiguous(), persistent=False)

    def _packs(self, device: torch.device) -> bool:
        return self.mode == "dynamic" and device.type == "cpu"

    def _packed(self) -> Int8PackedWeight:
        return Int8PackedWeight(
            self.weight_packed, self.weight_comp, self.out_features, self.in_features
        )

    def weight_int8(self) -> Tensor:
        """The int8 [N, K] weight (unpacked from the kernel layout when needed)."""
        if "weight_packed" in self._buffers:
            return ops.unpack_int8_weight(self._packed())
        return self.weight

    def dequantized_weight(self) -> Tensor:
        """The float32 [N, K] weight this layer computes with: int8 * scale."""
        return self.weight_int8().float() * self.weight_scale[:, None]

    # --- construction ---------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        mode: str = "dynamic",
        act_bits: int = 8,
        activation: str | None = None,
    ) -> Int8Linear:
        """Quantizes ``linear``'s weight symmetrically per output channel.

        ``scale[n] = max|W[n, :]| / 127`` and ``W_q = round_half_even(W / scale)``
        (one scale per row beats one per tensor when some rows hold outliers).
        The bias is kept in float32. ``act_bits`` and ``activation`` (applied
        after the linear, fused): see the class. ``linear`` is not modified.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"Int8Linear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}"
            )
        w = linear.weight.detach()
        if not w.is_floating_point() or w.device.type == "meta":
            raise ValueError(
                "Int8Linear.from_linear: linear.weight must be a float tensor with data, "
                f"got {w.dtype} on {w.device}"
            )
        if not torch.isfinite(w).all():
            raise ValueError("Int8Linear.from_linear: linear.weight holds NaN or inf")
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            mode=mode,
            device=w.device,
            act_bits=act_bits,
            activation=activation,
        )
        with torch.no_grad():
            if w.numel():
                w_q, scale = ops.quantize_per_row(w.float())
            else:
                w_q = torch.zeros(w.shape, dtype=torch.int8, device=w.device)
                scale = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
            layer._set_weight(w_q)
            layer.weight_scale.copy_(scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().float())
        return layer

    @classmethod
    def from_quantized(
        cls,
        w_q: Tensor,
        w_scale: Tensor,
        bias: Tensor | None = None,
        mode: str = "dynamic",
        act_bits: int = 8,
        activation: str | None = None,
    ) -> Int8Linear:
        """A layer holding codes chosen elsewhere (GPTQ): ``w_q`` int8 ``[N, K]`` in
        [-127, 127], ``w_scale`` float ``[N]``, computing ``x @ (w_q * w_scale).T + bias``."""
        fn = "Int8Linear.from_quantized"
        if not isinstance(w_q, Tensor) or w_q.dtype != torch.int8 or w_q.dim() != 2:
            raise TypeError(f"{fn}: w_q must be a 2-D int8 tensor")
        n, k = w_q.shape
        if not isinstance(w_scale, Tensor) or tuple(w_scale.shape) != (n,):
            raise ValueError(f"{fn}: w_scale must be a float tensor of shape [{n}]")
        if not w_scale.is_floating_point() or not bool(torch.isfinite(w_scale).all()):
            raise ValueError(f"{fn}: w_scale must be finite floats")
        if w_q.numel() and int(w_q.min()) < -127:
            raise ValueError(f"{fn}: w_q must be in [-127, 127] (-128 is not symmetric)")
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (n,)):
            raise ValueError(f"{fn}: bias must be None or a tensor of shape [{n}]")
        layer = cls(
            k,
            n,
            bias=bias is not None,
            mode=mode,
            device=w_q.device,
            act_bits=act_bits,
            activation=activation,
        )
        with torch.no_grad():
            layer._set_weight(w_q.contiguous())
            layer.weight_scale.copy_(w_scale.float())
            if bias is not None:
                layer.bias.copy_(bias.detach().float())
        return layer

    # --- forward ----------------------------------------------------------

    def forward(
        self, x: Tensor, residual: Tensor | None = None, norm: nn.Module | None = None
    ) -> Tensor:
        """``norm(act(x W^T + b) + residual)``; ``norm`` (an ``nn.LayerNorm`` or
        ``nn.RMSNorm`` over the output features, or None) is fused into the
        epilogue in dynamic mode (where a transformer block ends)."""
        nrm = norm_spec("Int8Linear", norm, self.out_features)
        if self.mode == "weight_only":
            y = ops.int8_weight_linear(x, self.weight, self.weight_scale, self.bias)
            return apply_epilogue(y, self.activation, residual, *nrm)
        w = self._packed() if "weight_packed" in self._buffers else self.weight
        return ops.int8_linear(
            x,
            w,
            self.weight_scale,
            self.bias,
            act_bits=self.act_bits,
            activation=self.activation,
            residual=residual,
            norm=nrm[0],
            norm_weight=nrm[1],
            norm_bias=nrm[2],
            eps=nrm[3],
        )

    # --- module protocol ---------------------------------------------------

    def nbytes(self) -> int:
        """Bytes this layer holds: weight (packed or not), scales, bias."""
        return nbytes_of(self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode}, "
            + (f"act_bits={self.act_bits}, " if self.act_bits != 8 else "")
            + (f"activation={self.activation}, " if self.activation != "none" else "")
            + f"weight=int8 per-channel, nbytes={self.nbytes()}"
        )

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        # A move between the CPU and another device changes the layout the
        # weight is read in (see _set_weight).
        packed = "weight_packed" in self._buffers
        if packed != self._packs(self.weight_scale.device):
            with torch.no_grad():
                self._set_weight(self.weight_int8())
        # .half() / .to(dtype) convert float buffers; the kernels want float32
        # scales and the bias is kept in float32 (converted per call anyway).
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = self.weight_scale.float()
        if self.bias is not None and self.bias.dtype != torch.float32:
            self.bias = self.bias.float()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[override]
        destination[prefix + "weight"] = self.weight_int8().detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            shape = (self.out_features, self.in_features)
            if not isinstance(w, Tensor) or w.dtype != torch.int8 or tuple(w.shape) != shape:
                error_msgs.append(
                    f"size or dtype mismatch for {key}: expected int8 {shape}, got "
                    f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}"
                )
            else:
                device = self.weight_scale.device
                with torch.no_grad():
                    self._set_weight(w.detach().to(device))
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def quantize_int8(
    model: nn.Module,
    mode: str = "dynamic",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    inplace: bool = False,
    act_bits: int = 8,
) -> nn.Module:
    """Replaces every ``nn.Linear`` that ``filter_fn(module, fqn)`` accepts with an Int8Linear.

    ``fqn`` is the module's dotted name in ``model`` (``""`` for the model
    itself). Layers are chosen as the ``"int8"`` recipe step of
    :func:`pykernels.compress` chooses them (this runs that step, without
    embeddings): without ``filter_fn`` every Linear is converted, except the
    output projection of ``nn.MultiheadAttention``, which attention reads as
    a dense weight, and Linear subclasses with a ``forward`` of their own,
    which an Int8Linear would not compute; both are left as they are (the
    feed-forward Linears of ``nn.TransformerEncoderLayer`` are converted, with
    torch's fused inference path turned off for that layer). The model is
    deep-copied first unless ``inplace=True``; the converted model is returned
    (an Int8Linear when ``model`` is itself a Linear). ``act_bits=7``: the
    opt-in 7-bit activations of :class:`Int8Linear` (faster on AVX2-only CPUs).
    """
    from ..compress.api import apply_steps
    from ..compress.recipes import Int8

    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_int8: model must be an nn.Module, got {type(model).__name__}")
    act_bits = check_int8_options("quantize_int8", mode, act_bits)
    _checks.check_callable("quantize_int8", "filter_fn", filter_fn)
    inplace = _checks.check_bool("quantize_int8", "inplace", inplace)
    step = Int8(mode=mode, embeddings=False, act_bits=act_bits)
    return apply_steps(model, [step], filter_fn, inplace=inplace)
