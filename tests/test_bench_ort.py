"""ONNX Runtime's rows of the model bench and the demo (pykernels.bench.ort), and the
breakdown of a compressed model's forward (pykernels.bench.breakdown), on a tiny BERT
with random weights (2 layers): fast, and the same graph patterns as MiniLM's."""

from __future__ import annotations

import pytest
import torch

import pykernels as pk
from pykernels.bench import breakdown as bd
from pykernels.bench import model as bench_model
from pykernels.bench import ort
from pykernels.compress.demo import mean_pool

transformers = pytest.importorskip("transformers")


def tiny_bert():
    transformers.logging.set_verbosity_error()
    return bench_model.bert_base(
        seed=0,
        num_hidden_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        intermediate_size=512,
        vocab_size=1000,
    )


def batch(n=4, tokens=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (n, tokens), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, n):  # right padding, as a tokenizer pads
        mask[i, tokens - 3 * i :] = 0
        ids[i, tokens - 3 * i :] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def test_ort_rows_match_torch_fp32_and_the_graph_is_fused(tmp_path):
    pytest.importorskip("onnxruntime")
    model, b = tiny_bert(), batch()
    ex = ort.export(model, tmp_path)
    # the BERT optimizer recognised every block: one fused op per layer (two per
    # layer for the residual LayerNorms) and the embeddings' LayerNorm
    assert ex.fused["Attention"] == 2 and ex.fused["BiasGelu"] == 2
    assert ex.fused["SkipLayerNormalization"] == 4 and ex.fused["EmbedLayerNormalization"] == 1
    with torch.inference_mode():
        ref = mean_pool(model, b)
        fp32 = mean_pool(ort.OrtEncoder(ex.fp32, threads=1), b)
        int8 = mean_pool(ort.OrtEncoder(ex.int8, threads=1), b)
        # another batch shape than the export's (2 x 16): the axes are dynamic
        b2 = batch(n=1, tokens=40)
        one = mean_pool(ort.OrtEncoder(ex.fp32, threads=1), b2)
        ref2 = mean_pool(model, b2)
    assert float(cosine(fp32, ref).min()) >= 0.999
    assert float(cosine(one, ref2).min()) >= 0.999
    c8 = float(cosine(int8, ref).mean())
    assert 0.9 < c8 < 0.99999, c8  # close, and not the fp32 graph again
    assert ex.int8.stat().st_size < 0.5 * ex.fp32.stat().st_size


def test_the_exported_files_are_cached(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    model = tiny_bert()
    first = ort.export(model, tmp_path)

    def no_rebuild(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(ort, "_build", no_rebuild)
    again = ort.export(model, tmp_path)
    assert (again.fp32, again.int8, again.fused) == (first.fp32, first.int8, first.fused)
    # other weights: another key, so it builds
    other = tiny_bert()
    with torch.no_grad():
        other.pooler.dense.bias.add_(1.0)
    with pytest.raises(AssertionError, match="exported again"):
        ort.export(other, tmp_path)


def test_without_onnxruntime_the_rows_are_skipped_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(ort, "available", lambda: "onnxruntime")
    rows, graph = bench_model.ort_rows(torch.nn.Linear(2, 2), "model tiny")
    assert rows == {} and graph is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "model tiny: ONNX Runtime rows skipped, onnxruntime is not installed "
        "(pip install -e '.[bench]')"
    ]


def test_a_capped_tier_has_no_ort_rows(monkeypatch, capsys):
    monkeypatch.setattr(ort, "available", lambda: None)
    monkeypatch.setenv("PYKERNELS_CPU_ISA", "avx2")
    rows, graph = bench_model.ort_rows(torch.nn.Linear(2, 2), "model tiny")
    assert rows == {} and graph is None
    assert "cannot be ISA-capped" in capsys.readouterr().err


def test_breakdown_shares_of_an_int8_model():
    model, b = tiny_bert(), batch()
    q = pk.quantize_int8(model)
    spent = bd.breakdown(lambda: mean_pool(q, b), calls=2)
    assert sum(spent.shares.values()) == pytest.approx(1.0)
    assert all(v >= 0 for v in spent.shares.values())
    assert spent.shares["pykernels"] > 0
    assert all(k.startswith("pykernels::") for k in spent.ours_by_op)
    # the encoder layers are fused blocks: int8 GEMMs and pykernels' attention
    assert {"pykernels::int8_linear", "pykernels::attention"} <= set(spent.ours_by_op)
    # LayerNorm stays torch's: it is among the other ops
    others = {k for k, _ in spent.top}
    assert any("layer_norm" in k for k in others), others
    assert "pykernels ops" in spent.line()
    # the fp32 model runs no pykernels op at all
    fp32 = bd.breakdown(lambda: mean_pool(tiny_bert(), b), calls=1)
    assert fp32.shares["pykernels"] == 0 and fp32.ours_ms == 0


def test_the_demo_never_saves_a_reference_row():
    from pykernels.compress import demo

    rows = [
        {"recipe": "fp32", "size_mb": 90.0, "cosine": 1.0},
        {"recipe": "ORT fp32", "size_mb": 90.0, "cosine": 1.0},
        {"recipe": "ORT int8", "size_mb": 23.0, "cosine": 0.999},
        {"recipe": "int8", "size_mb": 23.0, "cosine": 0.998},
    ]
    times = {"fp32": [2.0] * 9, "ORT fp32": [1.0] * 9, "ORT int8": [0.1] * 9, "int8": [1.0] * 9}
    assert demo.pick(rows, times)[0] == "int8"
