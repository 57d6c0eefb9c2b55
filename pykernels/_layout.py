"""Data layouts shared by every backend and by the ops: the dtype codes the
kernels take, raw-bit views of float tensors, and where each weight element
lives in the packed int8 and clustered layouts.

One table of dtype codes for the whole package (``csrc/common/dtype.h`` is its
C++ twin; the wire format's header uses the same codes). These helpers are not
the test oracle: the real ops depend on them, so they live apart from
``backends/reference``.
"""

from __future__ import annotations

import numpy as np
import torch

# dtype codes shared with csrc/common/dtype.h and the wire format
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
TORCH_DTYPE = {v: k for k, v in DTYPE_CODES.items()}
# The float dtypes the kernels take as raw bits (code -> NumPy view dtype).
BITS_DTYPE = {0: np.uint32, 1: np.uint16, 2: np.uint16}


def tensor_bits(t: torch.Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a contiguous CPU float tensor's raw bits."""
    if t.dtype == torch.float32:
        return t.view(torch.int32).numpy().view(np.uint32)
    return t.view(torch.int16).numpy().view(np.uint16)


def packed_shape(n: int, k: int) -> tuple[int, int]:
    """(N, K) padded as the packed weight layout pads them (16 and 4)."""
    return -(-n // 16) * 16, -(-k // 4) * 4


def packed_offsets(n: int, k: int) -> np.ndarray:
    """Byte offset of w[n, k] in the packed "k4n16" layout (csrc/int8/int8.h)."""
    np_, kp = packed_shape(n, k)
    rows = np.arange(n, dtype=np.int64)
    cols = np.arange(k, dtype=np.int64)
    panel, lane = rows // 16, rows % 16
    block, j = panel // 4, panel % 4
    nv = np.minimum(4, np_ // 16 - 4 * block)
    row_part = 64 * block * kp + 64 * j + 4 * lane
    return row_part[:, None] + 64 * (cols[None, :] // 4) * nv[:, None] + cols[None, :] % 4


def int8_unpack_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The int8 [N, K] weight back from its packed form, on packed's device."""
    off = torch.from_numpy(packed_offsets(n, k)).to(packed.device)
    return packed.reshape(-1)[off.reshape(-1)].view(n, k)


def cluster_code_offsets(k: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(byte, shift) of the code of column k in a row of packed codes
    (layout in csrc/cluster/cluster.h), by index arithmetic."""
    cols = np.arange(k, dtype=np.int64)
    if bits == 8:
        return cols, np.zeros(k, dtype=np.int64)
    j = (cols % 128) // 16
    return 64 * (cols // 128) + 4 * (cols % 16) + j // 2, 4 * (j % 2)
