"""attention against torch's SDPA at the shapes encoders run (CPU, float32).

* MiniLM (32 x 12 heads x 128 tokens x 32 head dim) and BERT-base (8 x 12 x
  128 x 64), with no mask and with an all-ones Hugging Face padding mask
  (SDPA gets the additive ``[B, 1, 1, S]`` mask HF passes it; pykernels the
  lengths :func:`~pykernels.ops.padding_mask_to_lengths` makes of it, once
  per batch, as a model would for all its layers).
* BERT-base with half of every sequence padded: SDPA still computes every
  key; ``kv_lengths`` leaves the padded ones out.
* BERT-base shape, causal (``is_causal=True`` for both).
* MiniLM's shape with q, k and v as strided views of one fused ``[B, S, 3,
  H, D]`` QKV projection, as a fused block feeds them.

Peers run on the same tensors, under ``torch.inference_mode``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import ops
from . import Case, inference

MINILM = (32, 12, 128, 32)
BERT = (8, 12, 128, 64)


def _case(name: str, impls: dict[str, Callable[[], object]], quick: bool) -> Case:
    return Case(
        family="attention",
        name=name,
        device="cpu",
        impls={k: inference(f) for k, f in impls.items()},
        baseline="torch SDPA",
        reps=5 if quick else 15,
    )


def _qkv(gen: torch.Generator, b: int, h: int, s: int, d: int):
    return [torch.randn(b, h, s, d, generator=gen) for _ in range(3)]


def _shape(b: int, h: int, s: int, d: int) -> str:
    return f"{b}x{h}x{s}x{d}"


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":  # on other devices attention() is SDPA itself
        return []
    gen = torch.Generator().manual_seed(0)
    out: list[Case] = []
    for label, (b, h, s, d) in (("MiniLM", MINILM), ("BERT-base", BERT)):
        q, k, v = _qkv(gen, b, h, s, d)
        out.append(
            _case(
                f"{label} {_shape(b, h, s, d)}",
                {
                    "torch SDPA": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
                    "pk attention": lambda q=q, k=k, v=v: ops.attention(q, k, v),
                },
                quick,
            )
        )
        hf = torch.zeros(b, 1, 1, s)  # an all-ones attention_mask, as HF hands it to SDPA
        lens, _ = ops.padding_mask_to_lengths(hf)
        out.append(
            _case(
                f"{label} {_shape(b, h, s, d)} HF mask (all ones)",
                {
                    "torch SDPA": lambda q=q, k=k, v=v, m=hf: F.scaled_dot_product_attention(
                        q, k, v, attn_mask=m
                    ),
                    "pk attention": lambda q=q, k=k, v=v, n=lens: ops.attention(
                        q, k, v, kv_lengths=n
                    ),
                    "pk attention (mask as is)": lambda q=q, k=k, v=v, m=hf: ops.attention(
                        q, k, v, attn_mask=m
                    ),
                },
                quick,
            )
        )
    b, h, s, d = BERT
    q, k, v = _qkv(gen, b, h, s, d)
    am = torch.ones(b, s, dtype=torch.int64)
    am[:, s // 2 :] = 0
    hf = torch.zeros(b, 1, 1, s).masked_fill(am[:, None, None, :] == 0, torch.finfo(q.dtype).min)
    lens, _ = ops.padding_mask_to_lengths(hf)
    out.append(
        _case(
            f"BERT-base {_shape(b, h, s, d)} half padded",
            {
                "torch SDPA": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=hf),
                "pk attention": lambda: ops.attention(q, k, v, kv_lengths=lens),
            },
            quick,
        )
    )
    out.append(
        _case(
            f"BERT-base {_shape(b, h, s, d)} causal",
            {
                "torch SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                "pk attention": lambda: ops.attention(q, k, v, is_causal=True),
            },
            quick,
        )
    )
    b, h, s, d = MINILM
    qkv = torch.randn(b, s, 3, h, d, generator=gen)
    fq, fk, fv = (t.transpose(1, 2) for t in qkv.unbind(2))
    out.append(
        _case(
            f"MiniLM {_shape(b, h, s, d)} fused-QKV views",
            {
                "torch SDPA": lambda: F.scaled_dot_product_attention(fq, fk, fv),
                "pk attention": lambda: ops.attention(fq, fk, fv),
            },
            quick,
        )
    )
    return out
