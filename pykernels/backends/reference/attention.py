"""attention reference: the definition, in float64, one batch entry at a time.

softmax(q k^T * scale + mask) v with keys at or past ``kv_lengths[b]`` left
out of batch entry b altogether and, with ``is_causal``, key j hidden from
query row i when j > i (top-left aligned, as torch's SDPA). A row that sees
no key gives zeros (what SDPA returns on the CPU); NaN in a score a row sees
gives NaN in that row.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    is_causal: bool,
    scale: float,
    kv_lengths: Tensor | None,
) -> Tensor:
    """The oracle: same arguments as the op (``mask`` additive float, broadcastable)."""
    b, h, sq, _ = q.shape
    sk, dv = k.shape[2], v.shape[3]
    out = torch.zeros(b, h, sq, dv, dtype=torch.float64)
    full = None if mask is None else mask.double().cpu().expand(b, h, sq, sk)
    lengths = [sk] * b if kv_lengths is None else [int(x) for x in kv_lengths.cpu()]
    for i in range(b):
        n = lengths[i]
        if n == 0:
            continue
        qi = q[i].double().cpu()
        ki = k[i, :, :n].double().cpu()
        vi = v[i, :, :n].double().cpu()
        s = qi @ ki.transpose(-1, -2) * scale
        if full is not None:
            s = s + full[i, :, :, :n]
        if is_causal:
            hide = torch.ones(sq, n, dtype=torch.bool).triu(1)
            s = s.masked_fill(hide, float("-inf"))
        m = s.amax(-1, keepdim=True)  # NaN where the row holds NaN
        empty = m == float("-inf")
        p = torch.exp(s - torch.where(empty, 0.0, m))
        o = (p @ vi) / p.sum(-1, keepdim=True)
        out[i] = torch.where(empty, 0.0, o)
    return out.to(dtype=q.dtype, device=q.device)
