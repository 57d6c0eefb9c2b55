"""What the compressed layers share: their byte count, and loading tensors whose
size depends on the weight (stored values, a chosen rank). Which modules of a
model they replace is :mod:`pykernels.compress.walk`'s business."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def nbytes_of(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def take_loaded_sizes(
    module: nn.Module, state_dict: dict, prefix: str, free_dims: dict[str, int]
) -> None:
    """Before ``load_state_dict`` copies: resize tensors whose size depends on the weight.

    A parameter or buffer ``name`` whose loaded tensor has the same dtype and
    differs from it only along dimension ``free_dims[name]`` is replaced by an
    empty tensor of the loaded size (a Parameter stays a Parameter, with its
    ``requires_grad``), which the load then fills. Any other mismatch is left
    for torch to report.
    """
    for name, dim in free_dims.items():
        loaded, mine = state_dict.get(prefix + name), getattr(module, name)
        if not isinstance(loaded, Tensor) or loaded.dtype != mine.dtype:
            continue
        if loaded.dim() != mine.dim() or loaded.shape == mine.shape:
            continue
        if any(
            a != b
            for i, (a, b) in enumerate(zip(loaded.shape, mine.shape, strict=False))
            if i != dim
        ):
            continue
        fresh = torch.empty(loaded.shape, dtype=mine.dtype, device=mine.device)
        if isinstance(mine, nn.Parameter):
            fresh = nn.Parameter(fresh, requires_grad=mine.requires_grad)
        setattr(module, name, fresh)


def __getattr__(name: str):
    # Models pickled whole (torch.save(model)) before the walk moved to
    # pykernels.compress.walk name its fused-path hook here.
    if name == "_unfused":
        from ..compress.walk import _unfused

        return _unfused
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
