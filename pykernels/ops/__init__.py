"""The functional API, one module per kernel family."""

from .attention import attention, padding_mask_to_lengths
from .cluster import (
    cluster_linear,
    cluster_weight,
    kmeans_cluster,
    pack_cluster_codes,
    unpack_cluster_codes,
)
from .int4 import int4_dequantize_weight, int4_linear, int4_quantize_weight
from .int8 import (
    Int8GatedWeight,
    Int8PackedWeight,
    int8_gemm,
    int8_linear,
    int8_linear_gated,
    int8_linear_prequantized,
    int8_linear_quantized_out,
    int8_weight_linear,
    pack_int8_gated_weight,
    pack_int8_weight,
    quantize_per_row,
    unpack_int8_weight,
)
from .qat import fake_quantize_per_row
from .quant import dequantize_buckets, quantize_buckets
from .sparse import SparseWeight, prune, sparse_linear, to_dense, to_sparse
from .svd import batched_svd, randomized_svd, svd_rank
from .topk import topk_densify, topk_sparsify

__all__ = [
    "attention",
    "Int8GatedWeight",
    "Int8PackedWeight",
    "batched_svd",
    "cluster_linear",
    "cluster_weight",
    "fake_quantize_per_row",
    "dequantize_buckets",
    "int4_dequantize_weight",
    "int4_linear",
    "int4_quantize_weight",
    "int8_gemm",
    "int8_linear",
    "int8_linear_gated",
    "int8_linear_prequantized",
    "int8_linear_quantized_out",
    "int8_weight_linear",
    "kmeans_cluster",
    "pack_cluster_codes",
    "pack_int8_gated_weight",
    "pack_int8_weight",
    "padding_mask_to_lengths",
    "prune",
    "quantize_buckets",
    "quantize_per_row",
    "randomized_svd",
    "SparseWeight",
    "sparse_linear",
    "svd_rank",
    "to_dense",
    "to_sparse",
    "topk_densify",
    "topk_sparsify",
    "unpack_cluster_codes",
    "unpack_int8_weight",
]
