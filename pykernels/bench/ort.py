"""ONNX Runtime as a peer for whole encoders (BERT-shaped Hugging Face models).

What a user deploying a sentence encoder on a CPU does: export with ``torch.onnx``,
fuse the graph with ``onnxruntime.transformers.optimizer`` (model_type "bert":
EmbedLayerNormalization, Attention, BiasGelu, SkipLayerNormalization), and for int8
run ``onnxruntime.quantization.quantize_dynamic`` on that fused graph. This module
does those steps once per model and versions (the files are cached, see
:func:`cache_dir`) and wraps a session so that it is called like the torch model
(``m(**batch).last_hidden_state``), so the bench and the demo time and check it the
same way as their torch rows.

Needs onnxruntime, onnx and onnxscript (the ``bench`` and ``demo`` extras);
:func:`available` says whether they are importable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

# The fused operators optimize_model reports for a BERT graph; all but the
# LayerNormalization left unfused should be non-zero on a correct export.
FUSED_OPS = ("EmbedLayerNormalization", "Attention", "BiasGelu", "SkipLayerNormalization")
# quantize_dynamic's options, shown with the int8 row: QInt8 weights (signed, per
# tensor), uint8 activations quantized at run time, every op type it can quantize
# dynamically (MatMul, Attention, Gather, EmbedLayerNormalization, ...).
QUANT_OPTIONS = (
    "weight_type=QInt8, per_channel=False, reduce_range=False, all op types, "
    "DefaultTensorType=FLOAT"
)
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def available() -> str | None:
    """None when ONNX Runtime rows can run here, else the missing module's name."""
    for mod in ("onnxruntime", "onnx"):
        if importlib.util.find_spec(mod) is None:
            return mod
    return None


def skip_line(where: str) -> str:
    return (
        f"{where}: ONNX Runtime rows skipped, {available()} is not installed "
        "(pip install -e '.[bench]')"
    )


def cache_dir() -> Path:
    """``$PYKERNELS_CACHE/onnx``, else ``$XDG_CACHE_HOME/pykernels/onnx`` (~/.cache), else
    a folder under the system's temp dir when the home is not writable."""
    root = os.environ.get("PYKERNELS_CACHE")
    if root:
        return Path(root) / "onnx"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    d = base / "pykernels" / "onnx"
    try:
        d.mkdir(parents=True, exist_ok=True)
        return d
    except OSError:
        return Path(tempfile.gettempdir()) / "pykernels-onnx"


def _key(model: nn.Module) -> str:
    """The model's config, a digest of its weights and the versions of every tool the
    files depend on: a changed model or an upgraded exporter makes new files."""
    import onnx
    import onnxruntime
    import transformers

    h = hashlib.blake2b(digest_size=12)
    h.update(
        json.dumps(
            [
                model.config.to_json_string(),
                torch.__version__,
                transformers.__version__,
                onnxruntime.__version__,
                onnx.__version__,
                QUANT_OPTIONS,
            ]
        ).encode()
    )
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _LastHidden(nn.Module):
    """The encoder with positional inputs and one output: what torch.onnx.export traces."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state


def _eager_copy(model: nn.Module) -> nn.Module:
    """``model`` with eager attention: traced through SDPA the graph's attention is not a
    pattern ORT's BERT optimizer fuses (0 Attention nodes); the eager softmax(QK^T)V is."""
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg._attn_implementation = "eager"
    eager = model.__class__(cfg).eval()
    eager.load_state_dict(model.state_dict())
    return eager


@dataclass
class Exported:
    fp32: Path  # the BERT-optimized graph
    int8: Path  # quantize_dynamic of it
    fused: dict[str, int]  # fused operator counts in the optimized graph


def export(model: nn.Module, where: Path | None = None) -> Exported:
    """The optimized fp32 and the dynamically quantized int8 ONNX files of a BERT-shaped
    Hugging Face ``model`` (from the cache when they are there)."""
    d = (where or cache_dir()) / _key(model)
    fp32, int8, meta = d / "optimized.onnx", d / "int8.onnx", d / "fused.json"
    if fp32.exists() and int8.exists() and meta.exists():
        return Exported(fp32, int8, json.loads(meta.read_text()))
    # built in a folder of this process's, then renamed: a run beside this one never
    # sees half-written files
    tmp = d.parent / f"{d.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fused = _build(model, tmp)
        if not meta.exists():  # else another run made it first
            shutil.rmtree(d, ignore_errors=True)  # an interrupted older attempt
            tmp.rename(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(fp32, int8, fused)


def _build(model: nn.Module, d: Path) -> dict[str, int]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    fp32, int8 = d / "optimized.onnx", d / "int8.onnx"
    raw = d / "exported.onnx"
    ids = torch.randint(1, model.config.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    args = (ids, mask, torch.zeros_like(ids))
    axes = {k: {0: "batch", 1: "sequence"} for k in (*_INPUTS, "last_hidden_state")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's notices
        torch.onnx.export(
            _LastHidden(_eager_copy(model)),
            args,
            str(raw),
            dynamo=False,  # the TorchScript exporter: the graph the BERT optimizer knows
            input_names=list(_INPUTS),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
        )
    cfg = model.config
    opt = optimize_model(
        str(raw),
        model_type="bert",
        num_heads=cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
    )
    fused = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(fp32))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run pre-processing, on every call
    try:
        quantize_dynamic(
            str(fp32),
            str(int8),
            weight_type=QuantType.QInt8,
            per_channel=False,
            reduce_range=False,
            # ORT's fused ops (com.microsoft) stop onnx's shape inference; without this
            # the quantizer cannot type the outputs that follow them and refuses
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)
    raw.unlink()
    (d / "fused.json").write_text(json.dumps(fused))
    return fused


def session(path: Path, threads: int | None = None) -> Any:
    """An InferenceSession as the bench runs every ORT row: intra-op threads = torch's
    (the bench's --threads), one inter-op thread, sequential execution, every graph
    optimization."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OrtEncoder(nn.Module):
    """An ONNX Runtime session called like the Hugging Face encoder it came from:
    ``m(input_ids=..., attention_mask=..., token_type_ids=...).last_hidden_state``."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.sess = session(self.path, threads)
        self.input_names = [i.name for i in self.sess.get_inputs()]

    def file_bytes(self) -> int:
        return self.path.stat().st_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids=None, **_: Any):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        given = {"input_ids": input_ids, "attention_mask": attention_mask}
        given["token_type_ids"] = token_type_ids
        feed = {k: given[k].numpy() for k in self.input_names}
        (out,) = self.sess.run(None, feed)
        return SimpleNamespace(last_hidden_state=torch.from_numpy(out))


def encoders(model: nn.Module, where: Path | None = None) -> tuple[dict[str, OrtEncoder], str]:
    """``{"ORT fp32": ..., "ORT int8": ...}`` for ``model`` and a line naming the fused
    operators of the optimized graph and the quantization options."""
    ex = export(model, where)
    counts = ", ".join(f"{v} {k}" for k, v in ex.fused.items())
    line = f"ORT graph: {counts}; int8: quantize_dynamic({QUANT_OPTIONS})"
    return {"ORT fp32": OrtEncoder(ex.fp32), "ORT int8": OrtEncoder(ex.int8)}, line


__all__ = [
    "FUSED_OPS",
    "OrtEncoder",
    "QUANT_OPTIONS",
    "available",
    "cache_dir",
    "encoders",
    "export",
    "session",
]
