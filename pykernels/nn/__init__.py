"""Drop-in compressed layers."""

from ._module import nbytes_of
from .cluster import ClusteredLinear
from .cp import CPConv2d
from .embedding import Int4Embedding, Int8Embedding
from .encoder import EncoderBlock, fuse_encoder_block
from .int4 import Int4Linear
from .int8 import Int8Linear, quantize_int8
from .mlp import Int8GatedMLP, fuse_gated_mlp
from .qat import QATLinear
from .sparse import SparseLinear, sparsify
from .svd import LowRankLinear, TuckerConv2d, factorize

__all__ = [
    "CPConv2d",
    "ClusteredLinear",
    "EncoderBlock",
    "Int4Embedding",
    "Int4Linear",
    "Int8Embedding",
    "Int8GatedMLP",
    "Int8Linear",
    "LowRankLinear",
    "QATLinear",
    "SparseLinear",
    "TuckerConv2d",
    "factorize",
    "fuse_encoder_block",
    "fuse_gated_mlp",
    "nbytes_of",
    "quantize_int8",
    "sparsify",
]
