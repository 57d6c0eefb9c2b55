"""Structured pruning that physically shrinks a model.

A *group* is a set of coupled units (neurons, channels, attention heads) that
must be removed together: the output rows of the layers that produce them
(``out``), the per-channel parameters they pass through (``chan``: batch
norms, depthwise convolutions) and the input columns of the layers that read
them (``in``). Removing a unit from every member at once leaves plain,
smaller dense modules whose output, for the kept units, is what the original
computed with the removed units' contributions dropped.

Groups are found two ways:

- by tracing (``torch.fx``) every part of the model that can be traced, and
  following each Linear / Conv output through channel-wise operations
  (activations, dropout, pooling, batch norm, elementwise products of coupled
  tensors, ``flatten`` into a Linear) to the layers that consume it. Any other
  use (a residual add with the block input, a LayerNorm, a reshape, a module
  or model output) blocks the group: a residual stream's width is never
  pruned.
- by structure, for Hugging Face BERT-family encoders (modules named
  ``query``/``key``/``value`` with ``num_attention_heads`` and
  ``attention_head_size``, and ``intermediate.dense`` -> ``output.dense``
  feed-forward blocks), which torch.fx cannot trace whole: attention heads
  (q/k/v rows, the output projection's columns and the head count) and FFN
  neurons.
"""

from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .context import Context, output_tensor

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOL = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
# Elementwise modules: each output element depends on the same element of the input only.
_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    F.softsign,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.erf,
    torch.exp,
    torch.abs,
    torch.neg,
    torch.square,
    torch.sqrt,
    torch.rsqrt,
    F.sigmoid,
    F.tanh,
    operator.neg,
    operator.pos,
}
_ELEMENTWISE_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "erf",
    "exp",
    "abs",
    "neg",
    "square",
    "sqrt",
    "rsqrt",
    "contiguous",
    "clone",
    "detach",
}
# Binary elementwise operations: with a constant they keep the tensor's channels;
# a product of two tensors (a gate) couples their channels; a sum of two is a
# residual connection and blocks.
_BINARY_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}
_POOL_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
# Shape queries read no channel values: they never block a group.
_SHAPE_METHODS = {"size", "dim"}
_SHAPE_ATTRS = {"shape", "device", "dtype", "ndim"}
# Activation modules of Hugging Face (transformers.activations) that are elementwise.
_HF_ELEMENTWISE = {
    "GELUActivation",
    "NewGELUActivation",
    "FastGELUActivation",
    "QuickGELUActivation",
    "GELUTanh",
    "PytorchGELUTanh",
    "AccurateGELUActivation",
    "SiLUActivation",
    "MishActivation",
    "LinearActivation",
    "ReLUSquaredActivation",
    "ClippedGELUActivation",
    "LaplaceActivation",
}


# --- groups ---------------------------------------------------------------------------


@dataclass
class Member:
    fqn: str
    module: nn.Module
    role: str  # "out", "in" or "chan"
    mult: int = 1  # features per channel (a Linear after flatten reads H*W per channel)


@dataclass
class Group:
    name: str
    units: str  # what a unit is: "neurons", "channels", "heads"
    size: int  # units
    members: list[Member]
    width: int = 1  # channels per unit (the head size for heads)
    attrs: list[tuple[str, str, int]] = field(default_factory=list)  # (fqn, attr, per unit)

    def fqns(self) -> set[str]:
        return {m.fqn for m in self.members}


def _feature_dim(module: nn.Module, role: str) -> int:
    """The weight dimension a unit's features lie along, for a member's role."""
    if isinstance(module, nn.Linear):
        return 0 if role == "out" else 1
    if isinstance(module, _CONV):
        return 1 if role == "in" else 0
    return 0  # batch norm vectors


def _features(idx: Tensor, width: int) -> Tensor:
    """Feature indices of units ``idx`` when each unit spans ``width`` consecutive features."""
    if width == 1:
        return idx
    return (idx[:, None] * width + torch.arange(width, device=idx.device)).reshape(-1)


def _unit_scores(group: Group, score_of: dict[int, Tensor]) -> Tensor:
    """Per unit, the sum of ``score_of[id(weight)]`` over the unit's entries of every
    member's weight."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        for name in ("weight",):
            w = getattr(m.module, name, None)
            if not isinstance(w, Tensor) or id(w) not in score_of:
                continue
            dim = _feature_dim(m.module, m.role)
            s = score_of[id(w)].double()
            s = s.transpose(0, dim).reshape(s.shape[dim], -1).sum(1).cpu()
            width = group.width * m.mult
            total += s.reshape(group.size, width).sum(1)
    return total


def _keep_count(size: int, ratio: float, round_to: int | None) -> int:
    keep = size - int(round(ratio * size))
    if round_to is not None and size > round_to:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    return max(1, min(size, keep))


def _slice_param(module: nn.Module, name: str, idx: Tensor, dim: int) -> None:
    t = getattr(module, name, None)
    if t is None:
        return
    with torch.no_grad():
        new = t.detach().index_select(dim, idx.to(t.device)).clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(module, name, new)


def _prune_member(ctx: Context, m: Member, features: Tensor) -> None:
    mod, n = m.module, int(features.numel())
    if isinstance(mod, nn.Linear):
        if m.role == "out":
            _slice_param(mod, "weight", features, 0)
            _slice_param(mod, "bias", features, 0)
            mod.out_features = n
            ctx.reshaped(m.fqn, out_keep=features, feature_dim=-1)
        else:
            _slice_param(mod, "weight", features, 1)
            mod.in_features = n
            ctx.reshaped(m.fqn, in_keep=features, feature_dim=-1)
    elif isinstance(mod, _CONV):
        if m.role == "out":
            _slice_param(mod, "weight", features, 0)
            _slice_param(mod, "bias", features, 0)
            mod.out_channels = n
            ctx.reshaped(m.fqn, out_keep=features, feature_dim=1)
        elif m.role == "in":
            _slice_param(mod, "weight", features, 1)
            mod.in_channels = n
            ctx.reshaped(m.fqn, in_keep=features, feature_dim=1)
        else:  # depthwise: one filter per channel
            _slice_param(mod, "weight", features, 0)
            _slice_param(mod, "bias", features, 0)
            mod.in_channels = mod.out_channels = mod.groups = n
            ctx.reshaped(m.fqn, in_keep=features, out_keep=features, feature_dim=1)
    elif isinstance(mod, _BN):
        for name in ("weight", "bias", "running_mean", "running_var"):
            _slice_param(mod, name, features, 0)
        mod.num_features = n
        ctx.reshaped(m.fqn, in_keep=features, out_keep=features, feature_dim=1)
    else:  # pragma: no cover - groups only hold the types above
        raise AssertionError(type(mod))


def _apply_group(ctx: Context, g: Group, keep: Tensor) -> None:
    for m in g.members:
        _prune_member(ctx, m, _features(keep, g.width * m.mult))
    for fqn, attr, per_unit in g.attrs:
        ctx.set_attr(fqn, attr, int(keep.numel()) * per_unit)


# --- tracing --------------------------------------------------------------------------


def _is_pk_layer(m: nn.Module) -> bool:
    return type(m).__module__.startswith("pykernels.")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_pk_layer(m) or super().is_leaf_module(m, qualname)


class _Space:
    """Channels of one tensor lineage; coupled lineages are merged (union-find)."""

    def __init__(self, size: int | None, layout: str | None, blocked: str | None = None) -> None:
        self.parent: _Space = self
        self.size = size
        self.layout = layout  # "linear" (features last) or "conv" (channels at dim 1)
        self.blocked = blocked
        self.members: list[Member] = []

    def root(self) -> _Space:
        s = self
        while s.parent is not s:
            s.parent = s.parent.parent
            s = s.parent
        return s

    def block(self, reason: str) -> None:
        r = self.root()
        if r.blocked is None:
            r.blocked = reason


def _union(a: _Space, b: _Space, where: str) -> _Space:
    a, b = a.root(), b.root()
    if a is b:
        return a
    b.parent = a
    a.members += b.members
    b.members = []
    if a.blocked is None and b.blocked is not None:
        a.blocked = b.blocked
    if a.blocked is None and (a.size != b.size or a.layout != b.layout):
        a.blocked = f"its output meets a tensor of another shape in {where}"
    return a


@dataclass
class _Ref:
    space: _Space
    flat: bool = False  # a conv tensor flattened from dim 1: channel c spans c*HW .. c*HW+HW-1


def _op_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


class _GraphScan:
    """Follows channel spaces through one traced graph."""

    def __init__(self, gm: fx.GraphModule, prefix: str, ctx_name: str, shapes: dict) -> None:
        self.gm, self.prefix, self.ctx_name, self.shapes = gm, prefix, ctx_name, shapes
        self.ref: dict[fx.Node, _Ref] = {}
        self.calls: dict[str, int] = {}
        self.producers: dict[str, _Space] = {}  # fqn -> the space its output starts

    def fqn(self, target: str) -> str:
        return f"{self.prefix}.{target}" if self.prefix else target

    def fresh(self, reason: str) -> _Ref:
        return _Ref(_Space(None, None, reason))

    def inputs(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in node.all_input_nodes if n in self.ref]

    def block_all(self, node: fx.Node, reason: str) -> None:
        for n in self.inputs(node):
            self.ref[n].space.block(reason)

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            try:
                self.visit(node)
            except Exception as e:  # noqa: BLE001 - an unexpected graph blocks, never breaks
                self.block_all(node, f"unsupported use in {_op_name(node)} ({e})")
                self.ref[node] = self.fresh(f"from {_op_name(node)}")

    def visit(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            where = f"an input of {self.ctx_name}"
            self.ref[node] = self.fresh(f"its output meets {where} (a residual connection)")
        elif node.op == "get_attr":
            self.ref[node] = self.fresh("its output meets a stored tensor")
        elif node.op == "output":
            self.block_all(node, f"its output is the output of {self.ctx_name}")
        elif node.op == "call_module":
            self.visit_module(node)
        else:
            self.visit_function(node)

    def one_input(self, node: fx.Node) -> _Ref | None:
        ins = self.inputs(node)
        return self.ref[ins[0]] if len(ins) == 1 else None

    def visit_module(self, node: fx.Node) -> None:
        target = str(node.target)
        fqn = self.fqn(target)
        m = self.gm.get_submodule(target)
        self.calls[fqn] = self.calls.get(fqn, 0) + 1
        src = self.one_input(node)
        label = f"'{fqn}' ({type(m).__name__})"
        if src is None or len(node.args) != 1 or node.kwargs:
            self.block_all(node, f"its output feeds {label} with other inputs")
            self.ref[node] = self.fresh(f"from {label}")
            return
        sp = src.space.root()
        if isinstance(m, nn.Linear):
            if src.flat and sp.size and m.in_features % sp.size == 0 and sp.layout == "conv":
                sp.members.append(Member(fqn, m, "in", m.in_features // sp.size))
            elif (
                not src.flat and sp.layout in ("linear", None) and sp.size in (m.in_features, None)
            ):
                sp.members.append(Member(fqn, m, "in"))
            else:
                sp.block(f"its output reaches {label} along another dimension")
            self.start(node, fqn, m, m.out_features, "linear")
        elif isinstance(m, _CONV) and m.groups == 1 and m.padding_mode == "zeros":
            if not src.flat and sp.layout in ("conv", None):
                sp.members.append(Member(fqn, m, "in"))
            else:
                sp.block(f"its output reaches {label} along another dimension")
            self.start(node, fqn, m, m.out_channels, "conv")
        elif (
            isinstance(m, _CONV)
            and m.groups == m.in_channels == m.out_channels
            and m.padding_mode == "zeros"
            and not src.flat
            and sp.layout == "conv"
        ):
            sp.members.append(Member(fqn, m, "chan"))
            self.ref[node] = src
        elif isinstance(m, _BN) and not src.flat and self.bn_fits(fqn, sp):
            sp.members.append(Member(fqn, m, "chan"))
            self.ref[node] = src
        elif isinstance(m, _ELEMENTWISE_MODULES) or type(m).__name__ in _HF_ELEMENTWISE:
            self.ref[node] = src
        elif isinstance(m, _POOL) and sp.layout == "conv" and not src.flat:
            self.ref[node] = src
        elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            self.flatten(node, src)
        else:
            sp.block(f"its output feeds {label}, which needs every channel")
            self.ref[node] = self.fresh(f"from {label}")

    def bn_fits(self, fqn: str, sp: _Space) -> bool:
        """A batch norm works on dim 1: a conv space, or a 2-D [N, C] linear output."""
        if sp.layout == "conv":
            return True
        return sp.layout == "linear" and self.shapes.get(fqn, 0) == 2

    def start(self, node: fx.Node, fqn: str, m: nn.Module, size: int, layout: str) -> None:
        sp = _Space(size, layout)
        sp.members.append(Member(fqn, m, "out"))
        self.producers[fqn] = sp
        self.ref[node] = _Ref(sp)

    def flatten(self, node: fx.Node, src: _Ref) -> None:
        sp = src.space.root()
        if sp.layout == "conv" and not src.flat:
            self.ref[node] = _Ref(sp, flat=True)
        else:
            sp.block("its output is flattened along another dimension")
            self.ref[node] = self.fresh("from flatten")

    def visit_function(self, node: fx.Node) -> None:
        t, name = node.target, _op_name(node)
        ins = self.inputs(node)
        if node.op == "call_method" and t in _SHAPE_METHODS:
            self.ref[node] = self.fresh(f"from {name}")
            return
        if node.op == "call_function" and t is getattr and node.args[1] in _SHAPE_ATTRS:
            self.ref[node] = self.fresh(f"from {name}")
            return
        if not ins:
            self.ref[node] = self.fresh(f"from {name}")
            return
        elementwise = (node.op == "call_function" and t in _ELEMENTWISE_FUNCTIONS) or (
            node.op == "call_method" and t in _ELEMENTWISE_METHODS
        )
        binary = (node.op == "call_function" and t in _BINARY_FUNCTIONS) or (
            node.op == "call_method" and t in _BINARY_METHODS
        )
        first = node.args[0] if node.args else None
        if elementwise and len(ins) == 1 and first is ins[0]:
            self.ref[node] = self.ref[ins[0]]
        elif binary and len(ins) == 1:
            self.ref[node] = self.ref[ins[0]]
        elif binary and len(ins) == 2 and name.rstrip("_") in ("add", "sub", "iadd", "isub"):
            # Two branches summed: a residual connection. Its width could be pruned only
            # with every layer writing into the stream; it is kept whole instead.
            reason = f"its output is summed with another branch in {name} (a residual stream)"
            self.block_all(node, reason)
            self.ref[node] = self.fresh(reason)
        elif binary and len(ins) == 2:
            a, b = self.ref[ins[0]], self.ref[ins[1]]
            if a.flat != b.flat:
                a.space.block(f"its output meets a flattened tensor in {name}")
                b.space.block(f"its output meets a flattened tensor in {name}")
                self.ref[node] = self.fresh(f"from {name}")
            else:
                self.ref[node] = _Ref(_union(a.space, b.space, name), a.flat)
        elif node.op == "call_function" and t in _POOL_FUNCTIONS and len(ins) == 1:
            src = self.ref[ins[0]]
            if src.space.root().layout == "conv" and not src.flat and first is ins[0]:
                self.ref[node] = src
            else:
                src.space.block(f"its output feeds {name} along another dimension")
                self.ref[node] = self.fresh(f"from {name}")
        elif self.is_flatten(node) and len(ins) == 1 and first is ins[0]:
            self.flatten(node, self.ref[ins[0]])
        else:
            self.block_all(node, f"its output feeds {name}, which is not channel-wise")
            self.ref[node] = self.fresh(f"from {name}")

    @staticmethod
    def is_flatten(node: fx.Node) -> bool:
        is_fn = node.op == "call_function" and node.target is torch.flatten
        is_method = node.op == "call_method" and node.target == "flatten"
        if not (is_fn or is_method):
            return False
        args = list(node.args[1:])
        start = node.kwargs.get("start_dim", args[0] if args else 0)
        end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
        return start == 1 and end == -1


def _trace(module: nn.Module) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = _Tracer().trace(module)
    return fx.GraphModule(module, graph)


def _scan_model(
    model: nn.Module, shapes: dict[str, int]
) -> tuple[list[_GraphScan], dict[str, str]]:
    """Traces the model, or where it cannot be traced, each child in turn.

    Returns the scans and, for modules inside an untraceable part and in no
    traced graph, why.
    """
    scans: list[_GraphScan] = []
    untraced: dict[str, str] = {}
    tracer = _Tracer()

    def visit(fqn: str, m: nn.Module) -> None:
        try:
            gm = _trace(m)
        except Exception as e:  # noqa: BLE001 - any failure means "trace the children"
            msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            name = f"'{fqn}'" if fqn else "the model"
            for cname, child in m.named_children():
                cfqn = f"{fqn}.{cname}" if fqn else cname
                if tracer.is_leaf_module(child, cfqn):
                    untraced[cfqn] = (
                        f"it is called by {name} ({type(m).__name__}), which torch.fx "
                        f"cannot trace ({type(e).__name__}: {msg})"
                    )
                else:
                    visit(cfqn, child)
            return
        name = f"'{fqn}' ({type(m).__name__})" if fqn else "the model"
        scan = _GraphScan(gm, fqn, name, shapes)
        scan.run()
        scans.append(scan)

    visit("", model)
    return scans, untraced


def _input_ranks(ctx: Context) -> dict[str, int]:
    """The rank of each batch norm's input on the example inputs."""
    ranks: dict[str, int] = {}
    hooks = []
    for fqn, m in ctx.model.named_modules():
        if isinstance(m, _BN):

            def hook(mod, args, fqn=fqn):
                if args and isinstance(args[0], Tensor):
                    ranks[fqn] = args[0].dim()

            hooks.append(m.register_forward_pre_hook(hook))
    if hooks:
        try:
            with torch.no_grad():
                ctx.call()
        finally:
            for h in hooks:
                h.remove()
    return ranks


def _fx_groups(ctx: Context, claimed: set[str]) -> tuple[list[Group], dict[str, str]]:
    scans, untraced = _scan_model(ctx.model, _input_ranks(ctx))
    calls: dict[str, int] = {}
    for s in scans:
        for k, v in s.calls.items():
            calls[k] = calls.get(k, 0) + v
    groups: list[Group] = []
    reasons: dict[str, str] = dict(untraced)
    for s in scans:
        seen: set[int] = set()
        for sp0 in s.producers.values():
            sp = sp0.root()
            if id(sp) in seen:
                continue
            seen.add(id(sp))
            producers = [m.fqn for m in sp.members if m.role == "out"]
            why = sp.blocked
            if why is None and not any(m.role == "in" for m in sp.members):
                why = "no layer reads its output"
            if why is None:
                twice = [m.fqn for m in sp.members if calls.get(m.fqn, 0) > 1]
                if twice:
                    why = f"'{twice[0]}' is called more than once"
            if why is None:
                taken = [m.fqn for m in sp.members if m.fqn in claimed]
                if taken:
                    why = f"'{taken[0]}' is pruned with another group"
            if why is not None:
                for p in producers:
                    reasons.setdefault(p, why)
                continue
            units = "channels" if sp.layout == "conv" else "neurons"
            groups.append(Group(", ".join(producers), units, int(sp.size), list(sp.members)))
    return groups, reasons


# --- Hugging Face BERT-family encoders ----------------------------------------------


def _linear(m: Any) -> nn.Linear | None:
    return m if isinstance(m, nn.Linear) else None


def _bert_groups(ctx: Context, heads: bool) -> tuple[list[Group], dict[str, str]]:
    groups: list[Group] = []
    reasons: dict[str, str] = {}
    model = ctx.model
    for fqn, m in model.named_modules():
        q, k, v = (_linear(getattr(m, n, None)) for n in ("query", "key", "value"))
        nh, hd = getattr(m, "num_attention_heads", None), getattr(m, "attention_head_size", None)
        if heads and q and k and v and isinstance(nh, int) and isinstance(hd, int):
            parent_fqn, _, own = fqn.rpartition(".")
            parent = model.get_submodule(parent_fqn)
            o = _linear(getattr(getattr(parent, "output", None), "dense", None))
            width = nh * hd
            ok = (
                o is not None
                and getattr(parent, own, None) is m
                and q.out_features == k.out_features == v.out_features == width
                and o.in_features == width
                and getattr(m, "all_head_size", width) == width
            )
            if not ok:
                reasons[f"{fqn}.query"] = "attention whose projections do not match its head count"
                continue
            pre = f"{fqn}." if fqn else ""
            opre = f"{parent_fqn}.output.dense" if parent_fqn else "output.dense"
            members = [
                Member(pre + "query", q, "out"),
                Member(pre + "key", k, "out"),
                Member(pre + "value", v, "out"),
                Member(opre, o, "in"),
            ]
            attrs = [(fqn, "num_attention_heads", 1), (fqn, "all_head_size", hd)]
            groups.append(Group(f"{fqn} (heads)", "heads", nh, members, width=hd, attrs=attrs))
        inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
        d1, d2 = _linear(getattr(inter, "dense", None)), _linear(getattr(out, "dense", None))
        if d1 and d2 and hasattr(m, "attention"):
            pre = f"{fqn}." if fqn else ""
            why = _check_ffn(inter, out)
            if why is not None:
                reasons[pre + "intermediate.dense"] = why
                continue
            members = [
                Member(pre + "intermediate.dense", d1, "out"),
                Member(pre + "output.dense", d2, "in"),
            ]
            groups.append(Group(f"{pre}intermediate (FFN)", "neurons", d1.out_features, members))
    return groups, reasons


def _check_ffn(inter: nn.Module, out: nn.Module) -> str | None:
    """Confirms by tracing that ``inter`` is dense -> elementwise ops and ``out`` reads
    its first input only through ``dense``."""
    try:
        g1, g2 = _trace(inter).graph, _trace(out).graph
    except Exception as e:  # noqa: BLE001
        return f"its FFN block cannot be traced to check it ({type(e).__name__})"
    nodes = [n for n in g1.nodes if n.op not in ("placeholder", "output")]
    if not nodes or nodes[0].op != "call_module" or nodes[0].target != "dense":
        return "intermediate does not start with its dense layer"
    for n in nodes[1:]:
        mod = inter.get_submodule(str(n.target)) if n.op == "call_module" else None
        ok = (
            (mod is not None and (isinstance(mod, _ELEMENTWISE_MODULES)))
            or (mod is not None and type(mod).__name__ in _HF_ELEMENTWISE)
            or (n.op == "call_function" and n.target in _ELEMENTWISE_FUNCTIONS)
            or (n.op == "call_method" and n.target in _ELEMENTWISE_METHODS)
        )
        if not ok or len(n.all_input_nodes) != 1:
            return f"intermediate applies {_op_name(n)}, which is not elementwise"
    first = next(n for n in g2.nodes if n.op == "placeholder")
    users = list(first.users)
    if len(users) != 1 or users[0].op != "call_module" or users[0].target != "dense":
        return "output reads the intermediate activations other than through its dense layer"
    return None


# --- the step --------------------------------------------------------------------------


TAYLOR_PROBES = 4  # random output projections when the model returns no loss


def _importance(ctx: Context, groups: list[Group], importance: str) -> dict[int, Tensor]:
    """One score per unit of each group (keyed by ``id(group)``); higher is kept."""
    weights = list(
        {id(m.module.weight): m.module.weight for g in groups for m in g.members}.values()
    )
    if importance == "l2":
        sq = {id(w): w.detach().float().pow(2) for w in weights}
        return {id(g): _unit_scores(g, sq).sqrt() for g in groups}
    acc = {id(g): torch.zeros(g.size, dtype=torch.float64) for g in groups}
    saved = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            out = ctx.call()
            loss = getattr(out, "loss", None)
            if isinstance(loss, Tensor) and loss.dim() == 0:
                losses = [loss]
            else:
                # No loss: project the output on random directions. The mean square of
                # r . (first-order change) over r estimates the squared norm of the
                # output change when a unit is removed.
                y = output_tensor(out)
                gen = torch.Generator(device=y.device).manual_seed(0)
                losses = [
                    (y * torch.randn(y.shape, generator=gen, device=y.device, dtype=y.dtype)).sum()
                    for _ in range(TAYLOR_PROBES)
                ]
            for i, loss in enumerate(losses):
                grads = torch.autograd.grad(
                    loss, weights, retain_graph=i + 1 < len(losses), allow_unused=True
                )
                wg = {
                    id(w): w.detach() * g if g is not None else torch.zeros_like(w)
                    for w, g in zip(weights, grads, strict=False)
                }
                for g in groups:
                    acc[id(g)] += _unit_scores(g, wg).pow(2)
    except RuntimeError as e:
        raise ValueError(
            "prune: importance='taylor' needs gradients through the model on example_inputs "
            f"(put prune before int8 / sparse steps): {e}"
        ) from e
    finally:
        for w, r in zip(weights, saved, strict=False):
            w.requires_grad_(r)
    return {k: (v / len(losses)).sqrt() for k, v in acc.items()}


# --- calibration-aware choice and reconstruction ------------------------------------

# Ridge damping of the kept channels' covariance, relative to its mean diagonal (as
# GPTQ's): keeps the solve stable where calibration rows are few or channels are
# nearly collinear, at a negligible bias.
RECONSTRUCT_DAMP = 0.01
# Rounds of the greedy OBS choice of single neurons (see _obs_keep).
OBS_ROUNDS = 32


def _consumers(g: Group) -> list[Member] | None:
    """The Linear layers reading the group's units (one feature per unit channel), or
    None when some consumer is not such a Linear (a conv, a flattened input): those
    groups are pruned without reconstruction."""
    ins = [m for m in g.members if m.role == "in"]
    if not ins or any(not isinstance(m.module, nn.Linear) or m.mult != 1 for m in ins):
        return None
    return ins


@dataclass
class _Moments:
    rows: int = 0
    total: Tensor | None = None  # float64 [K]: sum of x
    xtx: Tensor | None = None  # float64 [K, K]: sum of x^T x
    ysum: Tensor | None = None  # float64 [N]: sum of the target outputs y
    ytx: Tensor | None = None  # float64 [N, K]: sum of y^T x

    def add(self, x: Tensor, y: Tensor | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not x.shape[0]:
            return
        if y is not None:
            y = y.detach().reshape(-1, y.shape[-1]).float()
            if y.shape[0] != x.shape[0]:
                y = None  # rows that do not pair up: fall back to the layer's own output
        if y is not None:
            yx, ys = (y.T @ x).double(), y.sum(0).double()
            self.ytx = yx if self.ytx is None else self.ytx.add_(yx)
            self.ysum = ys if self.ysum is None else self.ysum.add_(ys)
            self.paired = getattr(self, "paired", 0) + x.shape[0]
        # One float32 product per batch (fast), accumulated in float64.
        part, col = (x.T @ x).double(), x.sum(0).double()
        if not (bool(torch.isfinite(col).all()) and bool(torch.isfinite(part.diagonal()).all())):
            raise ValueError(
                "prune: calibration drives an input of a pruned layer to NaN or inf; the "
                "calibration batches must be inputs the model computes finite values on"
            )
        self.rows += x.shape[0]
        self.total = col if self.total is None else self.total.add_(col)
        self.xtx = part if self.xtx is None else self.xtx.add_(part)

    def stats(self, centered: bool) -> tuple[Tensor, Tensor]:
        """The mean and the (centered, or raw second-moment) covariance, float64."""
        assert self.total is not None and self.xtx is not None
        mu = self.total / self.rows
        c = self.xtx / self.rows
        if centered:
            c = c - torch.outer(mu, mu)
        return mu, c


class _Enough(Exception):  # noqa: N818 - a signal, not an error
    """Raised by the statistics hooks to stop a forward once every consumer fired."""


def _moments(
    ctx: Context,
    batches: list[Any],
    layers: list[tuple[str, nn.Linear]],
    reference: nn.Module | None = None,
) -> dict[int, _Moments]:
    """The inputs' first and second moments of ``layers`` (fqn, module) over the
    calibration batches, on the model as it is now (earlier groups already pruned and
    re-fitted). With ``reference`` (the model before pruning), the same-named layer's
    output there on the same batch is paired with each input row: the target the
    re-fit matches, so that it also corrects what earlier groups' pruning changed
    upstream (sequential reconstruction, as layer-wise post-training pruning does)."""
    from .auto import output_rows

    out = {id(m): _Moments() for _, m in layers}
    targets: dict[int, Tensor] = {}
    current: list[Any] = [None]

    def run(model: nn.Module, mods: list[tuple[int, nn.Module]], pre: bool, i: int, b) -> None:
        seen: set[int] = set()
        hooks = []
        for key, m in mods:
            if pre:

                def hook(mod, args, st=out[key], key=key):
                    if args and isinstance(args[0], Tensor) and args[0].is_floating_point():
                        # Padding tokens' rows left out: what the model computes there is
                        # never read, and fitting it would spend the re-fit on noise.
                        st.add(output_rows(args[0], current[0]), targets.pop(key, None))
                    seen.add(key)
                    if len(seen) == len(mods):
                        # Every consumer has its input: the rest of the forward is not
                        # needed (a layer's group costs the model up to that layer).
                        raise _Enough

                hooks.append(m.register_forward_pre_hook(hook))
            else:

                def fhook(mod, args, y, key=key):
                    if isinstance(y, Tensor) and y.is_floating_point():
                        targets[key] = output_rows(y, current[0])
                    seen.add(key)
                    if len(seen) == len(mods):
                        raise _Enough

                hooks.append(m.register_forward_hook(fhook))
        try:
            _call_calibration(model, b, i)
        finally:
            for h in hooks:
                h.remove()

    ref_mods = []
    if reference is not None:
        for fqn, m in layers:
            try:
                ref_mods.append((id(m), reference.get_submodule(fqn)))
            except AttributeError:
                ref_mods = []
                break
    with torch.no_grad():
        for i, b in enumerate(batches):
            current[0] = b
            targets.clear()
            if ref_mods:
                run(reference, ref_mods, False, i, b)
            run(ctx.model, [(id(m), m) for _, m in layers], True, i, b)
    return out


def _call_calibration(model: nn.Module, b: Any, i: int) -> None:
    from .context import call_model

    try:
        call_model(model, b)
    except _Enough:
        pass
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(
            f"prune: the model does not run on calibration batch {i} "
            f"({type(e).__name__}: {e}); calibration batches must be inputs "
            "shaped like example_inputs"
        ) from e


def _act_scores(g: Group, consumers: list[Member], mom: dict[int, _Moments]) -> Tensor:
    """Per unit, the mean square of what removing it (alone) takes from the consumers'
    outputs once its mean is folded into their bias: ``tr(W_S C_SS W_S^T)`` over the
    unit's features S, with C the centered input covariance (FLAP's fluctuation
    metric for one channel: ``var(x_j) ||W[:, j]||^2``)."""
    total = torch.zeros(g.size, dtype=torch.float64)
    w_ = g.width
    for m in consumers:
        _, c = mom[id(m.module)].stats(centered=m.module.bias is not None)
        w = m.module.weight.detach().double().cpu()
        if w_ == 1:
            total += (w * w).sum(0) * c.diagonal()
        else:
            k = g.size
            blocks_w = w.reshape(w.shape[0], k, w_).permute(1, 0, 2)  # [units, N, width]
            blocks_c = c.reshape(k, w_, k, w_).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
            # tr(W_S C_SS W_S^T) per unit
            total += torch.einsum("unw,uwv,unv->u", blocks_w, blocks_c, blocks_w)
    return total


def _obs_keep(g: Group, consumers: list[Member], mom: dict[int, _Moments], keep: int) -> Tensor:
    """The units to keep, chosen greedily as structured OBS (Optimal Brain Surgeon)
    does: each time, the unit whose removal raises the consumers' output error the
    least *after* the remaining inputs are re-fitted to compensate (with ``H`` the
    inverse of the damped input covariance, ``tr(W_S (H_SS)^-1 W_S^T)`` over the
    unit's features S), then the compensation applied and ``H`` downdated. Cheap in
    closed form, and it accounts for the least-squares re-fit that follows, which
    the per-unit contribution alone (:func:`_act_scores`) cannot: a unit its
    neighbours can stand in for goes before a loud unit nobody else can replace."""
    w_ = g.width
    states = []
    for m in consumers:
        mu, c = mom[id(m.module)].stats(centered=m.module.bias is not None)
        lam = RECONSTRUCT_DAMP * float(c.diagonal().mean().clamp_min(1e-12))
        a = c + lam * torch.eye(c.shape[0], dtype=c.dtype)
        h = torch.cholesky_inverse(torch.linalg.cholesky(a))
        states.append([m.module.weight.detach().double().cpu().clone(), h])
    alive = torch.ones(g.size, dtype=torch.bool)
    eye = torch.eye(w_, dtype=torch.float64)
    # Single features (FFN neurons) go in OBS_ROUNDS rounds of the cheapest few, each
    # round one block downdate (one at a time would cost hundreds of K x K updates);
    # heads one at a time.
    per = 1 if w_ > 1 else max(1, math.ceil((g.size - keep) / OBS_ROUNDS))
    while int(alive.sum()) > keep:
        err = torch.zeros(g.size, dtype=torch.float64)
        for w, h in states:
            if w_ == 1:
                err += (w * w).sum(0) / h.diagonal().clamp_min(1e-300)
            else:
                k = g.size
                hb = h.reshape(k, w_, k, w_).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
                wb = w.reshape(w.shape[0], k, w_).permute(1, 0, 2)  # [units, N, width]
                inv = torch.linalg.inv(hb + 1e-12 * eye)  # removed units: identity-ish
                err += torch.einsum("unw,uwv,unv->u", wb, inv, wb)
        err[~alive] = math.inf
        take = torch.argsort(err, stable=True)[: min(per, int(alive.sum()) - keep)]
        alive[take] = False
        s = _features(torch.sort(take).values, w_)
        for st in states:
            w, h = st
            h_ss_inv = torch.linalg.inv(h[s][:, s])
            # OBS: the other inputs absorb what the removed ones carried
            w -= (w[:, s] @ h_ss_inv) @ h[s, :]
            h -= h[:, s] @ h_ss_inv @ h[s, :]
            w[:, s] = 0
            h[s, :] = 0
            h[:, s] = 0
            h[s, s] = 1.0  # a placeholder on the removed features' diagonal
    return alive.nonzero().flatten()


def reconstruct_linear(
    weight: Tensor,
    bias: Tensor | None,
    keep: Tensor,
    mean: Tensor,
    cov: Tensor,
    damp: float = RECONSTRUCT_DAMP,
    target: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The weights over input features ``keep`` that best reproduce ``x -> W x + b``
    (least squares over the calibration rows), and the matching bias.

    ``mean`` and ``cov`` are the input's mean and covariance (centered when there is
    a bias to absorb the dropped features' mean, else the raw second moment with
    ``mean`` zero). With D the dropped features: ``W_K' = W_K + W_D C_DK (C_KK +
    lambda I)^-1`` and ``b' = b + W_D mu_D - (W_K' - W_K) mu_K``, the closed form of
    the regression of the dropped part on the kept one. Written as a correction to
    ``W_K``, it is exactly ``W_K`` (and ``b``) when the dropped features are zero on
    the calibration data, whatever the damping.

    ``target``: ``(mu_y, C_yx)``, the mean of another output to match (the
    unpruned model's, where the inputs have drifted) and its covariance with the
    inputs; then ``W_K' = W_K + (C_yK - W_K C_KK) (C_KK + lambda I)^-1`` (ridge
    regression toward ``W_K``) and ``b' = mu_y - W_K' mu_K``."""
    k_in = weight.shape[1]
    drop_mask = torch.ones(k_in, dtype=torch.bool)
    drop_mask[keep.cpu()] = False
    drop = drop_mask.nonzero().flatten()
    keep = keep.cpu()
    w = weight.detach().double().cpu()
    w_k, w_d = w[:, keep], w[:, drop]
    c_kk, c_dk = cov[keep][:, keep], cov[drop][:, keep]
    lam = damp * float(c_kk.diagonal().mean().clamp_min(1e-12))
    a = c_kk + lam * torch.eye(len(keep), dtype=c_kk.dtype)
    if target is None:
        rhs = (w_d @ c_dk).T  # [K, N]
    else:
        rhs = (target[1][:, keep] - w_k @ c_kk).T
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        delta = torch.cholesky_solve(rhs, chol).T
    else:  # numerically singular even with damping: least squares instead
        delta = torch.linalg.lstsq(a, rhs).solution.T
    new_w = (w_k + delta).to(weight.dtype)
    new_b = None
    if bias is not None:
        mu = mean.cpu()
        if target is None:
            b = bias.detach().double().cpu() + w_d @ mu[drop] - delta @ mu[keep]
        else:
            b = target[0] - (w_k + delta) @ mu[keep]
        new_b = b.to(bias.dtype)
    return new_w, new_b


def _reconstruct(
    g: Group, consumers: list[Member], mom: dict[int, _Moments], keep_units: Tensor
) -> list[tuple[nn.Linear, Tensor, Tensor | None]]:
    """New (weight, bias) of each consumer for the units kept; applied after slicing."""
    feats = _features(keep_units, g.width)
    out = []
    for m in consumers:
        lin = m.module
        st = mom[id(lin)]
        if not st.rows:
            continue
        centered = lin.bias is not None
        mu, c = st.stats(centered=centered)
        if not centered:
            mu = torch.zeros_like(mu)
        target = None
        if st.ytx is not None and getattr(st, "paired", 0) == st.rows:
            # E[(y - mu_y) x^T] (or E[y x^T] without a bias), y the reference's output
            mu_y = st.ysum / st.rows
            cyx = st.ytx / st.rows
            if centered:
                cyx = cyx - torch.outer(mu_y, st.total / st.rows)
            else:
                mu_y = torch.zeros_like(mu_y)
            target = (mu_y, cyx)
        w, b = reconstruct_linear(lin.weight, lin.bias, feats, mu, c, target=target)
        out.append((lin, w, b))
    return out


def _set_linear(lin: nn.Linear, w: Tensor, b: Tensor | None) -> None:
    with torch.no_grad():
        lin.weight.copy_(w.to(lin.weight.device))
        if b is not None and lin.bias is not None:
            lin.bias.copy_(b.to(lin.bias.device))


def prune_structured(ctx: Context, step: Any) -> None:
    """Applies :class:`pykernels.recipes.PruneStructured` to ``ctx.model``."""
    bert, bert_reasons = _bert_groups(ctx, step.heads)
    claimed = set().union(*(g.fqns() for g in bert)) if bert else set()
    fx_groups, reasons = _fx_groups(ctx, claimed)
    reasons.update(bert_reasons)
    groups = bert + fx_groups

    # A shared (tied) weight cannot be sliced: the other holder would change too, and
    # two members of one group may even cut it along different dimensions.
    holders: dict[int, set[str]] = {}
    for fqn, m in ctx.model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), set()).add(fqn)
    usable: list[Group] = []
    for g in groups:
        why = None
        for mem in g.members:
            if not ctx.accept(mem.module, mem.fqn):
                why = f"'{mem.fqn}' is excluded by filter_fn / exclude"
                break
            for p in mem.module.parameters(recurse=False):
                others = holders.get(id(p), set()) - {mem.fqn}
                if others:
                    why = f"its weights are shared with '{sorted(others)[0]}'"
                    break
            if why:
                break
        if why is None:
            usable.append(g)
        else:
            for mem in g.members:
                if mem.role == "out":
                    reasons.setdefault(mem.fqn, why)

    plan = [
        (g, _keep_count(g.size, step.ratio, None if g.units == "heads" else step.round_to))
        for g in usable
    ]
    plan = [(g, k) for g, k in plan if k < g.size]
    batches = getattr(ctx, "calibration", None)
    reconstruct = step.reconstruct
    if reconstruct is None:
        reconstruct = bool(batches)
    if reconstruct and not batches:
        raise ValueError(
            f"recipe step {str(step)!r} reconstructs from calibration data: call "
            "pk.compress(model, recipe, example_inputs, calibration=batches) with batches "
            "of inputs like example_inputs"
        )
    importance = step.importance or ("act" if batches else "l2")
    if importance == "act" and not batches:
        raise ValueError(
            f"recipe step {str(step)!r}: importance='act' weighs each unit by its "
            "activations on calibration data: pass calibration=batches to pk.compress"
        )
    if plan:
        # The model before pruning: each re-fit matches its consumer's output there.
        reference = copy.deepcopy(ctx.model) if reconstruct else None
        scores = {}
        if importance != "act":
            scores = _importance(ctx, [g for g, _ in plan], importance)
        for g, keep in ctx.progress(plan, "prune"):
            consumers = _consumers(g) if (reconstruct or importance == "act") else None
            mom = None
            if consumers is not None:
                # Each group's statistics on the model as pruned so far, so that a
                # later group's reconstruction sees what the earlier ones left.
                mom = _moments(ctx, batches, [(m.fqn, m.module) for m in consumers], reference)
                if any(not mom[id(m.module)].rows for m in consumers):
                    mom = None
            s = None
            if importance == "act" and not (reconstruct and mom is not None):
                # A consumer the calibration never reaches (or one that is not a
                # plain Linear): its unit's weights decide, as without calibration.
                s = _act_scores(g, consumers, mom) if mom is not None else None
                if s is None:
                    w2 = {
                        id(m.module.weight): m.module.weight.detach().float().pow(2)
                        for m in g.members
                    }
                    s = _unit_scores(g, w2).sqrt()
            elif importance != "act":
                s = scores[id(g)]
            if importance == "act" and reconstruct and mom is not None:
                keep_units = _obs_keep(g, consumers, mom, keep)
            else:
                order = torch.argsort(s, descending=True, stable=True)[:keep]
                keep_units = torch.sort(order).values
            updates = []
            if reconstruct and mom is not None:
                updates = _reconstruct(g, consumers, mom, keep_units)
            _apply_group(ctx, g, keep_units)
            for lin, w, b in updates:
                _set_linear(lin, w, b)

    # Every layer whose output width stays, and why (inputs may still have been pruned).
    narrowed = {m.fqn for g, _ in plan for m in g.members if m.role == "out"}
    read = {m.fqn for g, _ in plan for m in g.members if m.role == "in"}
    for fqn, m in ctx.model.named_modules():
        if isinstance(m, (nn.Linear, *_CONV)) and fqn not in narrowed and fqn in reasons:
            if ctx.accept.excluded(fqn):
                continue
            note = " (its inputs were pruned)" if fqn in read else ""
            ctx.skip(fqn, f"output width kept: {reasons[fqn]}{note}")
