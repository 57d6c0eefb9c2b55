"""Decoder language models: prefill and decode tokens/s of a Llama-shaped causal LM,
compressed by pykernels, against the float model and torch's own CPU int4 kernel.

The model is a ``transformers.LlamaForCausalLM`` with random weights (seed 0; no
decoder checkpoint ships offline): hidden 2048, intermediate 5632, 8 layers, 32
heads, vocab 32000, about 0.54 B parameters (``--quick``: hidden 512, 4 layers,
vocab 8000). Random weights cost nothing in speed: every row reads the same bytes
and runs the same operations as a trained model of this shape would.

Rows (each a whole model, greedy, batch 1):

- ``fp32`` and ``bf16``: the float model (``bf16`` is the baseline ratios divide by);
- ``aten int4 (bf16)``: every Linear (lm_head too) packed by
  ``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` and run by
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on bf16 activations, group 128,
  asymmetric: :class:`AtenInt4Linear`, the peer a torch user has without torchao;
- ``pk int8`` (dynamic W8A8), ``pk int8 weight_only`` (W8A16) and, where the
  ``int4`` step exists, ``pk int4`` (mode ``auto``: weight-only at decode, W4A8 at prefill)
  and ``pk int4 weight_only`` (g128): ``pk``'s
  recipes on the fp32 model, lm_head included, as ``pk.compress`` does.

Cases: ``prefill 1x128`` (one forward over a 128-token prompt, logits of the last
position only, as ``generate`` computes them) and ``decode <n> tokens @<ctx>`` (n greedy
steps through the KV cache after a ctx-token prompt; the cache is cropped back
before each timed call), each timed in alternating rounds (every row once per round,
median of 5) so that all rows see the same phases of a shared host.
:func:`summary` gives tokens/s for each and the greedy tokens of each compressed row
against fp32's (with random weights the logits are nearly flat, so agreement is
expected to be poor: it measures nothing about a trained model).

:func:`tiny_decoder` and :func:`greedy_no_cache` serve the tests and the demo.
"""

from __future__ import annotations

import copy
import gc
import sys
from typing import Any

import torch
from torch import Tensor, nn

from . import Case, inference

ARCHS = ("llama", "gpt2")
BASELINE = "bf16"
PEER = "aten int4 (bf16)"
# per case name: lines for summary() (it gets the results only)
_NOTES: dict[str, list[str]] = {}
_TOKENS: dict[str, int] = {}  # tokens each case's timed call produces or reads


def _transformers():
    try:
        import transformers
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    return transformers


def tiny_decoder(arch: str, seed: int | None = None) -> nn.Module:
    """A small random-weight causal LM in eval mode: ``"llama"`` (grouped-query
    attention, gated SiLU MLP, RMSNorm, untied lm_head) or ``"gpt2"`` (Conv1D
    projections, lm_head tied to the token embedding). Vocab 256, hidden 64, 2
    layers: fast enough for tests. ``seed`` reseeds torch first when given."""
    transformers = _transformers()
    if transformers is None:
        raise ImportError("tiny_decoder needs transformers: pip install transformers")
    if seed is not None:
        torch.manual_seed(seed)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_id=2,
        )
        return transformers.LlamaForCausalLM(cfg).eval()
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=256,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=1,
            eos_token_id=2,
        )
        return transformers.GPT2LMHeadModel(cfg).eval()
    raise ValueError(f"tiny_decoder: arch must be one of {ARCHS}, got {arch!r}")


def llama(quick: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The benchmark's Llama-shaped decoder with random weights (see the module doc)."""
    transformers = _transformers()
    if transformers is None:
        raise ImportError("llama needs transformers: pip install transformers")
    torch.manual_seed(seed)
    if quick:
        size = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4)
        size.update(num_attention_heads=8, vocab_size=8000)
    else:
        size = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8)
        size.update(num_attention_heads=32, vocab_size=32000)
    cfg = transformers.LlamaConfig(
        **size, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, dtype=dtype
    )
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def greedy_no_cache(model: nn.Module, input_ids: Tensor, max_new_tokens: int) -> Tensor:
    """``max_new_tokens`` greedy tokens of a causal LM, each from a full forward over the
    whole sequence without a KV cache: what ``model.generate(..., do_sample=False,
    min_new_tokens=max_new_tokens)`` must reproduce through its cache (the
    end-of-sequence token barred, as there). Returns the new tokens [batch,
    max_new_tokens]."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"greedy_no_cache: input_ids must be a Tensor, got {type(input_ids)}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.is_floating_point():
        raise ValueError(
            f"greedy_no_cache: input_ids must be integer [batch, length >= 1], got "
            f"{input_ids.dtype} {list(input_ids.shape)}"
        )
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ValueError(
            f"greedy_no_cache: max_new_tokens must be an int >= 0, got {max_new_tokens!r}"
        )
    ids = input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = _bar_eos(model, model(input_ids=ids, use_cache=False).logits[:, -1].float())
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, input_ids.shape[1] :]


def _bar_eos(model: nn.Module, logits: Tensor) -> Tensor:
    """``logits`` with the model's end-of-sequence token(s) at -inf, as
    ``generate(min_new_tokens=n)`` treats them for its first n tokens."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for t in [] if eos is None else [eos] if isinstance(eos, int) else eos:
        if 0 <= t < logits.shape[-1]:
            logits[..., t] = -torch.inf
    return logits


def greedy_consistent(
    model: nn.Module, input_ids: Tensor, new_tokens: Tensor, atol: float = 1e-4
) -> bool:
    """Whether ``new_tokens`` (from ``generate`` through the KV cache) are greedy choices
    of ``model`` run without a cache: one forward over prompt + tokens, and each token's
    logit within ``atol`` of the largest at its position. :func:`greedy_no_cache`'s
    test without its flakiness: a float kernel may round a row differently at another
    batch of rows, and on a near-tie (random weights give flat logits) pick the other
    token, after which the two sequences part for good.

    The model's end-of-sequence token is left out of the comparison: every
    caller here generates with ``min_new_tokens=n``, under which ``generate``
    never picks it (on random weights it is now and then the raw argmax)."""
    if not isinstance(input_ids, Tensor) or not isinstance(new_tokens, Tensor):
        raise TypeError("greedy_consistent: input_ids and new_tokens must be Tensors")
    if new_tokens.dim() != 2 or new_tokens.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"greedy_consistent: new_tokens must be [batch, n] with input_ids' batch, got "
            f"{list(new_tokens.shape)} for {list(input_ids.shape)}"
        )
    n = new_tokens.shape[1]
    if n == 0:
        return True
    seq = torch.cat([input_ids, new_tokens], dim=1)
    with torch.no_grad():
        logits = model(input_ids=seq, use_cache=False).logits[:, -n - 1 : -1].float()
    logits = _bar_eos(model, logits)
    chosen = logits.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
    return bool((chosen >= logits.amax(-1) - atol).all())


# --- the peer: torch's CPU int4 kernel ---------------------------------------------


class AtenInt4Linear(nn.Module):
    """A Linear through torch's CPU int4 kernel, with the very codes, scales and zero
    points :func:`pykernels.ops.int4_quantize_weight` gives (asymmetric, group
    ``group_size``): repacked by ``aten._convert_weight_to_int4pack_for_cpu`` and
    multiplied by ``aten._weight_int4pack_mm_for_cpu`` on bf16 activations (the kernel
    takes no other), so a comparison with ``pk int4`` times the kernels on the same
    weights. Output in bf16. A benchmark peer, not a pykernels layer."""

    def __init__(self, linear: nn.Linear, group_size: int = 128) -> None:
        super().__init__()
        from .. import ops

        n, k = linear.out_features, linear.in_features
        self.in_features, self.out_features, self.group_size = k, n, group_size
        packed, scales, zeros = ops.int4_quantize_weight(
            linear.weight.detach().float(), group_size=group_size, symmetric=False
        )
        # pykernels' nibbles (column 2j low, 2j+1 high) as the int32 codes aten packs.
        q = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(n, k).to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # aten's form: w = (q - 8) * scale + zero_f; pykernels' (q - zero) * scale.
        zero_f = (8 - zeros.float()) * scales
        sz = torch.stack([scales, zero_f], dim=-1)  # [N, K/g, 2]
        self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous().bfloat16())
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().bfloat16())

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        # The kernel refuses strided rows (logits_to_keep's slice of the last position).
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, self.group_size, self.scales_and_zeros
        )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features)

    def dequantized_weight(self) -> Tensor:
        """The float weight the kernel multiplies by (for checking the peer)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return self.forward(eye).float().t()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, g={self.group_size}"
        )


def aten_int4(model: nn.Module, group_size: int = 128) -> nn.Module:
    """``model`` (in place) with every ``nn.Linear`` an :class:`AtenInt4Linear`."""
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear:
            model.set_submodule(name, AtenInt4Linear(m, group_size))
    return model


# --- cases --------------------------------------------------------------------------


def _has_int4() -> bool:
    from ..compress import recipes

    return "int4" in recipes.step_names()


def rows(fp32: nn.Module) -> dict[str, nn.Module]:
    """The models of a case, built from the fp32 one (which becomes the ``fp32`` row)."""
    from ..compress import recipes
    from ..compress.api import apply_steps

    out: dict[str, nn.Module] = {"fp32": fp32}
    out[BASELINE] = copy.deepcopy(fp32).to(torch.bfloat16)
    out[PEER] = aten_int4(copy.deepcopy(out[BASELINE]))
    wanted = {"pk int8": "int8", "pk int8 weight_only": "int8:weight_only"}
    if _has_int4():
        wanted.update({"pk int4": "int4", "pk int4 weight_only": "int4:weight_only"})
    else:
        print("llm: no int4 recipe step in this build: int4 rows skipped", file=sys.stderr)
    for name, recipe in wanted.items():
        out[name] = apply_steps(fp32, recipes.parse(recipe))
        gc.collect()
    return out


def _prefill(model: nn.Module, ids: Tensor) -> Any:
    return model(input_ids=ids, use_cache=True, logits_to_keep=1)


class _Decoder:
    """n greedy decode steps from a prefilled KV cache, cropped back before each call."""

    def __init__(self, model: nn.Module, prompt: Tensor, steps: int) -> None:
        self.model, self.steps, self.length = model, steps, prompt.shape[1]
        with torch.inference_mode():
            out = _prefill(model, prompt)
        # transformers 5 names it ``cache`` (``past_key_values`` before).
        cache = out.get("cache")
        self.cache = cache if cache is not None else out.past_key_values
        self.first = out.logits[:, -1].argmax(-1, keepdim=True)

    def __call__(self) -> Tensor:
        extra = self.cache.get_seq_length() - self.length
        if extra > 0:  # transformers 5 crops by a negative count of tokens to drop
            self.cache.crop(-extra)
        tok, pos = self.first, self.length
        for _ in range(self.steps):
            out = self.model(
                input_ids=tok,
                cache=self.cache,
                use_cache=True,
                cache_position=torch.tensor([pos]),
            )
            tok, pos = out.logits[:, -1].argmax(-1, keepdim=True), pos + 1
        return tok


def _agreement(models: dict[str, nn.Module], prompts: Tensor, n: int) -> list[str]:
    """Greedy tokens of each row against fp32's: how many leading tokens are
    identical (mean over prompts) and the fraction of positions equal."""
    gens = {}
    with torch.inference_mode():
        for name, m in models.items():
            gens[name] = m.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )[:, prompts.shape[1] :]
    ref = gens["fp32"]
    lines = []
    for name, g in gens.items():
        if name == "fp32":
            continue
        same = g == ref
        lead = same.int().cumprod(1).sum(1).float().mean().item()
        lines.append(
            f"{name}: {lead:.1f} of {n} leading greedy tokens equal fp32's, "
            f"{same.float().mean().item():.0%} of positions"
        )
    return lines


def cases(device: str, quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []
    if _transformers() is None:
        print(
            "llm: skipped, transformers is not installed (pip install -e '.[bench]')",
            file=sys.stderr,
        )
        return []
    fp32 = llama(quick)
    params = sum(p.numel() for p in fp32.parameters())
    cfg = fp32.config
    shape = (
        f"Llama random {params / 1e9:.2f}B (hidden {cfg.hidden_size}, ffn {cfg.intermediate_size}, "
        f"{cfg.num_hidden_layers} layers, vocab {cfg.vocab_size})"
    )
    print(f"llm: building the rows of {shape}", file=sys.stderr)
    models = rows(fp32)
    gen = torch.Generator().manual_seed(0)
    prompt_len, ctx, steps = (32, 16, 4) if quick else (128, 128, 16)
    prefill_ids = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=gen)
    ctx_ids = torch.randint(3, cfg.vocab_size, (1, ctx), generator=gen)

    agree = _agreement(
        models, torch.randint(3, cfg.vocab_size, (2, 8), generator=gen), 4 if quick else 16
    )
    notes = [shape, "greedy tokens against fp32 (random weights: agreement means little):"]
    notes += ["  " + a for a in agree]

    prefill = f"{shape.split(' (')[0]} prefill 1x{prompt_len}"
    decode = f"{shape.split(' (')[0]} decode {steps} tokens @{ctx}"
    _TOKENS[prefill], _TOKENS[decode] = prompt_len, steps
    _NOTES[prefill], _NOTES[decode] = notes, []
    reps = 3 if quick else 5
    pre = {k: inference(lambda m=m: _prefill(m, prefill_ids)) for k, m in models.items()}
    dec = {k: inference(_Decoder(m, ctx_ids, steps)) for k, m in models.items()}
    # Alternating rounds: a case runs for minutes, over which a shared host's speed drifts.
    return [
        Case("llm", prefill, "cpu", pre, BASELINE, reps=reps, interleave=True),
        Case("llm", decode, "cpu", dec, BASELINE, reps=reps, interleave=True),
    ]


def summary(results) -> str:
    """Tokens/s of every row per case, its ratio to bf16 and to the aten int4 peer, and
    the greedy agreement notes."""
    lines = ["llm: tokens/s (x bf16, x aten int4)"]
    by_case: dict[str, dict[str, float]] = {}
    for r in results:
        if r.family == "llm":
            by_case.setdefault(r.case, {})[r.impl] = r.median_ms
    for case, ms in by_case.items():
        lines.append(f"  {case}:")
        n = _TOKENS.get(case, 1)
        for impl, t in ms.items():
            peer = f", {ms[PEER] / t:.2f}x" if PEER in ms else ""
            base = f"{ms[BASELINE] / t:.2f}x" if BASELINE in ms else "-"
            lines.append(f"    {impl}: {n / t * 1e3:.1f} tokens/s ({base}{peer})")
        lines += ["    " + x for x in _NOTES.get(case, [])]
    return "\n".join(lines)


__all__ = [
    "AtenInt4Linear",
    "aten_int4",
    "cases",
    "greedy_consistent",
    "greedy_no_cache",
    "llama",
    "rows",
    "summary",
    "tiny_decoder",
]
