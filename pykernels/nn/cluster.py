"""ClusteredLinear: weight sharing (clustering) for ``nn.Linear``, trainable centroids."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import _checks
from ..ops import cluster as oc
from ._module import nbytes_of

MIN_CLUSTERS, MAX_CLUSTERS = 2, 256
MODES = ("dynamic", "weight_only")


class ClusteredLinear(nn.Module):
    """``y = x @ W.T + b`` with each weight an index into a small codebook.

    ``per="row"``: each output channel has its own codebook of ``n_clusters``
    centroids; ``per="layer"``: one codebook for the whole weight. The codes
    are packed 4 bits each for up to 16 clusters, 8 bits up to 256, and the
    forward (:func:`pykernels.ops.cluster_linear`) reads them and the
    codebooks directly, never forming the dense weight. Build it with
    :meth:`from_linear`.

    ``mode="dynamic"`` quantizes each row of x and each codebook to int8 on
    the fly and sums exactly in int32 (as :class:`Int8Linear`'s dynamic mode,
    reading half its weight bytes); ``mode="weight_only"`` keeps x in float32
    and computes with the centroids as they are (the exact product with
    :meth:`dequantized_weight`).

    The centroids (``codebook``, float32 ``[N or 1, C]``) and the bias are
    parameters: their gradient is the sum of dL/dW over each cluster's
    members, so fine-tuning moves the centroids and keeps every weight in
    its cluster (cluster-preserving training, as TF-MOT's). ``codes`` is a
    uint8 buffer in the packed layout, which does not depend on the CPU, and
    ``state_dict`` stores it as it is.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n_clusters: int = 16,
        per: str = "row",
        bias: bool = True,
        mode: str = "dynamic",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        fn = "ClusteredLinear"
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            _checks.check_int(fn, name, v, 0)
        n_clusters = _checks.check_int(fn, "n_clusters", n_clusters, MIN_CLUSTERS, MAX_CLUSTERS)
        if per not in oc.PER:
            raise ValueError(f"{fn}: per must be 'row' or 'layer', got {per!r}")
        bias = _checks.check_bool(fn, "bias", bias)
        if mode not in MODES:
            raise ValueError(f"{fn}: mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.n_clusters, self.per = n_clusters, per
        self.bits = oc.bits_for(n_clusters)
        rows = out_features if per == "row" else 1
        row_bytes = oc.code_row_bytes(in_features, self.bits)
        self.register_buffer(
            "codes", torch.zeros(out_features, row_bytes, dtype=torch.uint8, device=device)
        )
        self.codebook = nn.Parameter(torch.zeros(rows, n_clusters, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        n_clusters: int = 16,
        per: str = "row",
        iters: int = 8,
        mode: str = "dynamic",
    ) -> ClusteredLinear:
        """Clusters ``linear``'s weight by 1-D k-means (:func:`pykernels.ops.kmeans_cluster`:
        centroids spaced linearly over each row's, or the layer's, range, then
        ``iters`` Lloyd steps). The bias is kept. ``linear`` is not modified."""
        fn = "ClusteredLinear.from_linear"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{fn}: linear must be an nn.Linear, got {type(linear).__name__}")
        n_clusters = _checks.check_int(fn, "n_clusters", n_clusters, MIN_CLUSTERS, MAX_CLUSTERS)
        if per not in oc.PER:
            raise ValueError(f"{fn}: per must be 'row' or 'layer', got {per!r}")
        w = linear.weight.detach()
        if not w.is_floating_point() or w.device.type == "meta":
            raise ValueError(
                f"{fn}: linear.weight must be a float tensor with data, got {w.dtype} on {w.device}"
            )
        if not torch.isfinite(w).all():
            raise ValueError(f"{fn}: linear.weight holds NaN or inf")
        layer = cls(
            linear.in_features,
            linear.out_features,
            n_clusters,
            per,
            bias=linear.bias is not None,
            mode=mode,
            device=w.device,
        )
        idx, cb = ops.kmeans_cluster(w.float(), n_clusters, per, iters)
        with torch.no_grad():
            layer.codes.copy_(ops.pack_cluster_codes(idx, layer.bits))
            layer.codebook.copy_(cb)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().float())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return ops.cluster_linear(
            x,
            self.codes,
            self.codebook,
            self.bias,
            bits=self.bits,
            k=self.in_features,
            dynamic=self.mode == "dynamic",
        )

    def weight_codes(self) -> Tensor:
        """The cluster index of each weight, int64 ``[N, K]``."""
        return ops.unpack_cluster_codes(self.codes, self.in_features, self.bits)

    def dequantized_weight(self) -> Tensor:
        """The float32 ``[N, K]`` weight this layer computes with."""
        return ops.cluster_weight(self.codes, self.codebook, self.in_features, self.bits)

    def nbytes(self) -> int:
        """Bytes held: packed codes, codebooks, bias."""
        return nbytes_of(self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, n_clusters={self.n_clusters}, per={self.per}, "
            f"mode={self.mode}, "
            f"codes={self.bits}-bit, nbytes={self.nbytes()}"
        )

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A code past the codebook is refused now, with the key named, rather than
        # at the first forward.
        codes = state_dict.get(prefix + "codes")
        codebook = state_dict.get(prefix + "codebook", self.codebook)
        if (
            isinstance(codes, Tensor)
            and isinstance(codebook, Tensor)
            and codes.dtype == torch.uint8
            and codes.shape == self.codes.shape
            and codebook.dim() == 2
            and _checks.has_data(codes)
            and codes.numel()
            and codebook.shape[1] < 2**self.bits
            and not oc._codes_fit(codes, self.in_features, self.bits, codebook.shape[1])
        ):
            raise ValueError(
                f"ClusteredLinear.load_state_dict: state_dict[{prefix + 'codes'!r}] names "
                f"entries past the codebook's {codebook.shape[1]}"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        # .half() / .to(dtype) convert float parameters; the kernels read
        # float32 codebooks (the bias is widened per call anyway).
        if self.codebook.dtype != torch.float32:
            self.codebook = nn.Parameter(
                self.codebook.detach().float(), requires_grad=self.codebook.requires_grad
            )
        return self
