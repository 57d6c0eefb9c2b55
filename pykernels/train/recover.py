"""``pk.distill.recover``: win back what compression cost, within a time budget.

A pruned (or otherwise compressed, still float) student is distilled from its
uncompressed teacher for a given number of minutes::

    student, _ = pk.compress(teacher, "prune:0.3", example)
    student = pk.distill.recover(student, teacher, batches, minutes=10, holdout=held)

What it does, chosen for the time budget rather than a step count:

- **Loss.** Where the architectures line up (both accept
  ``output_hidden_states=True``, as Hugging Face models do, and return as many
  hidden states of the same shapes), every layer's hidden state is matched
  (layer-wise distillation, as TinyBERT / MiniLM do), plus the output;
  otherwise the output alone. Each match is ``1 - cosine`` of rows along the
  last dimension plus the squared error relative to the teacher's mean square,
  so it is scale free and pulls both direction and size.
- **Schedule.** AdamW; the learning rate warms up over the first 5% of the
  time budget and decays along a cosine over the *elapsed time*, so the run
  ends annealed whatever a step costs on this machine.
- **Early stop and best checkpoint.** With ``holdout`` batches, the student's
  mean output cosine to the teacher there is measured a dozen times over the
  budget (and at the start); the best student seen is kept and returned, and
  the run stops when it has not improved for ``patience`` evaluations in the
  second half of the budget. A student that starts at held-out cosine 0.9 or
  more (a calibration-aware ``prune``) trains at a third of the default rate.
- **What trains.** Every trainable parameter but ``nn.Embedding`` tables
  (unchanged by pruning; ``train_embeddings=True`` to include them).

The student trains in eval mode (dropout off, batch-norm statistics frozen):
it is to reproduce the teacher's inference function, not to regularize.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compress.context import output_tensor, restore_training_flags, training_flags
from .distill import _batch, _call, _forever

__all__ = ["recover"]

# Held-out cosine at the start from which the default learning rate is scaled down.
CLOSE_START = 0.9
CLOSE_LR_SCALE = 1 / 3
# Early stopping counts evaluations without improvement only after this fraction of
# the budget.
PATIENT_UNTIL = 0.5


def _match(s: Tensor, t: Tensor, inputs: Any = None) -> Tensor:
    """``1 - cos`` of rows plus MSE relative to the teacher's mean square, over the
    rows of real tokens when ``inputs`` has an attention mask."""
    from ..compress.auto import output_rows

    s, t = output_rows(s.float(), inputs), output_rows(t.float(), inputs)
    cos = F.cosine_similarity(s, t, dim=-1, eps=1e-8).mean()
    mse = F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
    return (1 - cos) + mse


def _hidden_call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs, output_hidden_states=True)
    return None


def _hidden_states(out: Any) -> tuple[Tensor, ...] | None:
    hs = (
        out.get("hidden_states")
        if isinstance(out, Mapping)
        else getattr(out, "hidden_states", None)
    )
    if isinstance(hs, (tuple, list)) and hs and all(isinstance(h, Tensor) for h in hs):
        return tuple(hs)
    return None


def _cosine_on(student: nn.Module, teacher_outs: list[Tensor], batches: list[Any]) -> float:
    from ..compress.auto import output_rows

    with torch.no_grad():
        num, n = 0.0, 0
        for b, t in zip(batches, teacher_outs, strict=True):
            inputs, _ = _batch(b)
            s = output_tensor(_call(student, inputs)).double()
            s2, t2 = output_rows(s, inputs), output_rows(t.double(), inputs)
            c = F.cosine_similarity(s2, t2, dim=-1, eps=1e-30)
            num += float(c.sum())
            n += c.numel()
    return num / max(n, 1)


def recover(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    minutes: float = 10.0,
    holdout: Iterable[Any] | None = None,
    *,
    lr: float | None = None,
    layerwise: bool | None = None,
    patience: int = 4,
    evals: int = 12,
    max_steps: int | None = None,
    train_embeddings: bool = False,
    progress: bool = True,
    return_history: bool = False,
) -> nn.Module | tuple[nn.Module, dict[str, Any]]:
    """Distills ``teacher`` into ``student`` for ``minutes`` and returns the student
    (the same object, trained in place, holding the best checkpoint seen).

    Args:
        student: the compressed model, with float (trainable) parameters: a
            pruned, low-rank or QAT-prepared model (not Int8Linear layers,
            which have no backward: recover first, quantize after).
        teacher: the uncompressed model; runs under ``no_grad``.
        data: batches as :func:`pykernels.distill.fit` takes them (a tensor,
            a mapping of keyword inputs, or ``(inputs, labels)``; labels are
            ignored); iterated again when it runs out.
        minutes: the wall-clock budget (> 0).
        holdout: batches the student's output cosine to the teacher is
            measured on, for early stopping and the best checkpoint (else the
            student at the end of the budget is returned).
        lr: AdamW's peak learning rate; default 3e-4 for models over a million
            trainable parameters, 1e-3 below, a third of that when the
            student's held-out cosine already starts at 0.9 or more.
        layerwise: match every hidden state too (default: when the two models'
            hidden states line up).
        patience: evaluations without improvement before stopping early
            (counted from half the budget on).
        evals: how many held-out evaluations the budget is split into.
        max_steps: an optional cap on optimizer steps (for tests).
        train_embeddings: also train ``nn.Embedding`` tables. Off by default:
            pruning leaves them as they were, and in a small encoder they are
            half the parameters (MiniLM: 11.7 M of 22.7 M), whose dense
            gradients and AdamW updates cost a good part of each step.
        progress: a tqdm bar over the time budget.
        return_history: also return a dict: steps, seconds, lr, layerwise,
            ``evals`` as ``(seconds, step, cosine)``, ``best_cosine`` and
            ``start_cosine``.
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError("recover: student and teacher must be nn.Modules")
    if student is teacher:
        raise ValueError("recover: student and teacher are the same module")
    if (
        isinstance(minutes, bool)
        or not isinstance(minutes, (int, float))
        or not (math.isfinite(minutes) and minutes > 0)
    ):
        raise ValueError(f"recover: minutes must be a number > 0, got {minutes!r}")
    if lr is not None and (
        isinstance(lr, bool)
        or not isinstance(lr, (int, float))
        or not (math.isfinite(lr) and lr > 0)
    ):
        raise ValueError(f"recover: lr must be a number > 0, got {lr!r}")
    for name, v in (("patience", patience), ("evals", evals)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"recover: {name} must be an int >= 1, got {v!r}")
    if max_steps is not None and (
        isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
    ):
        raise ValueError(f"recover: max_steps must be an int >= 1 or None, got {max_steps!r}")
    if isinstance(data, (Tensor, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(f"recover: data must be an iterable of batches, got {type(data).__name__}")
    held: list[Any] = []
    if holdout is not None:
        if isinstance(holdout, (Tensor, Mapping)) or not isinstance(holdout, Iterable):
            raise TypeError(
                f"recover: holdout must be an iterable of batches, got {type(holdout).__name__}"
            )
        held = list(holdout)
        if not held:
            raise ValueError("recover: holdout yields no batch")
    if not isinstance(train_embeddings, bool):
        raise TypeError(f"recover: train_embeddings must be a bool, got {train_embeddings!r}")
    frozen: list[nn.Parameter] = []
    if not train_embeddings:
        # requires_grad off for the run (restored after), so that backward stops there
        frozen = [
            p
            for m in student.modules()
            if isinstance(m, nn.Embedding)
            for p in m.parameters()
            if p.requires_grad
        ]
    skip = {id(p) for p in frozen}
    params = [p for p in student.parameters() if p.requires_grad and id(p) not in skip]
    if not params:
        raise ValueError("recover: the student has no trainable parameters")
    lr_given = lr is not None
    if lr is None:
        lr = 3e-4 if sum(p.numel() for p in params) > 1_000_000 else 1e-3
    first = iter(data)
    try:
        batch0 = next(first)
    except StopIteration:
        raise ValueError("recover: data yields no batch") from None

    for p in frozen:
        p.requires_grad_(False)
    try:
        return _run(
            student, teacher, params, data, batch0, first, minutes, held, lr, layerwise,
            patience, evals, max_steps, progress, return_history, lr_given,
        )  # fmt: skip
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _run(
    student, teacher, params, data, batch0, first, minutes, held, lr, layerwise,
    patience, evals, max_steps, progress, return_history, lr_given,
):  # fmt: skip
    batches = _forever(data, batch0, first)
    s_flags, t_flags = training_flags(student), training_flags(teacher)
    student.eval()
    teacher.eval()
    if layerwise is None or layerwise:
        inputs0, _ = _batch(batch0)
        ok = False
        try:
            with torch.no_grad():
                so, to = _hidden_call(student, inputs0), _hidden_call(teacher, inputs0)
            sh, th = _hidden_states(so), _hidden_states(to)
            ok = (
                sh is not None
                and th is not None
                and len(sh) == len(th)
                and all(a.shape == b.shape for a, b in zip(sh, th, strict=True))
            )
        except TypeError:  # the model takes no output_hidden_states
            ok = False
        if layerwise and not ok:
            raise ValueError(
                "recover: layerwise=True, but the student's and teacher's hidden states do "
                "not line up (same count and shapes, from output_hidden_states=True)"
            )
        layerwise = ok

    with torch.no_grad():
        t_held = [output_tensor(_call(teacher, _batch(b)[0])).detach() for b in held]
    budget_s = minutes * 60.0
    best_state = None
    best = -math.inf
    start_cos = None
    if held:
        best = start_cos = _cosine_on(student, t_held, held)
        best_state = copy.deepcopy(student.state_dict())
        if not lr_given and start_cos >= CLOSE_START:
            # A student already close to its teacher (a re-fitted pruning) is refined,
            # not re-learned: at the full rate the first steps undo more than the
            # budget wins back (MiniLM prune:0.3 from 0.92: no step of 17 beat the start).
            lr *= CLOSE_LR_SCALE
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history: dict[str, Any] = {"lr": lr, "layerwise": layerwise, "evals": []}
    if held:
        history["start_cosine"] = start_cos
        history["evals"].append((0.0, 0, start_cos))
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=round(budget_s), desc="recover", unit="s", leave=False)
        except ImportError:
            bar = None
    start = time.perf_counter()
    next_eval = budget_s / evals
    stale, step, shown = 0, 0, 0
    try:
        while True:
            elapsed = time.perf_counter() - start
            if elapsed >= budget_s or (max_steps is not None and step >= max_steps):
                break
            frac = elapsed / budget_s
            warm = 0.05
            scale = (
                frac / warm
                if frac < warm
                else 0.5 * (1 + math.cos(math.pi * (frac - warm) / (1 - warm)))
            )
            for g in opt.param_groups:
                g["lr"] = lr * max(scale, 0.02)
            inputs, _ = _batch(next(batches))
            if layerwise:
                with torch.no_grad():
                    to = _hidden_call(teacher, inputs)
                so = _hidden_call(student, inputs)
                th, sh = _hidden_states(to), _hidden_states(so)
                loss = _match(output_tensor(so), output_tensor(to).detach(), inputs)
                layers = [_match(a, b.detach(), inputs) for a, b in zip(sh, th, strict=True)]
                loss = loss + sum(layers) / len(layers)
            else:
                with torch.no_grad():
                    t_out = output_tensor(_call(teacher, inputs)).detach()
                loss = _match(output_tensor(_call(student, inputs)), t_out, inputs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            elapsed = time.perf_counter() - start
            if bar is not None:
                bar.update(int(min(elapsed, budget_s)) - shown)
                shown = int(min(elapsed, budget_s))
                bar.set_postfix(loss=f"{float(loss):.4g}", best=f"{best:.4f}")
            if held and (elapsed >= next_eval or elapsed >= budget_s):
                next_eval += budget_s / evals
                c = _cosine_on(student, t_held, held)
                history["evals"].append((elapsed, step, c))
                if c > best:
                    best, stale = c, 0
                    best_state = copy.deepcopy(student.state_dict())
                elif elapsed >= budget_s * PATIENT_UNTIL:
                    # Not before half the budget: the first steps at the peak rate may
                    # dip below a good start before they climb past it.
                    stale += 1
                    if stale >= patience:
                        break
    finally:
        if bar is not None:
            bar.close()
        restore_training_flags(student, s_flags)
        restore_training_flags(teacher, t_flags)
    if held:
        c = _cosine_on(student, t_held, held)
        history["evals"].append((time.perf_counter() - start, step, c))
        if c > best:
            best, best_state = c, None
        if best_state is not None:
            student.load_state_dict(best_state)
        history["best_cosine"] = best
    history["steps"] = step
    history["seconds"] = time.perf_counter() - start
    return (student, history) if return_history else student
