"""Knowledge distillation: a compressed student learns from its uncompressed teacher.

:class:`DistillLoss` is Hinton et al.'s loss, with an optional hidden-state
(or embedding) term for encoders trained without labels;
:func:`fit` is a plain training loop that runs the teacher under
``no_grad`` and works with any student (pruned, QAT-prepared, sparse)::

    student, _ = pk.compress(teacher, "prune:0.3", example)
    history = pk.distill.fit(student, teacher, batches, steps=500,
                             loss=pk.distill.DistillLoss(hidden="cosine"))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compress.context import restore_training_flags, training_flags

__all__ = ["DistillLoss", "fit"]

HIDDEN = (None, "mse", "cosine")


def _split(out: Any, hidden_mode: str | None, who: str) -> tuple[Tensor | None, Tensor | None]:
    """(logits, hidden) of a model output: a tensor (logits, or the hidden state /
    embedding when the loss has a hidden term), a (logits, hidden) pair, or a
    mapping with "logits" and/or "hidden" keys."""
    if isinstance(out, Tensor):
        return (None, out) if hidden_mode is not None else (out, None)
    if isinstance(out, Mapping):
        # A Hugging Face encoder's output holds its hidden state as last_hidden_state.
        hidden = out.get("hidden")
        if hidden is None and hidden_mode is not None:
            hidden = out.get("last_hidden_state")
        return out.get("logits"), hidden
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return out[0], out[1]
    raise TypeError(
        f"DistillLoss: {who} must be a Tensor, a (logits, hidden) pair or a mapping with "
        f"'logits'/'hidden', got {type(out).__name__}"
    )


class DistillLoss(nn.Module):
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)``
    ``+ hidden_weight * H(s_hidden, t_hidden)``.

    - ``temperature`` T > 0 softens both distributions; the T^2 factor keeps
      the soft term's gradients on the scale of the hard one's (Hinton et al.).
    - ``alpha`` in [0, 1] weighs the teacher's soft targets against the labels.
      Without labels the soft term is used alone (weight 1).
    - ``hidden``: ``"mse"`` (mean squared error) or ``"cosine"`` (mean of
      1 - cosine similarity over the last dimension) between student and
      teacher hidden states or embeddings, for encoders without logits or
      labels (a mapping's ``"hidden"``, else its ``"last_hidden_state"``, as
      a Hugging Face encoder returns); ``None`` for none.

    Call it as ``loss(student_out, teacher_out, labels=None)``. Outputs are
    logits tensors, or with ``hidden`` set, hidden/embedding tensors, or
    ``(logits, hidden)`` pairs, or mappings with ``"logits"`` / ``"hidden"``.
    Logits of any leading shape ``[..., C]`` (labels ``[...]``; -100 is
    ignored as in ``F.cross_entropy``).
    """

    def __init__(
        self,
        temperature: float = 2.0,
        alpha: float = 0.5,
        hidden: str | None = None,
        hidden_weight: float = 1.0,
    ) -> None:
        super().__init__()
        t = temperature
        if (
            isinstance(t, bool)
            or not isinstance(t, (int, float))
            or not (math.isfinite(t) and t > 0)
        ):
            raise ValueError(f"DistillLoss: temperature must be a number > 0, got {temperature!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"DistillLoss: alpha must be in [0, 1], got {alpha!r}")
        if hidden not in HIDDEN:
            raise ValueError(f"DistillLoss: hidden must be one of {HIDDEN}, got {hidden!r}")
        w = hidden_weight
        if (
            isinstance(w, bool)
            or not isinstance(w, (int, float))
            or not (math.isfinite(w) and w >= 0)
        ):
            raise ValueError(f"DistillLoss: hidden_weight must be a number >= 0, got {w!r}")
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.hidden, self.hidden_weight = hidden, float(hidden_weight)

    def soft(self, s: Tensor, t: Tensor) -> Tensor:
        """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over rows."""
        T = self.temperature
        s2, t2 = s.reshape(-1, s.shape[-1]).float(), t.reshape(-1, t.shape[-1]).float()
        if t2.numel() and bool(torch.isneginf(t2).all(-1).any()):
            raise ValueError(
                "DistillLoss: teacher_out has a row of logits that are all -inf (every class "
                "masked): its distribution is undefined"
            )
        log_t, log_s = F.log_softmax(t2 / T, -1), F.log_softmax(s2 / T, -1)
        # A class the teacher masks (logit -inf, probability 0) adds 0 * log 0 = 0;
        # F.kl_div computes 0 * (-inf - log_s) = NaN there. Both logs are zeroed
        # where p = 0 so neither the value nor the gradient meets an inf.
        p = log_t.exp()
        kept = p != 0  # NaN (a NaN or +inf logit) is kept: it must reach the loss
        zero = log_t.new_zeros(())
        terms = p * (torch.where(kept, log_t, zero) - torch.where(kept, log_s, zero))
        rows = max(t2.shape[0], 1)
        return terms.sum() / rows * T * T

    def hidden_term(self, s: Tensor, t: Tensor) -> Tensor:
        s, t = s.float(), t.float()
        if self.hidden == "mse":
            return F.mse_loss(s, t)
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()

    def forward(self, student_out: Any, teacher_out: Any, labels: Tensor | None = None) -> Tensor:
        s_logits, s_hidden = _split(student_out, self.hidden, "student_out")
        t_logits, t_hidden = _split(teacher_out, self.hidden, "teacher_out")
        terms: list[Tensor] = []
        if s_logits is not None or t_logits is not None:
            if s_logits is None or t_logits is None:
                raise ValueError("DistillLoss: logits given for only one of student and teacher")
            if s_logits.shape != t_logits.shape:
                raise ValueError(
                    f"DistillLoss: student logits {tuple(s_logits.shape)} and teacher logits "
                    f"{tuple(t_logits.shape)} differ in shape"
                )
            soft = self.soft(s_logits, t_logits.detach())
            if labels is None:
                terms.append(soft)
            else:
                if not isinstance(labels, Tensor) or labels.shape != s_logits.shape[:-1]:
                    got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels)
                    raise ValueError(
                        f"DistillLoss: labels must have shape {tuple(s_logits.shape[:-1])}, "
                        f"got {got}"
                    )
                ce = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]), labels.reshape(-1))
                terms.append(self.alpha * soft + (1 - self.alpha) * ce)
        if self.hidden is not None and (s_hidden is not None or t_hidden is not None):
            if s_hidden is None or t_hidden is None:
                raise ValueError("DistillLoss: hidden states given for only one of the models")
            if s_hidden.shape != t_hidden.shape:
                raise ValueError(
                    f"DistillLoss: student hidden {tuple(s_hidden.shape)} and teacher hidden "
                    f"{tuple(t_hidden.shape)} differ in shape"
                )
            terms.append(self.hidden_weight * self.hidden_term(s_hidden, t_hidden.detach()))
        if not terms:
            raise ValueError("DistillLoss: nothing to compare (no logits and no hidden states)")
        return terms[0] if len(terms) == 1 else sum(terms[1:], terms[0])

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, hidden={self.hidden}, "
            f"hidden_weight={self.hidden_weight}"
        )


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _batch(batch: Any) -> tuple[Any, Tensor | None]:
    """(inputs, labels): a tensor or mapping is inputs alone; a pair is (inputs, labels)."""
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(
                f"fit: a tuple batch must be (inputs, labels), got {len(batch)} elements"
            )
        return batch[0], batch[1]
    return batch, None


def _forever(data: Iterable[Any], batch0: Any, first: Iterator[Any]) -> Iterator[Any]:
    yield batch0
    yield from first
    while True:
        again = False
        for b in data:
            again = True
            yield b
        if not again:
            raise ValueError(
                "fit: data ran out before `steps` and cannot be iterated again (a one-shot "
                "iterator); pass a list or a DataLoader"
            )


def _refuse_untrainable(student: nn.Module, e: RuntimeError) -> None:
    """A backward that failed inside an int8 layer (it has none: the rounding has no
    useful gradient) is the student's fault, not a crash: say which layers and what to
    do instead."""
    from ..nn import Int8Linear

    int8 = [f or "(model)" for f, m in student.named_modules() if isinstance(m, Int8Linear)]
    if int8:
        listed = ", ".join(int8[:4]) + (f" and {len(int8) - 4} more" if len(int8) > 4 else "")
        raise ValueError(
            f"fit: the student cannot be trained through its Int8Linear layers ({listed}), "
            "which have no backward: distill a pk.qat.prepare'd student and pk.qat.convert it "
            f"afterwards, or freeze every parameter before them ({e})"
        ) from e


def fit(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    *,
    steps: int,
    optimizer: torch.optim.Optimizer | None = None,
    loss: Callable[[Any, Any, Tensor | None], Tensor] | None = None,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Trains ``student`` to match ``teacher`` for ``steps`` optimizer steps; returns
    the loss of each step.

    ``data`` yields batches: a tensor or a mapping of keyword arguments
    (inputs only), or ``(inputs, labels)``; it is iterated again when it runs
    out. The teacher runs in eval mode under ``torch.no_grad``; the student
    in train mode (one passed in train mode keeps its submodules' own modes,
    so a BatchNorm frozen in eval mode stays frozen). Afterwards every
    submodule of both is back in the mode it had before the call.
    ``optimizer`` defaults to AdamW (lr 1e-4) over the student's trainable
    parameters; ``loss`` to :class:`DistillLoss`\\ ().
    ``callback(step, loss)`` runs after each step (for a curve, or early
    evaluation). A tqdm bar (when tqdm is installed) shows progress unless
    ``progress=False``.
    """
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise TypeError("fit: student and teacher must be nn.Modules")
    if student is teacher:
        raise ValueError("fit: student and teacher are the same module")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"fit: steps must be an int >= 1, got {steps!r}")
    if loss is None:
        loss = DistillLoss()
    elif not callable(loss):
        raise TypeError("fit: loss must be callable")
    params = [p for p in student.parameters() if p.requires_grad]
    if optimizer is None:
        if not params:
            raise ValueError("fit: the student has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    first = iter(data)
    try:
        batch0 = next(first)
    except StopIteration:
        raise ValueError("fit: data yields no batch") from None
    batches = _forever(data, batch0, first)

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional: no bar then
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=steps, desc="distill", unit="step")
    # Both models come back with every submodule in the mode it had (a frozen,
    # eval-mode BatchNorm inside the student stays so).
    student_flags, teacher_flags = training_flags(student), training_flags(teacher)
    teacher.eval()
    if not student.training:
        student.train()
    history: list[float] = []
    try:
        for step in range(steps):
            inputs, labels = _batch(next(batches))
            with torch.no_grad():
                t_out = _call(teacher, inputs)
            s_out = _call(student, inputs)
            value = loss(s_out, t_out, labels)
            optimizer.zero_grad(set_to_none=True)
            try:
                value.backward()
            except RuntimeError as e:
                _refuse_untrainable(student, e)
                raise
            optimizer.step()
            v = float(value.detach())
            history.append(v)
            if callback is not None:
                callback(step, v)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{v:.4g}")
    finally:
        if bar is not None:
            bar.close()
        restore_training_flags(student, student_flags)
        restore_training_flags(teacher, teacher_flags)
    return history


# pk.distill.recover: time-budgeted recovery (layer-wise matching, early stop on a
# held-out set). Imported last: it builds on this module's batch helpers.
from .recover import recover  # noqa: E402

__all__ += ["recover"]
