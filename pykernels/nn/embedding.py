"""Int8Embedding: an ``nn.Embedding`` table stored as int8 rows with one scale each."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ._module import nbytes_of


class Int8Embedding(nn.Module):
    """A lookup table of int8 rows, each with its own float32 scale (row-wise symmetric).

    ``forward(ids)`` returns ``weight_int8[ids] * scale[ids]`` in the source
    embedding's dtype: the same lookup as ``nn.Embedding`` (a padding row is
    returned as stored, zero when it was zero), at a quarter of the bytes.
    One scale per row keeps rare tokens' small rows from losing all precision
    to the table's largest entry. Inference only: the table has no gradient.
    Build it with :meth:`from_embedding`; ``state_dict`` holds ``weight``
    (int8 ``[num_embeddings, embedding_dim]``) and ``weight_scale`` (float32
    ``[num_embeddings]``).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"Int8Embedding: {name} must be a non-negative int, got {v!r}")
        if padding_idx is not None:
            if not isinstance(padding_idx, int) or isinstance(padding_idx, bool):
                raise ValueError(f"Int8Embedding: padding_idx must be an int, got {padding_idx!r}")
            # nn.Embedding's convention: a negative index counts from the end.
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(
                    f"Int8Embedding: padding_idx must be within num_embeddings "
                    f"({num_embeddings}), got {padding_idx}"
                )
            if padding_idx < 0:
                padding_idx += num_embeddings
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"Int8Embedding: dtype must be a float dtype, got {dtype!r}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.register_buffer(
            "weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weight_scale", torch.zeros(num_embeddings, dtype=torch.float32, device=device)
        )

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        """Quantizes each row: ``scale = max|row| / 127``, ``q = round_half_even(row / scale)``.

        ``embedding`` is not modified. ``max_norm`` is refused: nn.Embedding
        renormalizes its rows in place during lookup, which a fixed int8
        table cannot do.
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                "Int8Embedding.from_embedding: embedding must be an nn.Embedding, "
                f"got {type(embedding).__name__}"
            )
        if embedding.max_norm is not None:
            raise ValueError(
                "Int8Embedding.from_embedding: embedding.max_norm must be None "
                "(rows renormalized at lookup cannot be stored as fixed int8)"
            )
        w = embedding.weight.detach()
        if not w.is_floating_point() or w.device.type == "meta":
            raise ValueError(
                "Int8Embedding.from_embedding: embedding.weight must be a float tensor with "
                f"data, got {w.dtype} on {w.device}"
            )
        if not torch.isfinite(w).all():
            raise ValueError("Int8Embedding.from_embedding: embedding.weight holds NaN or inf")
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            dtype=w.dtype,
            device=w.device,
        )
        with torch.no_grad():
            q, scale = quantize_rows(w)
            layer.weight.copy_(q)
            layer.weight_scale.copy_(scale)
        return layer

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"Int8Embedding: input must be a torch.Tensor, got {type(input)}")
        if input.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"Int8Embedding: input must be int64 or int32 ids, got {input.dtype}")
        flat = input.reshape(-1)
        rows = self.weight.index_select(0, flat).to(self.dtype)
        scale = self.weight_scale.index_select(0, flat).to(self.dtype)
        return (rows * scale[:, None]).view(*input.shape, self.embedding_dim)

    def dequantized_weight(self) -> Tensor:
        """The float table this layer looks up: int8 * scale, in the layer's dtype."""
        return (self.weight.float() * self.weight_scale[:, None]).to(self.dtype)

    def nbytes(self) -> int:
        """Bytes held: the int8 table and the row scales."""
        return nbytes_of(self)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s + f", dtype={self.dtype}, weight=int8 per-row, nbytes={self.nbytes()}"

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        # .half() / .to(dtype) would convert the scales; keep them float32 and
        # let the output dtype follow the conversion instead.
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = self.weight_scale.float()
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return self


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row of a 2-D float tensor: ``(q int8, scale float32)``.

    The int8 family's :func:`pykernels.ops.quantize_per_row`, so tables and
    Int8Linear weights round alike; an all-zero row gets scale 0 and zeros.
    """
    if w.numel() == 0:
        return (
            torch.zeros(w.shape, dtype=torch.int8, device=w.device),
            torch.zeros(w.shape[0], dtype=torch.float32, device=w.device),
        )
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        w = w.float()
    return ops.quantize_per_row(w)
