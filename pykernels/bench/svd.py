"""svd family against torch (PERFORMANCE.md shapes).

* ``rsvd m x n r=..``: ``pk.ops.randomized_svd`` (defaults) vs
  ``torch.svd_lowrank(q=r+10)`` (niter=2, truncated to r), and sklearn's
  ``randomized_svd`` when scikit-learn is installed. The matrix has a known
  spectrum (s_i = i^-0.5 + 0.05: slow decay, the hard case), so each impl's
  name carries its error over the optimal rank-r error.
* ``svd_rank``: rank for 10% relative error vs a full ``torch.linalg.svd``.
* ``batched_svd``: [1024, 64, 64] and [16, 256, 256] vs ``torch.linalg.svd``.
* ``LowRankLinear``: 4096 x 4096 at rank 512 (25% of the parameters), M = 32,
  vs the dense layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn.svd import LowRankLinear
from ..ops import svd as ops_svd
from . import Case, inference


def _with_spectrum(m: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5 + 0.05
    return (u * s) @ v.T, s


def _ratio(a, u, s, vh, opt) -> float:
    return float(torch.linalg.norm(a - (u * s) @ vh)) / opt


def _rsvd_case(a, s_true, r, reps) -> Case:
    opt = ops_svd.optimal_error(s_true, r)

    def torch_lowrank():
        u, s, v = torch.svd_lowrank(a, q=r + 10, niter=2)
        return u[:, :r], s[:r], v[:, :r].T

    def pk_rsvd():
        return ops_svd.randomized_svd(a, r)

    impls = {
        f"torch.svd_lowrank (err {_ratio(a, *torch_lowrank(), opt):.4f}x)": torch_lowrank,
        f"pk randomized_svd (err {_ratio(a, *pk_rsvd(), opt):.4f}x)": pk_rsvd,
    }
    try:
        from sklearn.utils.extmath import randomized_svd as sk_rsvd

        an = a.numpy()

        def sklearn():
            u, s, vh = sk_rsvd(an, r, random_state=0)
            return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)

        impls[f"sklearn randomized_svd (err {_ratio(a, *sklearn(), opt):.4f}x)"] = sklearn
    except ImportError:
        pass
    m, n = a.shape
    return Case(
        family="svd",
        name=f"rsvd {m}x{n} r={r}",
        device="cpu",
        impls=impls,
        baseline=next(iter(impls)),
        reps=reps,
    )


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []  # no CUDA svd kernels yet
    gen = torch.Generator().manual_seed(0)
    reps = 3 if quick else 5
    out = []
    shapes = [(768, 3072)] if quick else [(768, 3072), (4096, 4096)]
    for m, n in shapes:
        a, s_true = _with_spectrum(m, n, gen)
        for r in (32, 128) if quick else (32, 128, 256):
            out.append(_rsvd_case(a, s_true, r, reps))
    # svd_rank: a spectrum that decays, so the answer is a small rank.
    k = 1024
    u, _ = torch.linalg.qr(torch.randn(k, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=gen))
    s = torch.exp(-torch.arange(k, dtype=torch.float32) / 40)
    b = (u * s) @ v.T
    r_pk = ops_svd.svd_rank(b, tol=0.1)[0]
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
        )
    )
    for shape in ((1024, 64, 64),) if quick else ((1024, 64, 64), (16, 256, 256)):
        x = torch.randn(*shape, generator=gen)
        out.append(
            Case(
                family="svd",
                name=f"batched_svd {list(shape)}",
                device="cpu",
                impls={
                    "torch.linalg.svd": lambda x=x: torch.linalg.svd(x, full_matrices=False),
                    "pk batched_svd": lambda x=x: ops_svd.batched_svd(x),
                },
                baseline="torch.linalg.svd",
                reps=3,
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


__all__ = ["cases"]
