"""pk.distill.recover: a pruned student distilled back toward its teacher within a time
budget (an MLP trained on scikit-learn's digits, and a small BERT built from a
config for the layer-wise path), the best checkpoint kept, its refusals, and
pk.Budget(recover_minutes=...) in the auto recipe."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import pykernels as pk
from pykernels.distill import recover


@functools.lru_cache(maxsize=1)
def _digits():
    from pykernels import _digits as D

    xtr, ytr, xte, yte = D.data(0)
    teacher = D.train(D.mlp(0, hidden=256), xtr, ytr, epochs=15, lr=3e-3).eval()
    return teacher, xtr, xte


def _cos(a, b):
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def test_recover_mlp_improves_and_keeps_best():
    teacher, xtr, xte = _digits()
    student, _ = pk.compress(teacher, "prune:0.5", xtr[:256], progress=False)
    held = [xte[:200], xte[200:]]
    with torch.no_grad():
        before = _cos(torch.cat([student(h) for h in held]), torch.cat([teacher(h) for h in held]))
    batches = [xtr[i : i + 64] for i in range(0, len(xtr), 64)]
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    got, hist = recover(
        student, teacher, batches, minutes=0.1, holdout=held, progress=False, return_history=True
    )
    assert got is student
    with torch.no_grad():
        after = _cos(torch.cat([student(h) for h in held]), torch.cat([teacher(h) for h in held]))
    assert after > before + 0.01
    assert hist["layerwise"] is False and hist["steps"] > 0
    # the returned student is the best checkpoint seen on the held-out batches
    assert hist["best_cosine"] == pytest.approx(after, abs=1e-9)
    assert all(c <= hist["best_cosine"] + 1e-12 for _, _, c in hist["evals"])
    assert hist["start_cosine"] == pytest.approx(before, abs=1e-9)
    assert hist["seconds"] < 0.1 * 60 + 5
    # the teacher is untouched
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k])


def test_recover_layerwise_on_bert_from_config():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.2,  # layers that matter: the default leaves the output ~ embeddings
    )
    torch.manual_seed(0)
    teacher = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(0, 64, (8, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[:4, 12:] = 0  # padding: its rows are never matched nor measured
        return {"input_ids": ids, "attention_mask": mask}

    train, held = [batch() for _ in range(8)], [batch() for _ in range(2)]
    student, _ = pk.compress(teacher, "prune:0.5", train[0], progress=False)
    before = student.embeddings.word_embeddings.weight.detach().clone()
    _, hist = recover(
        student, teacher, train, minutes=0.1, holdout=held, progress=False, return_history=True
    )
    assert hist["layerwise"] is True
    assert hist["best_cosine"] > hist["start_cosine"] + 0.02
    # embedding tables are not trained by default, and stay trainable for the caller
    assert torch.equal(student.embeddings.word_embeddings.weight, before)
    assert student.embeddings.word_embeddings.weight.requires_grad
    _, hist = recover(
        student, teacher, train, minutes=0.02, max_steps=2, progress=False,
        train_embeddings=True, return_history=True,
    )  # fmt: skip
    assert not torch.equal(student.embeddings.word_embeddings.weight, before)
    with pytest.raises(TypeError, match="train_embeddings"):
        recover(student, teacher, train, minutes=0.02, train_embeddings=1)


def test_recover_without_holdout_runs_to_the_budget():
    teacher, xtr, _ = _digits()
    student, _ = pk.compress(teacher, "prune:0.5", xtr[:256], progress=False)
    _, hist = recover(
        student, teacher, [xtr[:64]], minutes=0.02, max_steps=5, progress=False,
        return_history=True,
    )  # fmt: skip
    assert hist["steps"] == 5 and "best_cosine" not in hist


def test_recover_refusals():
    teacher, xtr, _ = _digits()
    student, _ = pk.compress(teacher, "prune:0.5", xtr[:64], progress=False)
    data = [xtr[:32]]
    with pytest.raises(ValueError, match="minutes"):
        recover(student, teacher, data, minutes=0)
    with pytest.raises(ValueError, match="minutes"):
        recover(student, teacher, data, minutes=math.inf)
    with pytest.raises(ValueError, match="same module"):
        recover(teacher, teacher, data, minutes=1)
    with pytest.raises(TypeError, match="nn.Modules"):
        recover("student", teacher, data, minutes=1)
    with pytest.raises(TypeError, match="data"):
        recover(student, teacher, xtr[:32], minutes=1)
    with pytest.raises(ValueError, match="data yields no batch"):
        recover(student, teacher, [], minutes=1, progress=False)
    with pytest.raises(ValueError, match="holdout yields no batch"):
        recover(student, teacher, data, minutes=1, holdout=[])
    with pytest.raises(ValueError, match="lr"):
        recover(student, teacher, data, minutes=1, lr=-1.0)
    with pytest.raises(ValueError, match="patience"):
        recover(student, teacher, data, minutes=1, patience=0)
    frozen, _ = pk.compress(teacher, "prune:0.5", xtr[:64], progress=False)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        recover(frozen, teacher, data, minutes=1)
    with pytest.raises(ValueError, match="line up"):
        recover(student, teacher, data, minutes=0.01, layerwise=True, progress=False)


def test_auto_with_recovery():
    teacher, xtr, xte = _digits()
    calib = [xtr[i : i + 64] for i in range(0, 1024, 64)]
    held = [xte[:200], xte[200:]]
    out, rep = pk.compress(
        teacher,
        "auto",
        xtr[:128],
        budget=pk.Budget(cosine=0.97, recover_minutes=0.1, minimize="bytes"),
        calibration=calib,
        holdout=held,
        progress=False,
    )
    assert rep.recovery is not None and rep.recovery["steps"] > 0
    with torch.no_grad():
        cos = _cos(torch.cat([out(h) for h in held]), torch.cat([teacher(h) for h in held]))
    assert cos >= 0.97
    assert rep.recovered is not None and rep.recipe.startswith("prune:0.3")
    assert rep.recovery["holdout_after"]["cosine"] >= 0.97
    # the rest of the recipe reproduces the model on the recovered weights (with the
    # calibration batches: pruned groups are re-fitted on them)
    again, _ = pk.compress(
        rep.recovered, rep.recipe_after_recovery, xtr[:128], calibration=calib, progress=False
    )
    assert torch.equal(again(held[0]), out(held[0]))
