"""The measured report :func:`pykernels.compress` returns."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..nn._module import nbytes_of
from .context import Change, Context, Skipped, call_model, output_tensor
from .kinds import count_params

# Latency: alternate the two models so drift hits both alike; stop after about
# this many seconds of timed calls, within [MIN_REPS, MAX_REPS] per model.
LATENCY_BUDGET_S = 2.0
MIN_REPS, MAX_REPS = 3, 25


@dataclass
class LayerRow:
    """One module the recipe changed."""

    name: str
    type_before: str
    type_after: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    rel_error: float  # ||y_new - y|| / ||y|| of this module on its original input
    steps: list[str] = field(default_factory=list)
    # The same error for what round-to-nearest makes of the module, where a
    # calibrated step (GPTQ, AWQ, SmoothQuant) replaced it; None elsewhere.
    rtn_error: float | None = None


@dataclass
class CompressionReport:
    """What :func:`pykernels.compress` did and what it cost, every number measured.

    ``layers``: one :class:`LayerRow` per changed module. Its ``rel_error`` is
    the module's own error: the compressed module is fed the input the
    original module received in the original model on ``example_inputs``
    (the kept features of it, after pruning) and its output, with removed
    features counted as zeros, is compared with the original module's.
    Modules a calibrated step made (``int8:gptq``, ``awq+int4``, ...) also
    carry ``rtn_error``: the same error of the module the uncalibrated step
    (round to nearest) would have made, measured alike.
    ``skipped``: what a step left alone, and why. ``total``: ``params_*``
    (stored weight values), ``bytes_*`` (parameters and buffers held),
    ``latency_ms_*`` (median of timed forwards on ``example_inputs``, the two
    models alternated, at ``threads`` torch threads), ``output_rel_error``
    (``||y_c - y|| / ||y||``) and ``output_cosine`` (mean cosine of
    corresponding rows along the last dimension) of the model's output, or
    its ``last_hidden_state``.
    """

    recipe: str
    layers: list[LayerRow]
    skipped: list[Skipped]
    total: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "layers": [asdict(r) for r in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
            "total": dict(self.total),
        }

    def __str__(self) -> str:
        rtn = any(r.rtn_error is not None for r in self.layers)
        rows = [
            (
                r.name,
                r.type_before
                if r.type_before == r.type_after
                else f"{r.type_before} -> {r.type_after}",
                f"{r.params_before:,} -> {r.params_after:,}",
                f"{_mb(r.bytes_before)} -> {_mb(r.bytes_after)}",
                f"{r.rel_error:.2e}",
            )
            + ((_vs_rtn(r),) if rtn else ())
            for r in self.layers
        ]
        head = ("layer", "module", "params", "MB", "rel err") + (("vs RTN",) if rtn else ())
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
        ]
        line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=False))
        out = [f"CompressionReport: {self.recipe}", line, "-" * len(line)]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
        t = self.total
        out.append("-" * len(line))
        out.append(
            f"params {t['params_before']:,} -> {t['params_after']:,} "
            f"({_ratio(t['params_after'], t['params_before'])}), "
            f"bytes {_mb(t['bytes_before'])} -> {_mb(t['bytes_after'])} MB "
            f"({_ratio(t['bytes_after'], t['bytes_before'])})"
        )
        out.append(
            f"latency {t['latency_ms_before']:.3g} -> {t['latency_ms_after']:.3g} ms "
            f"(speedup {t['latency_ms_before'] / t['latency_ms_after']:.2f}x, median of "
            f"{t['latency_reps']}, {t['threads']} threads), output rel error "
            f"{t['output_rel_error']:.3e}, cosine {t['output_cosine']:.6f}"
        )
        if self.skipped:
            out.append(f"left alone ({len(self.skipped)}):")
            out += [f"  {s.fqn} [{s.step}]: {s.reason}" for s in self.skipped]
        return "\n".join(out)

    def __repr__(self) -> str:
        t = self.total
        return (
            f"CompressionReport(recipe={self.recipe!r}, layers={len(self.layers)}, "
            f"bytes={t['bytes_before']}->{t['bytes_after']}, "
            f"latency_ms={t['latency_ms_before']:.3g}->{t['latency_ms_after']:.3g}, "
            f"output_cosine={t['output_cosine']:.6f})"
        )

    def plot(self, path: str) -> None:
        """Bytes before / after and relative error of each changed layer (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError(
                "CompressionReport.plot needs matplotlib: pip install matplotlib "
                '(or "pykernels[plot]")'
            ) from None
        names = [r.name for r in self.layers]
        x = range(len(names))
        fig, (ax1, ax2) = plt.subplots(
            2, 1, figsize=(max(6.0, 0.25 * len(names) + 2), 7), sharex=True
        )
        ax1.bar(
            [i - 0.2 for i in x], [r.bytes_before / 1e6 for r in self.layers], 0.4, label="before"
        )
        ax1.bar(
            [i + 0.2 for i in x], [r.bytes_after / 1e6 for r in self.layers], 0.4, label="after"
        )
        ax1.set_ylabel("MB")
        ax1.legend()
        t = self.total
        ax1.set_title(
            f"{self.recipe}: {_mb(t['bytes_before'])} -> {_mb(t['bytes_after'])} MB, "
            f"speedup {t['latency_ms_before'] / t['latency_ms_after']:.2f}x, "
            f"cosine {t['output_cosine']:.4f}"
        )
        ax2.bar(list(x), [max(r.rel_error, 1e-12) for r in self.layers])
        ax2.set_yscale("log")
        ax2.set_ylabel("relative error of the layer")
        ax2.set_xticks(list(x))
        ax2.set_xticklabels(names, rotation=90, fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _vs_rtn(r: LayerRow) -> str:
    """The error of a calibrated layer against round-to-nearest's, as a ratio."""
    if r.rtn_error is None:
        return ""
    if r.rtn_error > 0:
        return f"{r.rel_error / r.rtn_error:.2f}x of {r.rtn_error:.2e}"
    return f"RTN {r.rtn_error:.2e}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.3g}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x" if b else "n/a"


# --- measuring --------------------------------------------------------------------------


def rel_error(new: Tensor, ref: Tensor) -> float:
    """``||new - ref|| / ||ref||`` in float64 (0 when both are 0)."""
    new, ref = new.detach().double(), ref.detach().double()
    den = float(ref.norm())
    num = float((new - ref).norm())
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def row_cosine(new: Tensor, ref: Tensor) -> float:
    """Mean cosine similarity of corresponding rows along the last dimension."""
    new, ref = new.detach().double(), ref.detach().double()
    if ref.dim() < 2:
        new, ref = new.reshape(1, -1), ref.reshape(1, -1)
    new, ref = new.reshape(-1, ref.shape[-1]), ref.reshape(-1, ref.shape[-1])
    return float(torch.nn.functional.cosine_similarity(new, ref, dim=-1, eps=1e-30).mean())


def _expand(y: Tensor, keep: Tensor, size: int, dim: int) -> Tensor:
    """``y`` with its features along ``dim`` put back at ``keep`` of ``size``, zeros elsewhere."""
    shape = list(y.shape)
    shape[dim] = size
    full = y.new_zeros(shape)
    return full.index_copy(dim % y.dim(), keep.to(y.device), y)


def _layer_errors(
    reference: nn.Module,
    compressed: nn.Module,
    changes: dict[str, Change],
    example_inputs: Any,
    modules: dict[str, nn.Module] | None = None,
) -> tuple[dict[str, float], Any]:
    """Each changed module's own error, in one forward of the reference model (whose output is
    returned too); ``modules`` (by fqn) stand in for ``compressed``'s modules."""
    sums: dict[str, list[float]] = {fqn: [0.0, 0.0] for fqn in changes}
    failed: set[str] = set()
    hooks = []

    for fqn, ch in changes.items():
        old = reference.get_submodule(fqn) if fqn else reference
        if modules is not None and fqn in modules:
            new = modules[fqn]
        else:
            new = compressed.get_submodule(fqn) if fqn else compressed

        def hook(mod, args, kwargs, out, fqn=fqn, ch=ch, new=new):
            if fqn in failed or not isinstance(out, Tensor) or not args:
                failed.add(fqn)
                return
            x = args[0]
            if ch.in_keep is not None:
                x = x.index_select(ch.feature_dim % x.dim(), ch.in_keep.to(x.device))
            if ch.in_scale is not None and modules is None:
                x = x * ch.in_scale.to(x)
            try:
                y = new(x, *args[1:], **kwargs)
            except Exception:  # noqa: BLE001 - a module that cannot be fed alone is reported NaN
                failed.add(fqn)
                return
            if ch.out_scale is not None and modules is None:
                y = y * ch.out_scale.to(y)
            if ch.out_keep is not None:
                y = _expand(y, ch.out_keep, out.shape[ch.feature_dim], ch.feature_dim)
            d = (y.double() - out.double()).pow(2).sum()
            sums[fqn][0] += float(d)
            sums[fqn][1] += float(out.double().pow(2).sum())

        hooks.append(old.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = call_model(reference, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    errors = {}
    for fqn, (num, den) in sums.items():
        if fqn in failed:
            errors[fqn] = math.nan
        elif den == 0:
            errors[fqn] = 0.0 if num == 0 else math.inf
        else:
            errors[fqn] = math.sqrt(num / den)
    return errors, out


def _latency(a: nn.Module, b: nn.Module, example_inputs: Any) -> tuple[float, float, int]:
    """Median ms of forwards of ``a`` and of ``b``, alternated."""
    ta, tb = [], []
    with torch.inference_mode():
        call_model(a, example_inputs)  # warm-up: caches, lazy packing, allocator
        call_model(b, example_inputs)
        t0 = time.perf_counter()
        call_model(a, example_inputs)
        call_model(b, example_inputs)
        once = time.perf_counter() - t0
        reps = int(min(MAX_REPS, max(MIN_REPS, LATENCY_BUDGET_S // max(once, 1e-9))))
        for _ in range(reps):
            for model, out in ((a, ta), (b, tb)):
                t0 = time.perf_counter()
                call_model(model, example_inputs)
                out.append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, reps


def measure(
    reference: nn.Module, compressed: nn.Module, ctx: Context, recipe: str
) -> CompressionReport:
    """Builds the report: both models must be in eval mode."""
    order = [fqn for fqn, _ in compressed.named_modules() if fqn in ctx.changes]
    if "" in ctx.changes and "" not in order:
        order.insert(0, "")
    changes = {fqn: ctx.changes[fqn] for fqn in order}
    errors, out_ref = _layer_errors(reference, compressed, changes, ctx.example_inputs)
    base = {f: m.eval() for f, m in ctx.baselines.items() if f in changes}
    rtn: dict[str, float] = {}
    if base:
        sub = {f: changes[f] for f in base}
        rtn, _ = _layer_errors(reference, compressed, sub, ctx.example_inputs, base)
    with torch.no_grad():
        out_new = call_model(compressed, ctx.example_inputs)
    y_ref, y_new = output_tensor(out_ref), output_tensor(out_new)
    rows = []
    for fqn, ch in changes.items():
        old = reference.get_submodule(fqn) if fqn else reference
        new = compressed.get_submodule(fqn) if fqn else compressed
        rows.append(
            LayerRow(
                name=fqn or "(model)",
                type_before=type(old).__name__,
                type_after=type(new).__name__,
                params_before=count_params(old),
                params_after=count_params(new),
                bytes_before=nbytes_of(old),
                bytes_after=nbytes_of(new),
                rel_error=errors[fqn],
                steps=list(ch.steps),
                rtn_error=rtn.get(fqn),
            )
        )
    lat_before, lat_after, reps = _latency(reference, compressed, ctx.example_inputs)
    total = {
        "params_before": count_params(reference),
        "params_after": count_params(compressed),
        "bytes_before": nbytes_of(reference),
        "bytes_after": nbytes_of(compressed),
        "latency_ms_before": lat_before,
        "latency_ms_after": lat_after,
        "latency_reps": reps,
        "threads": torch.get_num_threads(),
        "output_rel_error": rel_error(y_new, y_ref),
        "output_cosine": row_cosine(y_new, y_ref),
    }
    return CompressionReport(recipe, rows, list(ctx.skipped), total)
