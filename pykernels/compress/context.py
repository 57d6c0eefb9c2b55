"""What a recipe step sees while it runs: which modules it may touch, how to call
the model on the example inputs, and where it records what it changed."""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import walk

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class Change:
    """One module the recipe replaced or reshaped, keyed by its fully qualified name.

    ``in_keep`` / ``out_keep``: the original input / output features (channels)
    the module still has, when pruning removed some, along ``feature_dim``
    (-1 for Linear-like layers, 1 for convolutions and batch norms). They
    compose over steps, so the report can compare the final module with the
    original one (the module at the same fqn of the uncompressed model).
    """

    fqn: str
    steps: list[str] = field(default_factory=list)
    in_keep: Tensor | None = None
    out_keep: Tensor | None = None
    feature_dim: int = -1
    # AWQ / SmoothQuant moved a per-channel factor into the module: the report feeds it
    # its original input times ``in_scale`` and multiplies its output by ``out_scale``.
    in_scale: Tensor | None = None
    out_scale: Tensor | None = None


@dataclass
class Skipped:
    fqn: str
    step: str
    reason: str


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` for a tensor, a tuple or a mapping."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def training_flags(model: nn.Module) -> dict[str, bool]:
    """Each submodule's own ``training`` flag, by every name it has in ``model``."""
    return {fqn: m.training for fqn, m in model.named_modules(remove_duplicate=False)}


def restore_training_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    """Puts back what :func:`training_flags` took: ``model.train(mode)`` would set every
    submodule alike and lose an eval-mode BatchNorm inside a training model. A module
    at a name ``flags`` lacks (a step's replacement and what it holds) takes the flag
    of the nearest name above it that ``flags`` has."""
    for fqn, m in model.named_modules(remove_duplicate=False):
        name = fqn
        while name not in flags and name:
            name = name.rpartition(".")[0]
        m.training = flags.get(name, model.training)


def check_example_inputs(example_inputs: Any) -> None:
    if isinstance(example_inputs, Tensor):
        return
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"compress: example_inputs keys must be str, got {bad[0]!r}")
        return
    if isinstance(example_inputs, (tuple, list)):
        return
    raise TypeError(
        "compress: example_inputs must be a tensor, a tuple of positional inputs or a dict of "
        f"keyword inputs (a Hugging Face batch), got {type(example_inputs).__name__}"
    )


class Selector:
    """``filter_fn(module, fqn)`` (as in torchao) and ``exclude`` patterns on fqns.

    An exclude entry ``"name"`` excludes that module and everything under it;
    ``"re:<regex>"`` excludes every fqn the regex matches from its start
    (``re.match``, as llm-compressor's ``ignore``).
    """

    def __init__(self, model: nn.Module, filter_fn: FilterFn | None, exclude: Any) -> None:
        if filter_fn is not None and not callable(filter_fn):
            raise TypeError(
                f"compress: filter_fn must be callable (module, fqn) -> bool or None, "
                f"got {type(filter_fn).__name__}"
            )
        self.filter_fn = filter_fn
        if exclude is None:
            exclude = []
        if isinstance(exclude, str) or not isinstance(exclude, Iterable):
            raise TypeError(
                "compress: exclude must be a list of names or 're:' patterns, "
                f"got {type(exclude).__name__}"
            )
        names = {fqn for fqn, _ in model.named_modules()}
        self.names: list[str] = []
        self.patterns: list[re.Pattern] = []
        for e in exclude:
            if not isinstance(e, str) or not e:
                raise TypeError(f"compress: exclude entries must be non-empty str, got {e!r}")
            if e.startswith("re:"):
                try:
                    self.patterns.append(re.compile(e[3:]))
                except re.error as err:
                    raise ValueError(
                        f"compress: exclude pattern {e!r} is not a regex: {err}"
                    ) from None
            else:
                if e not in names:
                    raise ValueError(
                        f"compress: exclude names {e!r}, which is no module of the model "
                        "(use 're:' for a pattern)"
                    )
                self.names.append(e)

    def excluded(self, fqn: str) -> bool:
        if any(fqn == n or fqn.startswith(n + ".") for n in self.names):
            return True
        return any(p.match(fqn) for p in self.patterns)

    def __call__(self, module: nn.Module, fqn: str) -> bool:
        if self.excluded(fqn):
            return False
        if self.filter_fn is None:
            return True
        ok = self.filter_fn(module, fqn)
        if not isinstance(ok, bool):
            raise TypeError(
                f"compress: filter_fn must return a bool, got {type(ok).__name__} for {fqn!r}"
            )
        return ok


class Context:
    """Passed to :meth:`pykernels.recipes.Step.apply`."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        selector: Selector,
        progress: bool,
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.accept = selector
        self.show_progress = progress
        self.changes: dict[str, Change] = {}
        self.skipped: list[Skipped] = []
        self.unfit: list[Skipped] = []  # those of skipped a step's unfit() refused
        self.attrs: dict[str, dict[str, Any]] = {}
        self.step = ""
        self._also: dict[str, list[str]] = {}  # other names of a shared module, by targets()
        # Calibrated steps (GPTQ, AWQ, SmoothQuant): the ``calibration=`` batches, the
        # steps still to come (AWQ searches for the quantizer after it), and what plain
        # round-to-nearest would have made of each module they replace (for the report).
        self.calibration: list[Any] | None = None
        self.remaining: list[Any] = []
        self.baselines: dict[str, nn.Module] = {}

    def call(self, model: nn.Module | None = None) -> Any:
        return call_model(self.model if model is None else model, self.example_inputs)

    def modules(self, types: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
        """(fqn, module) for every module of one of ``types`` (the model itself included),
        each once, outermost first; modules inside a match are not visited. Neither
        the selection nor safety is checked: a step replacing modules wants
        :meth:`targets`."""
        return walk.candidates(self.model, types)

    def targets(
        self,
        types: tuple[type, ...],
        unfit: Callable[[nn.Module], str | None] | None = None,
    ) -> list[tuple[str, nn.Module]]:
        """(fqn, module) for each module of one of ``types`` that this step may replace by
        a layer computing the same function: accepted by the caller's ``filter_fn`` and
        ``exclude``, not read directly by its owner (attention's ``out_proj``), not a
        subclass with a computation of its own, and fit for the step (``unfit(module)``
        returns None; else it names why the step cannot convert that module, as
        :meth:`pykernels.recipes.Step.unfit` does). Those accepted but unsafe or unfit
        are recorded as skipped, with the reason: one layer the step cannot take never
        stops it from converting the others. A module held under several names is
        listed once; :meth:`replace` puts its replacement at each accepted name."""
        found, unsafe = walk.targets(self.model, types, self.accept)
        for fqn, reason in unsafe:
            self.skip(fqn, reason)
        if unfit is not None:
            fit = []
            for fqn, m in found:
                reason = unfit(m)
                if reason is None:
                    fit.append((fqn, m))
                else:
                    self.skip(fqn, reason)
                    self.unfit.append(self.skipped[-1])
            found = fit
        # By the model's own module: a Conv1D is offered as a Linear it does not hold.
        wanted = {id(self.model.get_submodule(fqn) if fqn else self.model): fqn for fqn, _ in found}
        self._also = {}
        for fqn, m in self.model.named_modules(remove_duplicate=False):
            first = wanted.get(id(m))
            if first is not None and fqn != first and self.accept(m, fqn):
                self._also.setdefault(first, []).append(fqn)
        return found

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """(fqn, layer) for each transformer encoder layer whose projections this step
        may all replace (:func:`walk.encoder_blocks`): the candidates for a fused
        :class:`pykernels.nn.EncoderBlock`."""
        return walk.encoder_blocks(self.model, self.accept)

    def gated_mlps(self) -> list[tuple[str, nn.Module]]:
        """(fqn, module) for each gated-MLP-shaped module whose Linears this step may
        all replace (:func:`walk.gated_mlps`): the candidates for a fused
        :class:`pykernels.nn.Int8GatedMLP`."""
        return walk.gated_mlps(self.model, self.accept)

    def progress(self, items: Iterable, desc: str, total: int | None = None) -> Iterator:
        return progress(items, desc, self.show_progress, total)

    def _change(self, fqn: str) -> Change:
        # A module inside a transparent wrapper (AWQ's InputScaled) is one layer with it.
        parts = fqn.split(".")
        for i in range(len(parts) - 1, 0, -1):
            owner = ".".join(parts[:i])
            if getattr(self.model.get_submodule(owner), "pk_transparent", False):
                fqn = owner
        if fqn not in self.changes:
            self.changes[fqn] = Change(fqn)
        ch = self.changes[fqn]
        if not ch.steps or ch.steps[-1] != self.step:
            ch.steps.append(self.step)
        return ch

    def replace(self, fqn: str, new: nn.Module) -> None:
        """Swaps the module at ``fqn`` (and at its other names, when :meth:`targets` found
        it shared) for ``new``: a different layer of the same function, in the same
        training mode, and frozen (no parameter requiring grad) when the old one was."""
        old = self.model.get_submodule(fqn) if fqn else self.model
        new.train(old.training)
        # A layer the caller froze stays frozen: a fine-tuning loop over the
        # trainable parameters must not start training it.
        params = list(old.parameters())
        if params and not any(p.requires_grad for p in params):
            new.requires_grad_(False)
        also = [n for n in self._also.pop(fqn, ()) if self.model.get_submodule(n) is old]
        for name in (fqn, *also):
            self._change(name)
            if name == "":
                self.model = new
            else:
                self.model.set_submodule(name, new)

    def reshaped(
        self,
        fqn: str,
        in_keep: Tensor | None = None,
        out_keep: Tensor | None = None,
        feature_dim: int = -1,
    ) -> None:
        """Records that pruning kept ``in_keep`` / ``out_keep`` of the module at ``fqn``."""
        ch = self._change(fqn)
        ch.feature_dim = feature_dim
        if in_keep is not None:
            ch.in_keep = in_keep if ch.in_keep is None else ch.in_keep[in_keep]
        if out_keep is not None:
            ch.out_keep = out_keep if ch.out_keep is None else ch.out_keep[out_keep]

    def scaled(
        self, fqn: str, in_scale: Tensor | None = None, out_scale: Tensor | None = None
    ) -> None:
        """Records that the module at ``fqn`` now takes its input times ``in_scale`` and
        gives its output divided by ``out_scale`` (per channel), its function otherwise
        the same: what AWQ and SmoothQuant fold in."""
        ch = self._change(fqn)
        if in_scale is not None:
            ch.in_scale = in_scale if ch.in_scale is None else ch.in_scale * in_scale
        if out_scale is not None:
            ch.out_scale = out_scale if ch.out_scale is None else ch.out_scale * out_scale

    def set_attr(self, fqn: str, name: str, value: int) -> None:
        """Sets an int attribute (a head count) that :func:`pykernels.load` must restore."""
        setattr(self.model.get_submodule(fqn), name, value)
        self.attrs.setdefault(fqn, {})[name] = value

    def skip(self, fqn: str, reason: str) -> None:
        self.skipped.append(Skipped(fqn, self.step, reason))


_warned_tqdm = False


def progress(items: Iterable, desc: str, enabled: bool, total: int | None = None) -> Iterator:
    """A tqdm bar that appears only on work that takes more than a second."""
    global _warned_tqdm
    if not enabled:
        return iter(items)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if not _warned_tqdm:
            warnings.warn(
                "pykernels: progress bars need tqdm (pip install tqdm); pass progress=False "
                "to silence this",
                stacklevel=3,
            )
            _warned_tqdm = True
        return iter(items)
    return iter(tqdm(items, desc=desc, total=total, delay=1.0, leave=False))


def output_tensor(out: Any) -> Tensor:
    """The tensor a model's output is compared by: itself, its ``last_hidden_state``
    or ``logits`` (an attribute or key), else the first tensor found depth-first in
    a tuple, list, mapping, dataclass (a Hugging Face ``ModelOutput`` is one) or
    named tuple. TypeError when it holds none."""
    found = _find_tensor(out, depth=0)
    if found is None:
        raise TypeError(
            f"compress: cannot find a tensor in the model's output ({type(out).__name__}) "
            "to compare"
        )
    return found


def _find_tensor(out: Any, depth: int) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if depth > 8:  # a self-referencing output; nothing sensible to compare there
        return None
    for name in ("last_hidden_state", "logits"):
        v = out.get(name) if isinstance(out, Mapping) else getattr(out, name, None)
        if isinstance(v, Tensor):
            return v
    if isinstance(out, Mapping):
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        values = [getattr(out, f.name, None) for f in dataclasses.fields(out)]
    else:
        values = []
    for v in values:
        t = _find_tensor(v, depth + 1)
        if t is not None:
            return t
    return None


def module_device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")
