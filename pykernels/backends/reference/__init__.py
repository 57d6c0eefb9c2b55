"""Reference implementations: the test oracle and the backend of last resort.

Written for clarity, not speed, and independently of the kernels: a full
stable sort instead of a selection, torch's own dtype conversions instead of
the kernels' bit manipulation. Same buffer signatures as the native family
(raw bits in NumPy arrays), so every backend is called the same way. One
module per family; this package also exposes every name flat (the old
``pykernels._reference``), layout helpers included.
"""

from ..._layout import (
    BITS_DTYPE,
    DTYPE_CODES,
    TORCH_DTYPE,
    cluster_code_offsets,
    int8_unpack_weight,
    packed_offsets,
    packed_shape,
    tensor_bits,
)
from ._bits import (
    INF_BITS,
    MAX_BITS,
    bits_to_float32,
    float32_to_bits,
    float32_to_bits_saturating,
)
from .cluster import cluster_linear, cluster_unpack_codes
from .int8 import (
    int8_gemm,
    int8_linear,
    int8_pack_weight,
    int8_weight_linear,
    quantize_per_row,
    quantize_rows_tensor,
)
from .qat import fake_quant_backward, fake_quant_per_row
from .quant import (
    QUANT_LIMIT,
    dequantize_buckets,
    pack_bits,
    pack_codes,
    quant_noise,
    quantize_buckets,
    splitmix64,
    unpack_bits,
    unpack_codes,
)
from .sparse import sparse_linear, sparse_linear_backward
from .topk import KEY_MASK, topk_densify, topk_order, topk_sparsify, topk_sparsify_tensor

__all__ = [
    "BITS_DTYPE",
    "DTYPE_CODES",
    "INF_BITS",
    "KEY_MASK",
    "MAX_BITS",
    "QUANT_LIMIT",
    "TORCH_DTYPE",
    "bits_to_float32",
    "cluster_code_offsets",
    "cluster_linear",
    "cluster_unpack_codes",
    "dequantize_buckets",
    "fake_quant_backward",
    "fake_quant_per_row",
    "float32_to_bits",
    "float32_to_bits_saturating",
    "int8_gemm",
    "int8_linear",
    "int8_pack_weight",
    "int8_unpack_weight",
    "int8_weight_linear",
    "pack_bits",
    "pack_codes",
    "packed_offsets",
    "packed_shape",
    "quant_noise",
    "quantize_buckets",
    "quantize_per_row",
    "quantize_rows_tensor",
    "sparse_linear",
    "sparse_linear_backward",
    "splitmix64",
    "tensor_bits",
    "topk_densify",
    "topk_order",
    "topk_sparsify",
    "topk_sparsify_tensor",
    "unpack_bits",
    "unpack_codes",
]
