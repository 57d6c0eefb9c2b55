"""Module kinds: how :func:`pykernels.save` describes a compressed or reshaped module
and how :func:`pykernels.load` rebuilds it before loading its tensors.

A kind is a module type with ``describe(module) -> dict`` (JSON: the
constructor's sizes and options, never tensors) and ``build(config) ->
module`` (an empty module of those sizes, which ``load_state_dict`` then
fills). ``params(module)`` counts stored weight values for layers that keep
their weights in buffers (int8 tables); other modules count their parameters.
A later module registers its own layers with :func:`register_kind`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..nn import (
    ClusteredLinear,
    CPConv2d,
    EncoderBlock,
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8GatedMLP,
    Int8Linear,
    LowRankLinear,
    QATLinear,
    SparseLinear,
    TuckerConv2d,
)


@dataclass(frozen=True)
class ModuleKind:
    name: str
    type: type
    describe: Callable[[nn.Module], dict[str, Any]]
    build: Callable[[dict[str, Any]], nn.Module]
    params: Callable[[nn.Module], int] | None = None


_MODULE_KINDS: dict[str, ModuleKind] = {}


def register_kind(
    type_: type,
    describe: Callable[[nn.Module], dict[str, Any]],
    build: Callable[[dict[str, Any]], nn.Module],
    name: str | None = None,
    params: Callable[[nn.Module], int] | None = None,
) -> ModuleKind:
    """Lets :func:`pykernels.save` / :func:`pykernels.load` handle modules of ``type_``.

    ``name`` (default: the class name) is what the manifest records; it must be
    unique. ``describe`` must record everything ``build`` needs to make a
    module whose ``load_state_dict`` takes the saved tensors.
    """
    if not isinstance(type_, type) or not issubclass(type_, nn.Module):
        raise TypeError(f"register_kind: type_ must be an nn.Module subclass, got {type_!r}")
    name = name or type_.__name__
    old = _MODULE_KINDS.get(name)
    if old is not None and old.type is not type_:
        raise ValueError(f"register_kind: a kind named {name!r} is already registered")
    mk = ModuleKind(name, type_, describe, build, params)
    _MODULE_KINDS[name] = mk
    return mk


def module_kind_of(module: nn.Module) -> ModuleKind | None:
    """The registered module kind whose type is exactly ``type(module)``."""
    for mk in _MODULE_KINDS.values():
        if type(module) is mk.type:
            return mk
    return None


def module_kind_named(name: str) -> ModuleKind | None:
    return _MODULE_KINDS.get(name)


def module_kind_names() -> list[str]:
    return sorted(_MODULE_KINDS)


def count_params(model: nn.Module) -> int:
    """Stored weight values: parameters, plus the int8 weights (and float biases) of
    layers that hold them as buffers. Scales, indices and running statistics
    are not counted."""
    total, seen = 0, set()
    skip_under: list[str] = []
    for fqn, m in model.named_modules():
        if any(fqn.startswith(p) for p in skip_under):
            continue
        mk = module_kind_of(m)
        if mk is not None and mk.params is not None:
            total += mk.params(m)
            skip_under.append(fqn + "." if fqn else "")
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


# --- dtypes as text ---------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: Any) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def _float_dtype(module: nn.Module) -> str:
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return dtype_name(t.dtype)
    return "float32"


# --- the built-in kinds -------------------------------------------------------------------


def _linear_describe(m: nn.Linear) -> dict[str, Any]:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "dtype": dtype_name(m.weight.dtype),
    }


def _linear_build(c: dict[str, Any]) -> nn.Module:
    return nn.Linear(c["in_features"], c["out_features"], c["bias"], dtype=dtype_of(c["dtype"]))


def _conv_describe(m: nn.Module) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
        "dilation": list(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
        "dtype": dtype_name(m.weight.dtype),
    }


def _conv_build(cls: type) -> Callable[[dict[str, Any]], nn.Module]:
    def build(c: dict[str, Any]) -> nn.Module:
        pad = c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"])
        return cls(
            c["in_channels"],
            c["out_channels"],
            tuple(c["kernel_size"]),
            stride=tuple(c["stride"]),
            padding=pad,
            dilation=tuple(c["dilation"]),
            groups=c["groups"],
            bias=c["bias"],
            padding_mode=c["padding_mode"],
            dtype=dtype_of(c["dtype"]),
        )

    return build


def _bn_describe(m: nn.Module) -> dict[str, Any]:
    return {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
        "dtype": _float_dtype(m),
    }


def _bn_build(cls: type) -> Callable[[dict[str, Any]], nn.Module]:
    def build(c: dict[str, Any]) -> nn.Module:
        return cls(
            c["num_features"],
            eps=c["eps"],
            momentum=c["momentum"],
            affine=c["affine"],
            track_running_stats=c["track_running_stats"],
            dtype=dtype_of(c["dtype"]),
        )

    return build


def _int8_linear_describe(m: Int8Linear) -> dict[str, Any]:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "mode": m.mode,
        "act_bits": m.act_bits,
        "activation": m.activation,
    }


def _int8_linear_params(m: Int8Linear) -> int:
    return m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)


def _int4_linear_describe(m: Int4Linear) -> dict[str, Any]:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "group_size": m.group_size,
        "symmetric": m.symmetric,
        "mode": m.mode,
    }


def _int4_linear_build(c: dict[str, Any]) -> nn.Module:
    return Int4Linear(
        c["in_features"], c["out_features"], c["bias"], c["group_size"], c["symmetric"], c["mode"]
    )


def _int8_emb_describe(m: Int8Embedding) -> dict[str, Any]:
    return {
        "num_embeddings": m.num_embeddings,
        "embedding_dim": m.embedding_dim,
        "padding_idx": m.padding_idx,
        "dtype": dtype_name(m.dtype),
    }


def _int8_emb_build(c: dict[str, Any]) -> nn.Module:
    return Int8Embedding(
        c["num_embeddings"], c["embedding_dim"], c["padding_idx"], dtype=dtype_of(c["dtype"])
    )


def _int4_emb_describe(m: Int4Embedding) -> dict[str, Any]:
    return {**_int8_emb_describe(m), "group_size": m.group_size, "symmetric": m.symmetric}


def _int4_emb_build(c: dict[str, Any]) -> nn.Module:
    return Int4Embedding(
        c["num_embeddings"],
        c["embedding_dim"],
        c["padding_idx"],
        group_size=c["group_size"],
        symmetric=c["symmetric"],
        dtype=dtype_of(c["dtype"]),
    )


def _qat_describe(m: QATLinear) -> dict[str, Any]:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "mode": m.mode,
        "dtype": dtype_name(m.weight.dtype),
    }


def _qat_build(c: dict[str, Any]) -> nn.Module:
    return QATLinear(
        c["in_features"], c["out_features"], c["bias"], c["mode"], dtype=dtype_of(c["dtype"])
    )


def _sparse_describe(m: SparseLinear) -> dict[str, Any]:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "pattern": m.pattern,
        "nnz": int(m.values.numel()),
    }


def _sparse_build(c: dict[str, Any]) -> nn.Module:
    from ..ops import sparse as sp

    # A weight of the right size with nothing stored (every row empty), built
    # without the dense [out, in] zeros it would take to prune one: the load
    # takes the stored pattern and its sizes.
    n, k = c["out_features"], c["in_features"]
    block = sp.BLOCK if c["pattern"] == "block" else 1
    values = torch.zeros((0, block, block) if block > 1 else (0,))
    col = torch.zeros(0, dtype=sp._col_dtype(k, block))
    row_ptr = torch.zeros(-(-n // block) + 1, dtype=torch.int64)
    bias = torch.zeros(n) if c["bias"] else None
    return SparseLinear(sp.SparseWeight(values, col, row_ptr, n, k, block), bias, c["pattern"])


def _lowrank_describe(m: LowRankLinear) -> dict[str, Any]:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "rank": m.rank,
        "bias": m.bias is not None,
        "energy_kept": m.energy_kept,
        "dtype": dtype_name(m.down.dtype),
    }


def _lowrank_build(c: dict[str, Any]) -> nn.Module:
    m = LowRankLinear(c["in_features"], c["out_features"], c["rank"], c["bias"])
    m.energy_kept = float(c.get("energy_kept", 1.0))
    return m.to(dtype_of(c.get("dtype", "float32")))


def _tucker_describe(m: TuckerConv2d) -> dict[str, Any]:
    return {
        "first": _conv_describe(m.first),
        "core": _conv_describe(m.core),
        "last": _conv_describe(m.last),
    }


def _tucker_build(c: dict[str, Any]) -> nn.Module:
    b = _conv_build(nn.Conv2d)
    return TuckerConv2d(b(c["first"]), b(c["core"]), b(c["last"]))


def _clustered_describe(m: ClusteredLinear) -> dict[str, Any]:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "n_clusters": m.n_clusters,
        "per": m.per,
        "bias": m.bias is not None,
        "mode": m.mode,
    }


def _clustered_build(c: dict[str, Any]) -> nn.Module:
    return ClusteredLinear(
        c["in_features"],
        c["out_features"],
        c["n_clusters"],
        c["per"],
        bias=c["bias"],
        mode=c.get("mode", "dynamic"),
    )


def _clustered_params(m: ClusteredLinear) -> int:
    # One stored value per weight (its code, as Int8Linear counts its int8
    # weights), plus the centroids and the bias.
    extra = m.bias.numel() if m.bias is not None else 0
    return m.in_features * m.out_features + m.codebook.numel() + extra


def _cp_describe(m: CPConv2d) -> dict[str, Any]:
    return {
        "first": _conv_describe(m.first),
        "vertical": _conv_describe(m.vertical),
        "horizontal": _conv_describe(m.horizontal),
        "last": _conv_describe(m.last),
        "rel_error": m.rel_error,
    }


def _cp_build(c: dict[str, Any]) -> nn.Module:
    b = _conv_build(nn.Conv2d)
    m = CPConv2d(b(c["first"]), b(c["vertical"]), b(c["horizontal"]), b(c["last"]))
    m.rel_error = c.get("rel_error")
    return m


def _embedding_describe(m: nn.Embedding) -> dict[str, Any]:
    return {
        "num_embeddings": m.num_embeddings,
        "embedding_dim": m.embedding_dim,
        "padding_idx": m.padding_idx,
        "max_norm": m.max_norm,
        "norm_type": m.norm_type,
        "scale_grad_by_freq": m.scale_grad_by_freq,
        "sparse": m.sparse,
        "dtype": dtype_name(m.weight.dtype),
    }


def _embedding_build(c: dict[str, Any]) -> nn.Module:
    return nn.Embedding(
        c["num_embeddings"],
        c["embedding_dim"],
        padding_idx=c["padding_idx"],
        max_norm=c["max_norm"],
        norm_type=c["norm_type"],
        scale_grad_by_freq=c["scale_grad_by_freq"],
        sparse=c["sparse"],
        dtype=dtype_of(c["dtype"]),
    )


register_kind(nn.Linear, _linear_describe, _linear_build)
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_kind(_cls, _conv_describe, _conv_build(_cls))
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_kind(_cls, _bn_describe, _bn_build(_cls))
register_kind(nn.Embedding, _embedding_describe, _embedding_build)
register_kind(
    Int8Linear,
    _int8_linear_describe,
    lambda c: Int8Linear(
        c["in_features"],
        c["out_features"],
        c["bias"],
        c["mode"],
        act_bits=c.get("act_bits", 8),
        activation=c.get("activation", "none"),
    ),
    params=_int8_linear_params,
)
register_kind(
    EncoderBlock,
    lambda m: m.config(),
    lambda c: EncoderBlock(**c),
    params=lambda m: (
        sum(_int8_linear_params(getattr(m, n)) for n in ("qkv", "out", "ffn1", "ffn2"))
        + sum(p.numel() for p in (*m.norm1.parameters(), *m.norm2.parameters()))
    ),
)
register_kind(
    Int8GatedMLP,
    lambda m: m.config(),
    lambda c: Int8GatedMLP(**c),
    params=lambda m: m.gate_up_weight.numel() + _int8_linear_params(m.down),
)
register_kind(Int4Linear, _int4_linear_describe, _int4_linear_build, params=_int8_linear_params)
register_kind(Int8Embedding, _int8_emb_describe, _int8_emb_build, params=lambda m: m.weight.numel())
register_kind(
    Int4Embedding,
    _int4_emb_describe,
    _int4_emb_build,
    params=lambda m: m.num_embeddings * m.embedding_dim,
)
register_kind(QATLinear, _qat_describe, _qat_build)
register_kind(SparseLinear, _sparse_describe, _sparse_build)
register_kind(LowRankLinear, _lowrank_describe, _lowrank_build)
register_kind(TuckerConv2d, _tucker_describe, _tucker_build)
register_kind(ClusteredLinear, _clustered_describe, _clustered_build, params=_clustered_params)
register_kind(CPConv2d, _cp_describe, _cp_build)
