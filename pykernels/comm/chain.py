"""Chain: a sparsifier whose kept values are quantized again.

It owns no payload kind: it makes TopK payloads whose values are a nested
quantize payload (TopK's ``value_codec`` 1), which TopK writes, reads,
decodes and sums.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .base import Codec, _key, decode, to_dtype
from .quantize import Quantize
from .topk import TopK
from .wire import Payload


class Chain(Codec):
    """A sparsifier whose kept values are compressed again: ``Chain(TopK(0.01), Quantize(8))``.

    The first codec must be :class:`TopK`, the second a :class:`Quantize`
    without error feedback of its own: with the first's error feedback on,
    the quantization error of the sent values goes into its residual too,
    measured against what decode returns in the tensor's dtype. A step whose
    input holds NaN or inf leaves the residual as it was (see TopK); its
    values' bucket then decodes to NaN.
    """

    name = "chain"
    dtypes = TopK.dtypes

    def __init__(self, first: Codec, second: Codec) -> None:
        super().__init__()
        if not isinstance(first, TopK):
            raise TypeError(f"Chain: first must be a TopK codec, got {type(first).__name__}")
        if not isinstance(second, Quantize):
            raise TypeError(f"Chain: second must be a Quantize codec, got {type(second).__name__}")
        if second.error_feedback:
            raise ValueError(
                "Chain: the second codec must not keep its own error feedback (the kept "
                "entries change every call); the first codec's error feedback covers its error"
            )
        self.first, self.second = first, second

    def __repr__(self) -> str:
        return f"Chain({self.first!r}, {self.second!r})"

    @property
    def stateful(self) -> bool:
        return self.first.stateful or self.second.stateful

    @property
    def keeps_tensor_state(self) -> bool:
        return self.first.keeps_tensor_state or self.second.keeps_tensor_state

    def residual_codec(self) -> Codec | None:
        return self.first.residual_codec()

    @property
    def noise_seed(self) -> int | None:
        return self.second.noise_seed

    @noise_seed.setter
    def noise_seed(self, seed: int) -> None:
        self.second.noise_seed = seed

    def encode(self, tensor: Tensor, key: str | None = None, seed: int | None = None) -> Payload:
        """TopK's entries of ``tensor``, their values quantized (``seed``: see Quantize.encode)."""
        t = self.first._check_tensor(tensor)
        key = _key(key)
        values, idx, r = self.first._select(t, key)
        q = self.second.encode(values, key=key, seed=seed)
        nested = Payload("quantize", torch.float32, (values.numel(),), q.params, q.parts)
        if r is not None and values.numel():
            # Measured against what decode returns, in the tensor's dtype (not the
            # fp32 dequantized values): fp16 and bf16 lose no rounding per step.
            sent = to_dtype(decode(nested), t.dtype).float()
            diff = values.float() - sent
            diff = torch.where(torch.isfinite(diff), diff, torch.zeros_like(diff))
            r.view(-1).index_add_(0, idx, diff)
        params = {
            "k": int(idx.numel()),
            "value_dtype": torch.float32,
            "approx": self.first.approx,
            "error_feedback": r is not None,
        }
        return Payload("topk", t.dtype, tuple(t.shape), params, {"indices": idx, "values": nested})

    def take_back(self, payload: Payload, key: str | None = None) -> None:
        self.first.take_back(payload, key)

    def state_dict(self) -> dict[str, Tensor]:
        sd = {f"first.{k}": v for k, v in self.first.state_dict().items()}
        sd.update({f"second.{k}": v for k, v in self.second.state_dict().items()})
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                "Chain.load_state_dict: state_dict must be a mapping of 'first.<key>/<field>' "
                f"and 'second.<key>/<field>' to tensors, got {type(state_dict).__name__}"
            )
        parts: dict[str, dict[str, Tensor]] = {"first": {}, "second": {}}
        for name, t in state_dict.items():
            head, _, rest = str(name).partition(".")
            if head not in parts:
                raise ValueError(
                    f"Chain.load_state_dict: entry {name!r} starts with neither 'first.' "
                    "nor 'second.'"
                )
            parts[head][rest] = t
        kept = self.first._state
        for head, codec in (("first", self.first), ("second", self.second)):
            try:
                codec.load_state_dict(parts[head])
            except (TypeError, ValueError) as e:
                self.first._state = kept  # all or nothing, as for any codec
                raise type(e)(f"Chain.load_state_dict: the entries under '{head}.': {e}") from None

    def reset(self, key: str | None = None) -> None:
        self.first.reset(key)
        self.second.reset(key)

    def keys(self) -> list[str]:
        return list(dict.fromkeys(self.first.keys() + self.second.keys()))

    def check(self, dtype: torch.dtype, device: torch.device | str) -> None:
        self.first.check(dtype, device)
