"""Quantized ``nn.Embedding`` tables: :class:`Int8Embedding` (int8 rows, one scale
each) and :class:`Int4Embedding` (group-wise 4-bit rows in the int4 family's format)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import _checks
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
        padding_idx = _check_table_args("Int8Embedding", num_embeddings, embedding_dim, padding_idx)
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
        w = _check_source("Int8Embedding.from_embedding", embedding)
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
        flat = _check_ids("Int8Embedding", input).reshape(-1)
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
        return _scales_stay_float32(self, "weight_scale", fn)


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


def _scales_stay_float32(table: nn.Module, name: str, fn) -> nn.Module:
    """After ``nn.Module._apply``: .half() / .to(dtype) would have converted the
    scales; keep them float32 (the stored format) and let the output dtype follow
    the conversion instead."""
    if getattr(table, name).dtype != torch.float32:
        setattr(table, name, getattr(table, name).float())
    probe = fn(torch.empty(0, dtype=table.dtype))
    if probe.is_floating_point():
        table.dtype = probe.dtype
    return table


def _check_table_args(
    fn: str, num_embeddings: object, embedding_dim: object, padding_idx: object
) -> int | None:
    """The checks nn.Embedding's constructor makes, with the argument named;
    returns ``padding_idx`` made non-negative (nn.Embedding's convention)."""
    for name, v in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{fn}: {name} must be a non-negative int, got {v!r}")
    if padding_idx is None:
        return None
    if not isinstance(padding_idx, int) or isinstance(padding_idx, bool):
        raise ValueError(f"{fn}: padding_idx must be an int, got {padding_idx!r}")
    assert isinstance(num_embeddings, int)
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(
            f"{fn}: padding_idx must be within num_embeddings ({num_embeddings}), got {padding_idx}"
        )
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def _check_source(fn: str, embedding: object) -> Tensor:
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"{fn}: embedding must be an nn.Embedding, got {type(embedding).__name__}")
    if embedding.max_norm is not None:
        raise ValueError(
            f"{fn}: embedding.max_norm must be None (rows renormalized at lookup cannot be "
            "stored as a fixed quantized table)"
        )
    w = embedding.weight.detach()
    if not w.is_floating_point() or w.device.type == "meta":
        raise ValueError(
            f"{fn}: embedding.weight must be a float tensor with data, got {w.dtype} on {w.device}"
        )
    if not torch.isfinite(w).all():
        raise ValueError(f"{fn}: embedding.weight holds NaN or inf")
    return w


def _check_ids(fn: str, input: object) -> Tensor:
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a torch.Tensor, got {type(input)}")
    if input.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: input must be int64 or int32 ids, got {input.dtype}")
    return input


class Int4Embedding(nn.Module):
    """A lookup table of group-wise 4-bit rows: each ``group_size`` (32, 64 or
    128) consecutive entries of a row share one float32 scale and one zero point
    in 0..15, the format of :mod:`pykernels.ops.int4` with the table's rows as
    N and ``embedding_dim`` as K (llama.cpp stores token embeddings the same way
    in its Q4 files).

    ``forward(ids)`` gathers the ids' packed rows and dequantizes only those:
    ``(q - zero) * scale`` in float32 (one rounding each), then the source
    embedding's dtype. Bytes per row at ``embedding_dim`` D: D/2 for the codes
    and 5 per group (scale and zero), 0.65x an :class:`Int8Embedding` row at
    D = 384, g = 32. A padding row of zeros stays exactly zero (a zero group
    gets codes equal to its zero point). Inference only. Build it with
    :meth:`from_embedding`; ``state_dict`` holds ``packed`` (uint8 ``[V, D/2]``),
    ``scales`` (float32 ``[V, D/g]``) and ``zeros`` (uint8 ``[V, D/g]``).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        group_size: int = 32,
        symmetric: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        from ..ops.int4 import check_group_size

        fn = "Int4Embedding"
        self.padding_idx = _check_table_args(fn, num_embeddings, embedding_dim, padding_idx)
        self.group_size = check_group_size(fn, group_size, int(embedding_dim))
        self.symmetric = _checks.check_bool(fn, "symmetric", symmetric)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"{fn}: dtype must be a float dtype, got {dtype!r}")
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.dtype = dtype
        v, d, g = self.num_embeddings, self.embedding_dim, self.group_size
        zero = 8 if self.symmetric else 0
        self.register_buffer(
            "packed", torch.full((v, d // 2), zero * 17, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.ones(v, d // g, dtype=torch.float32, device=device))
        self.register_buffer(
            "zeros", torch.full((v, d // g), zero, dtype=torch.uint8, device=device)
        )

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, group_size: int = 32, symmetric: bool = False
    ) -> Int4Embedding:
        """Round-to-nearest of each row group (:func:`pykernels.ops.int4_quantize_weight`).

        ``embedding`` is not modified. ``embedding_dim`` must be a multiple of
        ``group_size`` (ValueError naming ``group_size``); ``max_norm`` is refused
        (nn.Embedding renormalizes rows in place at lookup, which a fixed table
        cannot do)."""
        fn = "Int4Embedding.from_embedding"
        w = _check_source(fn, embedding)
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            group_size=group_size,
            symmetric=symmetric,
            dtype=w.dtype,
            device=w.device,
        )
        if w.numel():
            with torch.no_grad():
                packed, scales, zeros = ops.int4_quantize_weight(
                    w.float(), layer.group_size, layer.symmetric
                )
                layer.packed.copy_(packed)
                layer.scales.copy_(scales)
                layer.zeros.copy_(zeros)
        return layer

    def forward(self, input: Tensor) -> Tensor:
        ids = _check_ids("Int4Embedding", input).reshape(-1)
        t, d, g = ids.numel(), self.embedding_dim, self.group_size
        p = self.packed.index_select(0, ids)
        # Low nibble is the even column, high nibble the odd one (the int4 format).
        q = torch.stack((p & 15, p >> 4), dim=-1).view(t, d // g, g)
        z = self.zeros.index_select(0, ids)
        s = self.scales.index_select(0, ids)
        rows = (q.float() - z.unsqueeze(-1).float()) * s.unsqueeze(-1)
        return rows.to(self.dtype).view(*input.shape, d)

    def dequantized_weight(self) -> Tensor:
        """The float table this layer looks up, in the layer's dtype."""
        if self.packed.numel() == 0:
            return torch.zeros(
                self.num_embeddings, self.embedding_dim, dtype=self.dtype, device=self.packed.device
            )
        w = ops.int4_dequantize_weight(self.packed, self.scales, self.zeros, self.group_size)
        return w.to(self.dtype)

    def nbytes(self) -> int:
        """Bytes held: the packed codes, the group scales and zero points."""
        return nbytes_of(self)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        kind = "sym" if self.symmetric else "asym"
        return (
            s + f", dtype={self.dtype}, weight=int4 g{self.group_size} {kind}, "
            f"nbytes={self.nbytes()}"
        )

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        return _scales_stay_float32(self, "scales", fn)
