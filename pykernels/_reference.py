"""Reference implementations: the test oracle and the backend of last resort.

Written for clarity, not speed, and independently of the kernels: a full
stable sort instead of a selection, torch's own dtype conversions instead of
the kernels' bit manipulation. Same buffer signatures as the native family
(raw bits in NumPy arrays), so every backend is called the same way.
"""

from __future__ import annotations

import numpy as np
import torch

# dtype codes shared with csrc/topk/topk.h
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
BITS_DTYPE = {0: np.uint32, 1: np.uint16, 2: np.uint16}
KEY_MASK = {0: 0x7FFFFFFF, 1: 0x7FFF, 2: 0x7FFF}
TORCH_DTYPE = {v: k for k, v in DTYPE_CODES.items()}


def bits_to_float32(bits: np.ndarray, dtype: int) -> np.ndarray:
    """Raw bits of `dtype` -> float32 values, through torch's conversion."""
    if dtype == 0:
        return bits.view(np.float32)
    t = torch.from_numpy(bits.view(np.int16)).view(TORCH_DTYPE[dtype])
    return t.float().numpy()


def float32_to_bits(y: np.ndarray, dtype: int) -> np.ndarray:
    """float32 values -> raw bits of `dtype`, rounded to nearest even by torch."""
    if dtype == 0:
        return y.astype(np.float32).view(np.uint32)
    t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(TORCH_DTYPE[dtype])
    return t.view(torch.int16).numpy().view(np.uint16)


# |bits| of inf and of the largest finite value, per 16-bit dtype code
INF_BITS = {1: 0x7C00, 2: 0x7F80}
MAX_BITS = {1: 0x7BFF, 2: 0x7F7F}


def float32_to_bits_saturating(y: np.ndarray, dtype: int) -> np.ndarray:
    """float32_to_bits, but a finite y past the dtype's range becomes its
    largest finite value (signed) instead of inf: what error feedback sends."""
    bits = float32_to_bits(y, dtype)
    if dtype != 0:
        over = np.isfinite(y) & ((bits & 0x7FFF) == INF_BITS[dtype])
        bits = np.where(over, (bits & 0x8000) | MAX_BITS[dtype], bits).astype(bits.dtype)
    return bits


def topk_order(keys: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest keys, ties to the lower index, ascending."""
    idx = np.arange(keys.size, dtype=np.int64)
    order = np.lexsort((idx, -keys.astype(np.int64)))  # key descending, then index
    return np.sort(order[:k])


def topk_sparsify(
    x: np.ndarray,
    dtype: int,
    k: int,
    approx: bool,
    residual: np.ndarray | None,
    values: np.ndarray,
    indices: np.ndarray,
) -> None:
    """Fills values (raw bits of dtype) and indices; updates residual in place.

    `approx` is accepted for signature parity; the reference is always exact.
    """
    del approx
    if residual is None:
        keys = x & KEY_MASK[dtype]
        sel = topk_order(keys, k)
        values[:] = x[sel]
        indices[:] = sel
        return
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are data here
        y = (bits_to_float32(x, dtype) + residual).astype(np.float32)
    sel = topk_order(y.view(np.uint32) & 0x7FFFFFFF, k)
    sent_bits = float32_to_bits_saturating(y[sel], dtype)
    sent = bits_to_float32(sent_bits, dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        remainder = np.where(np.isfinite(sent) & np.isfinite(y[sel]), y[sel] - sent, 0.0)
    residual[:] = y
    residual[sel] = remainder.astype(np.float32)
    values[:] = sent_bits
    indices[:] = sel


def topk_sparsify_tensor(
    x: torch.Tensor, k: int, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle on tensors: (values, indices); residual (if given) updated in place."""
    code = DTYPE_CODES[x.dtype]
    bits = tensor_bits(x.detach().reshape(-1).contiguous().cpu())
    values = np.empty(k, dtype=BITS_DTYPE[code])
    indices = np.empty(k, dtype=np.int64)
    r = None if residual is None else residual.detach().reshape(-1).cpu().numpy().copy()
    topk_sparsify(bits, code, k, False, r, values, indices)
    if residual is not None:
        residual.copy_(torch.from_numpy(r).view(residual.shape))
    v = torch.from_numpy(values.view(np.int32 if code == 0 else np.int16)).view(x.dtype)
    return v.to(x.device), torch.from_numpy(indices).to(x.device)


def tensor_bits(t: torch.Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a contiguous CPU float tensor's raw bits."""
    if t.dtype == torch.float32:
        return t.view(torch.int32).numpy().view(np.uint32)
    return t.view(torch.int16).numpy().view(np.uint16)


def topk_densify(
    values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    """Dense tensor of `shape` with values summed at indices (flat)."""
    numel = int(np.prod(shape)) if len(shape) else 1
    out = np.zeros(numel, dtype=np.float64)
    np.add.at(out, indices.cpu().numpy(), values.detach().cpu().double().numpy())
    return torch.from_numpy(out).to(values.dtype).view(shape)


# --- int8 -------------------------------------------------------------------


def quantize_per_row(x: np.ndarray, q: np.ndarray, scale: np.ndarray, bits: int = 8) -> None:
    """Per-row int8: symmetric (bits 8: scale = max|row| / 127, q = rint(x / scale)) or
    the 7-bit grid (bits 7, see ``_quantize7``)."""
    x = np.asarray(x, dtype=np.float32)
    if bits == 7:
        qf, s = _quantize7(x)
        q[:] = qf.astype(np.int8)
        scale[:] = s
        return
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        amax = np.abs(x).max(axis=1, initial=np.float32(0))
        s = (amax / np.float32(127)).astype(np.float32)
        s[np.isnan(x).any(axis=1)] = np.nan
        usable = (s > 0) & np.isfinite(s)
        ratio = np.where(usable[:, None], x / np.where(usable, s, 1)[:, None], 0)
    q[:] = np.clip(np.rint(ratio), -127, 127).astype(np.int8)
    scale[:] = s


def _quantize7(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 7-bit grid of csrc/int8/int8.h in NumPy float32: (q as float32, scale).

    lo = min(row, 0), hi = max(row, 0); scale = hi / 127 - lo / 127;
    zp = rint(-lo / scale) in [0, 127]; q = clip(rint(x / scale), -zp, 127 - zp).
    """
    f127 = np.float32(127)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lo = np.minimum(x.min(axis=1, initial=np.float32(0)), np.float32(0))
        hi = np.maximum(x.max(axis=1, initial=np.float32(0)), np.float32(0))
        s = ((hi / f127).astype(np.float32) - (lo / f127).astype(np.float32)).astype(np.float32)
        s[np.isnan(x).any(axis=1)] = np.nan
        usable = (s > 0) & np.isfinite(s)
        safe = np.where(usable, s, np.float32(1)).astype(np.float32)
        zp = np.where(usable, np.clip(np.rint(-lo / safe), 0, 127), 0).astype(np.float32)
        ratio = np.rint(x / safe[:, None])
    q = np.clip(ratio, -zp[:, None], (127 - zp)[:, None])
    q = np.where(usable[:, None], q, 0).astype(np.float32)
    return q, s.astype(np.float32)


def int8_gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    """c = a @ b.T, computed in int64 and checked to fit int32."""
    full = a.astype(np.int64) @ b.astype(np.int64).T
    c[:] = full.astype(np.int32)


def packed_shape(n: int, k: int) -> tuple[int, int]:
    """(N, K) padded as the packed weight layout pads them (16 and 4)."""
    return -(-n // 16) * 16, -(-k // 4) * 4


def packed_offsets(n: int, k: int) -> np.ndarray:
    """Byte offset of w[n, k] in the packed "k4n16" layout (csrc/int8/int8.h)."""
    np_, kp = packed_shape(n, k)
    rows = np.arange(n, dtype=np.int64)
    cols = np.arange(k, dtype=np.int64)
    panel, lane = rows // 16, rows % 16
    block, j = panel // 4, panel % 4
    nv = np.minimum(4, np_ // 16 - 4 * block)
    row_part = 64 * block * kp + 64 * j + 4 * lane
    return row_part[:, None] + 64 * (cols[None, :] // 4) * nv[:, None] + cols[None, :] % 4


def int8_pack_weight(w: np.ndarray, packed: np.ndarray, comp: np.ndarray) -> None:
    """The packed layout by index arithmetic, independent of the C++ loops."""
    n, k = w.shape
    packed[:] = 0
    packed[packed_offsets(n, k).ravel()] = w.ravel()
    comp[:] = 0
    comp[:n] = 128 * w.astype(np.int64).sum(axis=1)


def int8_unpack_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The int8 [N, K] weight back from its packed form, on packed's device."""
    off = torch.from_numpy(packed_offsets(n, k)).to(packed.device)
    return packed.reshape(-1)[off.reshape(-1)].view(n, k)


def quantize_rows_tensor(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_row in torch on any device: (q as float32, scale float32)."""
    xf = x.float()
    if bits == 7:
        q, s = _quantize7(xf.cpu().numpy())
        return torch.from_numpy(q).to(x.device), torch.from_numpy(s).to(x.device)
    # A tensor divisor: on CUDA a Python scalar divisor becomes a multiplication.
    s = xf.abs().amax(dim=1) / xf.new_full((), 127.0) if xf.shape[1] else xf.new_zeros(xf.shape[0])
    s = torch.where(torch.isnan(xf).any(dim=1), torch.full_like(s, float("nan")), s)
    usable = (s > 0) & torch.isfinite(s)
    ratio = xf / torch.where(usable, s, torch.ones_like(s))[:, None]
    q = torch.where(usable[:, None], torch.round(ratio).clamp(-127, 127), torch.zeros_like(xf))
    return q, s


def int8_linear(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    act_bits: int = 8,
) -> torch.Tensor:
    """Dynamic W8A8 linear in float64 from the same integers and scales."""
    q, s = quantize_rows_tensor(x, act_bits)
    acc = q.double() @ w_q.double().T
    y = acc * s.double()[:, None] * w_scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def int8_weight_linear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Weight-only linear in float64: x @ (w_q * w_scale[:, None]).T + bias."""
    y = x.double() @ (w_q.double() * w_scale.double()[:, None]).T
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


# --- sparse -----------------------------------------------------------------


def sparse_linear(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    n: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x @ W.T + bias in float64 over W's stored entries only (CSR); float32 out.

    Summing stored entries, not a dense product, so a NaN in x reaches only
    the outputs whose rows store that column, as in the kernels.
    """
    rows = torch.repeat_interleave(torch.arange(n, device=x.device), row_ptr[1:] - row_ptr[:-1])
    terms = x.double()[:, cols] * values.double()[None, :]
    y = torch.zeros(x.shape[0], n, dtype=torch.float64, device=x.device)
    y.index_add_(1, rows, terms)
    if bias is not None:
        y = y + bias.double()
    return y.float()


def sparse_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w_dense: torch.Tensor,
    row_ptr: torch.Tensor,
    cols: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dvalues) in float64: dense autograd restricted to the stored entries."""
    dx = dy.double() @ w_dense.double()
    rows = torch.repeat_interleave(
        torch.arange(w_dense.shape[0], device=dy.device), row_ptr[1:] - row_ptr[:-1]
    )
    dv = (dy.double().T @ x.double())[rows, cols]
    return dx.float(), dv.float()


# --- quant ------------------------------------------------------------------
# Bucketed absmax quantization with stochastic rounding (csrc/quant/quant.h
# states the arithmetic). Whole-array NumPy: every step a single fp32
# operation, so the result equals the kernels' bit for bit.

QUANT_LIMIT = {8: 127, 4: 7, 2: 1}
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def splitmix64(seed: int) -> int:
    z = (seed + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _lowbias32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> np.uint32(16))


def quant_noise(seed: int, start: int, count: int) -> np.ndarray:
    """The stochastic-rounding noise u in [0, 1) of elements [start, start + count)."""
    key = splitmix64(seed)
    k0, k1 = np.uint32(key & _M32), np.uint32(key >> 32)
    i = np.arange(start, start + count, dtype=np.uint64)
    lo = (i & np.uint64(_M32)).astype(np.uint32)
    hi = (i >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        key = k0 ^ _lowbias32(hi ^ k1)
        h = _lowbias32(lo ^ key)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (one per uint8) -> their low `bits` bits, element i at bit i * bits."""
    if bits == 8:
        return codes.astype(np.uint8)
    b = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(b.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    if bits == 8:
        return packed[:n].astype(np.uint8)
    b = np.unpackbits(packed, bitorder="little", count=n * bits).reshape(n, bits)
    full = np.zeros((n, 8), dtype=np.uint8)
    full[:, :bits] = b
    return np.packbits(full, axis=1, bitorder="little").reshape(n)


def quantize_buckets(
    x: np.ndarray,
    dtype: int,
    bits: int,
    bucket: int,
    stochastic: bool,
    seed: int,
    residual: np.ndarray | None,
    codes: np.ndarray,
    scales: np.ndarray,
) -> None:
    """Fills codes (packed) and scales; with a residual, error feedback in place."""
    n = x.size
    if n == 0:
        return
    lim = QUANT_LIMIT[bits]
    y = bits_to_float32(x, dtype).astype(np.float32)
    if residual is not None:
        y = y + residual
    nb = -(-n // bucket)
    yb = np.zeros(nb * bucket, dtype=np.float32)
    yb[:n] = y
    yb = yb.reshape(nb, bucket)
    amax_bits = (yb.view(np.uint32) & np.uint32(0x7FFFFFFF)).max(axis=1)
    amax = amax_bits.view(np.float32)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.float32(lim) / amax
        nonfinite = amax_bits >= 0x7F800000
        ok = ~nonfinite & (amax_bits != 0) & np.isfinite(inv)
        scale = np.where(ok, amax / np.float32(lim), np.float32(0)).astype(np.float32)
        scale[nonfinite] = np.uint32(0x7FC00000).view(np.float32)
        v = yb * np.where(ok, inv, np.float32(0))[:, None]
        if stochastic:
            u = quant_noise(seed, 0, nb * bucket).reshape(nb, bucket)
            q = np.floor(v + u)
        else:
            q = np.rint(v)
    q = np.clip(q, -lim, lim)
    q[~ok] = 0
    c = (q.astype(np.int32) + lim).reshape(-1)[:n]
    codes[:] = pack_codes(c, bits)
    scales[:] = scale
    if residual is not None:
        with np.errstate(invalid="ignore"):
            r = yb - (q.astype(np.float32) * scale[:, None])
        r[nonfinite] = 0
        residual[:] = r.reshape(-1)[:n]


def dequantize_buckets(
    codes: np.ndarray,
    scales: np.ndarray,
    n: int,
    bits: int,
    bucket: int,
    out: np.ndarray,
    accumulate: bool,
) -> None:
    """out = (or +=) float32(code - L) * scale of the element's bucket."""
    if n == 0:
        return
    q = unpack_codes(codes, n, bits).astype(np.int32) - QUANT_LIMIT[bits]
    s = np.repeat(scales, bucket)[:n]
    with np.errstate(invalid="ignore"):
        deq = q.astype(np.float32) * s
    if accumulate:
        out[:] = out + deq
    else:
        out[:] = deq


def pack_bits(values: np.ndarray, width: int, out: np.ndarray) -> None:
    """The low `width` bits of each uint32 value, value i at bit i * width (little-endian)."""
    if width == 0 or values.size == 0:
        return
    b = np.unpackbits(values.astype("<u4").view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
    out[:] = np.packbits(b[:, :width].reshape(-1), bitorder="little")


def unpack_bits(data: np.ndarray, n: int, width: int, values: np.ndarray) -> None:
    """Inverse of pack_bits: `n` values into `values` (uint32)."""
    if width == 0 or n == 0:
        values[:] = 0
        return
    bits = np.unpackbits(data, bitorder="little", count=n * width).reshape(n, width)
    full = np.zeros((n, 32), dtype=np.uint8)
    full[:, :width] = bits
    values[:] = np.packbits(full, axis=1, bitorder="little").view("<u4").reshape(n)


# --- qat: fake quantization ---------------------------------------------------


def fake_quant_per_row(x: np.ndarray, y: np.ndarray, mask: np.ndarray, scale: np.ndarray) -> None:
    """Oracle of ``csrc/qat/qat.h``: y = round_half_even(x / s).clip(+-127) * s per row,
    s = max|row| / 127, mask = (|x / s| <= 127.5); zero rows y 0 mask 1, rows with
    NaN/inf y NaN mask 0."""
    x = x.astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        finite = np.isfinite(x).all(axis=1)
        amax = np.abs(x).max(axis=1, initial=np.float32(0)).astype(np.float32)
        s = (amax / np.float32(127)).astype(np.float32)
        s[np.isnan(x).any(axis=1)] = np.nan
        scale[:] = s
        usable = finite & (s > 0)
        safe = np.where(usable, s, np.float32(1)).astype(np.float32)[:, None]
        t = (x / safe).astype(np.float32)
        q = np.clip(np.rint(t), -127, 127).astype(np.float32)
        yy = np.where(usable[:, None], q * safe, np.float32(0) * s[:, None])
        y[:] = yy.astype(np.float32)
        m = np.where(usable[:, None], np.abs(t) <= np.float32(127.5), (s == 0)[:, None])
        mask[:] = m.astype(np.uint8)


def fake_quant_backward(grad: np.ndarray, mask: np.ndarray, out: np.ndarray) -> None:
    """Oracle of ``fake_quant_backward_cpu``: the gradient where mask, else 0."""
    out[:] = np.where(mask != 0, grad, np.float32(0)).astype(np.float32)


# --- cluster: weight sharing through codebooks ---------------------------------


def cluster_code_offsets(k: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(byte, shift) of the code of column k in a row of packed codes
    (layout in csrc/cluster/cluster.h), by index arithmetic."""
    cols = np.arange(k, dtype=np.int64)
    if bits == 8:
        return cols, np.zeros(k, dtype=np.int64)
    j = (cols % 128) // 16
    return 64 * (cols // 128) + 4 * (cols % 16) + j // 2, 4 * (j % 2)


def cluster_unpack_codes(codes: np.ndarray, k: int, bits: int) -> np.ndarray:
    """The [N, K] codes (int64) of packed rows of codes."""
    byte, shift = cluster_code_offsets(k, bits)
    mask = 0xFF if bits == 8 else 0xF
    return (codes[:, byte].astype(np.int64) >> shift) & mask


def cluster_linear(
    x: np.ndarray,
    codes: np.ndarray,
    codebook: np.ndarray,
    bias: np.ndarray | None,
    bits: int,
    dynamic: bool,
    y: np.ndarray,
) -> None:
    """y = x @ W.T + bias, W[n, k] = codebook[n or 0, code[n, k]]: in float64, or
    (dynamic) from int8 x and codebooks as quantize_per_row makes them, the
    integer sum exact and the fp32 epilogue float(acc) * (xs * cs) + bias."""
    k = x.shape[1]
    idx = cluster_unpack_codes(codes, k, bits)
    n = idx.shape[0]
    rows = np.arange(n)[:, None] if codebook.shape[0] == n else np.zeros((n, 1), dtype=np.int64)
    if dynamic:
        xq = np.empty(x.shape, np.int8)
        xs = np.empty(x.shape[0], np.float32)
        quantize_per_row(x, xq, xs)
        cq = np.empty(codebook.shape, np.int8)
        cs = np.empty(codebook.shape[0], np.float32)
        quantize_per_row(codebook, cq, cs)
        acc = xq.astype(np.int64) @ cq[rows, idx].astype(np.int64).T
        with np.errstate(invalid="ignore", over="ignore"):
            out = acc.astype(np.float32) * (xs[:, None] * cs[rows[:, 0]][None, :])
            if bias is not None:
                out = out + bias.astype(np.float32)
        y[:] = out
        return
    w = codebook.astype(np.float64)[rows, idx]
    out = x.astype(np.float64) @ w.T
    if bias is not None:
        out = out + bias.astype(np.float64)
    y[:] = out.astype(np.float32)
