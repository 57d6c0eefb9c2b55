"""pk.compress(model, "auto", ...) to a pk.Budget, and the per-layer recipe selectors it
writes: the budget holds on held-out batches (measured here independently), the
recipe string reproduces the model exactly, and the same call works on an MLP
trained on scikit-learn's digits, a CNN and a decoder language model built from a
config."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pykernels as pk
from pykernels.compress import recipes
from pykernels.compress.auto import AutoReport, Budget
from pykernels.nn import ClusteredLinear, Int8Embedding, Int8Linear, SparseLinear

# --- the selector grammar ----------------------------------------------------------


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)
    ).eval()


@pytest.mark.parametrize(
    "text",
    [
        "int8@0,4",
        "int8@!2",
        "sparse:0.5@re:[02]",
        "prune:0.25@0,2+int8@0+sparse:0.5@2,4",
        "int8:act_bits=7@4+lowrank:0.9@0",
        "keep",
    ],
)
def test_selector_round_trip(text):
    steps = recipes.parse(text)
    assert "+".join(str(s) for s in steps) == text
    assert recipes.parse("+".join(str(s) for s in steps)) == steps
    # and through the manifest's JSON spec
    assert recipes.from_specs([s.spec() for s in steps]) == steps


def test_selector_applies_only_where_named():
    m, x = _mlp(), torch.randn(4, 16)
    out, rep = pk.compress(m, "int8@0,4+sparse:0.5@re:2", x, progress=False)
    assert isinstance(out[0], Int8Linear) and isinstance(out[4], Int8Linear)
    assert isinstance(out[2], SparseLinear)
    assert rep.recipe == "int8@0,4+sparse:0.5@re:2"
    neg, _ = pk.compress(m, "int8@!2", x, progress=False)
    assert type(neg[2]) is nn.Linear and isinstance(neg[0], Int8Linear)
    # a selector narrows exclude, never widens it
    ex, _ = pk.compress(m, "int8@0,2", x, exclude=["2"], progress=False)
    assert isinstance(ex[0], Int8Linear) and type(ex[2]) is nn.Linear
    same, _ = pk.compress(m, "keep", x, progress=False)
    assert torch.equal(same(x), m(x))


def test_selector_refusals():
    m, x = _mlp(), torch.randn(4, 16)
    with pytest.raises(ValueError, match="empty item"):
        recipes.parse("int8@0,,2")
    with pytest.raises(ValueError, match="not a regex"):
        recipes.parse("int8@re:(")
    with pytest.raises(ValueError, match="no module of the model"):
        pk.compress(m, "int8@nothere", x, progress=False)
    with pytest.raises(TypeError):
        recipes.Scoped("int8", ("0",))


# --- the budget --------------------------------------------------------------------


def test_budget_validation():
    with pytest.raises(ValueError, match="at least one"):
        Budget()
    with pytest.raises(ValueError, match="cosine"):
        Budget(cosine=1.5)
    with pytest.raises(ValueError, match="rel_error"):
        Budget(rel_error=-0.1)
    with pytest.raises(ValueError, match="minimize"):
        Budget(cosine=0.9, minimize="energy")
    with pytest.raises(ValueError, match="minimize"):
        Budget(cosine=0.9, minimize={"flops": 1.0})
    with pytest.raises(TypeError, match="metric"):
        Budget(metric=lambda m, b: 1.0)
    with pytest.raises(ValueError, match="recover_minutes"):
        Budget(cosine=0.9, recover_minutes=0)
    assert Budget.parse("cosine=0.99,recover_minutes=2") == Budget(cosine=0.99, recover_minutes=2)
    with pytest.raises(ValueError, match="budget"):
        Budget.parse("accuracy=3")
    b = Budget(cosine=0.9, rel_error=0.2)
    assert b.meets({"cosine": 0.95, "rel_error": 0.1})
    assert not b.meets({"cosine": 0.95, "rel_error": 0.3})
    assert not b.meets({"cosine": float("nan"), "rel_error": 0.1})


def test_auto_refusals():
    m, x = _mlp(), torch.randn(8, 16)
    with pytest.raises(ValueError, match="needs budget"):
        pk.compress(m, "auto", x)
    with pytest.raises(ValueError, match='for recipe "auto"'):
        pk.compress(m, "int8", x, budget=Budget(cosine=0.9))
    with pytest.raises(TypeError, match="budget"):
        pk.compress(m, "auto", x, budget={"cosine": 0.9})
    with pytest.raises(ValueError, match="held-out"):
        pk.compress(m, "auto", x, budget=Budget(cosine=0.9), calibration=[x])
    with pytest.raises(TypeError, match="calibration"):
        pk.compress(m, "auto", x, budget=Budget(cosine=0.9), calibration=x)
    with pytest.raises(ValueError, match="holdout yields no batch"):
        pk.compress(m, "auto", x, budget=Budget(cosine=0.9), holdout=[])


# --- the search on real models -----------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits():
    from pykernels import _digits as D

    xtr, ytr, xte, yte = D.data(0)
    model = D.train(D.mlp(0, hidden=256), xtr, ytr, epochs=15, lr=3e-3).eval()
    return D, model, xtr, ytr, xte, yte


def _cosine(a, b):
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def _check(model, out, report, example, held, floor, calib=None):
    """The budget holds on the held-out batches by a measure of our own, and the
    recipe string reproduces the model exactly (given the search's calibration
    batches, which calibration-aware pruning reads)."""
    assert isinstance(report, AutoReport)
    with torch.no_grad():
        got = torch.cat([out(h) for h in held])
        ref = torch.cat([model(h) for h in held])
        assert _cosine(got, ref) >= floor
        assert report.holdout["cosine"] == pytest.approx(_cosine(got, ref), abs=1e-9)
        again, _ = pk.compress(model, report.recipe, example, calibration=calib, progress=False)
        for h in held:
            assert torch.equal(again(h), out(h))
    assert len(report.choices) >= 1
    assert report.trials and any(t.feasible for t in report.trials)
    bytes_ = report.budget.minimize == "bytes"
    cost = (lambda t: t.est_bytes) if bytes_ else (lambda t: t.est_latency_ms)  # noqa: E731
    for a in report.pareto():  # nothing on the front is beaten on both axes by another trial
        for b in report.trials:
            assert not (cost(b) < cost(a) and b.quality["cosine"] > a.quality["cosine"])


def test_auto_mlp_on_digits_latency_and_bytes(tmp_path):
    D, model, xtr, _, xte, _ = _digits()
    example = xtr[:256]
    calib, held = [xtr[256:512], xtr[512:768]], [xte[:200], xte[200:400]]
    for minimize in ("latency", "bytes"):
        budget = Budget(cosine=0.995, minimize=minimize)
        out, rep = pk.compress(
            model, "auto", example, budget=budget, calibration=calib, holdout=held, progress=False
        )
        _check(model, out, rep, example, held, 0.995, calib)
        assert "search" in str(rep) and "AutoReport(" in repr(rep)
        d = rep.to_dict()
        assert d["recipe"] == rep.recipe and len(d["trials"]) == len(rep.trials)
        json.dumps(d)
    # bytes: never larger than uniform int8 when that meets the budget as well
    int8, _ = pk.compress(model, "int8", example, progress=False)
    assert rep.total["bytes_after"] <= pk.nn.nbytes_of(int8)
    try:
        import matplotlib  # noqa: F401 - optional (the plot extra)
    except ImportError:
        with pytest.raises(ImportError, match="needs matplotlib"):
            rep.plot(str(tmp_path / "pareto.png"))
    else:
        rep.plot(str(tmp_path / "pareto.png"))
        assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_auto_bytes_is_deterministic_and_tightens():
    D, model, xtr, _, xte, _ = _digits()
    example = xtr[:128]
    calib, held = [xtr[128:512]], [xte[:300]]
    runs = []
    for _ in range(2):
        _, rep = pk.compress(
            model,
            "auto",
            example,
            budget=Budget(cosine=0.98, minimize="bytes"),
            calibration=calib,
            holdout=held,
            progress=False,
        )
        runs.append(rep)
    assert runs[0].recipe == runs[1].recipe
    # a looser budget never gives a larger model
    _, loose = pk.compress(
        model,
        "auto",
        example,
        budget=Budget(cosine=0.9, minimize="bytes"),
        calibration=calib,
        holdout=held,
        progress=False,
    )
    assert loose.total["bytes_after"] <= runs[0].total["bytes_after"]
    assert loose.holdout["cosine"] >= 0.9


def test_auto_metric_budget_keeps_accuracy():
    D, model, xtr, ytr, xte, yte = _digits()
    # batches carry their labels by position: the metric reads them from the batch list
    held = [xte[:225], xte[225:]]
    labels = {id(held[0]): yte[:225], id(held[1]): yte[225:]}

    def accuracy(m, batches):
        ys = [labels[id(b)] for b in batches]
        with torch.no_grad():
            hits = sum(int((m(b).argmax(1) == y).sum()) for b, y in zip(batches, ys, strict=True))
        return 100.0 * hits / sum(len(y) for y in ys)

    base = accuracy(model, held)
    out, rep = pk.compress(
        model,
        "auto",
        xtr[:128],
        budget=Budget(metric=(accuracy, base - 1.0), minimize="bytes"),
        calibration=[xtr[:512]],
        holdout=held,
        progress=False,
    )
    assert accuracy(out, held) >= base - 1.0
    assert rep.holdout["metric"] == pytest.approx(accuracy(out, held))
    assert rep.total["bytes_after"] < rep.total["bytes_before"]


def test_auto_keeps_the_model_when_nothing_fits():
    model, x = _mlp(), torch.randn(64, 16)
    out, rep = pk.compress(
        model,
        "auto",
        x,
        budget=Budget(rel_error=0.0),
        calibration=[torch.randn(64, 16)],
        holdout=[torch.randn(64, 16)],
        progress=False,
    )
    assert rep.recipe == "keep"
    assert torch.equal(out(x), model(x))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_auto_cnn_on_digits():
    D, _, xtr, ytr, xte, _ = _digits()
    img = lambda x: F.interpolate(x.reshape(-1, 1, 8, 8), size=16, mode="bilinear")  # noqa: E731
    torch.manual_seed(0)
    cnn = SmallCNN()
    D.train(cnn, img(xtr), ytr, epochs=2, lr=3e-3)
    cnn.eval()
    example, calib, held = img(xtr[:64]), [img(xtr[64:256])], [img(xte[:128]), img(xte[128:256])]
    out, rep = pk.compress(
        cnn, "auto", example, budget=Budget(cosine=0.99), calibration=calib, holdout=held,
        progress=False,
    )  # fmt: skip
    _check(cnn, out, rep, example, held, 0.99, calib)
    kinds = {c.step for c in rep.candidates}
    assert any(k.startswith("tucker") for k in kinds)


def test_auto_decoder_lm_from_config():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, 128, (4, 24), generator=g) for _ in range(4)]
    out, rep = pk.compress(
        lm,
        "auto",
        {"input_ids": ids[0]},
        budget=Budget(cosine=0.99, minimize="bytes"),
        calibration=[{"input_ids": ids[1]}],
        holdout=[{"input_ids": ids[2]}, {"input_ids": ids[3]}],
        progress=False,
    )
    with torch.no_grad():
        for i in ids[2:]:
            assert _cosine(out(input_ids=i).logits, lm(input_ids=i).logits) > 0.985
        again, _ = pk.compress(
            lm,
            rep.recipe,
            {"input_ids": ids[0]},
            calibration=[{"input_ids": ids[1]}],
            progress=False,
        )
        assert torch.equal(again(input_ids=ids[2]).logits, out(input_ids=ids[2]).logits)
    assert rep.holdout["cosine"] >= 0.99
    changed = [
        m for m in out.modules() if isinstance(m, (Int8Linear, Int8Embedding, ClusteredLinear))
    ]
    assert changed


def test_cli_compress_auto(tmp_path, capsys):
    from pykernels.__main__ import main

    path = tmp_path / "mlp.pt"
    torch.save(_mlp(), path)
    out = tmp_path / "auto.safetensors"
    argv = ["compress", str(path), "--recipe", "auto", "--input-shape", "64,16"]
    argv += ["--trust-pickle", "--out", str(out), "--quiet"]
    assert main([*argv, "--budget", "cosine=0.99", "--minimize", "bytes"]) == 0
    printed = capsys.readouterr().out
    assert "auto: Budget(cosine>=0.99, minimize=bytes)" in printed
    assert out.stat().st_size > 0
    assert main([*argv, "--budget", "accuracy=0.9"]) == 2
    assert "--budget" in capsys.readouterr().err
    assert main(["compress", str(path), "--recipe", "int8", "--budget", "cosine=0.9",
                 "--input-shape", "4,16", "--trust-pickle", "--out", str(out)]) == 2  # fmt: skip
    assert "--budget is for --recipe auto" in capsys.readouterr().err
