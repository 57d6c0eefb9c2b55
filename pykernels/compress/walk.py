"""Which modules of a model a step may replace: the one walk that every recipe
step, ``pk.quantize_int8`` / ``pk.sparsify`` / ``pk.factorize`` and
``pk.qat.prepare`` / ``convert`` go through.

A replacement layer (Int8Linear, SparseLinear, ...) has no dense ``.weight``
and computes what the module it replaces computes when *called*. The walk
leaves alone, and names the reason for, the modules where that is not enough:

- a module whose owner reads its tensors instead of calling it:
  ``nn.MultiheadAttention`` passes ``out_proj.weight`` (and
  ``in_proj_weight``, a bare parameter) to ``F.multi_head_attention_forward``.
  Converting attention would take a module of our own, and a conversion must
  never leave a model that fails at forward;
- a subclass that computes something else than its torch base (its own
  ``forward``, a scaled or gated Linear): the replacement would compute the
  base's function and silently drop the subclass's;
- a module with forward or backward hooks (a hook that rescales the output,
  ``torch.nn.utils.prune``'s mask): they belong to the module object, and the
  replacement would compute without them.

``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``) run a fused
inference path (``torch._transformer_encoder_layer_fwd``) on
``linear1.weight`` and ``linear2.weight`` when they can. Those feed-forward
Linears are converted, and :func:`guard_fused_paths` turns the fused path off
for the layers holding them: torch takes the module-by-module path whenever a
submodule has a forward hook, and ``TransformerEncoder`` honours
``use_nested_tensor = False``.

Hugging Face's ``Conv1D`` (GPT-2, GPT, DistilGPT-2...) is a Linear with its
weight stored transposed ([in, out]): ``x @ W + b``. A step asking for
``nn.Linear`` is offered each plain ``Conv1D`` as the equivalent ``nn.Linear``
(:func:`as_linear`, the same values transposed, not in the model): the step's
replacement then takes the Conv1D's place, and the model never holds the
intermediate Linear, whose state_dict would not match the original
architecture's for :func:`pykernels.load`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

Accept = Callable[[nn.Module, str], bool]

# What a module's computation is made of, beyond its tensors: a subclass that
# overrides none of these computes what its base computes.
_COMPUTE = ("forward", "_conv_forward", "__call__")


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class when transformers is loaded (a model holding one
    has loaded it), else None: the walk never imports transformers itself."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def with_conv1d(types: tuple[type, ...]) -> tuple[type, ...]:
    """``types`` plus transformers' ``Conv1D`` where ``types`` asks for ``nn.Linear``."""
    conv1d = conv1d_type()
    if conv1d is None or nn.Linear not in types or conv1d in types:
        return types
    return (*types, conv1d)


def is_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def as_linear(conv: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what a transformers ``Conv1D`` computes: its weight
    transposed into Linear's [out, in] (values copied exactly) and its bias, on the
    Conv1D's device and dtype, in its training mode, frozen when it was."""
    w = conv.weight.detach()
    nx, nf = w.shape
    lin = nn.Linear(nx, nf, bias=conv.bias is not None, device="meta")
    lin.weight = nn.Parameter(w.t().contiguous(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        lin.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
    lin.train(conv.training)
    return lin


def candidates(model: nn.Module, types: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """(fqn, module) for every module of one of ``types`` (the model itself included),
    each once, outermost first; modules inside a match are not visited."""
    types = with_conv1d(types)
    out: list[tuple[str, nn.Module]] = []
    for fqn, m in model.named_modules():
        if any(f == "" or fqn.startswith(f + ".") for f, _ in out):
            continue
        if isinstance(m, types):
            out.append((fqn, m))
    return out


def why_not(model: nn.Module, fqn: str, module: nn.Module, types: tuple[type, ...]) -> str | None:
    """Why replacing ``module`` (at ``fqn`` of ``model``) by a layer standing for one of
    ``types`` would change what the model computes; None when it would not."""
    types = with_conv1d(types)
    base = next(t for t in types if isinstance(module, t))
    if type(module) is not base:
        own = [n for n in _COMPUTE if getattr(type(module), n, None) is not getattr(base, n, None)]
        if own:
            return (
                f"{type(module).__name__} overrides {base.__name__}.{own[0]}: a replacement "
                f"would compute a plain {base.__name__}"
            )
    hooks = _hooks(module)
    if hooks:
        return f"it has {hooks}, which a replacement would not run" + (
            " (torch.nn.utils.prune.remove(module, 'weight') makes a pruned weight plain)"
            if "prune" in hooks
            else ""
        )
    parts = fqn.split(".") if fqn else []
    for i in range(len(parts) - 1, -1, -1):
        owner_fqn = ".".join(parts[:i])
        owner = model.get_submodule(owner_fqn) if owner_fqn else model
        if isinstance(owner, nn.MultiheadAttention):
            return "its nn.MultiheadAttention reads the weight directly instead of calling it"
    return None


def _hooks(module: nn.Module) -> str:
    """The hooks on ``module`` that change what calling it computes (its forward and
    backward hooks, less the guard this walk puts on), named for a report."""
    found = []
    for kind, table in (
        ("forward pre-hook", module._forward_pre_hooks),
        ("forward hook", module._forward_hooks),
        ("backward hook", module._backward_hooks),
        ("backward pre-hook", getattr(module, "_backward_pre_hooks", {})),
    ):
        for hook in table.values():
            if hook is _unfused:
                continue
            name = getattr(hook, "__qualname__", None) or type(hook).__qualname__
            where = getattr(hook, "__module__", None) or type(hook).__module__ or ""
            found.append(f"a {kind} ({where.rpartition('.')[2]}.{name})")
    return ", ".join(found)


def targets(
    model: nn.Module, types: tuple[type, ...], accept: Accept
) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """The :func:`candidates` that ``accept(module, fqn)`` takes and that can be
    replaced exactly, and (fqn, reason) for those it takes that cannot.

    ``accept`` is asked first, so a module the caller did not ask for is never
    reported, and an ``accept`` that raises for a module it must not take
    (``pk.qat.prepare``'s filter) sees every candidate.
    """
    ok: list[tuple[str, nn.Module]] = []
    skipped: list[tuple[str, str]] = []
    for fqn, m in candidates(model, types):
        if not accept(m, fqn):
            continue
        reason = why_not(model, fqn, m, types)
        if reason is None:
            ok.append((fqn, as_linear(m) if is_conv1d(m) and nn.Linear in types else m))
        else:
            skipped.append((fqn, reason))
    return ok, skipped


def encoder_blocks(model: nn.Module, accept: Accept) -> list[tuple[str, nn.Module]]:
    """(fqn, module) of the transformer encoder layers that
    :func:`pykernels.nn.encoder.fuse_encoder_block` may fuse: of a layout it knows,
    with no hooks of their own, and every projection plain, accepted by ``accept``
    and replaceable by :func:`why_not`'s rules (so a filter or ``exclude`` that
    leaves out one projection leaves the layer to the per-Linear path).
    Outermost first; layers inside a match are not visited."""
    from ..nn.encoder import _spec

    out: list[tuple[str, nn.Module]] = []
    for fqn, m in model.named_modules():
        if any(f == "" or fqn.startswith(f + ".") for f, _ in out):
            continue
        spec = _spec(m)
        if isinstance(spec, str) or _hooks(m):
            continue
        names = {id(sub): (fqn + "." if fqn else "") + n for n, sub in m.named_modules()}
        projections = [spec.q, spec.k, spec.v, spec.out, spec.ffn1, spec.ffn2]
        if isinstance(m, nn.TransformerEncoderLayer):
            projections = [m.self_attn.out_proj, m.linear1, m.linear2]
        ok = True
        for lin in projections:
            name = names.get(id(lin))
            if name is None or type(lin) is not nn.Linear or not accept(lin, name):
                ok = False
                break
            # MultiheadAttention reads out_proj directly; the fused block does not.
            if not isinstance(m, nn.TransformerEncoderLayer) and why_not(
                model, name, lin, (nn.Linear,)
            ):
                ok = False
                break
            if _hooks(lin):
                ok = False
                break
        if ok:
            out.append((fqn, m))
    return out


def gated_mlps(model: nn.Module, accept: Accept) -> list[tuple[str, nn.Module]]:
    """(fqn, module) of the modules shaped like a gated MLP
    (:func:`pykernels.nn.mlp.gated_mlp_linears`: three plain Linears and
    parameter-free activations) that :func:`pykernels.nn.mlp.fuse_gated_mlp` may
    fuse: no hooks, and each Linear accepted by ``accept`` and replaceable by
    :func:`why_not`'s rules. Whether one really computes ``down(act(gate(x)) *
    up(x))`` is the fuser's probe to decide."""
    from ..nn.mlp import gated_mlp_linears

    out: list[tuple[str, nn.Module]] = []
    for fqn, m in model.named_modules():
        lins = gated_mlp_linears(m)
        if isinstance(lins, str) or _hooks(m) or not fqn:
            continue
        names = {id(sub): fqn + "." + n for n, sub in m.named_children()}
        if all(
            accept(lin, names[id(lin)])
            and not why_not(model, names[id(lin)], lin, (nn.Linear,))
            and not _hooks(lin)
            for lin in lins
        ):
            out.append((fqn, m))
    return out


def _unfused(module, args):  # noqa: ARG001
    """A forward pre-hook that does nothing: its presence keeps torch's fused
    transformer path, which reads dense weights, off (see the module docstring)."""
    return None


def guard_fused_paths(model: nn.Module) -> None:
    """After a swap: turn torch's fused transformer paths off where they would
    read a weight that is no longer dense (or, for a QATLinear, would skip its
    fake quantization)."""
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
