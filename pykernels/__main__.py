"""``python -m pykernels info | bench | demo | compress | federated``."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any

from ._cli import UsageError, one_line, positive_int


def _info(args: argparse.Namespace) -> int:
    from . import info

    d = info()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for key, value in d.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for fam, per_dev in value.items():
                print(f"  {fam}: " + ", ".join(f"{dev} -> {b}" for dev, b in per_dev.items()))
        else:
            print(f"{key}: {value}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.isa:
        return _bench_tiers(args)
    import os

    import torch

    from . import bench, info
    from .bench import tiers

    if args.threads:
        torch.set_num_threads(args.threads)
        from . import set_num_threads

        set_num_threads(args.threads)
    devices = (
        [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    )
    families = tuple(args.family) if args.family else bench.FAMILIES
    cases = [c for d in devices for c in bench.collect_cases(families, d, args.quick)]
    if args.case:
        cases = [c for c in cases if any(s in c.name for s in args.case)]
        if not cases:
            raise UsageError(f"no {'/'.join(families)} case name contains any of {args.case}")
    results = bench.run(cases)
    print(bench.table(results, {c.name: c.baseline for c in cases}))
    import importlib

    for fam in families:
        mod = importlib.import_module(f"pykernels.bench.{fam}")
        if hasattr(mod, "summary") and any(r.family == fam for r in results):
            print()
            print(mod.summary(results))
    meta = {k: v for k, v in info().items() if not isinstance(v, dict)}
    meta["torch_threads"] = torch.get_num_threads()
    meta["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    meta["caps"] = {k: os.environ[k] for k in tiers.CAP_VARS if k in os.environ}
    if args.json:
        bench.write_json(args.json, results, meta)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        bench.plot(args.plot, results)
        print(f"wrote {args.plot}", file=sys.stderr)
        for fam in families:
            mod = importlib.import_module(f"pykernels.bench.{fam}")
            if hasattr(mod, "plot") and any(r.family == fam for r in results):
                extra = args.plot.rsplit(".", 1)[0] + f"_{fam}.png"
                mod.plot(extra, results)
                print(f"wrote {extra}", file=sys.stderr)
    return 0


def _bench_tiers(args: argparse.Namespace) -> int:
    """Each --isa tier in a child process, ours and the peers capped together."""
    from .bench import tiers

    try:
        chosen = tiers.parse(args.isa)
    except ValueError as e:
        print(f"python -m pykernels bench: {e}", file=sys.stderr)
        return 2
    child: list[str] = []
    for fam in args.family or []:
        child += ["--family", fam]
    for sub in args.case or []:
        child += ["--case", sub]
    if args.quick:
        child.append("--quick")
    if args.threads:
        child += ["--threads", str(args.threads)]
    child += ["--device", "cpu"]
    if args.plot:
        print("--plot is per run: omitted with --isa", file=sys.stderr)
    return tiers.run(chosen, child, args.json)


def _require(module: str, extra: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f'{what} needs {module}: pip install -e ".[{extra}]"') from None


def _check_compress_args(args: argparse.Namespace) -> None:
    """Every check that needs no model, so that a typo costs no model load."""
    from .compress import recipes
    from .compress.auto import Budget

    if args.recipe.strip().lower() == "auto":
        try:
            budget = Budget.parse(args.budget or "cosine=0.99")
            minimize = args.minimize
            if minimize not in ("latency", "bytes"):
                weights = dict(kv.split("=") for kv in minimize.split(","))
                minimize = {k.strip(): float(v) for k, v in weights.items()}
            args.budget = Budget(
                cosine=budget.cosine,
                rel_error=budget.rel_error,
                minimize=minimize,
                recover_minutes=budget.recover_minutes,
            )
        except (ValueError, TypeError) as e:
            raise UsageError(f"--budget/--minimize: {one_line(e)}") from None
    else:
        if args.budget is not None:
            raise UsageError("--budget is for --recipe auto")
        try:
            recipes.parse(args.recipe)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--recipe: {one_line(e)}") from None
    if os.path.isdir(args.path):
        if not os.path.isfile(os.path.join(args.path, "config.json")):
            raise UsageError(f"{args.path} has no config.json: not a Hugging Face model directory")
        _require("transformers", "demo", "a model directory")
    elif not os.path.isfile(args.path):
        raise UsageError(f"no such file or directory: {args.path}")
    elif args.path.endswith(".safetensors"):
        raise UsageError(
            f"{args.path} holds tensors without the architecture to put them in: give the "
            "Hugging Face model directory it belongs to"
        )
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(out_dir):
        raise UsageError(f"--out {args.out}: not a file in an existing folder")
    if args.example and not os.path.isfile(args.example):
        raise UsageError(f"--example: no such file: {args.example}")
    if args.input_shape is not None:
        try:
            shape = [int(s) for s in args.input_shape.split(",")]
        except ValueError:
            shape = []
        if not shape or min(shape) < 1:
            raise UsageError(
                f"--input-shape {args.input_shape!r}: positive integers separated by commas, "
                "e.g. 1,3,224,224"
            )
        args.input_shape = shape
    _require("safetensors", "demo", "writing --out")
    if args.plot:
        _require("matplotlib", "plot", "--plot")


def _torch_load(path: str, trust_pickle: bool, what: str) -> Any:
    """``torch.load`` that unpickles arbitrary objects only when the user said so:
    a pickle can run any code its author chose when it is loaded."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=not trust_pickle, map_location="cpu")
    except pickle.UnpicklingError:
        if trust_pickle:
            raise
        raise UsageError(
            f"{path} ({what}) is a full pickle, not tensors only: unpickling it would run code "
            "from the file. Only if you trust its source, pass --trust-pickle (safer: a "
            "Hugging Face directory written by save_pretrained)"
        ) from None
    except Exception as e:  # noqa: BLE001 - whatever torch raises for a file it cannot read
        raise UsageError(f"cannot read {path}: {type(e).__name__}: {one_line(e)}") from None


def _load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    from torch import nn

    if os.path.isdir(args.path):
        transformers = importlib.import_module("transformers")
        transformers.logging.set_verbosity_error()
        try:
            model = transformers.AutoModel.from_pretrained(args.path).eval()
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load {args.path}: {one_line(e)}") from None
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.path)
        except Exception:  # noqa: BLE001 - a model directory without a tokenizer
            tokenizer = None
        return model, tokenizer
    model = _torch_load(args.path, args.trust_pickle, "a model")
    if not isinstance(model, nn.Module):
        hint = (
            " (a state_dict has no architecture: save the model with save_pretrained, or "
            "torch.save the module itself and pass --trust-pickle)"
            if isinstance(model, dict)
            else ""
        )
        raise UsageError(f"{args.path} holds a {type(model).__name__}, not a model{hint}")
    return model.eval(), None


def _given_example(args: argparse.Namespace) -> Any:
    """The example input from --example or --input-shape, before any model loads."""
    import torch

    if args.example:
        return _torch_load(args.example, args.trust_pickle, "an example input")
    if args.input_shape:
        return torch.randn(*args.input_shape)
    return None


def _tokenized_example(tokenizer: Any, n: int = 8, skip: int = 0) -> Any:
    if tokenizer is None:
        raise UsageError(
            "give --example FILE (a torch.save'd tensor, tuple or dict) or --input-shape"
        )
    from .compress.demo import corpus, passages

    texts = passages(corpus(), tokenizer, skip + n, 128)[skip:]
    return dict(
        tokenizer(texts, truncation=True, padding=True, max_length=128, return_tensors="pt")
    )


def _auto_batches(args: argparse.Namespace, tokenizer: Any, example: Any) -> tuple[list, list]:
    """Calibration and held-out batches for --recipe auto: other passages of the demo's
    English sentences for a tokenizer's model, else random inputs shaped like the
    example (a tensor, or a tuple/dict of tensors)."""
    import torch

    if tokenizer is not None and args.example is None and args.input_shape is None:
        texts = _tokenized_example(tokenizer, 16, 8)
        half = {k: v[:8] for k, v in texts.items()}
        rest = {k: v[8:] for k, v in texts.items()}
        return [half], [rest]
    if not isinstance(example, torch.Tensor) or not example.is_floating_point():
        raise UsageError(
            "--recipe auto on a non-text model needs a float tensor example (--input-shape or "
            "--example): its calibration and held-out batches are random inputs of that shape"
        )
    g = torch.Generator().manual_seed(0)
    make = lambda: torch.randn(example.shape, generator=g, dtype=example.dtype)  # noqa: E731
    return [make(), make()], [make(), make()]


def _compress(args: argparse.Namespace) -> int:
    _check_compress_args(args)
    import torch

    from . import compress, save, set_num_threads

    if args.threads:
        torch.set_num_threads(args.threads)
        set_num_threads(args.threads)
    example = _given_example(args)
    model, tokenizer = _load_model(args)
    if example is None:
        example = _tokenized_example(tokenizer)
    kwargs: dict[str, Any] = {}
    if args.recipe.strip().lower() == "auto":
        calibration, holdout = _auto_batches(args, tokenizer, example)
        kwargs = {"budget": args.budget, "calibration": calibration, "holdout": holdout}
    try:
        model_c, report = compress(model, args.recipe, example, progress=not args.quiet, **kwargs)
    except ValueError as e:  # pk.compress's errors about what it was given
        raise UsageError(one_line(e)) from None
    print(report)
    save(model_c, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)", file=sys.stderr)
    if args.plot:
        report.plot(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _add_compress_parser(sub: Any) -> None:
    p = sub.add_parser("compress", help="compress a model directory or a torch.save'd model")
    p.add_argument(
        "path",
        help="a Hugging Face model directory, or a torch.save'd nn.Module (needs --trust-pickle)",
    )
    p.add_argument(
        "--recipe",
        required=True,
        help="e.g. 'int8', 'prune:0.3+int8', 'int8@encoder.layer.0', or 'auto' (with --budget)",
    )
    p.add_argument(
        "--budget",
        help="for --recipe auto: cosine=0.99 and/or rel_error=X, recover_minutes=M "
        "(default cosine=0.99), checked on held-out passages",
    )
    p.add_argument(
        "--minimize",
        default="latency",
        help="for --recipe auto: latency, bytes, or weights like latency=1,bytes=0.5",
    )
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    inputs = p.add_mutually_exclusive_group()
    inputs.add_argument("--example", help="a torch.save'd example input (tensor, tuple or dict)")
    inputs.add_argument(
        "--input-shape", help="random float example input of this shape, e.g. 1,3,224,224"
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow model and example files that unpickle arbitrary objects (a whole "
        "torch.save'd module): loading them runs code from the file",
    )
    p.add_argument("--threads", type=positive_int, help="threads for torch and pykernels")
    p.add_argument("--plot", metavar="PATH.png", help="write the report's chart (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_compress)


def _bench_families() -> tuple[str, ...]:
    from .bench import FAMILIES

    return FAMILIES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pykernels")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_info = sub.add_parser("info", help="what was built and which backend each family uses")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_info.set_defaults(fn=_info)
    p_bench = sub.add_parser("bench", help="each family against its peers, with ratios")
    p_bench.add_argument(
        "--family",
        action="append",
        choices=list(_bench_families()),
        help="repeatable",
    )
    p_bench.add_argument(
        "--case",
        action="append",
        metavar="TEXT",
        help="only the cases whose name contains TEXT (repeatable), e.g. 'gated'",
    )
    p_bench.add_argument("--device", choices=["cpu", "cuda"])
    p_bench.add_argument("--quick", action="store_true", help="smaller shapes, fewer repeats")
    p_bench.add_argument("--threads", type=positive_int, help="threads for torch and pykernels")
    p_bench.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p_bench.add_argument("--plot", metavar="PATH.png", help="write a chart (needs matplotlib)")
    p_bench.add_argument(
        "--isa",
        action="append",
        metavar="TIER",
        help="CPU tiers to run, each in a child process with ours and the peers capped "
        "together: avx2, avx512, amx (x86-64), neon, dotprod, i8mm (aarch64) or native "
        "(comma-separated or repeated); a tier this CPU cannot run is skipped, saying so",
    )
    p_bench.set_defaults(fn=_bench)
    from .compress.demo import add_parsers as _add_demo_parser

    _add_demo_parser(sub)
    _add_compress_parser(sub)
    from .comm._flower_demo import add_parser as _add_federated_parser

    _add_federated_parser(sub)  # federated (needs flwr when run, not to parse)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as e:
        print(f"{parser.prog} {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
