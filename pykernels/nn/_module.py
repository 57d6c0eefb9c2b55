"""What the compressed layers share: their byte count, and loading tensors whose
size depends on the weight (stored values, a chosen rank)."""

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


# --- swapping layers into a model ----------------------------------------------
#
# A conversion (quantize_int8, sparsify, factorize) replaces child modules by
# compressed layers that have no dense `.weight`. Two torch modules read their
# Linears' weights directly instead of calling them:
#
# - nn.MultiheadAttention passes out_proj.weight (and its in_proj_weight, a bare
#   parameter) to F.multi_head_attention_forward. Its Linear is left dense:
#   converting attention would take a module of our own, and a conversion must
#   never leave a model that fails at forward.
# - nn.TransformerEncoderLayer (and nn.TransformerEncoder) run a fused
#   inference path (torch._transformer_encoder_layer_fwd) on linear1.weight and
#   linear2.weight when they can. Those feed-forward Linears are converted, and
#   the fused path is turned off for the layers holding them (it would read the
#   dense weights the layer no longer has): torch takes the module-by-module
#   path whenever a submodule has a forward hook, and TransformerEncoder honours
#   use_nested_tensor = False.


def convertible_children(
    model: nn.Module, kinds: tuple[type, ...], accept
) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, child) for each child of a type in `kinds` that
    ``accept(child, fqn)`` takes, leaving out what nn.MultiheadAttention owns."""
    out = []
    for fqn, parent in list(model.named_modules()):
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for name, child in list(parent.named_children()):
            child_fqn = f"{fqn}.{name}" if fqn else name
            if isinstance(child, kinds) and accept(child, child_fqn):
                out.append((parent, name, child))
    return out


def _unfused(module, args):  # noqa: ARG001
    """A forward pre-hook that does nothing: its presence keeps torch's fused
    transformer path, which reads dense weights, off (see above)."""
    return None


def guard_fused_paths(model: nn.Module) -> None:
    """After a swap: turn torch's fused transformer paths off where they would
    read a weight that is no longer dense."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            for name in ("linear1", "linear2"):
                child = getattr(m, name, None)
                if child is not None and not isinstance(child, nn.Linear):
                    if _unfused not in child._forward_pre_hooks.values():
                        child.register_forward_pre_hook(_unfused)
        if isinstance(m, nn.TransformerEncoder):
            if any(
                not isinstance(getattr(layer, name, None), (nn.Linear, type(None)))
                for layer in m.layers
                for name in ("linear1", "linear2")
            ):
                m.use_nested_tensor = False
