"""cluster family: weight sharing. A weight matrix is stored as small codes,
each an index into its row's codebook (``per="row"``) or the layer's one
codebook (``per="layer"``), packed 4 bits per code for up to 16 clusters and
8 bits up to 256.

``cluster_linear(x, codes, codebook, bias, bits=)`` computes ``x @ W.T + b``
reading the packed codes and codebooks directly: the native CPU kernel looks
the weights up in registers (AVX-512 / AVX2 permutes for 4-bit codes) and
never forms W. It is a ``torch.library`` custom op (native CPU kernel, Numba,
reference; torch ops on other devices) with a backward: the gradient of a
centroid is the sum of dL/dW over the weights that share it, so the
codebooks train while the assignment stays fixed (cluster-preserving
fine-tuning). ``kmeans_cluster`` makes the codes and codebooks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends
from ..backends.torch import cluster as _tc
from . import _checks

BITS = (4, 8)
MAX_CLUSTERS = {4: 16, 8: 256}
PER = ("row", "layer")


def bits_for(n_clusters: int) -> int:
    """The code width for ``n_clusters``: 4 bits up to 16 clusters, else 8."""
    return 4 if n_clusters <= 16 else 8


def code_row_bytes(k: int, bits: int) -> int:
    """Bytes per row of packed codes for K columns (csrc/cluster/cluster.h)."""
    return -(-k // 128) * 64 if bits == 4 else k


def pack_cluster_codes(idx: Tensor, bits: int) -> Tensor:
    """Packs [N, K] integer codes (each < 2**bits) into rows of uint8 (cluster.h's layout)."""
    fn = "pack_cluster_codes"
    if not isinstance(idx, Tensor) or idx.dim() != 2:
        raise ValueError(f"{fn}: idx must be a 2-D tensor of codes [N, K]")
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise TypeError(f"{fn}: idx must be an integer tensor, got {idx.dtype}")
    if bits not in BITS:
        raise ValueError(f"{fn}: bits must be 4 or 8, got {bits!r}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 2**bits):
        raise ValueError(f"{fn}: codes must lie in [0, {2**bits - 1}] for {bits}-bit codes")
    return _tc.pack_codes(idx, bits)


def unpack_cluster_codes(codes: Tensor, k: int, bits: int) -> Tensor:
    """The [N, K] codes (int64) of packed rows (inverse of :func:`pack_cluster_codes`)."""
    _check_codes("unpack_cluster_codes", codes, k, bits)
    return _tc.unpack_codes(codes, k, bits)


def cluster_weight(codes: Tensor, codebook: Tensor, k: int, bits: int) -> Tensor:
    """The dense float32 [N, K] weight the codes and codebooks stand for."""
    fn = "cluster_weight"
    _check_codes(fn, codes, k, bits)
    _check_codebook(fn, codebook, codes.shape[0], bits, codes.device)
    return _tc.dense_weight(codes, codebook.detach(), k, bits)


def kmeans_cluster(
    w: Tensor, n_clusters: int, per: str = "row", iters: int = 8
) -> tuple[Tensor, Tensor]:
    """1-D k-means of a [N, K] weight: (codes int64 [N, K], codebook float32 [N or 1, C]).

    Centroids start evenly spaced over each row's (or the layer's) range
    [min, max], as TF-MOT's linear initialisation does, then ``iters`` Lloyd
    steps: each weight goes to its nearest centroid (midpoints between sorted
    centroids, so a binary search), each centroid moves to the mean of its
    members; a centroid left without members keeps its place. Each step can
    only lower the squared error.
    """
    fn = "kmeans_cluster"
    n_clusters = _checks.check_int(fn, "n_clusters", n_clusters, 2, 256)
    iters = _checks.check_int(fn, "iters", iters, 0)
    if per not in PER:
        raise ValueError(f"{fn}: per must be 'row' or 'layer', got {per!r}")
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"{fn}: w must be a 2-D float tensor")
    w = w.detach().float()
    rows = w if per == "row" else w.reshape(1, -1)
    if rows.numel() == 0:
        cb = torch.zeros(rows.shape[0], n_clusters, device=w.device)
        return torch.zeros(w.shape, dtype=torch.int64, device=w.device), cb
    lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
    steps = torch.linspace(0, 1, n_clusters, device=w.device)[None, :]
    cb = lo + (hi - lo) * steps
    r, c = rows.shape[0], n_clusters
    # Flat cluster ids (row * C + code): one bincount gives every row's sums
    # and counts at once, faster than scatter_add over [R, C].
    base = (torch.arange(r, device=w.device) * c)[:, None]
    flat_w = rows.reshape(-1).double()
    for _ in range(iters):
        idx = _nearest(rows, cb)
        flat = (idx + base).reshape(-1)
        sums = torch.bincount(flat, weights=flat_w, minlength=r * c).view(r, c)
        counts = torch.bincount(flat, minlength=r * c).view(r, c)
        cb = torch.where(counts > 0, (sums / counts.clamp_min(1)).float(), cb)
    idx = _nearest(rows, cb)
    return idx.reshape(w.shape), cb.contiguous()


def _nearest(rows: Tensor, cb: Tensor) -> Tensor:
    """Index of each value's nearest centroid (ties to the lower one); sorts cb in place."""
    cb.copy_(cb.sort(dim=1).values)
    mid = (cb[:, 1:] + cb[:, :-1]) / 2
    return torch.searchsorted(mid.contiguous(), rows.contiguous())


# --- checks ----------------------------------------------------------------------


def _check_codes(fn: str, codes: Tensor, k: int, bits: int) -> None:
    if bits not in BITS or isinstance(bits, bool):
        raise ValueError(f"{fn}: bits must be 4 or 8, got {bits!r}")
    if not isinstance(codes, Tensor):
        raise TypeError(f"{fn}: codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"{fn}: codes must be uint8 (packed), got {codes.dtype}")
    want = code_row_bytes(k, bits)
    if codes.dim() != 2 or codes.shape[1] != want:
        raise ValueError(
            f"{fn}: codes must be [N, {want}] for K = {k} with {bits}-bit codes, "
            f"got shape {tuple(codes.shape)}"
        )


def _check_codebook(fn: str, codebook: Tensor, n: int, bits: int, device: torch.device) -> None:
    if not isinstance(codebook, Tensor):
        raise TypeError(f"{fn}: codebook must be a torch.Tensor, got {type(codebook).__name__}")
    if codebook.dtype != torch.float32:
        raise TypeError(f"{fn}: codebook must be float32, got {codebook.dtype}")
    if codebook.dim() != 2 or codebook.shape[0] not in (n, 1):
        raise ValueError(
            f"{fn}: codebook must be [N, C] (per row) or [1, C] (per layer) with N = {n}, "
            f"got shape {tuple(codebook.shape)}"
        )
    c = codebook.shape[1]
    if not 1 <= c <= MAX_CLUSTERS[bits]:
        raise ValueError(
            f"{fn}: a codebook of {c} entries does not fit {bits}-bit codes "
            f"(at most {MAX_CLUSTERS[bits]})"
        )
    if codebook.device != device:
        raise ValueError(f"{fn}: codebook is on {codebook.device} but codes are on {device}")


def _codes_fit(codes: Tensor, k: int, bits: int, c: int) -> bool:
    """Whether every one of the K codes of each row is below ``c``."""
    top = int(codes.amax())
    if bits == 8:
        return top < c  # a row is exactly its K codes
    if top >> 4 < c and int((codes & 15).amax()) < c:
        return True
    # A nibble past K (the padding of the last 128-code group) is never read:
    # decide on the codes themselves.
    return int(_tc.unpack_codes(codes, k, bits).max()) < c


def _check_code_range(fn: str, codes: Tensor, k: int, bits: int, c: int) -> None:
    """Every code names an entry of its codebook, since the backends would disagree
    on a stray one (native and Numba read 0, the others fail inside torch).

    On the CPU this runs at every call: a write through ``codes.data`` or a
    NumPy view moves no version counter, so a check remembered from an earlier
    call could not see it. It runs only when the codebook is smaller than the
    code width allows (``c < 2**bits``: the default 16 clusters, or 256 with
    8-bit codes, pay nothing), and costs two to three passes over the codes:
    for 8 MB of 4-bit codes (4096 x 4096) about 0.3 ms on one core, as long
    as the kernel itself for a single token, a tenth of it for 16 tokens.
    On other devices a check waits for the device, so it runs once per codes
    tensor while its version counter and data pointer stay the same.
    """
    if not _checks.has_data(codes) or codes.numel() == 0 or c >= 2**bits:
        return
    key = ("cluster-codes", k, bits, c)
    cached = codes.device.type != "cpu"
    if cached and _checks.is_checked((codes,), key):
        return
    if not _codes_fit(codes, k, bits, c):
        raise ValueError(
            f"{fn}: codes name entries past the codebook's {c} (a code >= {c} in a "
            f"{bits}-bit code row)"
        )
    if cached:
        _checks.mark_checked((codes,), key)


# --- the op ------------------------------------------------------------------------


def _linear_torch(x, codes, codebook, bias, bits, dynamic) -> Tensor:
    return _tc.cluster_linear(x, codes, codebook.detach(), bias, bits, dynamic)


def _linear_cpu(fns, x, codes, codebook, bias, bits, dynamic) -> Tensor:
    y = torch.empty(x.shape[0], codes.shape[0], dtype=torch.float32, device=x.device)
    backends.host_call(fns.cluster_linear, x, codes, codebook, bias, int(bits), bool(dynamic), y)
    return y


backends.register("cluster", "linear", torch=_linear_torch, cpu=_linear_cpu)


def _impl(
    x: Tensor, codes: Tensor, codebook: Tensor, bias: Tensor | None, bits: int, dynamic: bool
) -> Tensor:
    return backends.impl("cluster", "linear", x)(x, codes, codebook, bias, bits, dynamic)


@torch.library.custom_op("pykernels::cluster_linear", mutates_args=())
def _op(
    x: Tensor, codes: Tensor, codebook: Tensor, bias: Tensor | None, bits: int, dynamic: bool
) -> Tensor:
    return _impl(x, codes, codebook, bias, bits, dynamic)


@_op.register_fake
def _(
    x: Tensor, codes: Tensor, codebook: Tensor, bias: Tensor | None, bits: int, dynamic: bool
) -> Tensor:
    return x.new_empty(x.shape[0], codes.shape[0], dtype=torch.float32)


def _setup(ctx, inputs, output) -> None:  # noqa: ARG001
    x, codes, codebook, bias, bits, _dynamic = inputs
    ctx.save_for_backward(x, codes, codebook)
    ctx.bits = bits
    ctx.has_bias = bias is not None


def _backward(ctx, gy: Tensor):
    x, codes, codebook = ctx.saved_tensors
    k = x.shape[1]
    gx = gcb = gb = None
    if ctx.needs_input_grad[0]:
        gx = gy @ _tc.dense_weight(codes, codebook, k, ctx.bits)
    if ctx.needs_input_grad[2]:
        # dL/dcentroid = sum of dL/dW over the weights coded to it.
        gw = gy.T @ x.float()  # [N, K]
        idx = _tc.unpack_codes(codes, k, ctx.bits)
        if codebook.shape[0] == idx.shape[0]:
            gcb = torch.zeros_like(codebook).scatter_add_(1, idx, gw)
        else:
            gcb = torch.zeros_like(codebook).scatter_add_(1, idx.reshape(1, -1), gw.reshape(1, -1))
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = gy.sum(dim=0)
    return gx, None, gcb, gb, None, None


torch.library.register_autograd("pykernels::cluster_linear", _backward, setup_context=_setup)


def cluster_linear(
    x: Tensor,
    codes: Tensor,
    codebook: Tensor,
    bias: Tensor | None = None,
    *,
    bits: int = 4,
    k: int | None = None,
    dynamic: bool = False,
) -> Tensor:
    """``y = x @ W.T + bias`` with ``W[n, k] = codebook[n or 0, codes[n, k]]``.

    ``x``: float32, float16 or bfloat16 ``[..., K]`` (computed in float32,
    returned in x's dtype); ``codes``: uint8 ``[N, code_row_bytes(K, bits)]``
    from :func:`pack_cluster_codes`; ``codebook``: float32 ``[N, C]`` (one per
    output channel) or ``[1, C]`` (one for the layer), C <= 16 for 4-bit
    codes, <= 256 for 8-bit; ``bias``: ``[N]`` or None; ``k``: the layer's
    in_features, checked against x when given (a row of 4-bit codes covers K
    rounded up to 128, so the codes alone cannot tell K = 40 from 41).

    ``dynamic=False`` computes in float32 from x as it is (weight-only);
    ``dynamic=True`` quantizes each row of x to int8 as
    :func:`quantize_per_row` does, and each codebook row the same way, sums
    the integer products exactly and scales back (the arithmetic of
    :func:`int8_linear`, at half its weight bytes with 4-bit codes; K must be
    below 131072). Differentiable in x, codebook and bias (not in the codes);
    in dynamic mode the gradient is the weight-only one (a straight-through
    estimator for the int8 rounding).
    """
    fn = "cluster_linear"
    _checks.check_float_input(fn, x, min_dim=1)
    if k is not None and _checks.check_int(fn, "k", k, 0) != x.shape[-1]:
        raise ValueError(f"{fn}: x must have K = {k} in its last dimension, got {tuple(x.shape)}")
    k = x.shape[-1]
    dynamic = _checks.check_bool(fn, "dynamic", dynamic)
    if dynamic and k >= 131072:
        raise ValueError(f"{fn}: K = {k} could overflow int32 accumulation (limit 131072)")
    _check_codes(fn, codes, k, bits)
    n = codes.shape[0]
    _check_codebook(fn, codebook, n, bits, codes.device)
    _checks.check_bias(fn, bias, n)
    for name, t in (("x", x), ("bias", bias)):
        if t is not None and t.device != codes.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but codes are on {codes.device}")
    _check_code_range(fn, codes, k, bits, codebook.shape[1])
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(math.prod(lead), k)
    if x2.dtype != torch.float32:
        x2 = x2.float()
    if x2.shape[0] == 0 or n == 0:
        y = x2.new_zeros(x2.shape[0], n)
        if bias is not None:
            y = y + bias.float()
        return y.view(*lead, n).to(x.dtype)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    b32 = None if bias is None else (bias if bias.dtype == torch.float32 else bias.float())
    cb = codebook if codebook.is_contiguous() else codebook.contiguous()
    if backends.skip_dispatcher(x2, cb, b32):
        y = _impl(x2, codes.contiguous(), cb, b32, int(bits), dynamic)
    else:
        y = torch.ops.pykernels.cluster_linear(x2, codes.contiguous(), cb, b32, int(bits), dynamic)
    return y.view(*lead, n).to(x.dtype)


__all__ = [
    "BITS",
    "MAX_CLUSTERS",
    "PER",
    "bits_for",
    "cluster_linear",
    "cluster_weight",
    "code_row_bytes",
    "kmeans_cluster",
    "pack_cluster_codes",
    "unpack_cluster_codes",
]
