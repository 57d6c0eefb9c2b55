"""Issue 21's anchors on all-MiniLM-L6-v2, side by side with pykernels' own rows.

The anchors (Intel Neural Compressor, llm-compressor, NNCF, torchao) quantize the
same model with int4 g128 asymmetric weights, from the same 256 calibration
sentences, and are judged on the same 96 held-out sentences as
``benchmarks/calibrate_minilm.py`` (whose helpers this script reuses):

* per Linear, the relative output error ``||X W_hat^T - X W^T|| / ||X W^T + b||``
  on the held-out inputs that Linear receives in the fp32 model, as a ratio to
  round to nearest (pykernels' ``rtn_int4``, the int4 contract); median and
  worst over the 37 Linears. ``W_hat`` is what the quantized layer computes
  with (``Int4Linear.dequantized_weight``, INC's ``recover()``, NNCF's
  decompressor, or the layer applied to the identity). Rows that rescale the
  layer's inputs (AWQ) have no such ratio: their weights are not comparable
  to ``W`` alone, so only the model's cosine judges them;
* the model: mean cosine of the held-out sentence embeddings to fp32's;
* wall time of the whole quantization call, at 2 threads.

The anchors are not pykernels dependencies: INC, NNCF and torchao come with
``pip install .[bench]``; llm-compressor with ``.[anchors]``, in an environment of
its own (its pins would move transformers; see pyproject.toml). An anchor that is
not installed, or fails, gets a row with its error.

    HF_HUB_OFFLINE=1 flock /tmp/pk-bench.lock python benchmarks/anchors_minilm.py \\
        --anchors pk,inc --json benchmarks/anchors_minilm_2026-12-07.json

Each call adds its anchors' rows to the JSON (existing rows of other anchors stay),
so the slow anchors can run one lock hold at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import io
import json
import logging
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import calibrate_minilm as cm  # noqa: E402

from pykernels.compress.calibrate.scaling import rtn_int4  # noqa: E402

ANCHORS = ("pk", "inc", "llmc", "nncf", "torchao")
GROUP = 128


class Bench:
    """The fp32 model, its data, and the reference every row is judged against."""

    def __init__(self) -> None:
        self.model, self.calib, self.held = cm.load()
        self.lins = {n: m for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
        self.ref = cm.embed(self.model, self.held)
        xs = cm.held_inputs(self.model, self.held, list(self.lins.values()))
        self.x = {n: xs[id(m)] for n, m in self.lins.items()}
        self.rtn_err = {
            n: cm.layer_err(self.x[n], m, rtn_int4(m.weight.detach().float(), GROUP, False))
            for n, m in self.lins.items()
        }

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def row(
        self,
        method: str,
        qmodel: nn.Module,
        seconds: float,
        w_hat: Callable[[str], torch.Tensor | None] | None,
        **extra,
    ) -> dict:
        """Scores one quantized model: per-layer ratio to RTN (when ``w_hat``), cosine, time."""
        out: dict = {"method": method, "seconds": round(seconds, 2)}
        if w_hat is not None:
            ratios, left_float = {}, []
            for n, m in self.lins.items():
                w = w_hat(n)
                if w is None:  # the anchor kept this Linear in float: no ratio to take
                    left_float.append(n)
                    continue
                w = w.detach().float()
                if w.shape != m.weight.shape:
                    raise ValueError(f"{method}: {n} weight {tuple(w.shape)}")
                ratios[n] = cm.layer_err(self.x[n], m, w) / self.rtn_err[n]
            enc = [r for n, r in ratios.items() if not n.startswith("pooler")]
            out |= {
                "layer_ratio_median": statistics.median(ratios.values()),
                "layer_ratio_worst": max(ratios.values()),
                "worst_layer": max(ratios, key=ratios.get),
                "encoder_ratio_median": statistics.median(enc),
                "encoder_ratio_worst": max(enc),
                "layers": len(ratios),
            }
            if left_float:
                out["left_float"] = left_float
        out["cosine"] = cm.cosine(qmodel, self.ref, self.held)
        return out | extra


def applied_to_identity(model: nn.Module, dtype=torch.float32) -> Callable[[str], torch.Tensor]:
    """W_hat of any linear-like module: ``layer(I) - b`` is ``W_hat^T``."""

    def get(name: str) -> torch.Tensor:
        mod = model.get_submodule(name)
        k = mod.in_features
        with torch.no_grad():
            y = mod(torch.eye(k, dtype=dtype)).float()
        if mod.bias is not None:
            y = y - mod.bias.detach().float()
        return y.T

    return get


def timed(fn: Callable[[], nn.Module]) -> tuple[nn.Module, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- pykernels -------------------------------------------------------------------------------


# The anchors' int4 is weight-only (W4A16), so pykernels' rows to set beside them are
# the weight_only ones; its default int4 is W4A8 (int8 activations), listed after.
PK_RECIPES = (
    "int4:g128:weight_only",
    "int4:g128:gptq:weight_only",
    "awq+int4:g128:weight_only",
    "int4:g128",
    "int4:g128:gptq",
    "awq+int4:g128",
    "smoothquant+int8",
    "int8",
)


def run_pk(b: Bench, recipes: list[str]) -> list[dict]:
    import pykernels as pk

    rows = []
    for recipe in recipes:
        out, t = timed(
            lambda r=recipe: pk.compress(
                b.model, r, b.calib[0], calibration=b.calib, progress=False
            )[0]
        )
        is_int4 = recipe.startswith("int4")  # awq+ rescales inputs: cosine only
        get = (lambda n, o=out: o.get_submodule(n).dequantized_weight()) if is_int4 else None
        rows.append(b.row(f"pykernels {recipe}", out, t, get))
    return rows


# --- Intel Neural Compressor (3.x torch API) --------------------------------------------------


class _Batch(dict):
    """A dict batch with ``.to``: INC's AWQ moves ``example_inputs`` with ``.to(device)``."""

    def to(self, device):
        return _Batch({k: v.to(device) for k, v in self.items()})


def run_inc(b: Bench, which: set[str]) -> list[dict]:
    from neural_compressor.torch.quantization import (
        AWQConfig,
        GPTQConfig,
        RTNConfig,
        convert,
        prepare,
    )

    # use_layer_wise=False: RTN's default reloads each layer from model_path on disk.
    common = {"bits": 4, "group_size": GROUP, "use_sym": False}
    cfgs = {
        "rtn": (RTNConfig(**common, use_layer_wise=False), False),
        "gptq": (GPTQConfig(**common), True),
        "awq": (AWQConfig(**common), True),
    }
    rows = []
    for name, (cfg, calibrated) in cfgs.items():
        if name not in which:
            continue

        def go(cfg=cfg, calibrated=calibrated):
            m = prepare(b.fresh(), cfg, example_inputs=_Batch(b.calib[0]))
            if calibrated:
                with torch.no_grad():
                    for batch in b.calib:
                        m(**batch)
            return convert(m)

        try:
            out, t = timed(go)
        except Exception as e:  # noqa: BLE001 - an anchor's failure is a result
            rows.append(failed(f"INC {name}", e))
            continue
        get = None if name == "awq" else (lambda n, o=out: inc_weight(o.get_submodule(n)))
        rows.append(b.row(f"INC {name}", out, t, get))
    return rows


def inc_weight(mod: nn.Module) -> torch.Tensor | None:
    """INC's dequantized weight; None where it left the Linear in float."""
    return mod.recover() if hasattr(mod, "recover") else None


def run_inc_smoothquant(b: Bench) -> dict:
    try:
        from neural_compressor.torch.quantization import SmoothQuantConfig, prepare

        prepare(b.fresh(), SmoothQuantConfig(alpha=0.5), example_inputs=_Batch(b.calib[0]))
    except Exception as e:  # noqa: BLE001
        return failed("INC smoothquant W8A8", e)
    return {"method": "INC smoothquant W8A8", "error": "prepared; convert not measured"}


# --- llm-compressor ---------------------------------------------------------------------------


def run_llmc(b: Bench) -> list[dict]:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    # One sample per sentence, unpadded: llm-compressor batches and pads them itself.
    rows: dict[str, list] = {"input_ids": [], "attention_mask": []}
    for batch in b.calib:
        for ids, am in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            n = int(am.sum())
            rows["input_ids"].append(ids[:n].tolist())
            rows["attention_mask"].append(am[:n].tolist())
    ds = Dataset.from_dict(rows)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=False, strategy="group", group_size=GROUP
        ),
    )

    def go():
        m = b.fresh()
        oneshot(
            model=m,
            dataset=ds,
            recipe=[GPTQModifier(config_groups={"w4a16_asym": scheme}, ignore=[])],
            sequential_targets=["BertLayer"],
            num_calibration_samples=len(ds),
            max_seq_length=128,
        )
        return m

    try:
        out, t = timed(go)
    except Exception as e:  # noqa: BLE001
        return [failed("llm-compressor GPTQ", e)]
    # oneshot leaves each Linear's weight fake-quantized in place (compression to
    # packed int4 happens only at save_pretrained).
    return [b.row("llm-compressor GPTQ", out, t, lambda n: out.get_submodule(n).weight)]


# --- NNCF -------------------------------------------------------------------------------------


def run_nncf(b: Bench) -> list[dict]:
    import nncf
    from nncf import CompressWeightsMode, IgnoredScope

    variants = {
        "nncf int4 (data-free)": {},
        "nncf int4 awq": {"awq": True},
        "nncf int4 scale_estimation": {"scale_estimation": True},
        "nncf int4 gptq": {"gptq": True},
    }
    rows = []
    for name, kw in variants.items():

        def go(kw=kw):
            return nncf.compress_weights(
                b.fresh(),
                mode=CompressWeightsMode.INT4_ASYM,
                group_size=GROUP,
                ratio=1.0,
                # all_layers: NNCF otherwise keeps the last Linear (the pooler) in int8.
                all_layers=True,
                dataset=nncf.Dataset(b.calib),
                ignored_scope=IgnoredScope(patterns=[".*embeddings.*"]),
                **kw,
            )

        grab = _Grab()
        nncf.nncf_logger.addHandler(grab)
        try:
            out, t = timed(go)
        except Exception as e:  # noqa: BLE001
            rows.append(failed(name, e))
            continue
        finally:
            nncf.nncf_logger.removeHandler(grab)
        row = b.row(name, out, t, None if "awq" in name else nncf_weight(out))
        skipped = [m for m in grab.messages if "No matching patterns" in m]
        if skipped:
            row["note"] = skipped[0]
        rows.append(row)
    return rows


class _Grab(logging.Handler):
    """Keeps an anchor's log messages (NNCF says there when AWQ found nothing to scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def nncf_weight(model: nn.Module) -> Callable[[str], torch.Tensor]:
    """NNCF keeps packed uint8 weights and decompresses them in a hook on the parameter."""
    hooks = getattr(model, "__nncf_hooks").post_hooks

    def get(name: str) -> torch.Tensor:
        dec = hooks[name.replace(".", ":") + ":weight__0"]["0"]
        w = model.get_submodule(name).weight
        return dec(w).reshape(model.get_submodule(name).out_features, -1)

    return get


# --- torchao ----------------------------------------------------------------------------------


def run_torchao(b: Bench) -> list[dict]:
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    asym = MappingType.ASYMMETRIC
    cfgs = {
        # The int4 paths the issue names; on CPU each refuses (the error is the row).
        "torchao Int4WeightOnly bf16": (lambda: Int4WeightOnlyConfig(group_size=GROUP), True),
        "torchao Int4WeightOnly tile_packed_to_4d bf16": (
            lambda: Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="tile_packed_to_4d"),
            True,
        ),
        "torchao IntxWeightOnly int4 g128": (
            lambda: IntxWeightOnlyConfig(
                weight_dtype=torch.int4, granularity=PerGroup(GROUP), mapping_type=asym
            ),
            False,
        ),
        "torchao Int8DynAct-Int4 g128 (a8w4)": (
            lambda: Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int4,
                weight_granularity=PerGroup(GROUP),
                weight_mapping_type=asym,
            ),
            False,
        ),
        "torchao Int8DynAct-Int4 opaque_torchao_auto": (
            lambda: Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int4,
                weight_granularity=PerGroup(GROUP),
                intx_packing_format="opaque_torchao_auto",
            ),
            False,
        ),
        "torchao Int8DynAct-Int8 (a8w8)": (Int8DynamicActivationInt8WeightConfig, False),
    }
    rows = []
    for name, (make, bf16) in cfgs.items():
        try:

            def go(make=make, bf16=bf16):
                m = b.fresh().to(torch.bfloat16) if bf16 else b.fresh()
                quantize_(m, make())
                return m

            out, t = timed(go)
            weight_only = "WeightOnly" in name
            # A weight-only int4 layer's W_hat is comparable to RTN's; an a8 layer's
            # output also carries the activation rounding, so only its cosine counts.
            get = applied_to_identity(out) if weight_only and not bf16 else None
            rows.append(b.row(name, out, t, get))
        except Exception as e:  # noqa: BLE001
            rows.append(failed(name, e))
    return rows


# --- driver -----------------------------------------------------------------------------------


def failed(method: str, e: BaseException) -> dict:
    last = traceback.extract_tb(e.__traceback__)[-1]
    where = f"{os.path.basename(last.filename)}:{last.lineno}"
    return {"method": method, "error": f"{type(e).__name__}: {str(e)[:300]}", "at": where}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchors", default=",".join(ANCHORS), help=f"from {ANCHORS}")
    ap.add_argument("--inc", default="rtn,gptq,awq", help="INC algorithms to run")
    ap.add_argument("--pk", default=",".join(PK_RECIPES), help="pykernels recipes to run")
    ap.add_argument("--json")
    ap.add_argument("--quiet", action="store_true", help="silence the anchors' own logging")
    args = ap.parse_args()
    which = [a for a in args.anchors.split(",") if a]
    bad = [a for a in which if a not in ANCHORS]
    if bad:
        raise SystemExit(f"--anchors: unknown {bad}; choose from {ANCHORS}")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    res: dict = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            res = json.load(f)
    b = Bench()
    runners = {
        "pk": lambda: run_pk(b, args.pk.split(",")),
        "inc": lambda: run_inc(b, set(args.inc.split(","))) + [run_inc_smoothquant(b)],
        "llmc": lambda: run_llmc(b),
        "nncf": lambda: run_nncf(b),
        "torchao": lambda: run_torchao(b),
    }
    dists = {
        "pk": "pykernels",
        "inc": "neural-compressor-pt",
        "llmc": "llmcompressor",
        "nncf": "nncf",
        "torchao": "torchao",
    }
    for a in which:
        load = os.getloadavg()
        sink = io.StringIO()
        quiet = contextlib.redirect_stdout(sink) if args.quiet else contextlib.nullcontext()
        try:
            with quiet:
                rows = runners[a]()
        except ImportError as e:
            rows = [failed(a, e)]
        # Rows of an earlier call for the same anchor stay unless this call redid them.
        entry = res.setdefault("anchors", {}).setdefault(a, {"rows": []})
        done = {r["method"] for r in rows}
        entry["rows"] = [r for r in entry["rows"] if r["method"] not in done] + rows
        entry.setdefault("calls", []).append(
            {
                "version": version(dists[a]),
                "methods": sorted(done),
                "load_before": load,
                "load_after": os.getloadavg(),
            }
        )
        for r in rows:
            print(json.dumps(r), flush=True)
    res["threads"] = 2
    res["torch"] = torch.__version__
    res["transformers"] = version("transformers")
    res["calib_sentences"] = sum(len(x["input_ids"]) for x in b.calib)
    res["held_sentences"] = sum(len(x["input_ids"]) for x in b.held)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
