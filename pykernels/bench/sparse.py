"""Sparse weights against dense and torch.sparse (PERFORMANCE.md: W 4096 x 4096, Y = X W^T).

* ``unstructured M=.. s=..``: ``pk.nn.SparseLinear`` forward vs dense fp32
  ``F.linear`` (the baseline) and ``torch.sparse.mm(W_csr, X.T)`` on the same
  magnitude-pruned weight, for M in {1, 32, 256} and sparsity in {0.5, 0.8,
  0.9, 0.95, 0.99}; also ``scipy.sparse.csr_matrix`` when scipy is installed.
* ``rotated x4 M=.. s=0.9``: the same, each call on the next of four copies
  of every weight, as a model's many layers would: at 90% the sparse weights
  (10 MB ours, 20 MB torch CSR) fit the last-level cache when one layer is
  called over and over, the dense one (64 MB) does not.
* ``block M=.. s=0.9``: 4x4 blocks, vs ``torch.sparse_bsr`` on the same blocks
  (vs dense where this torch cannot multiply BSR on the CPU: builds without
  MKL, torch's aarch64 wheels among them).
* ``train M=.. s=0.9``: forward + backward (dX and the weight gradient) of
  the 90% layer vs the dense ``nn.Linear``; ``train block``: the same for
  the 4x4-block layer.

:func:`summary` gives the break-even sparsity against dense for each M.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from ..nn.sparse import SparseLinear
from ..ops import sparse as sp
from . import Case, Result, inference

N = K = 4096
MS = (1, 32, 256)
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.99)


def _train_step(layer, x):
    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).sum().backward()

    return run


def _rotating(fn, copies):
    """fn(copy) on the next copy at each call."""
    state = {"i": 0}

    def run():
        state["i"] = (state["i"] + 1) % len(copies)
        return fn(copies[state["i"]])

    return run


def _scipy_impl(w: torch.Tensor, x: torch.Tensor) -> dict:
    """scipy.sparse.csr_matrix @ X.T when scipy is installed (an optional peer)."""
    try:
        import scipy.sparse
    except ImportError:
        return {}
    w_sp = scipy.sparse.csr_matrix(w.numpy())
    xt = x.numpy().T
    return {"scipy csr_matrix": lambda: w_sp @ xt}


def torch_bsr_runs() -> bool:
    """Whether this torch multiplies a BSR matrix by a dense one on the CPU: builds
    without MKL (torch's aarch64 wheels) raise "not implemented ... without MKL"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = torch.eye(4).to_sparse_bsr((2, 2))
        try:
            torch.sparse.mm(w, torch.ones(4, 1))
        except RuntimeError:
            return False
    return True


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []  # no CUDA sparse kernels yet
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=gen) * 0.02)
    ms = (1, 32) if quick else MS
    sparsities = (0.9,) if quick else SPARSITIES
    reps = 3 if quick else 7
    out = []
    for s in sparsities:
        layer = SparseLinear.from_linear(lin, s)
        w = layer.to_dense()
        w_csr = w.to_sparse_csr()
        for m in ms:
            x = torch.randn(m, K, generator=gen)
            out.append(
                Case(
                    family="sparse",
                    name=f"unstructured M={m} s={s}",
                    device=device,
                    impls={
                        "dense F.linear": inference(lambda x=x, w=w: F.linear(x, w, lin.bias)),
                        "torch.sparse_csr": inference(
                            lambda x=x, w_csr=w_csr: torch.sparse.mm(w_csr, x.T)
                        ),
                        **_scipy_impl(w, x),
                        "pk SparseLinear": inference(lambda x=x, layer=layer: layer(x)),
                    },
                    baseline="dense F.linear",
                    reps=reps,
                    notes={"nbytes": str(layer.nbytes()), "dense_nbytes": str(4 * N * K + 4 * N)},
                )
            )
    copies = 4
    layers = [SparseLinear.from_linear(lin, 0.9) for _ in range(copies)]
    dense = [layer.to_dense() for layer in layers]
    csrs = [w.to_sparse_csr() for w in dense]
    for m in (1,) if quick else (1, 32):
        x = torch.randn(m, K, generator=gen)
        out.append(
            Case(
                family="sparse",
                name=f"rotated x{copies} M={m} s=0.9",
                device=device,
                impls={
                    "dense F.linear": inference(
                        _rotating(lambda w, x=x: F.linear(x, w, lin.bias), dense)
                    ),
                    "torch.sparse_csr": inference(
                        _rotating(lambda w, x=x: torch.sparse.mm(w, x.T), csrs)
                    ),
                    "pk SparseLinear": inference(_rotating(lambda layer, x=x: layer(x), layers)),
                },
                baseline="dense F.linear",
                reps=4 * reps,
            )
        )
    block = SparseLinear.from_linear(lin, 0.9, "block")
    wb = block.to_dense()
    w_bsr = wb.to_sparse_bsr((sp.BLOCK, sp.BLOCK))
    bsr = torch_bsr_runs()
    for m in ms:
        x = torch.randn(m, K, generator=gen)
        bsr_impl = {"torch.sparse_bsr": inference(lambda x=x: torch.sparse.mm(w_bsr, x.T))}
        out.append(
            Case(
                family="sparse",
                name=f"block M={m} s=0.9",
                device=device,
                impls={
                    "dense F.linear": inference(lambda x=x: F.linear(x, wb, lin.bias)),
                    **(bsr_impl if bsr else {}),
                    "pk SparseLinear block": inference(lambda x=x: block(x)),
                },
                baseline="torch.sparse_bsr" if bsr else "dense F.linear",
                reps=reps,
            )
        )
    train_layer = SparseLinear.from_linear(lin, 0.9)
    train_block = SparseLinear.from_linear(lin, 0.9, "block")
    for m in (32,) if quick else (32, 256):
        x = torch.randn(m, K, generator=gen, requires_grad=True)
        for kind, layer in (("", train_layer), ("block ", train_block)):
            out.append(
                Case(
                    family="sparse",
                    name=f"train {kind}fwd+bwd M={m} s=0.9",
                    device=device,
                    impls={
                        "dense nn.Linear": _train_step(lin, x),
                        "pk SparseLinear": _train_step(layer, x),
                    },
                    baseline="dense nn.Linear",
                    reps=reps,
                )
            )
    return out


def _speedups(results: list[Result]) -> dict[int, list[tuple[float, float]]]:
    """M -> [(sparsity, pk speedup over dense)] from the unstructured cases."""
    out: dict[int, list[tuple[float, float]]] = {}
    for r in results:
        if r.family == "sparse" and r.case.startswith("unstructured") and r.impl.startswith("pk"):
            m = int(r.case.split("M=")[1].split()[0])
            s = float(r.case.split("s=")[1])
            out.setdefault(m, []).append((s, r.speedup))
    return {m: sorted(v) for m, v in out.items()}


def break_even(points: list[tuple[float, float]]) -> str:
    """Sparsity where pk matches dense, interpolated on log speedup between grid points."""
    if not points:
        return "n/a"
    if points[0][1] >= 1.0:
        return f"<= {points[0][0]}"
    for (s0, r0), (s1, r1) in zip(points, points[1:], strict=False):
        if r0 < 1.0 <= r1:
            t = -math.log(r0) / (math.log(r1) - math.log(r0))
            return f"{s0 + t * (s1 - s0):.2f}"
    return f"> {points[-1][0]}"


def summary(results: list[Result]) -> str:
    lines = ["sparse break-even sparsity vs dense fp32 F.linear (W 4096 x 4096):"]
    for m, pts in _speedups(results).items():
        lines.append(f"  M={m}: {break_even(pts)}")
    return "\n".join(lines)


def plot(path: str, results: list[Result]) -> None:
    """Speedup over dense against sparsity, one line per M (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, pts in _speedups(results).items():
        ax.plot([s for s, _ in pts], [r for _, r in pts], marker="o", label=f"M={m}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("speedup over dense F.linear")
    ax.set_title("pk SparseLinear, W 4096x4096 fp32, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
