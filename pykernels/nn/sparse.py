"""SparseLinear: a pruned ``nn.Linear`` stored sparse, faster in forward and
backward, trainable with its mask fixed; and ``sparsify``, which swaps it into
a model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..ops import _checks
from ..ops import sparse as sp
from ._module import nbytes_of, take_loaded_sizes

SCOPES = ("layer", "global")
_STRUCTURE = ("values", "col", "row_ptr")  # in sp.check_structure's order


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with W stored sparse (CSR, or 4x4 BSR for the block pattern).

    The stored values are the layer's trainable ``values`` parameter: an
    optimizer step updates them and never the pattern, so fine-tuning keeps
    the sparsity. The backward pass computes dX by a transposed sparse
    product and the gradient of the stored values only (an SDDMM), never a
    dense weight gradient. Build it with :meth:`from_linear`. The gradient of
    the input depends on the thread count in its last bits (see
    :func:`pykernels.ops.sparse_linear`); the output and the values'
    gradient do not.
    """

    def __init__(self, weight: sp.SparseWeight, bias: Tensor | None, pattern: str) -> None:
        super().__init__()
        if pattern not in sp.PATTERNS:
            raise ValueError(f"SparseLinear: pattern must be one of {sp.PATTERNS}, got {pattern!r}")
        self.in_features = weight.k
        self.out_features = weight.n
        self.pattern = pattern
        self.block = weight.block
        self.values = nn.Parameter(weight.values.detach().clone())
        self.register_buffer("col", weight.col.clone())
        self.register_buffer("row_ptr", weight.row_ptr.clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, sparsity: float | None = None, pattern: str = "unstructured"
    ) -> SparseLinear:
        """Prunes ``linear`` by magnitude to ``sparsity`` (see :func:`pykernels.prune`).

        With ``sparsity=None`` the weight's existing zeros are kept as they are
        (for ``"2:4"`` the pattern is applied, its sparsity being 0.5). The
        block pattern stores 4x4 blocks. ``linear`` is not modified.
        """
        if not isinstance(linear, nn.Linear):
            got = type(linear).__name__
            raise TypeError(f"SparseLinear.from_linear: linear must be an nn.Linear, got {got}")
        if pattern not in sp.PATTERNS:
            raise ValueError(f"SparseLinear.from_linear: pattern must be one of {sp.PATTERNS}")
        if sparsity is not None:
            sparsity = sp._check_sparsity("SparseLinear.from_linear", sparsity)
        w = linear.weight.detach()
        if sparsity is not None or pattern == "2:4":
            w = sp.prune(w, sparsity, pattern)
        block = sp.BLOCK if pattern == "block" else 1
        return cls(sp.to_sparse(w, block), linear.bias, pattern)

    @classmethod
    def from_linears(
        cls, linears: list[nn.Linear], sparsity: float, pattern: str = "unstructured"
    ) -> list[SparseLinear]:
        """Prunes ``linears`` together: one magnitude threshold across all their weights
        (as ``torch.nn.utils.prune.global_unstructured``; for ``"block"`` one
        block-norm threshold), so the layers end up at different densities and
        their weights as a whole at ``sparsity``. ``"2:4"`` is per group of four,
        so pruning together is the same as one by one. The layers are not modified.
        """
        fn = "SparseLinear.from_linears"
        if pattern not in sp.PATTERNS:
            raise ValueError(f"{fn}: pattern must be one of {sp.PATTERNS}")
        for lin in linears:
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{fn}: linears must be nn.Linear, got {type(lin).__name__}")
        if pattern == "2:4":
            return [cls.from_linear(lin, None, pattern) for lin in linears]
        sparsity = sp._check_sparsity(fn, sparsity)
        if not linears:
            return []
        if pattern == "unstructured":
            scores = [lin.weight.detach().abs().float().reshape(-1) for lin in linears]
        else:
            scores = [sp.block_norms(lin.weight).reshape(-1) for lin in linears]
        flat = torch.cat([s.cpu() for s in scores])
        keep = sp.magnitude_keep(flat, sp._keep_count(flat.numel(), sparsity))
        block = sp.BLOCK if pattern == "block" else 1
        out, start = [], 0
        for lin, s in zip(linears, scores, strict=True):
            part = keep[start : start + s.numel()]
            start += s.numel()
            if pattern == "unstructured":
                mask = part.view(lin.weight.shape)
            else:
                nb, kb = -(-lin.out_features // sp.BLOCK), -(-lin.in_features // sp.BLOCK)
                mask = sp.expand_block_mask(part.view(nb, kb), *lin.weight.shape)
            w = lin.weight.detach()
            pruned = torch.where(mask.to(w.device), w, torch.zeros_like(w))
            out.append(cls(sp.to_sparse(pruned, block), lin.bias, pattern))
        return out

    def sparse_weight(self) -> sp.SparseWeight:
        return sp.SparseWeight(
            self.values, self.col, self.row_ptr, self.out_features, self.in_features, self.block
        )

    def forward(self, x: Tensor) -> Tensor:
        return sp.sparse_linear(x, self.sparse_weight(), self.bias)

    def to_dense(self) -> Tensor:
        """The dense (pruned) float32 weight [out_features, in_features]."""
        with torch.no_grad():
            return sp.to_dense(self.sparse_weight())

    def density(self) -> float:
        """Fraction of the weight's entries that are non-zero (NaN on meta: no values)."""
        total = self.in_features * self.out_features
        if self.values.device.type == "meta":
            return float("nan")
        return float((self.to_dense() != 0).sum()) / total if total else 0.0

    def nbytes(self) -> int:
        """Bytes held: stored values, column indices, row pointers, bias."""
        return nbytes_of(self)

    def extra_repr(self) -> str:
        fmt = "csr" if self.block == 1 else f"bsr {self.block}x{self.block}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, pattern={self.pattern}, format={fmt}, "
            f"density={self.density():.4f}, nbytes={self.nbytes()}"
        )

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A corrupted structure is refused now, with the key named, rather than
        # at the first forward (or, on a backend that trusted it, never).
        dev = self.col.device
        parts = {f: state_dict.get(prefix + f, getattr(self, f)) for f in _STRUCTURE}
        parts = {f: t.to(dev) if isinstance(t, Tensor) else t for f, t in parts.items()}
        if any(isinstance(state_dict.get(prefix + f), Tensor) for f in _STRUCTURE):
            sp.check_structure(
                "SparseLinear.load_state_dict",
                *(parts[f] for f in _STRUCTURE),
                self.out_features,
                self.in_features,
                self.block,
                name=lambda field: f"state_dict[{prefix + field!r}]",
            )
        # The number of stored values depends on the weight: take the loaded one
        # (row_ptr's size is the row count, which must match).
        take_loaded_sizes(self, state_dict, prefix, {"values": 0, "col": 0})
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def sparsify(
    model: nn.Module,
    sparsity: float | None,
    pattern: str = "unstructured",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    scope: str = "layer",
    inplace: bool = False,
) -> nn.Module:
    """Prunes every ``nn.Linear`` that ``filter_fn(module, fqn)`` accepts and swaps in SparseLinear.

    ``scope="layer"`` prunes each layer to ``sparsity``; ``scope="global"``
    uses one magnitude threshold across all selected layers (as
    ``torch.nn.utils.prune.global_unstructured`` does; for the block pattern
    one block-norm threshold), so layers end up with different densities and
    the selected weights as a whole have ``sparsity``. 2:4 is per group of
    four, so its scope does not matter, and its sparsity is 0.5: ``sparsity``
    must then be 0.5 or None (anything else is refused). Layers are chosen
    as the ``"sparse"`` recipe step chooses them (this runs that step): the
    output projection of ``nn.MultiheadAttention`` and Linear subclasses with
    their own ``forward`` are left as they are; see
    :func:`pykernels.quantize_int8`. Deep-copies the model unless
    ``inplace=True``; returns the converted model.
    """
    from ..compress.api import apply_steps
    from ..compress.recipes import Sparse

    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsify: model must be an nn.Module, got {type(model).__name__}")
    if pattern not in sp.PATTERNS:
        raise ValueError(f"sparsify: pattern must be one of {sp.PATTERNS}, got {pattern!r}")
    if scope not in SCOPES:
        raise ValueError(f"sparsify: scope must be one of {SCOPES}, got {scope!r}")
    _checks.check_callable("sparsify", "filter_fn", filter_fn)
    inplace = _checks.check_bool("sparsify", "inplace", inplace)
    if pattern != "2:4":
        sparsity = sp._check_sparsity("sparsify", sparsity)
    elif sparsity is not None and sp._check_sparsity("sparsify", sparsity) != 0.5:
        # 2:4 keeps two of every four whatever is asked: refuse rather than
        # return a model at a sparsity the caller did not ask for.
        raise ValueError(
            f"sparsify: the 2:4 pattern has sparsity 0.5, got sparsity={sparsity}; pass 0.5 or None"
        )
    step = Sparse(sparsity if pattern != "2:4" else None, pattern, scope)
    return apply_steps(model, [step], filter_fn, inplace=inplace)
