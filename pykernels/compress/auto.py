"""Compression to a budget: ``pk.compress(model, "auto", example_inputs, budget=pk.Budget(...))``.

A user rarely knows which recipe to write. The ``auto`` recipe picks a step for
each layer so that the compressed model keeps a floor of output fidelity on
**held-out** batches and is as fast (or as small) as it can be on this machine:

1. **Sensitivity.** Each candidate step (``int8``, ``int4`` when registered,
   ``cluster:16``, ``sparse`` levels, ``lowrank`` energies, ``tucker`` for
   convolutions) is applied to each layer alone; its cost is the model's
   output error on the calibration batches (``1 - cosine`` to the
   uncompressed model's output) and its gain the layer's measured latency
   (the replacement timed at the layer's real input shape, from hooks on
   ``example_inputs``; cached per kind, shape and thread count) and bytes.
2. **Search.** For a price ``lam`` on error, each layer takes the candidate
   minimizing ``cost + lam * error`` (a Lagrangian relaxation of "minimize
   cost subject to summed error <= budget", exact when per-layer errors add).
   ``lam`` is bisected (in log space) on the **held-out** batches: every
   assignment tried is built and measured end to end, so an assignment whose
   composed error overshoots the budget is tightened by the next bisection
   step. Uniform recipes of the same candidates are measured too, and the
   fastest (or smallest) feasible model, by end-to-end measurement, wins.
3. **Output.** The model, and an :class:`AutoReport`: the usual
   :class:`CompressionReport` plus per-layer choices (step, error, latency,
   bytes), the assignments tried (for :meth:`AutoReport.plot`'s Pareto front),
   and ``report.recipe``: a recipe string with per-layer selectors
   (``"int8@encoder.layer.0,encoder.layer.1+sparse:0.8@pooler.dense"``) that
   ``pk.compress(model, report.recipe, example_inputs)`` applies again exactly.

With ``Budget(recover_minutes=...)``, structured pruning (``prune``, which needs
training to recover) is tried first: the pruned model is distilled from the
original for that long (:func:`pykernels.distill.recover`), and the per-layer
search then runs on the recovered model, still measured against the original
one. ``report.recipe`` then starts with the prune step, whose recovered weights
a recipe cannot carry: ``report.recovered`` is that float model, and
``report.recipe_after_recovery`` reproduces the rest on it.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..nn._module import nbytes_of
from . import recipes
from .context import (
    Context,
    FilterFn,
    Selector,
    call_model,
    output_tensor,
    progress,
    restore_training_flags,
    training_flags,
)
from .report import CompressionReport, rel_error, row_cosine

__all__ = ["AutoReport", "Budget", "Choice", "compress_auto", "default_candidates"]

MINIMIZE = ("latency", "bytes")
Metric = Callable[[nn.Module, list[Any]], float]


@dataclass
class Budget:
    """What ``pk.compress(model, "auto", ...)`` must keep, and what it minimizes.

    Args:
        cosine: floor on the mean row cosine (along the last dimension) of the
            compressed model's output to the uncompressed one's, on the
            held-out batches (``last_hidden_state`` / ``logits`` / the output
            tensor, as the report compares).
        rel_error: ceiling on ``||y_c - y|| / ||y||`` on the held-out batches.
        metric: ``(fn, floor)``: ``fn(model, batches) -> float`` (higher is
            better, e.g. accuracy) must stay ``>= floor`` on the held-out batches.
        minimize: ``"latency"`` (measured on ``example_inputs`` on this
            machine, at torch's current thread count), ``"bytes"``, or a dict
            of weights ``{"latency": 1.0, "bytes": 0.5}`` (each term relative
            to the uncompressed model's).
        recover_minutes: allow structured pruning followed by this many
            minutes of distillation (:func:`pykernels.distill.recover`).

    At least one of ``cosine``, ``rel_error`` and ``metric`` must be given; all
    those given must hold.
    """

    cosine: float | None = None
    rel_error: float | None = None
    metric: tuple[Metric, float] | None = None
    minimize: str | dict[str, float] = "latency"
    recover_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.cosine is None and self.rel_error is None and self.metric is None:
            raise ValueError("Budget: give at least one of cosine, rel_error and metric")
        if self.cosine is not None:
            c = self.cosine
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not -1 < c <= 1:
                raise ValueError(f"Budget: cosine must be a number in (-1, 1], got {c!r}")
            self.cosine = float(c)
        if self.rel_error is not None:
            r = self.rel_error
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < math.inf:
                raise ValueError(f"Budget: rel_error must be a finite number >= 0, got {r!r}")
            self.rel_error = float(r)
        if self.metric is not None:
            m = self.metric
            if not (isinstance(m, (tuple, list)) and len(m) == 2 and callable(m[0])):
                raise TypeError(
                    "Budget: metric must be a pair (fn, floor), fn(model, batches) -> float"
                )
            if isinstance(m[1], bool) or not isinstance(m[1], (int, float)):
                raise TypeError(f"Budget: metric's floor must be a number, got {m[1]!r}")
            self.metric = (m[0], float(m[1]))
        if isinstance(self.minimize, str):
            if self.minimize not in MINIMIZE:
                raise ValueError(
                    f"Budget: minimize must be one of {MINIMIZE} or a dict of weights, "
                    f"got {self.minimize!r}"
                )
        elif isinstance(self.minimize, dict):
            bad = [k for k in self.minimize if k not in MINIMIZE]
            if bad or not self.minimize:
                raise ValueError(
                    f"Budget: minimize's keys must be among {MINIMIZE}, got {list(self.minimize)}"
                )
            for k, w in self.minimize.items():
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
                    raise ValueError(f"Budget: minimize[{k!r}] must be a number >= 0, got {w!r}")
            self.minimize = {k: float(w) for k, w in self.minimize.items()}
        else:
            raise TypeError(
                f"Budget: minimize must be a str or a dict, got {type(self.minimize).__name__}"
            )
        if self.recover_minutes is not None:
            r = self.recover_minutes
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < math.inf:
                raise ValueError(f"Budget: recover_minutes must be a number > 0, got {r!r}")
            self.recover_minutes = float(r)

    def weights(self) -> dict[str, float]:
        """The objective as weights of relative latency and relative bytes."""
        if isinstance(self.minimize, str):
            return {self.minimize: 1.0}
        return dict(self.minimize)

    def meets(self, quality: dict[str, float]) -> bool:
        """Whether measured ``quality`` (from :func:`measure_quality`) satisfies the budget."""
        if self.cosine is not None and not quality["cosine"] >= self.cosine:
            return False
        if self.rel_error is not None and not quality["rel_error"] <= self.rel_error:
            return False
        if self.metric is not None and not quality["metric"] >= self.metric[1]:
            return False
        return True

    def __str__(self) -> str:
        parts = []
        if self.cosine is not None:
            parts.append(f"cosine>={self.cosine:g}")
        if self.rel_error is not None:
            parts.append(f"rel_error<={self.rel_error:g}")
        if self.metric is not None:
            name = getattr(self.metric[0], "__name__", "metric")
            parts.append(f"{name}>={self.metric[1]:g}")
        parts.append(f"minimize={self.minimize}")
        if self.recover_minutes is not None:
            parts.append(f"recover_minutes={self.recover_minutes:g}")
        return "Budget(" + ", ".join(parts) + ")"

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``"cosine=0.99"``, ``"rel_error=0.05,recover_minutes=10"`` (the CLI's form)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"budget: expected 'cosine=0.99' or 'rel_error=0.1', got {text!r}")
        kwargs: dict[str, Any] = {}
        for item in text.split(","):
            key, eq, value = item.strip().partition("=")
            if not eq or key not in ("cosine", "rel_error", "recover_minutes"):
                raise ValueError(
                    f"budget: {item!r} is not cosine=X, rel_error=X or recover_minutes=X"
                )
            try:
                kwargs[key] = float(value)
            except ValueError:
                raise ValueError(f"budget: {item!r}: {value!r} is not a number") from None
        return cls(**kwargs)


def output_rows(out: Tensor, inputs: Any) -> Tensor:
    """``out`` as rows along its last dimension; when ``inputs`` is a batch with an
    ``attention_mask`` of ``out``'s leading shape, only the rows of real tokens
    (padding's outputs are never read)."""
    if out.dim() == 0:
        return out.reshape(1, 1)
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if isinstance(mask, Tensor) and out.dim() >= 2 and tuple(mask.shape) == tuple(out.shape[:-1]):
        return out[mask.bool()]
    return out.reshape(-1, out.shape[-1])


def measure_quality(
    model: nn.Module, batches: list[Any], refs: list[Tensor], budget: Budget
) -> dict[str, float]:
    """Cosine and relative error of ``model``'s outputs to ``refs`` over ``batches``
    (all rows together, padding left out: :func:`output_rows`), and the budget's
    metric when it has one."""
    with torch.no_grad():
        outs = [output_tensor(call_model(model, b)).detach() for b in batches]
    y = torch.cat([output_rows(o, b) for o, b in zip(outs, batches, strict=True)])
    r = torch.cat([output_rows(o, b) for o, b in zip(refs, batches, strict=True)])
    q = {"cosine": row_cosine(y, r), "rel_error": rel_error(y, r)}
    if budget.metric is not None:
        v = budget.metric[0](model, batches)
        if isinstance(v, Tensor):
            v = float(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"Budget: metric must return a number, got {type(v).__name__}")
        q["metric"] = float(v)
    return q


# --- candidates ----------------------------------------------------------------------

# Candidate steps tried on each layer type by default. For latency only what can be
# faster than the layer (sparse and low-rank at the sparsities that keep an encoder
# near its fp32 outputs are slower than int8 here: benchmarks/RESULTS.md); for bytes
# everything that shrinks it. Structured pruning: each prunable group (a block's
# heads, its feed-forward neurons, a convolution's channels) at these ratios.
_LINEAR_LATENCY = ("int8",)
_LINEAR_BYTES = ("int8", "cluster:16", "sparse:0.8", "lowrank:0.8")
_EMBEDDING = ("int8",)
_CONV = ("tucker:0.95", "tucker:0.8")
# With calibration-aware pruning (units chosen on activations, consumers re-fitted) a
# lightly pruned group costs little enough to fit in tight budgets: 1/8 is tried too.
PRUNE_RATIOS = (0.125, 0.25, 0.5)
# Single-unit changes tried after the bisection (each one whole-model build and
# held-out check).
REFINE_TRIES = 8
# With minimize="latency", bytes (relative to the model's) count this much against
# relative latency: a tie-breaker, not a trade.
LATENCY_TIE_BYTES = 0.05
# Structured pruning ratios tried with recovery (Budget.recover_minutes), in order;
# the first whose recovered model meets the budget is kept.
RECOVER_RATIOS = (0.3,)

Candidates = dict[Any, tuple[Any, ...]]


def default_candidates(minimize: str | dict[str, float] = "latency") -> Candidates:
    """Candidate steps by layer type (``nn.Linear``, ``nn.Embedding``,
    ``nn.Conv2d``), and under the key ``"prune"`` the structured-pruning ratios
    tried on each prunable group. ``int4`` is added when a registered step of
    that name exists, ``int8:act_bits=7`` where :func:`pykernels.info` says it
    pays on this CPU; when bytes count, ``cluster:16``, ``sparse:0.8`` and
    ``lowrank:0.8`` too, and 4-bit embedding tables (``int4:g32:emb``)."""
    from ..info import info

    wants_bytes = minimize == "bytes" or (isinstance(minimize, dict) and "bytes" in minimize)
    linear = list(_LINEAR_BYTES if wants_bytes else _LINEAR_LATENCY)
    names = recipes.step_names()
    if "int4" in names:
        linear.insert(1, "int4")
    if "cluster" not in names and "cluster:16" in linear:
        linear.remove("cluster:16")
    try:
        pays = "brings no speed" not in str(info().get("int8_act_bits", "brings no speed"))
    except Exception:  # noqa: BLE001 - info() without a native build: no 7-bit candidate
        pays = False
    if pays:
        linear.insert(1, "int8:act_bits=7")
    embedding = list(_EMBEDDING)
    if wants_bytes and "int4" in names:
        # Tables are most of a small encoder's bytes once its Linears are int8.
        embedding.append("int4:g32:emb")
    return {
        nn.Linear: tuple(linear),
        nn.Embedding: tuple(embedding),
        nn.Conv2d: _CONV,
        "prune": PRUNE_RATIOS,
    }


@dataclass
class Choice:
    """One (layer, candidate) measured alone: the model's output error on the
    calibration batches with only this layer replaced, the layer's latency at its
    real input shape and its bytes. ``step`` ``"keep"`` is the layer as it was."""

    layer: str
    step: str
    error: float  # 1 - cosine of the model's output to the reference, calibration batches
    latency_ms: float
    bytes: int


@dataclass
class Trial:
    """One whole-model assignment built and measured on the held-out batches."""

    recipe: str
    est_latency_ms: float
    est_bytes: int
    est_error: float
    quality: dict[str, float]
    feasible: bool
    latency_ms: float | None = None  # measured end to end, for the finalists
    bytes: int | None = None


@dataclass
class AutoReport(CompressionReport):
    """:class:`CompressionReport` of the chosen model, plus how ``auto`` chose it.

    ``recipe``: the per-layer recipe string that reproduces the model
    (``pk.compress(model, report.recipe, example_inputs)``). ``choices``: the
    chosen :class:`Choice` of each layer. ``candidates``: every (layer,
    candidate) measured. ``trials``: the whole-model assignments built and
    measured on the held-out batches. ``holdout``: the chosen model's quality
    there. ``budget``, ``search_seconds``. With recovery: ``recovered`` (the
    distilled float model), ``recipe_after_recovery`` (what reproduces the rest on
    it) and ``recovery`` (the recovery's history).
    """

    choices: list[Choice] = field(default_factory=list)
    candidates: list[Choice] = field(default_factory=list)
    trials: list[Trial] = field(default_factory=list)
    holdout: dict[str, float] = field(default_factory=dict)
    budget: Budget | None = None
    search_seconds: float = 0.0
    recovered: nn.Module | None = None
    recipe_after_recovery: str | None = None
    recovery: dict[str, Any] | None = None

    def __str__(self) -> str:
        head = super().__str__()
        lines = [
            head,
            f"auto: {self.budget}, search {self.search_seconds:.0f} s, held-out "
            + ", ".join(f"{k} {v:.5g}" for k, v in self.holdout.items()),
        ]
        lines.append(f"{'layer':<48} {'step':<16} {'error':>9} {'ms':>8} {'bytes':>10}")
        for c in self.choices:
            lines.append(
                f"{c.layer:<48} {c.step:<16} {c.error:>9.2e} {c.latency_ms:>8.3f} {c.bytes:>10,}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"AutoReport(recipe={self.recipe!r}, layers={len(self.choices)}, "
            f"holdout={ {k: round(v, 6) for k, v in self.holdout.items()} }, "
            f"trials={len(self.trials)}, search_seconds={self.search_seconds:.1f})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the report's fields plus the choices, candidates and trials (the
        recovered model itself is left out)."""
        from dataclasses import asdict

        out = super().to_dict()
        out["choices"] = [asdict(c) for c in self.choices]
        out["candidates"] = [asdict(c) for c in self.candidates]
        out["trials"] = [asdict(t) for t in self.trials]
        out["holdout"] = dict(self.holdout)
        out["budget"] = str(self.budget)
        out["search_seconds"] = self.search_seconds
        out["recipe_after_recovery"] = self.recipe_after_recovery
        out["recovery"] = self.recovery
        return out

    def pareto(self) -> list[Trial]:
        """The trials no other trial beats on both estimated cost and held-out error."""
        key = _trial_cost_key(self.budget)
        pts = sorted(self.trials, key=lambda t: (key(t), 1 - t.quality["cosine"]))
        front, best = [], math.inf
        for t in pts:
            err = 1 - t.quality["cosine"]
            if err < best:
                front.append(t)
                best = err
        return front

    def plot(self, path: str) -> None:  # type: ignore[override]
        """The Pareto front of the assignments tried (estimated latency or bytes
        against held-out ``1 - cosine``), every trial and the chosen one, with the
        per-layer candidates beside it (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError(
                'AutoReport.plot needs matplotlib: pip install matplotlib (or "pykernels[plot]")'
            ) from None
        key = _trial_cost_key(self.budget)
        what = (
            "bytes"
            if self.budget is not None
            and self.budget.weights().get("bytes")
            and not self.budget.weights().get("latency")
            else "latency (ms, per-layer sum)"
        )
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
        xs = [key(t) for t in self.trials]
        ys = [max(1 - t.quality["cosine"], 1e-9) for t in self.trials]
        ax1.scatter(xs, ys, c=["#3a7" if t.feasible else "#c44" for t in self.trials], s=18)
        front = self.pareto()
        ax1.plot(
            [key(t) for t in front],
            [max(1 - t.quality["cosine"], 1e-9) for t in front],
            "-",
            color="#333",
            lw=1,
            label="Pareto front",
        )
        if self.budget is not None and self.budget.cosine is not None:
            ax1.axhline(1 - self.budget.cosine, color="#a33", ls="--", lw=1, label="budget")
        ax1.set_yscale("log")
        ax1.set_xlabel(f"estimated {what}")
        ax1.set_ylabel("held-out 1 - cosine")
        ax1.set_title("assignments tried (green: within budget)")
        ax1.legend(fontsize=8)
        steps = sorted({c.step for c in self.candidates})
        for s in steps:
            pts = [c for c in self.candidates if c.step == s]
            ax2.scatter(
                [c.latency_ms for c in pts], [max(c.error, 1e-9) for c in pts], s=10, label=s
            )
        ax2.set_yscale("log")
        ax2.set_xscale("log")
        ax2.set_xlabel("layer latency (ms)")
        ax2.set_ylabel("model 1 - cosine, this layer alone (calibration)")
        ax2.set_title("per-layer candidates")
        ax2.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _trial_cost_key(budget: Budget | None) -> Callable[[Trial], float]:
    w = budget.weights() if budget is not None else {"latency": 1.0}
    if w.get("latency") and not w.get("bytes"):
        return lambda t: t.est_latency_ms
    if w.get("bytes") and not w.get("latency"):
        return lambda t: float(t.est_bytes)
    return lambda t: w.get("latency", 0) * t.est_latency_ms + w.get("bytes", 0) * t.est_bytes / 1e6


# --- measuring layers ------------------------------------------------------------------

_LATENCY_CACHE: dict[tuple, float] = {}


def _layer_key(m: nn.Module) -> tuple:
    w = getattr(m, "weight", None)
    shape = tuple(w.shape) if isinstance(w, Tensor) else ()
    extra = tuple(
        getattr(m, a, None)
        for a in ("stride", "padding", "dilation", "groups", "bias")
        if not isinstance(getattr(m, a, None), (Tensor, nn.Parameter))
    )
    return (type(m).__name__, shape, getattr(m, "bias", None) is not None, extra)


def _time_module(m: nn.Module, x: Tensor, budget_s: float = 0.15, max_reps: int = 20) -> float:
    """Median ms of ``m(x)`` (after a warm-up), over up to ``max_reps`` calls or about
    ``budget_s`` seconds."""
    times = []
    with torch.inference_mode():
        m(x)  # warm-up: lazy packing, allocator, first-call dispatch
        m(x)
        start = time.perf_counter()
        while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            m(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _build(step: recipes.Step, layer: nn.Module) -> nn.Module | None:
    """``step`` applied to a copy of ``layer`` alone; None when it leaves it as it was."""
    work = copy.deepcopy(layer)
    ctx = Context(work, None, Selector(work, None, None), progress=False)
    step.apply(ctx)
    return None if ctx.model is work and not ctx.changes else ctx.model


def _layer_inputs(model: nn.Module, fqns: list[str], example_inputs: Any) -> dict[str, Tensor]:
    """The first positional input each layer receives on ``example_inputs``."""
    got: dict[str, Tensor] = {}
    hooks = []
    for fqn in fqns:

        def hook(mod, args, fqn=fqn):
            if fqn not in got and args and isinstance(args[0], Tensor):
                got[fqn] = args[0].detach().clone()

        hooks.append(model.get_submodule(fqn).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return got


# --- the search ------------------------------------------------------------------------


def _batches(name: str, data: Any) -> list[Any]:
    if data is None:
        return []
    if isinstance(data, (Tensor, dict)) or not isinstance(data, Iterable):
        raise TypeError(
            f"compress: {name} must be an iterable of batches shaped like example_inputs "
            f"(a list of tensors, tuples or dicts), got {type(data).__name__}"
        )
    out = list(data)
    if not out:
        raise ValueError(f"compress: {name} yields no batch")
    return out


_LAYER_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _assignment_recipe(
    assign: dict[str, str], order: list[str], model: nn.Module | None = None
) -> str:
    """The per-layer choices as a recipe string: one selector step per chosen kind, in
    the order of first appearance, layers in model order. With ``model``, a module
    all of whose layers (Linear, Embedding, convolutions) take the same step is
    named instead of its layers (``int8@encoder.layer.0``), which selects exactly
    the same layers."""
    by_step: dict[str, list[str]] = {}
    for fqn in order:
        s = assign.get(fqn, "keep")
        if s != "keep":
            by_step.setdefault(s, []).append(fqn)
    under: dict[str, list[str]] = {}
    if model is not None:
        for name, m in model.named_modules():
            if name and isinstance(m, _LAYER_TYPES):
                parts = name.split(".")
                for i in range(1, len(parts)):
                    under.setdefault(".".join(parts[:i]), []).append(name)
    parts = []
    for s, fqns in by_step.items():
        mine, named, covered = set(fqns), [], set()
        for fqn in fqns:
            if fqn in covered:
                continue
            pieces = fqn.split(".")
            pick = fqn
            for i in range(1, len(pieces)):
                anc = ".".join(pieces[:i])
                if under.get(anc) and all(n in mine for n in under[anc]):
                    pick = anc
                    break
            named.append(pick)
            covered.update(under.get(pick, [pick]) if pick != fqn else [fqn])
        parts.append(f"{s}@{','.join(named)}")
    return "+".join(parts)


def compress_auto(
    model: nn.Module,
    example_inputs: Any,
    *,
    budget: Budget,
    calibration: Any = None,
    holdout: Any = None,
    filter_fn: FilterFn | None = None,
    exclude: list[str] | None = None,
    candidates: dict[type, tuple[str, ...]] | None = None,
    seed: int = 0,
    progress_bars: bool = True,
) -> tuple[nn.Module, AutoReport]:
    """What ``pk.compress(model, "auto", example_inputs, budget=...)`` runs; see the
    module docstring. ``calibration`` and ``holdout`` are iterables of batches
    shaped like ``example_inputs``; without ``holdout``, the second half of
    ``calibration`` is held out (it needs two batches or more)."""
    from .api import compress

    if not isinstance(budget, Budget):
        raise TypeError(f"compress: budget must be a pykernels.Budget, got {type(budget).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"compress: seed must be an int, got {type(seed).__name__}")
    calib = _batches("calibration", calibration) or [example_inputs]
    held = _batches("holdout", holdout)
    if not held:
        if len(calib) < 2:
            raise ValueError(
                "compress: the auto recipe checks its budget on held-out batches: pass "
                "holdout=[...] (batches shaped like example_inputs), or calibration= with "
                "two batches or more (its second half is then held out)"
            )
        half = len(calib) // 2
        calib, held = calib[:half], calib[half:]
    if candidates is None:
        candidates = default_candidates(budget.minimize)
    elif not isinstance(candidates, dict) or not all(
        (isinstance(k, type) or k == "prune") and isinstance(v, (tuple, list))
        for k, v in candidates.items()
    ):
        raise TypeError(
            "compress: candidates must map layer types to recipe step strings (and "
            "'prune' to ratios), e.g. {nn.Linear: ('int8', 'sparse:0.8'), 'prune': (0.25,)}"
        )
    ratios = tuple(candidates.get("prune", ()))
    for r in ratios:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise ValueError(f"compress: candidates['prune'] must hold ratios in (0, 1), got {r!r}")
    parsed = {
        t: [(s, recipes.parse(s)) for s in steps] for t, steps in candidates.items() if t != "prune"
    }
    for steps in parsed.values():
        for s, p in steps:
            if len(p) != 1 or isinstance(p[0], (recipes.Scoped, recipes.PruneStructured)):
                raise ValueError(
                    f"compress: candidate {s!r} must be one step without '@' (structured "
                    "pruning goes under the key 'prune', as ratios)"
                )

    start = time.perf_counter()
    flags = training_flags(model)
    model.eval()
    selector = Selector(model, filter_fn, exclude)
    try:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            base, prefix, recovered, recovery, ref_model = model, "", None, None, model
            ref_held = [output_tensor(call_model(model, b)).detach() for b in held]
            if budget.recover_minutes is not None:
                with torch.enable_grad():
                    base, prefix, recovery = _prune_and_recover(
                        model,
                        example_inputs,
                        calib,
                        held,
                        ref_held,
                        budget,
                        seed,
                        progress_bars,
                    )
                recovered = base if prefix else None
                selector = Selector(base, filter_fn, exclude)
            model_ = copy.deepcopy(base).eval()
            out = _search(
                model_,
                ref_model,
                example_inputs,
                calib,
                held,
                ref_held,
                budget,
                parsed,
                ratios,
                selector,
                progress_bars,
                prefix,
            )
    finally:
        restore_training_flags(model, flags)
    recipe, rest, cands, chosen, trials, _ = out
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        source = model if recovered is None else recovered
        kw = {"filter_fn": filter_fn, "exclude": exclude, "progress": progress_bars}
        work, ref_rep = compress(source, rest, example_inputs, calibration=calib, **kw)
        if recovered is not None:
            # Layer rows against the recovered model (same shapes); the totals against
            # the original one, which the budget is about.
            total = _plain_report(model, work, example_inputs, recipe).total
            ref_rep = CompressionReport(recipe, ref_rep.layers, ref_rep.skipped, total)
    final_q = measure_quality(work.eval(), held, ref_held, budget)
    report = AutoReport(
        recipe=recipe,
        layers=ref_rep.layers,
        skipped=ref_rep.skipped,
        total=ref_rep.total,
        choices=chosen,
        candidates=cands,
        trials=trials,
        holdout=final_q,
        budget=budget,
        search_seconds=time.perf_counter() - start,
        recovered=recovered,
        recipe_after_recovery=rest if recovered is not None else None,
        recovery=recovery,
    )
    return work, report


def _plain_report(reference: nn.Module, work: nn.Module, example_inputs: Any, recipe: str):
    from .report import measure

    ctx = Context(work, example_inputs, Selector(work, None, None), progress=False)
    return measure(reference, work.eval(), ctx, recipe)


def _prune_units(
    model: nn.Module, example_inputs: Any, selector: Selector, layer_names: set[str]
) -> list[tuple[str, list[str]]]:
    """(name, member fqns) of each group structured pruning may narrow (a block's
    heads, its feed-forward neurons, a convolution's channels), all of whose members
    the caller's selector accepts; a group is named by its first output member."""
    from .prune import _bert_groups, _fx_groups

    ctx = Context(model, example_inputs, selector, progress=False)
    try:
        bert, _ = _bert_groups(ctx, True)
        claimed = set().union(*(g.fqns() for g in bert)) if bert else set()
        fx, _ = _fx_groups(ctx, claimed)
    except Exception:  # noqa: BLE001 - a model the tracer cannot read: no prune units
        return []
    out = []
    for g in bert + fx:
        members = sorted(g.fqns())
        if not all(selector(model.get_submodule(f), f) for f in members):
            continue
        if not any(f in layer_names for f in members):
            continue
        out.append((f"{g.name} ({g.units})", members))
    return out


def _search(
    model: nn.Module,
    reference: nn.Module,
    example_inputs: Any,
    calib: list[Any],
    held: list[Any],
    ref_held: list[Tensor],
    budget: Budget,
    parsed: dict[type, list[tuple[str, list[recipes.Step]]]],
    ratios: tuple[float, ...],
    selector: Selector,
    show: bool,
    prefix: str,
):
    """Sensitivity, then the bisection on the error price. ``model`` is a working
    copy (changed in place while measuring, restored after); errors are measured
    against ``reference``'s outputs."""
    from . import walk
    from .api import run_steps

    types = tuple(parsed)
    layers = [(fqn, m) for fqn, m in walk.targets(model, types, selector)[0] if fqn]
    order = [fqn for fqn, _ in layers]
    with torch.no_grad():
        ref_cal = [output_tensor(call_model(reference, b)).detach() for b in calib]
    inputs = _layer_inputs(model, order, example_inputs)
    units = _prune_units(model, example_inputs, selector, set(order)) if ratios else []
    cands: list[Choice] = []
    table: dict[str, list[Choice]] = {}
    unit_members: dict[str, list[str]] = {}
    threads = torch.get_num_threads()
    if layers and inputs.get(order[0]) is not None:
        _time_module(layers[0][1], inputs[order[0]])  # wakes the thread pool: not cached
    total = sum(len(next(v for t, v in parsed.items() if isinstance(m, t))) + 1 for _, m in layers)
    total += len(units) * len(ratios)
    bar = progress(range(total), "auto: sensitivity", show, total=total)
    no_floor = Budget(cosine=-0.999)  # only the measures
    for fqn, m in layers:
        steps = next(v for t, v in parsed.items() if isinstance(m, t))
        x = inputs.get(fqn)
        rows = []
        for text, step in [("keep", None), *steps]:
            next(bar, None)
            new = m if step is None else _build(step[0], m)
            if new is None:
                continue
            new.eval()
            shape = None if x is None else (tuple(x.shape), str(x.dtype))
            key = (text, _layer_key(m), shape, threads)
            if key not in _LATENCY_CACHE:
                _LATENCY_CACHE[key] = math.nan if x is None else _time_module(new, x)
            lat = _LATENCY_CACHE[key]
            err = 0.0
            if step is not None:
                model.set_submodule(fqn, new)
                try:
                    q = measure_quality(model, calib, ref_cal, no_floor)
                finally:
                    model.set_submodule(fqn, m)
                err = max(0.0, 1.0 - q["cosine"])
                if not math.isfinite(err):
                    continue
            rows.append(Choice(fqn, text, err, lat, nbytes_of(new)))
        table[fqn] = rows
        cands += rows

    def fin(v: float) -> float:
        return v if math.isfinite(v) else 0.0

    # A prune unit's gain: the ratio of what its layers cost at their cheapest choice
    # (the search applies the per-layer steps after pruning); its error is measured.
    for name, members in units:
        mine = [table[f] for f in members if f in table]
        best_lat = sum(min(fin(c.latency_ms) for c in rows) for rows in mine)
        best_bytes = sum(min(c.bytes for c in rows) for rows in mine)
        rows = [Choice(name, "keep", 0.0, 0.0, 0)]
        for r in ratios:
            next(bar, None)
            work = copy.deepcopy(model)
            ctx = Context(work, example_inputs, selector, progress=False)
            # Calibration-aware: the kept units chosen by their activations and the
            # consumer re-fitted on them, as the final build does.
            ctx.calibration = calib
            step = recipes.Scoped(recipes.PruneStructured(ratio=float(r)), tuple(members))
            run_steps(ctx, [step])
            if not ctx.changes:
                continue
            q = measure_quality(ctx.model.eval(), calib, ref_cal, no_floor)
            err = max(0.0, 1.0 - q["cosine"])
            if math.isfinite(err):
                rows.append(Choice(name, f"prune:{r:g}", err, -r * best_lat, -int(r * best_bytes)))
        table[name] = rows
        cands += rows
        unit_members[name] = members
    for _ in bar:
        pass

    w = budget.weights()
    if w == {"latency": 1.0}:
        # Bytes break ties: an int8 embedding table is as fast as a float one but a
        # quarter of the size, and timing noise must not decide between them.
        w["bytes"] = LATENCY_TIE_BYTES
    keep = {fqn: table[fqn][0] for fqn in order}
    lat0 = sum(fin(c.latency_ms) for c in keep.values()) or 1.0
    bytes0 = nbytes_of(model) or 1

    def cost(c: Choice) -> float:
        lat = c.latency_ms if math.isfinite(c.latency_ms) else fin(keep[c.layer].latency_ms)
        return w.get("latency", 0) * lat / lat0 + w.get("bytes", 0) * c.bytes / bytes0

    def assign(lam: float) -> dict[str, Choice]:
        return {
            u: min(rows, key=lambda c: (cost(c) + lam * c.error, c.error))
            for u, rows in table.items()
        }

    def recipe_of(choice: dict[str, Choice]) -> str:
        by_ratio: dict[str, list[str]] = {}
        for name, members in unit_members.items():
            c = choice.get(name)
            if c is not None and c.step != "keep":
                by_ratio.setdefault(c.step, []).extend(members)
        parts = [f"{s}@{','.join(sorted(set(f)))}" for s, f in sorted(by_ratio.items())]
        layers_part = _assignment_recipe({f: choice[f].step for f in order}, order, model)
        return "+".join(p for p in (*parts, layers_part) if p)

    def build(rest: str) -> nn.Module:
        work = copy.deepcopy(model)
        if rest:
            ctx = Context(work, example_inputs, selector, progress=False)
            ctx.calibration = calib
            run_steps(ctx, recipes.parse(rest))
            work = ctx.model
        return work.eval()

    trials: list[Trial] = []
    built: dict[str, Trial] = {}

    def trial(choice: dict[str, Choice]) -> Trial:
        rest = recipe_of(choice)
        if rest in built:
            return built[rest]
        q = measure_quality(build(rest), held, ref_held, budget)
        t = Trial(
            "+".join(p for p in (prefix, rest) if p),
            sum(fin(c.latency_ms) for c in choice.values()),
            sum(c.bytes for c in choice.values()),
            sum(c.error for c in choice.values()),
            q,
            budget.meets(q),
        )
        t._rest = rest  # type: ignore[attr-defined]
        built[rest] = t
        trials.append(t)
        return t

    def est(choice: dict[str, Choice]) -> float:
        return sum(cost(c) for c in choice.values())

    # Bisection on log10(lam): a small price takes the cheapest candidates, a large
    # one keeps every layer. Each distinct assignment is built and measured once.
    keep_all = {u: rows[0] for u, rows in table.items()}
    best = (est(keep_all), keep_all) if trial(keep_all).feasible else None
    lo, hi = -6.0, 8.0
    for _ in progress(range(16), "auto: search", show, total=16):
        mid = (lo + hi) / 2
        choice = assign(10.0**mid)
        if trial(choice).feasible:
            hi = mid
            if best is None or est(choice) < best[0]:
                best = (est(choice), choice)
        else:
            lo = mid
        if hi - lo < 0.05:
            break
    # The price is one number for every layer: a unit whose error is small but whose
    # gain per error is not the best may still fit in what the budget has left. Try
    # the single changes of the best feasible assignment, most efficient first, and
    # keep those that stay within budget end to end.
    if best is not None:
        current = dict(best[1])
        moves = []
        for u, rows in table.items():
            for c in rows:
                gain = cost(current[u]) - cost(c)
                if gain > 0 and c.error >= current[u].error:
                    moves.append((-(gain / max(c.error - current[u].error, 1e-12)), u, c))
        moves.sort(key=lambda m: (m[0], m[1], m[2].step))
        tries = 0
        for _, u, c in moves:
            if tries >= REFINE_TRIES:
                break
            if cost(c) >= cost(current[u]):
                continue
            candidate = {**current, u: c}
            tries += 1
            if trial(candidate).feasible:
                current = candidate
        if est(current) < best[0]:
            best = (est(current), current)
    # Each candidate alone on every layer it fits: the uniform recipes, measured the
    # same way, so that the answer is never worse than the best of them.
    finalists = [best] if best is not None else []
    for steps in parsed.values():
        for text, _ in steps:
            choice = dict(keep_all)
            for f in order:
                choice[f] = next((c for c in table[f] if c.step == text), table[f][0])
            if trial(choice).feasible:
                finalists.append((est(choice), choice))
    if not finalists:
        finalists = [(est(keep_all), keep_all)]
    finalists.sort(key=lambda b: b[0])
    # End to end: the finalists' real cost on example_inputs (fused blocks and all),
    # which the per-layer sum cannot see.
    scored = []
    for e, choice in finalists[:3]:
        t = trial(choice)
        work = build(t._rest)  # type: ignore[attr-defined]
        t.bytes = nbytes_of(work)
        t.latency_ms = _model_latency(work, example_inputs) if w.get("latency") else None
        real = (
            w.get("latency", 0) * (t.latency_ms or 0.0) / max(lat0, 1e-9)
            + w.get("bytes", 0) * t.bytes / bytes0
        )
        scored.append((real, e, choice, t))
    scored.sort(key=lambda s: (s[0], s[1]))
    _, _, choice, t = scored[0]
    chosen = [choice[u] for u in table]
    rest = t._rest or "keep"  # type: ignore[attr-defined]
    return t.recipe or rest, rest, cands, chosen, trials, t.quality


def _model_latency(model: nn.Module, example_inputs: Any, reps: int = 7) -> float:
    times = []
    with torch.inference_mode():
        call_model(model, example_inputs)
        for _ in range(reps):
            t0 = time.perf_counter()
            call_model(model, example_inputs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _prune_and_recover(model, example_inputs, calib, held, ref_held, budget, seed, show):
    """Structured pruning at the largest ratio whose recovered model meets the budget
    with room left for the per-layer steps; returns (model, prefix, history)."""
    from ..train.recover import recover
    from .api import compress

    minutes = budget.recover_minutes
    hist: dict[str, Any] = {}
    for ratio in RECOVER_RATIOS:
        text = f"prune:{ratio:g}"
        # With the calibration batches: units chosen by their activations and the
        # consumers re-fitted, a much better start for the distillation.
        pruned, _ = compress(model, text, example_inputs, calibration=calib, progress=False)
        student, hist = recover(
            pruned,
            model,
            calib,
            minutes=minutes,
            holdout=held,
            progress=show,
            return_history=True,
        )
        q = measure_quality(student.eval(), held, ref_held, budget)
        hist["ratio"] = ratio
        hist["holdout_after"] = q
        if budget.meets(q):
            return student, text, hist
    # Not even the recovered model meets the budget: the search runs on the original.
    return model, "", hist
