"""attention family: scaled dot-product attention on the CPU for encoders and ViTs.

:func:`attention` computes what ``torch.nn.functional.scaled_dot_product_attention``
computes for ``[B, H, S, D]`` tensors. float32 CPU tensors run the native
kernel (csrc/attention): a flash-style pass per (batch, head) with the keys
packed once per head, an online softmax over blocks of 256 keys (one block,
so one plain softmax, up to 256) and ``kv_lengths`` to skip padded keys, so
a right-padded batch costs what its real tokens cost. Other dtypes and
devices run torch's SDPA (the ``torch`` backend).

:func:`padding_mask_to_lengths` turns the padding masks Hugging Face passes
to SDPA into ``kv_lengths`` where they are right-padding masks.

Semantics, checked against SDPA (torch 2.13, CPU) in tests/test_attention.py:

- ``attn_mask``: bool (True = take part) or additive float, broadcastable to
  ``[B, H, Sq, Sk]``; ``is_causal`` hides key j from row i when j > i
  (top-left aligned when Sq != Sk). Unlike SDPA, a mask and ``is_causal``
  may be given together (both apply).
- A row that sees no key (every key masked by False or -inf, causal,
  ``kv_lengths`` 0, or Sk = 0) gives zeros, as SDPA on the CPU does. A
  float mask of ``finfo.min`` (Hugging Face's) is a finite bias: such a row
  averages v, in SDPA and here alike.
- NaN in q or k gives NaN in every row whose scores it reaches. Here SDPA's
  CPU kernel differs: a row whose every score is NaN (NaN in that query)
  comes back as zeros there, as if fully masked; here it is NaN, as the
  definition (and SDPA's math backend) gives. NaN in v reaches the rows that
  weigh its key, and, as in SDPA, may reach a row through a masked key (0 x
  NaN); keys past ``kv_lengths`` are never read.
- Strided q, k, v (e.g. views of a fused ``[B, S, 3, H, D]`` QKV projection)
  are read in place; only the last dimension must be contiguous, else that
  tensor is copied. The output has q's layout when q is a ``[B, S, H, D]``
  transposed view (so ``out.transpose(1, 2).reshape(B, S, H * D)`` is free),
  else it is contiguous, as SDPA's is.

Speed (AMD EPYC Zen 5, one thread, CPU time, fp32, torch 2.13; the host was
shared, so +-15%): 2.0-2.3x SDPA at MiniLM's 32 x 12 x 128 x 32 and
BERT-base's 8 x 12 x 128 x 64 on AVX-512, with or without an all-ones
padding mask; 1.15-1.2x on AVX2, where both are bound by the FMA rate
(SDPA runs at about half of AVX2's fp32 peak there, so 2x is out of reach
in fp32). Half-padded batches (kv_lengths) 2.2x (AVX2) to 3.7x (AVX-512),
causal 1.8-2.8x: the keys a row does not see are never computed. Threads
take (batch, head) pairs from a shared counter; two-thread timings on the
shared host were ruled by the scheduler (4 ms slices) for SDPA and this
kernel alike, and are not quoted here.

Error against float32 SDPA: the kernel's exp is a polynomial (relative error
about 2e-7) and it sums in its own order. On N(0, 1) inputs at MiniLM's and
BERT-base's shapes its error against a float64 evaluation is the same as
float32 SDPA's own: about 3e-7 relative (Frobenius) and 0.5-1.1e-6 at most
per element; the two differ from each other by at most about 1.5e-6
(tests/test_attention.py checks these bounds at every ISA tier).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from ..backends.reference import attention as _reference
from . import _checks

_FN = "attention"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --- backends --------------------------------------------------------------------


def _out_like(q: Tensor, dv: int) -> Tensor:
    """An empty [B, H, Sq, dv] output laid out as q: [B, Sq, H, dv] transposed
    where q's heads are inner to its sequence (a view of a fused projection)."""
    b, h, sq, _ = q.shape
    if h > 1 and sq > 1 and q.stride(1) < q.stride(2):
        return q.new_empty(b, sq, h, dv).transpose(1, 2)
    return q.new_empty(b, h, sq, dv)


def _full_mask(
    q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool, kv_lengths: Tensor | None
) -> Tensor | None:
    """One additive float mask holding all three ways of hiding keys (for SDPA)."""
    sq, sk = q.shape[2], k.shape[2]
    hide = None
    if is_causal:
        hide = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
    if kv_lengths is not None:
        pad = torch.arange(sk, device=q.device) >= kv_lengths.to(q.device)[:, None]
        pad = pad[:, None, None, :]
        hide = pad if hide is None else hide | pad
    if hide is None:
        return mask
    m = torch.zeros(hide.shape, dtype=q.dtype, device=q.device).masked_fill_(hide, float("-inf"))
    return m if mask is None else mask + m


def _attention_torch(q, k, v, mask, is_causal, scale, kv_lengths) -> Tensor:
    if mask is None and kv_lengths is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    m = _full_mask(q, k, mask, is_causal, kv_lengths)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)


def _kernel_mask(mask: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """The mask as the kernel reads it: float32, [B, H, Sq, Sk] with zero
    strides where it broadcasts, and a contiguous last dimension."""
    mask = mask.float()
    if shape[3] > 1 and (mask.shape[-1] == 1 or mask.stride(-1) != 1):
        mask = mask.expand(*mask.shape[:-1], shape[3]).contiguous()
    return mask.expand(shape)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _attention_native(q, k, v, mask, is_causal, scale, kv_lengths) -> Tensor:
    if q.dtype != torch.float32:  # the kernel is float32 only: SDPA serves the rest
        return _attention_torch(q, k, v, mask, is_causal, scale, kv_lengths)
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    out = _out_like(q, v.shape[3])
    if out.numel() == 0 or sk == 0:
        return out.zero_()
    m = None if mask is None else _kernel_mask(mask, (b, h, sq, sk))
    lens = None if kv_lengths is None else kv_lengths.to(torch.int64).contiguous()
    backends.host_call(
        backends.native.C.attention_f32,
        _unit_last(q.detach()),
        _unit_last(k.detach()),
        _unit_last(v.detach()),
        out,
        lens,
        None,
        m,
        is_causal,
        scale,
    )
    return out


backends.register(
    "attention",
    "attention",
    native_cpu=_attention_native,
    reference=_reference.attention,
    # No Numba kernel: where the extension is missing, torch's SDPA is the
    # fastest thing at hand.
    any=_attention_torch,
)


def _run(q, k, v, mask, is_causal, scale, kv_lengths) -> Tensor:
    return backends.impl(_FN, "attention", q)(q, k, v, mask, is_causal, scale, kv_lengths)


@torch.library.custom_op("pykernels::attention", mutates_args=())
def _attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    scale: float,
    kv_lengths: Tensor | None,
) -> Tensor:
    out = _run(q, k, v, mask, is_causal, scale, kv_lengths)
    # The fake promises _out_like's layout; SDPA (the torch backend) picks its own.
    want = _out_like(q, v.shape[3])
    return out if out.stride() == want.stride() else want.copy_(out)


@_attention_op.register_fake
def _(q, k, v, mask, is_causal, scale, kv_lengths):
    return _out_like(q, v.shape[3])


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, mask, is_causal, scale, kv_lengths = inputs
    ctx.save_for_backward(q, k, v, mask, kv_lengths)
    ctx.is_causal, ctx.scale = is_causal, scale


def _attention_grad(ctx, grad):
    # Training is not what the kernel is for: the backward recomputes the
    # forward with SDPA and differentiates that (the mask gets no gradient).
    q, k, v, mask, kv_lengths = ctx.saved_tensors
    with torch.enable_grad():
        qkv = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = _attention_torch(*qkv, mask, ctx.is_causal, ctx.scale, kv_lengths)
        gq, gk, gv = torch.autograd.grad(out, qkv, grad)
    return gq, gk, gv, None, None, None, None


torch.library.register_autograd(
    "pykernels::attention", _attention_grad, setup_context=_attention_setup
)


# --- the public functions ------------------------------------------------------


def _check_qkv(q: object, k: object, v: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_FN}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(
                f"{_FN}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}"
            )
        if t.dim() != 4:
            raise ValueError(
                f"{_FN}: {name} must be 4-D [batch, heads, seq, dim], got shape {tuple(t.shape)}"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{_FN}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_FN}: {name} must be on q's device {q.device}, got {t.device}")
    for i, what in ((0, "batch"), (1, "heads")):
        if not q.shape[i] == k.shape[i] == v.shape[i]:
            raise ValueError(
                f"{_FN}: q, k and v must have the same {what} (dimension {i}), got "
                f"{q.shape[i]}, {k.shape[i]} and {v.shape[i]}"
            )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"{_FN}: k and v must have the same sequence length (dimension 2), got "
            f"{k.shape[2]} and {v.shape[2]}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{_FN}: q and k must have the same head dim (dimension 3), got "
            f"{q.shape[3]} and {k.shape[3]}"
        )


def _check_mask(mask: object, q: Tensor, shape: tuple[int, ...]) -> Tensor | None:
    """The mask as an additive float tensor of q's dtype, 4-D, broadcastable to shape."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{_FN}: attn_mask must be a torch.Tensor or None, got {type(mask)}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{_FN}: attn_mask must be bool or a float tensor, got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"{_FN}: attn_mask must be on q's device {q.device}, got {mask.device}")
    ok = mask.dim() <= 4 and all(
        m in (1, s) for m, s in zip(reversed(mask.shape), reversed(shape), strict=False)
    )
    if not ok:
        raise ValueError(
            f"{_FN}: attn_mask of shape {tuple(mask.shape)} does not broadcast to "
            f"[batch, heads, q seq, k seq] = {list(shape)}"
        )
    mask = mask.detach()
    mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~mask, float("-inf")
        )
    return mask.to(q.dtype)


def _check_lengths(lengths: object, q: Tensor, sk: int) -> Tensor | None:
    if lengths is None:
        return None
    if isinstance(lengths, Sequence) and not isinstance(lengths, (str, bytes)):
        if not all(_checks.is_int(x) for x in lengths):
            raise TypeError(f"{_FN}: kv_lengths must hold ints, got {lengths!r}")
        lengths = torch.tensor([int(x) for x in lengths], dtype=torch.int64)
    if not isinstance(lengths, Tensor):
        raise TypeError(f"{_FN}: kv_lengths must be an int tensor [batch] or None, got {lengths!r}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{_FN}: kv_lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.shape != (q.shape[0],):
        raise ValueError(
            f"{_FN}: kv_lengths must have shape [batch] = ({q.shape[0]},), "
            f"got {tuple(lengths.shape)}"
        )
    lengths = lengths.detach()
    if backends.plain(lengths) and lengths.numel():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > sk:
            raise ValueError(f"{_FN}: kv_lengths must be in [0, {sk}], got [{lo}, {hi}]")
    # The kernel reads the lengths on the host; SDPA builds its mask on q's device.
    return lengths.to(torch.int64).to("cpu" if q.device.type == "cpu" else q.device)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    kv_lengths: Tensor | Sequence[int] | None = None,
) -> Tensor:
    """softmax(q k^T * scale + attn_mask) v, as ``F.scaled_dot_product_attention``.

    Args:
        q: ``[B, H, Sq, D]``, float32 (the native kernel on CPU), float64,
            float16 or bfloat16 (torch's SDPA); any strides.
        k: ``[B, H, Sk, D]``, q's dtype and device.
        v: ``[B, H, Sk, Dv]``, q's dtype and device.
        attn_mask: bool (True = attend, as SDPA) or additive float, of any
            shape broadcastable to ``[B, H, Sq, Sk]``.
        is_causal: hide key j from query row i when j > i (top-left aligned).
            May be combined with ``attn_mask``.
        scale: defaults to ``1 / sqrt(D)``.
        kv_lengths: int ``[B]`` (a tensor or a sequence): keys at positions
            ``>= kv_lengths[b]`` are left out of batch entry b, and never
            read, so padded keys cost nothing. See
            :func:`padding_mask_to_lengths`.

    Returns:
        ``[B, H, Sq, Dv]`` in q's dtype: contiguous, or ``[B, Sq, H, Dv]``
        transposed where q is such a view. A row that sees no key is zeros.
        See the module docstring for NaN and the error against SDPA.
    """
    _check_qkv(q, k, v)
    b, h, sq, d = q.shape
    sk = k.shape[2]
    mask = _check_mask(attn_mask, q, (b, h, sq, sk))
    is_causal = _checks.check_bool(_FN, "is_causal", is_causal)
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d else 1.0
    else:
        scale = _checks.check_number(_FN, "scale", scale)
        if not math.isfinite(scale):
            raise ValueError(f"{_FN}: scale must be finite, got {scale}")
    lengths = _check_lengths(kv_lengths, q, sk)
    if backends.skip_dispatcher(q, k, v, mask, lengths):
        return _run(q, k, v, mask, is_causal, scale, lengths)
    return torch.ops.pykernels.attention(q, k, v, mask, is_causal, scale, lengths)


def _keep_drop(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Where a padding mask keeps and where it drops a key."""
    if mask.dtype == torch.bool:
        return mask, ~mask
    if mask.dtype.is_floating_point and mask.dim() == 4:  # additive
        return mask == 0, mask <= torch.finfo(mask.dtype).min
    return mask != 0, mask == 0  # a [B, S] attention_mask of 0 and 1


def padding_mask_to_lengths(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """``(kv_lengths, attn_mask)`` for :func:`attention` from a Hugging Face padding mask.

    ``mask``: the ``[B, S]`` ``attention_mask`` (1 or True = token, 0 =
    padding), or the 4-D mask HF passes to SDPA (``[B, 1, 1, Sk]`` or
    ``[B, 1, Sq, Sk]``; bool with True = attend, or additive float with 0
    and ``finfo.min`` or -inf). Where it is a right-padding mask (each
    sequence's tokens first, the same keys for every query row) this returns
    ``(lengths, None)``, lengths int64 ``[B]`` on the CPU, so the padded keys
    are never computed; otherwise ``(None, mask)``, the mask as
    :func:`attention` takes it (a ``[B, S]`` mask as bool ``[B, 1, 1, S]``).
    The two give the same output, except that a float ``finfo.min`` mask
    whose sequence is all padding is passed through (SDPA then averages v
    in that entry, where length 0 would give zeros).

    It reads the mask's values (a device sync for a GPU mask), so it runs
    eagerly, once per batch, outside any compiled region.
    """
    if mask is None:
        return None, None
    if not isinstance(mask, Tensor):
        raise TypeError(f"padding_mask_to_lengths: mask must be a torch.Tensor, got {type(mask)}")
    if mask.dim() not in (2, 4):
        raise ValueError(
            "padding_mask_to_lengths: mask must be [B, S] or [B, 1, Sq, Sk], "
            f"got shape {tuple(mask.shape)}"
        )
    keep, drop = _keep_drop(mask.detach())
    if mask.dim() == 2:
        through = mask.detach().bool() if mask.dtype != torch.bool else mask
        through = through[:, None, None, :]
        keep, drop = keep[:, None, None, :], drop[:, None, None, :]
    else:
        through = mask
    sk = keep.shape[-1]
    row = keep[:, :1, :1, :]
    lengths = row.sum(-1).reshape(-1).to(torch.int64)
    prefix = torch.arange(sk, device=keep.device) < lengths[:, None]
    ok = (
        bool((keep | drop).all())
        and bool((keep == row).all())
        and bool((row.reshape(-1, sk) == prefix).all())
    )
    if ok and mask.dim() == 4 and mask.dtype.is_floating_point and bool((lengths == 0).any()):
        ok = bool((mask == float("-inf")).all(-1)[lengths == 0].all())
    if not ok:
        return None, through
    return lengths.cpu(), None
