"""sparse reference: sums over stored entries in float64."""

from __future__ import annotations

import torch


def sparse_linear(
    x: torch.Tensor,
    row_ptr: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    n: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x @ W.T + bias in float64 over W's stored entries only (CSR); float32 out.

    Summing stored entries, not a dense product, so a NaN in x reaches only
    the outputs whose rows store that column, as in the kernels.
    """
    rows = torch.repeat_interleave(torch.arange(n, device=x.device), row_ptr[1:] - row_ptr[:-1])
    terms = x.double()[:, cols] * values.double()[None, :]
    y = torch.zeros(x.shape[0], n, dtype=torch.float64, device=x.device)
    y.index_add_(1, rows, terms)
    if bias is not None:
        y = y + bias.double()
    return y.float()


def sparse_linear_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w_dense: torch.Tensor,
    row_ptr: torch.Tensor,
    cols: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dvalues) in float64: dense autograd restricted to the stored entries."""
    dx = dy.double() @ w_dense.double()
    rows = torch.repeat_interleave(
        torch.arange(w_dense.shape[0], device=dy.device), row_ptr[1:] - row_ptr[:-1]
    )
    dv = (dy.double().T @ x.double())[rows, cols]
    return dx.float(), dv.float()
