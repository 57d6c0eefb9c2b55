r"""Recipe steps for :func:`pykernels.compress`, and the string shortcuts for them.

A recipe is a list of steps applied in order, or the same steps as one string
joined by ``+``: ``"prune:0.3+int8"``. Each step is a :class:`Step` subclass
registered under a short name with :func:`register_step`; its string form is
``name[:arg[:arg...]]``, each argument positional or ``key=value``
(``"prune:0.3:importance=taylor:round_to=16"``).

A step may be limited to some layers by a selector after ``@``:
``step@item[,item...]`` applies the step only to the modules an item names,
``step@!item[,item...]`` to every module but those. An item is a fully
qualified module name (the module and everything under it, as ``exclude``
takes it) or ``re:<regex>`` (matched from the start of the name, as
``exclude``'s patterns). The selector runs to the next ``+``, so a regex in a
recipe string cannot hold ``+`` (write ``{1,}``) or ``,``. Selectors narrow
what the caller's ``filter_fn`` / ``exclude`` accept, never widen it:
``"int8@encoder.layer.0,encoder.layer.1+sparse:0.9@re:encoder\.layer\.[2-5]\.output"``.
This is how :func:`pykernels.compress` with ``"auto"`` writes its per-layer
choices (``report.recipe``).

A module outside this one adds a step by subclassing :class:`Step` and
registering it; :meth:`Step.spec` is what the saved manifest records, and
:meth:`Step.from_spec` reads it back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from .context import Context

_STEPS: dict[str, type[Step]] = {}


def register_step(cls: type[Step]) -> type[Step]:
    """Registers a :class:`Step` subclass under ``cls.name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Step)):
        raise TypeError(f"register_step: expected a Step subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or any(c in name for c in ":+= "):
        raise ValueError(f"register_step: {cls.__name__}.name must be a plain word, got {name!r}")
    if name in _STEPS and _STEPS[name] is not cls:
        raise ValueError(f"register_step: a step named {name!r} is already registered")
    _STEPS[name] = cls
    return cls


def step_names() -> list[str]:
    """The registered step names (``"int8"``, ``"sparse"``, ...), sorted."""
    return sorted(_STEPS)


class Step:
    """One compression step. Subclasses are dataclasses with a ``name`` and ``apply``.

    ``apply(model, ctx)`` changes ``ctx.model`` in place, through
    ``ctx.replace`` / ``ctx.reshaped`` / ``ctx.set_attr`` so the report and
    :func:`pykernels.save` know what changed, and ``ctx.skip`` for what it
    left alone and why. A step that replaces modules takes them from
    ``ctx.targets(types)``: the one walk that applies the caller's
    ``filter_fn`` / ``exclude`` and leaves alone (listed as skipped) what
    cannot be replaced exactly.
    """

    name: ClassVar[str] = ""
    #: positional order of the string form's arguments
    positional: ClassVar[tuple[str, ...]] = ()

    def apply(self, ctx: Context) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def unfit(self, module: nn.Module) -> str | None:
        """Why this step cannot convert ``module`` (None: it can). ``apply`` passes it
        to ``ctx.targets``, which leaves such modules as they are and lists them as
        skipped with this reason: the one rule for every step, so one unfit layer
        never aborts the model."""
        return None

    def spec(self) -> dict[str, Any]:
        """JSON-able description: ``{"step": name, **fields}``."""
        return {"step": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Step:
        args = {k: v for k, v in spec.items() if k != "step"}
        return cls(**args)

    @classmethod
    def from_args(cls, args: list[str], text: str) -> Step:
        """Builds the step from the string form's arguments (``text`` is for messages)."""
        kwargs: dict[str, Any] = {}
        names = [f.name for f in fields(cls)]
        for i, a in enumerate(args):
            if "=" in a:
                key, _, value = a.partition("=")
                if key not in names:
                    raise ValueError(
                        f"recipe step {text!r}: unknown argument {key!r}; {cls.name} takes "
                        f"{', '.join(names)}"
                    )
            elif i < len(cls.positional):
                key, value = cls.positional[i], a
            else:
                raise ValueError(
                    f"recipe step {text!r}: too many positional arguments; {cls.name} takes "
                    f"{', '.join(cls.positional) or 'none'} positionally"
                )
            if key in kwargs:
                raise ValueError(f"recipe step {text!r}: {key} given twice")
            kwargs[key] = _literal(value)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"recipe step {text!r}: {e}") from None

    def __str__(self) -> str:
        # The shortest string that parses back: leading non-default positional
        # arguments bare, the rest as key=value.
        parts = [self.name]
        bare = True
        for f in fields(self):
            v = getattr(self, f.name)
            if v == f.default:
                bare = bare and f.name not in self.positional
                continue
            i = len(parts) - 1
            if bare and i < len(self.positional) and self.positional[i] == f.name:
                parts.append(_num(v))
            else:
                bare = False
                parts.append(f"{f.name}={_num(v)}")
        return ":".join(parts)


def _num(v: Any) -> str:
    """A number as a recipe writes it: the short ``%g`` form when it parses back to the
    same value, else Python's repr (which always does)."""
    if isinstance(v, float):
        short = f"{v:g}"
        return short if float(short) == v else repr(v)
    return str(v)


def _literal(text: str) -> Any:
    """An argument's value: int, float, None, bool, or the text itself."""
    if text in ("None", "none"):
        return None
    if text in ("True", "true"):
        return True
    if text in ("False", "false"):
        return False
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


# What the int8, sparse, cluster and fake-quant kernels compute in.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def weight_unfit(
    module: nn.Module, finite: bool = True, dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES
) -> str | None:
    """The common reasons a step cannot take a layer's weight: a dtype its kernels
    do not compute in (the replacement would refuse the layer's own inputs), or,
    with ``finite``, NaN / inf (no scale or factorization represents them)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    if w.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        got = str(w.dtype).removeprefix("torch.")
        return f"weight is {got}: the replacement computes in {names}"
    if finite and w.device.type != "meta" and not bool(torch.isfinite(w.detach()).all()):
        return "weight holds NaN or inf, which the replacement cannot represent"
    return None


def _fraction(name: str, v: Any, lo_open: bool = False, hi_open: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a number, got {v!r}")
    lo_ok = v > 0 if lo_open else v >= 0
    hi_ok = v < 1 if hi_open else v <= 1
    if not (lo_ok and hi_ok):
        lo, hi = ("(0" if lo_open else "[0"), ("1)" if hi_open else "1]")
        raise ValueError(f"{name} must be in {lo}, {hi}, got {v!r}")
    return float(v)


def parse(recipe: Any) -> list[Step]:
    """A recipe (a string, a Step, or a list of them) as a list of Steps."""
    if isinstance(recipe, Step):
        return [recipe]
    if isinstance(recipe, str):
        if not recipe.strip():
            raise ValueError(f"recipe is empty; valid steps: {', '.join(step_names())}")
        return [_parse_scoped(part.strip(), recipe) for part in recipe.split("+")]
    if isinstance(recipe, (list, tuple)):
        if not recipe:
            raise ValueError(f"recipe is empty; valid steps: {', '.join(step_names())}")
        out: list[Step] = []
        for item in recipe:
            if isinstance(item, Step):
                out.append(item)
            elif isinstance(item, str):
                out.extend(parse(item))
            else:
                raise TypeError(
                    f"recipe entries must be pykernels.recipes steps or strings, got "
                    f"{type(item).__name__}"
                )
        return out
    raise TypeError(
        f"recipe must be a string like 'prune:0.3+int8' or a list of steps, got "
        f"{type(recipe).__name__}"
    )


def _parse_scoped(text: str, whole: str) -> Step:
    """One ``+``-separated part: a step, with its ``@`` selector when it has one."""
    text, at, select = text.partition("@")
    step = _parse_one(text.strip(), whole)
    if not at:
        return step
    negate = select.startswith("!")
    items = [i.strip() for i in select.removeprefix("!").split(",")]
    if not all(items):
        raise ValueError(
            f"recipe step {text + at + select!r}: the selector after '@' has an empty item "
            "(write step@name[,name...], step@!name or step@re:<regex>)"
        )
    return Scoped(step, tuple(items), negate)


def _parse_one(text: str, whole: str) -> Step:
    if not text:
        raise ValueError(
            f"recipe {whole!r} has an empty step (two '+' in a row, or a trailing '+')"
        )
    name, *args = text.split(":")
    cls = _STEPS.get(name.strip().lower())
    if cls is None:
        raise ValueError(
            f"unknown recipe step {name!r} in {whole!r}; valid steps: {', '.join(step_names())}"
            " (e.g. 'prune:0.3+int8', 'sparse:0.9', 'sparse:2:4', 'lowrank:0.9')"
        )
    if any(not a for a in args):
        raise ValueError(f"recipe step {text!r} has an empty argument")
    return cls.from_args(args, text)


def from_specs(specs: list[dict[str, Any]]) -> list[Step]:
    """The steps a saved manifest recorded (unknown names raise ValueError)."""
    out: list[Step] = []
    for spec in specs:
        if isinstance(spec, dict) and "select" in spec:
            rest = {k: v for k, v in spec.items() if k not in ("select", "negate")}
            select = spec["select"]
            if not isinstance(select, list) or not all(isinstance(i, str) for i in select):
                raise ValueError(f"recipe step {spec!r}: select must be a list of names")
            inner = from_specs([rest])[0]
            out.append(Scoped(inner, tuple(select), bool(spec.get("negate", False))))
            continue
        cls = _STEPS.get(spec.get("step")) if isinstance(spec, dict) else None
        if cls is None:
            raise ValueError(
                f"unknown recipe step {spec!r}; valid steps: {', '.join(step_names())}"
            )
        out.append(cls.from_spec(spec))
    return out


def _drop_gptq(spec: dict[str, Any]) -> dict[str, Any]:
    """A step's spec without its GPTQ options while they are the defaults, so the
    manifests of uncalibrated steps stay as they were before GPTQ existed."""
    for key, default in (("gptq", False), ("act_order", False), ("damp", 0.01)):
        if spec.get(key) == default:
            del spec[key]
    return spec


def _gptq_str(step: Any) -> str:
    s = ":gptq" if step.gptq else ""
    s += ":act_order" if step.act_order else ""
    return s + (f":damp={_num(step.damp)}" if step.damp != 0.01 else "")


class Scoped(Step):
    """``step@selector``: ``step`` applied only to the modules ``select`` names (or, with
    ``negate``, to all but those). ``select`` items are fully qualified names (the
    module and everything under it) or ``"re:<regex>"`` patterns matched from the
    start of a name. Built by :func:`parse` from ``"int8@encoder.layer.0"``; it
    narrows, never widens, the caller's ``filter_fn`` / ``exclude``."""

    def __init__(self, step: Step, select: tuple[str, ...], negate: bool = False) -> None:
        if not isinstance(step, Step) or isinstance(step, Scoped):
            raise TypeError(f"Scoped: step must be a (non-scoped) Step, got {step!r}")
        if (
            isinstance(select, str)
            or not select
            or not all(isinstance(i, str) and i for i in select)
        ):
            raise ValueError(
                f"Scoped: select must be non-empty names or 're:' patterns, got {select!r}"
            )
        self.step, self.select, self.negate = step, tuple(select), bool(negate)
        self.patterns = []
        for item in self.select:
            if item.startswith("re:"):
                try:
                    self.patterns.append(re.compile(item[3:]))
                except re.error as e:
                    raise ValueError(f"selector {item!r} is not a regex: {e}") from None
        self.names = tuple(i for i in self.select if not i.startswith("re:"))

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.step.name

    def matches(self, fqn: str) -> bool:
        """Whether the selector names ``fqn`` (before ``negate``)."""
        if any(fqn == n or fqn.startswith(n + ".") for n in self.names):
            return True
        return any(p.match(fqn) for p in self.patterns)

    def apply(self, ctx: Context) -> None:
        known = {fqn for fqn, _ in ctx.model.named_modules()}
        missing = [n for n in self.names if n not in known]
        if missing:
            raise ValueError(
                f"recipe step {str(self)!r}: {missing[0]!r} is no module of the model "
                "(use 're:' for a pattern)"
            )
        base = ctx.accept
        ctx.accept = _Narrowed(base, self)
        try:
            self.step.apply(ctx)
        finally:
            ctx.accept = base

    def unfit(self, module: nn.Module) -> str | None:
        return self.step.unfit(module)

    def spec(self) -> dict[str, Any]:
        out = {**self.step.spec(), "select": list(self.select)}
        if self.negate:
            out["negate"] = True
        return out

    def __str__(self) -> str:
        return f"{self.step}@{'!' if self.negate else ''}{','.join(self.select)}"

    def __repr__(self) -> str:
        return f"Scoped({self.step!r}, select={self.select!r}, negate={self.negate})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scoped) and (self.step, self.select, self.negate) == (
            other.step,
            other.select,
            other.negate,
        )

    __hash__ = None  # type: ignore[assignment]


class _Narrowed:
    """The caller's selector, further limited to what a :class:`Scoped` step names."""

    def __init__(self, base: Any, scoped: Scoped) -> None:
        self.base, self.scoped = base, scoped

    def excluded(self, fqn: str) -> bool:
        return self.base.excluded(fqn) or self.scoped.matches(fqn) == self.scoped.negate

    def __call__(self, module: nn.Module, fqn: str) -> bool:
        if self.scoped.matches(fqn) == self.scoped.negate:
            return False
        return self.base(module, fqn)


# --- the steps -----------------------------------------------------------------


@register_step
@dataclass
class Keep(Step):
    """Changes nothing: the recipe of a model kept as it is (what ``"auto"`` writes
    when no step pays within its budget). ``"keep"``."""

    name: ClassVar[str] = "keep"

    def apply(self, ctx: Context) -> None:
        return None


@register_step
@dataclass
class Int8(Step):
    """Linear layers -> :class:`pykernels.nn.Int8Linear` (``mode``: ``"dynamic"`` W8A8
    or ``"weight_only"`` W8A16; ``act_bits=7``: the opt-in 7-bit activations,
    faster on AVX2-only CPUs); embedding tables -> row-wise
    :class:`pykernels.nn.Int8Embedding` unless ``embeddings=False``.

    In dynamic mode, each transformer encoder layer whose projections are all
    selected (Hugging Face BERT-family, DistilBERT and ViT layers,
    ``nn.TransformerEncoderLayer``) becomes one :class:`pykernels.nn.EncoderBlock`
    (fused QKV, pykernels' attention, activation and residual adds in the int8
    GEMMs' epilogues) when a float copy of the fused block reproduces the
    layer; ``fuse=False`` keeps the per-Linear path everywhere. ``gated=True``
    (opt-in) also makes each gated MLP (Llama-style ``down(act(gate(x)) *
    up(x))``, found by structure and checked on a probe) one
    :class:`pykernels.nn.Int8GatedMLP` (gate and up in one GEMM, the product in
    its epilogue): measured 0.88-1.04x the three separate Int8Linears on Zen 5
    (slower at decode sizes), so not the default (benchmarks/RESULTS.md).

    ``"int8"``, ``"int8:weight_only"``, ``"int8:act_bits=7"``, ``"int8:fuse=False"``,
    ``"int8:gated=True"``."""

    mode: str = "dynamic"
    embeddings: bool = True
    act_bits: int = 8
    fuse: bool = True
    gated: bool = False
    gptq: bool = False
    act_order: bool = False
    damp: float = 0.01
    name: ClassVar[str] = "int8"
    positional: ClassVar[tuple[str, ...]] = ("mode",)

    @classmethod
    def from_args(cls, args: list[str], text: str) -> Step:
        from .calibrate import gptq_args

        return super().from_args(gptq_args(args), text)

    def spec(self) -> dict[str, Any]:
        out = _drop_gptq(super().spec())
        if not out.get("gated"):  # manifests from before the option stay as they were
            out.pop("gated", None)
        return out

    def __str__(self) -> str:
        s = super().__str__()
        for opt in ("gptq=True", "act_order=True", f"damp={_num(self.damp)}"):
            s = s.replace(":" + opt, "")
        return s + _gptq_str(self)

    def __post_init__(self) -> None:
        from ..nn.int8 import check_int8_options

        try:
            check_int8_options("int8", self.mode, self.act_bits)
        except (TypeError, ValueError) as e:  # a recipe's errors are ValueErrors
            raise ValueError(str(e).removeprefix("int8: ")) from None
        if not isinstance(self.embeddings, bool):
            raise ValueError(f"embeddings must be a bool, got {self.embeddings!r}")
        if not isinstance(self.fuse, bool):
            raise ValueError(f"fuse must be a bool, got {self.fuse!r}")
        if not isinstance(self.gated, bool):
            raise ValueError(f"gated must be a bool, got {self.gated!r}")
        from .calibrate import gptq_options

        gptq_options(self)

    def apply(self, ctx: Context) -> None:
        from ..nn import Int8Embedding, Int8Linear
        from ..nn.encoder import fuse_encoder_block
        from ..nn.mlp import fuse_gated_mlp

        if self.gptq:
            from .calibrate import int8_gptq

            return int8_gptq(ctx, self)
        if self.fuse and self.mode == "dynamic":
            for fqn, layer in ctx.progress(ctx.blocks(), "int8 blocks"):
                fused = fuse_encoder_block(layer, act_bits=self.act_bits)
                if not isinstance(fused, str):
                    ctx.replace(fqn, fused)
            gated = ctx.gated_mlps() if self.gated else []
            for fqn, mlp in ctx.progress(gated, "int8 gated MLPs"):
                fused = fuse_gated_mlp(mlp, act_bits=self.act_bits)
                if not isinstance(fused, str):
                    ctx.replace(fqn, fused)
        types: tuple[type, ...] = (nn.Linear, nn.Embedding) if self.embeddings else (nn.Linear,)
        for fqn, m in ctx.progress(ctx.targets(types, self.unfit), "int8"):
            if isinstance(m, nn.Linear):
                ctx.replace(fqn, Int8Linear.from_linear(m, mode=self.mode, act_bits=self.act_bits))
            else:
                ctx.replace(fqn, Int8Embedding.from_embedding(m))

    def unfit(self, module: nn.Module) -> str | None:
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            return "max_norm renormalizes rows at lookup; kept in float"
        return weight_unfit(module)


# Calibrated int4 quantizers by option name (the ``:gptq`` option of the int4
# step): calibration code registers itself here with register_int4_quantizer.
Int4Quantizer = Callable[["Int4", Context, list[tuple[str, nn.Linear]]], Iterable[tuple[str, Any]]]
_INT4_QUANTIZERS: dict[str, Int4Quantizer] = {}


def register_int4_quantizer(option: str, fn: Int4Quantizer) -> None:
    """Lets a calibrated method (``"gptq"``) produce the codes of the ``int4`` step.

    ``fn(step, ctx, targets)`` gets the step (its ``group_size``,
    ``symmetric``, ``mode``), the compression context (``ctx.model``, the
    example inputs, and whatever calibration data the caller passed) and the
    ``(fqn, nn.Linear)`` pairs the step will replace, in model order; it
    yields ``(fqn, (packed, scales, zeros))`` for each layer it quantized, in
    the format of :mod:`pykernels.ops.int4` (a layer it leaves out falls back
    to round-to-nearest). The step builds each layer with
    :meth:`pykernels.nn.Int4Linear.from_quantized`.
    """
    if option != "gptq":
        raise ValueError(f"register_int4_quantizer: option must be 'gptq', got {option!r}")
    if not callable(fn):
        raise TypeError("register_int4_quantizer: fn must be callable")
    _INT4_QUANTIZERS[option] = fn


@register_step
@dataclass
class Int4(Step):
    """Linear layers -> :class:`pykernels.nn.Int4Linear`: group-wise 4-bit weights
    (``group_size`` 32, 64 or 128; ``symmetric`` or not; ``mode`` ``"auto"``
    (the default: weight-only at decode sizes, W4A8 above; see
    :func:`pykernels.ops.int4_linear`), ``"dynamic"`` W4A8 or ``"weight_only"``
    W4A16), round-to-nearest, or calibrated by GPTQ with
    ``gptq=True`` (the ``:gptq`` option, available once the GPTQ code has
    registered itself with :func:`register_int4_quantizer`). Layers whose
    in_features is no multiple of ``group_size`` stay float (listed as skipped).

    ``emb`` (``embeddings=True``, off by default as torchao's int4 configs
    leave tables alone) also makes embedding tables
    :class:`pykernels.nn.Int4Embedding` with the same group size (round to
    nearest; GPTQ calibrates Linears only).

    ``"int4"`` (= ``"int4:g128"``), ``"int4:g64:sym"``, ``"int4:g128:weight_only"``,
    ``"int4:g128:gptq"``, ``"int4:g32:emb"``."""

    group_size: int = 128
    symmetric: bool = False
    mode: str = "auto"
    gptq: bool = False
    embeddings: bool = False
    name: ClassVar[str] = "int4"

    def __post_init__(self) -> None:
        from ..ops.int4 import check_group_size, check_mode

        try:
            self.group_size = check_group_size("int4", self.group_size)
            check_mode("int4", self.mode)
        except (TypeError, ValueError) as e:  # a recipe's errors are ValueErrors
            raise ValueError(str(e).removeprefix("int4: ")) from None
        for f in ("symmetric", "gptq", "embeddings"):
            if not isinstance(getattr(self, f), bool):
                raise ValueError(f"{f} must be a bool, got {getattr(self, f)!r}")

    @classmethod
    def from_args(cls, args: list[str], text: str) -> Step:
        # Bare options: g<size>, sym / asym, dynamic / weight_only, gptq.
        named: list[str] = []
        for a in args:
            low = a.lower()
            if low.startswith("g") and low[1:].isdigit():
                named.append(f"group_size={low[1:]}")
            elif low in ("sym", "asym"):
                named.append(f"symmetric={low == 'sym'}")
            elif low in ("auto", "dynamic", "weight_only"):
                named.append(f"mode={low}")
            elif low == "gptq":
                named.append("gptq=True")
            elif low in ("emb", "embeddings"):
                named.append("embeddings=True")
            elif "=" in a:
                named.append(a)
            else:
                raise ValueError(
                    f"recipe step {text!r}: unknown option {a!r}; int4 takes g32 / g64 / g128, "
                    "sym / asym, auto / dynamic / weight_only, gptq, emb (or key=value)"
                )
        return super().from_args(named, text)

    def spec(self) -> dict[str, Any]:
        out = super().spec()
        if not out.get("embeddings"):  # manifests from before the option stay as they were
            out.pop("embeddings", None)
        return out

    def __str__(self) -> str:
        parts = ["int4", f"g{self.group_size}"]
        if self.symmetric:
            parts.append("sym")
        if self.mode != "auto":
            parts.append(self.mode)
        if self.gptq:
            parts.append("gptq")
        if self.embeddings:
            parts.append("emb")
        return ":".join(parts)

    def quantizer(self) -> Int4Quantizer | None:
        """The calibrated quantizer this step uses (None: round-to-nearest);
        NotImplementedError when ``gptq`` is asked for and none is registered."""
        if not self.gptq:
            return None
        fn = _INT4_QUANTIZERS.get("gptq")
        if fn is None:
            raise NotImplementedError(
                "int4:gptq: no GPTQ quantizer is registered in this build "
                "(pykernels.compress.recipes.register_int4_quantizer('gptq', fn)); use "
                "round-to-nearest ('int4') instead"
            )
        return fn

    def apply(self, ctx: Context) -> None:
        from ..nn import Int4Embedding, Int4Linear

        fn = self.quantizer()
        types: tuple[type, ...] = (nn.Linear, nn.Embedding) if self.embeddings else (nn.Linear,)
        targets = ctx.targets(types, self.unfit)
        linears = [(fqn, m) for fqn, m in targets if isinstance(m, nn.Linear)]
        done = dict(fn(self, ctx, linears)) if fn is not None and linears else {}
        for fqn, m in ctx.progress(targets, "int4"):
            if isinstance(m, nn.Embedding):
                emb = Int4Embedding.from_embedding(m, self.group_size, self.symmetric)
                ctx.replace(fqn, emb)
                continue
            b = None if m.bias is None else m.bias.detach()
            if fqn in done:
                packed, scales, zeros = done[fqn]
                layer = Int4Linear.from_quantized(
                    packed, scales, zeros, self.group_size, bias=b, mode=self.mode
                )
            else:
                layer = Int4Linear.from_linear(m, self.group_size, self.symmetric, self.mode)
            ctx.replace(fqn, layer)

    def unfit(self, module: nn.Module) -> str | None:
        if isinstance(module, nn.Embedding):
            if module.max_norm is not None:
                return "max_norm renormalizes rows at lookup; kept in float"
            d = module.embedding_dim
            if d % self.group_size:
                return f"embedding_dim = {d} is no multiple of group_size {self.group_size}"
            return weight_unfit(module)
        k = module.in_features
        if k % self.group_size:
            return f"in_features = {k} is no multiple of group_size {self.group_size}"
        return weight_unfit(module)


@register_step
@dataclass
class Sparse(Step):
    """Linear layers -> :class:`pykernels.nn.SparseLinear`, magnitude-pruned to
    ``sparsity`` (``pattern``: ``"unstructured"``, ``"block"`` (4x4) or ``"2:4"``),
    each layer to it (``scope="layer"``) or the chosen layers' weights together
    (``scope="global"``: one threshold, :meth:`SparseLinear.from_linears`).

    ``"sparse:0.9"``, ``"sparse:0.9:block"``, ``"sparse:2:4"``,
    ``"sparse:0.9:scope=global"``."""

    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: str = "layer"
    name: ClassVar[str] = "sparse"
    positional: ClassVar[tuple[str, ...]] = ("sparsity", "pattern")

    def __post_init__(self) -> None:
        from ..nn.sparse import SCOPES
        from ..ops.sparse import PATTERNS

        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.pattern == "2:4":
            if self.sparsity not in (None, 0.5):
                raise ValueError(f"2:4 means sparsity 0.5, got sparsity={self.sparsity!r}")
            self.sparsity = None
        else:
            self.sparsity = _fraction("sparsity", self.sparsity)

    @classmethod
    def from_args(cls, args: list[str], text: str) -> Step:
        if args[:2] == ["2", "4"]:  # "sparse:2:4": the pattern, not two numbers
            args = ["pattern=2:4", *args[2:]]
        return super().from_args(args, text)

    def spec(self) -> dict[str, Any]:
        # Saved manifests of layer-scoped steps stay as they were before scope existed.
        out = super().spec()
        if self.scope == "layer":
            del out["scope"]
        return out

    def __str__(self) -> str:
        scope = "" if self.scope == "layer" else f":scope={self.scope}"
        if self.pattern == "2:4":
            return "sparse:2:4" + scope
        tail = "" if self.pattern == "unstructured" else f":{self.pattern}"
        return f"sparse:{_num(self.sparsity)}{tail}{scope}"

    def apply(self, ctx: Context) -> None:
        from ..nn import SparseLinear

        targets = ctx.targets((nn.Linear,), self.unfit)
        if self.scope == "global" and self.pattern != "2:4":
            layers = SparseLinear.from_linears([m for _, m in targets], self.sparsity, self.pattern)
            for (fqn, _), layer in zip(targets, layers, strict=True):
                ctx.replace(fqn, layer)
            return
        for fqn, m in ctx.progress(targets, "sparse"):
            ctx.replace(fqn, SparseLinear.from_linear(m, self.sparsity, self.pattern))

    def unfit(self, module: nn.Module) -> str | None:
        if self.pattern == "2:4" and module.in_features % 4:
            return f"in_features = {module.in_features} is no multiple of 4, which 2:4 needs"
        # NaN and inf are kept as stored values, as the dense layer computes with them.
        return weight_unfit(module, finite=False)


@register_step
@dataclass
class LowRank(Step):
    """Linear layers -> :class:`pykernels.nn.LowRankLinear` by truncated SVD: exactly one
    of ``energy`` (of ``||W||_F^2`` kept), ``rank`` or ``tol`` (relative error).
    A layer whose factors would not be smaller stays dense (listed as skipped).

    ``"lowrank:0.9"`` (energy), ``"lowrank:rank=64"``, ``"lowrank:tol=0.2"``."""

    energy: float | None = None
    rank: int | None = None
    tol: float | None = None
    name: ClassVar[str] = "lowrank"
    positional: ClassVar[tuple[str, ...]] = ("energy",)

    def __post_init__(self) -> None:
        given = [k for k in ("energy", "rank", "tol") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of energy, rank and tol, got {given or 'none'}")
        if self.energy is not None:
            self.energy = _fraction("energy", self.energy, lo_open=True, hi_open=False)
        if self.tol is not None:
            self.tol = _fraction("tol", self.tol)
        if self.rank is not None and (
            not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1
        ):
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")

    def __str__(self) -> str:
        if self.energy is not None:
            return f"lowrank:{_num(self.energy)}"
        if self.rank is not None:
            return f"lowrank:rank={self.rank}"
        return f"lowrank:tol={_num(self.tol)}"

    def apply(self, ctx: Context) -> None:
        from ..nn import LowRankLinear, nbytes_of

        for fqn, m in ctx.progress(ctx.targets((nn.Linear,), self.unfit), "lowrank"):
            new = LowRankLinear.from_linear(m, rank=self.rank, energy=self.energy, tol=self.tol)
            if nbytes_of(new) < nbytes_of(m):
                ctx.replace(fqn, new)
            else:
                ctx.skip(
                    fqn,
                    f"rank {new.rank} of {min(m.in_features, m.out_features)} would not be "
                    "smaller than the dense layer",
                )

    def unfit(self, module: nn.Module) -> str | None:
        # The factors are torch matmuls: any float dtype, but no SVD of NaN or inf.
        return weight_unfit(module, dtypes=(*KERNEL_DTYPES, torch.float64))


@register_step
@dataclass
class PruneStructured(Step):
    """Removes whole neurons, channels and attention heads, leaving smaller dense modules.

    ``ratio``: the fraction of each prunable group's units removed (at least one
    unit is kept). ``importance``: ``"l2"`` (the norm of each unit's weights
    across every layer it touches) or ``"taylor"`` (first order: ``|sum w *
    dL/dw|`` over those weights, the estimated change of L when the unit is
    removed, on the example inputs; L is the model's ``loss`` when it returns
    one (labels in the batch), else 4 random projections of the output, whose
    root mean square estimates the norm of the output's change).
    ``round_to``: kept neuron / channel counts become multiples of it (for the
    kernels' tiles); heads are whole heads anyway. What cannot be pruned
    safely (a residual stream, a layer norm's input, an untraceable use) is
    left alone and listed in the report. See :mod:`pykernels.compress.prune`.

    With ``calibration=`` batches (``pk.compress(..., calibration=batches)``),
    pruning is calibration-aware by default: units are chosen by
    ``importance="act"`` (what removing each one takes from its consumers'
    outputs on the calibration activations, its mean folded into their bias:
    ``var(x_j) ||W[:, j]||^2`` per neuron, the block sum per head, as FLAP), and
    ``reconstruct`` re-fits the consumers (an FFN's second projection, the
    attention output projection) by least squares on the calibration
    activations of the kept units, so each block's output stays as close as a
    linear map allows (:func:`pykernels.compress.prune.reconstruct_linear`).
    Without calibration, ``importance`` defaults to ``"l2"`` and nothing is
    re-fitted. ``reconstruct=False`` turns the re-fit off; ``importance="l2"``
    or ``"taylor"`` chooses by weights (or gradients) even with calibration.

    ``"prune:0.3"``, ``"prune:0.3:taylor"``, ``"prune:0.3:round_to=16"``,
    ``"prune:0.3:act:reconstruct=False"``."""

    ratio: float = 0.0
    importance: str | None = None
    round_to: int | None = None
    heads: bool = True
    reconstruct: bool | None = None
    name: ClassVar[str] = "prune"
    positional: ClassVar[tuple[str, ...]] = ("ratio", "importance")

    def __post_init__(self) -> None:
        self.ratio = _fraction("ratio", self.ratio)
        if self.importance is not None and self.importance not in ("l2", "taylor", "act"):
            raise ValueError(f"importance must be 'l2', 'taylor' or 'act', got {self.importance!r}")
        if self.reconstruct is not None and not isinstance(self.reconstruct, bool):
            raise ValueError(f"reconstruct must be a bool, got {self.reconstruct!r}")
        if self.round_to is not None and (
            not isinstance(self.round_to, int)
            or isinstance(self.round_to, bool)
            or self.round_to < 1
        ):
            raise ValueError(f"round_to must be a positive int or None, got {self.round_to!r}")
        if not isinstance(self.heads, bool):
            raise ValueError(f"heads must be a bool, got {self.heads!r}")

    def __str__(self) -> str:
        s = f"prune:{_num(self.ratio)}"
        if self.importance is not None:
            s += f":{self.importance}"
        if self.round_to is not None:
            s += f":round_to={self.round_to}"
        if not self.heads:
            s += ":heads=False"
        if self.reconstruct is not None:
            s += f":reconstruct={self.reconstruct}"
        return s

    def apply(self, ctx: Context) -> None:
        from .prune import prune_structured

        prune_structured(ctx, self)


@register_step
@dataclass
class Cluster(Step):
    """Linear layers -> :class:`pykernels.nn.ClusteredLinear` (weight sharing): each
    weight an index into a codebook of ``n_clusters`` centroids (k-means), one
    codebook per output channel (``per="row"``) or per layer (``"layer"``);
    4-bit codes up to 16 clusters, 8-bit up to 256. ``mode``: ``"dynamic"``
    (int8 activations) or ``"weight_only"`` (float activations).

    ``"cluster:16"``, ``"cluster:16:layer"``, ``"cluster:64:mode=weight_only"``."""

    n_clusters: int = 16
    per: str = "row"
    mode: str = "dynamic"
    gptq: bool = False
    act_order: bool = False
    damp: float = 0.01
    name: ClassVar[str] = "cluster"
    positional: ClassVar[tuple[str, ...]] = ("n_clusters", "per")

    @classmethod
    def from_args(cls, args: list[str], text: str) -> Step:
        from .calibrate import gptq_args

        return super().from_args(gptq_args(args), text)

    def spec(self) -> dict[str, Any]:
        return _drop_gptq(super().spec())

    def __post_init__(self) -> None:
        from ..nn.cluster import MAX_CLUSTERS, MIN_CLUSTERS

        v = self.n_clusters
        if isinstance(v, bool) or not isinstance(v, int) or not MIN_CLUSTERS <= v <= MAX_CLUSTERS:
            raise ValueError(
                f"n_clusters must be an int in [{MIN_CLUSTERS}, {MAX_CLUSTERS}], got {v!r}"
            )
        if self.per not in ("row", "layer"):
            raise ValueError(f"per must be 'row' or 'layer', got {self.per!r}")
        if self.mode not in ("dynamic", "weight_only"):
            raise ValueError(f"mode must be 'dynamic' or 'weight_only', got {self.mode!r}")
        from .calibrate import gptq_options

        gptq_options(self)

    def __str__(self) -> str:
        s = f"cluster:{self.n_clusters}" + (":layer" if self.per == "layer" else "")
        s += ":mode=weight_only" if self.mode == "weight_only" else ""
        return s + _gptq_str(self)

    def apply(self, ctx: Context) -> None:
        from ..nn import ClusteredLinear

        if self.gptq:
            from .calibrate import cluster_gptq

            return cluster_gptq(ctx, self)
        for fqn, m in ctx.progress(ctx.targets((nn.Linear,), self.unfit), "cluster"):
            new = ClusteredLinear.from_linear(m, self.n_clusters, self.per, mode=self.mode)
            ctx.replace(fqn, new)

    def unfit(self, module: nn.Module) -> str | None:
        return weight_unfit(module)


class _EnergyOrRank:
    """The two ways of sizing a convolution's decomposition (CP, Tucker): exactly
    one of ``energy`` (a fraction in (0, 1]) and ``rank`` (a positive int)."""

    energy: float | None
    rank: int | None
    name: ClassVar[str]

    def __post_init__(self) -> None:
        given = [k for k in ("energy", "rank") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of energy and rank, got {given or 'none'}")
        if self.energy is not None:
            self.energy = _fraction("energy", self.energy, lo_open=True, hi_open=False)
        if self.rank is not None and (
            not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1
        ):
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")

    def __str__(self) -> str:
        if self.energy is None:
            return f"{self.name}:rank={self.rank}"
        return f"{self.name}:{_num(self.energy)}"


@register_step
@dataclass
class CP(_EnergyOrRank, Step):
    """Conv2d layers -> :class:`pykernels.nn.CPConv2d` (CP decomposition, Lebedev et
    al. 2015) at ``rank``, or at the smallest rank keeping ``energy`` of
    ``||W||^2`` (relative error <= sqrt(1 - energy)). Grouped convolutions,
    and layers whose factors would not be smaller, stay as they are (listed
    as skipped).

    ``"cp:0.9"`` (energy), ``"cp:rank=32"``."""

    energy: float | None = None
    rank: int | None = None
    name: ClassVar[str] = "cp"
    positional: ClassVar[tuple[str, ...]] = ("energy",)

    def apply(self, ctx: Context) -> None:
        from ..nn import CPConv2d, nbytes_of

        for fqn, m in ctx.progress(ctx.targets((nn.Conv2d,), self.unfit), "cp"):
            new = CPConv2d.from_conv(m, rank=self.rank, energy=self.energy)
            if nbytes_of(new) < nbytes_of(m):
                ctx.replace(fqn, new)
            else:
                ctx.skip(fqn, f"rank {new.rank} would not be smaller than the dense layer")

    def unfit(self, module: nn.Module) -> str | None:
        return _conv_unfit(module, padding=False)


@register_step
@dataclass
class Tucker(_EnergyOrRank, Step):
    """Conv2d layers -> :class:`pykernels.nn.TuckerConv2d` (Tucker-2: a 1x1 convolution
    into ``rank`` channels, the kernel's core, a 1x1 convolution out), at ``rank``
    for both ranks or at the smallest ranks keeping ``energy`` of each
    unfolding. Grouped convolutions, padding modes other than zeros and
    layers whose factors would not be smaller stay as they are (listed as
    skipped). What :func:`pykernels.factorize` runs on convolutions.

    ``"tucker:0.9"`` (energy), ``"tucker:rank=32"``."""

    energy: float | None = None
    rank: int | None = None
    name: ClassVar[str] = "tucker"
    positional: ClassVar[tuple[str, ...]] = ("energy",)

    def apply(self, ctx: Context) -> None:
        from ..nn import TuckerConv2d, nbytes_of

        ranks = None if self.rank is None else (self.rank, self.rank)
        for fqn, m in ctx.progress(ctx.targets((nn.Conv2d,), self.unfit), "tucker"):
            new = TuckerConv2d.from_conv(m, ranks=ranks, energy=self.energy)
            if nbytes_of(new) < nbytes_of(m):
                ctx.replace(fqn, new)
            else:
                ctx.skip(fqn, f"ranks {new.ranks} would not be smaller than the dense layer")

    def unfit(self, module: nn.Module) -> str | None:
        return _conv_unfit(module, padding=True)


def _conv_unfit(module: nn.Module, padding: bool) -> str | None:
    if module.groups != 1:
        return f"groups={module.groups}: already factored by channel"
    if padding and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: only zero padding factors"
    return weight_unfit(module, dtypes=(*KERNEL_DTYPES, torch.float64))


__all__ = [
    "CP",
    "Cluster",
    "Int4",
    "Int8",
    "Keep",
    "LowRank",
    "PruneStructured",
    "Scoped",
    "Sparse",
    "Step",
    "Tucker",
    "from_specs",
    "parse",
    "register_int4_quantizer",
    "register_step",
    "step_names",
]
