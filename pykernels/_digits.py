"""Small real-data demos on scikit-learn's digits (8x8 images, 10 classes):
quantization-aware training and gradual pruning. Used by the tests and by
``benchmarks/`` to show the accuracy each technique keeps. Seeded, so a run
is reproducible; about a second each on 2 cores."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): a stratified 75/25 split, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(
        d.data, d.target, test_size=0.25, random_state=seed, stratify=d.target
    )
    f = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


def mlp(seed: int = 0, hidden: int = 128) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Percent correct."""
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    seed: int = 0,
    batch: int = 64,
    after_step=None,
) -> nn.Module:
    """Adam on cross-entropy, shuffled mini-batches; ``after_step(step)`` after each step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if after_step is not None:
                after_step(step)
            step += 1
    return model


def qat_digits(seed: int = 0) -> dict[str, float]:
    """fp32 training, post-training int8, and int8 after QAT fine-tuning (test accuracy, %)."""
    from .nn import quantize_int8
    from .train import qat

    xtr, ytr, xte, yte = data(seed)
    fp32 = train(mlp(seed), xtr, ytr, epochs=30, lr=3e-3, seed=seed)
    ptq = quantize_int8(fp32)
    prepared = qat.prepare(fp32)
    train(prepared, xtr, ytr, epochs=3, lr=1e-4, seed=seed + 1)
    return {
        "fp32": accuracy(fp32, xte, yte),
        "ptq_int8": accuracy(ptq, xte, yte),
        "qat_fake_quant": accuracy(prepared, xte, yte),
        "qat_int8": accuracy(qat.convert(prepared), xte, yte),
    }


def float_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def pruning_digits(seed: int = 0, sparsity: float = 0.9, epochs: int = 30) -> dict[str, float]:
    """Test accuracy (%) of a dense MLP (64-256-256-10), of the same pruned one-shot
    by magnitude to ``sparsity`` (every Linear, per layer), of one-shot followed by
    ``epochs`` of masked fine-tuning, and of gradual pruning (Zhu & Gupta, cubic,
    over the first half of the same fine-tuning, masks every 10 steps). Pruned
    models end as SparseLinear layers."""
    from .nn import sparsify
    from .schedules import GradualPruning, Polynomial

    xtr, ytr, xte, yte = data(seed)
    dense = train(mlp(seed, hidden=256), xtr, ytr, epochs=30, lr=3e-3, seed=seed)
    steps = epochs * math.ceil(len(xtr) / 64)

    def fine_tune(schedule: Polynomial) -> nn.Module:
        model = copy.deepcopy(dense)
        pruner = GradualPruning(model, schedule)
        train(model, xtr, ytr, epochs, 1e-3, seed + 1, after_step=lambda _: pruner.step())
        return pruner.finish()

    one_shot_tuned = fine_tune(Polynomial(sparsity, sparsity, 0, 1, 1))
    gradual = fine_tune(Polynomial(0.0, sparsity, begin_step=0, end_step=steps // 2, frequency=10))
    layers = [m for m in gradual.modules() if hasattr(m, "density")]
    return {
        "dense": accuracy(dense, xte, yte),
        "one_shot": accuracy(sparsify(dense, sparsity=sparsity), xte, yte),
        "one_shot_finetuned": accuracy(one_shot_tuned, xte, yte),
        "gradual": accuracy(gradual, xte, yte),
        "gradual_density": sum(m.density() for m in layers) / len(layers),
    }
