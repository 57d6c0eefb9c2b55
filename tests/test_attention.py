"""attention: every backend and ISA against the float64 reference and torch's SDPA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pykernels as pk
from pykernels import _native, backends
from pykernels.backends.reference import attention as ref_attention

attention = pk.ops.attention

# float32 against the float64 reference on N(0, 1) data with logits up to 4
# (check() allows proportionally more above: rounding of a score is relative
# to it): the kernel's exp (2e-7 relative) and its summation order. SDPA's
# own float32 error is of the same size (test_error_against_sdpa_at_model_shapes).
ATOL = 3e-6


def rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def reference(q, k, v, attn_mask=None, is_causal=False, scale=None, kv_lengths=None):
    mask = attn_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    lens = None if kv_lengths is None else torch.as_tensor(kv_lengths)
    return ref_attention.attention(q, k, v, mask, is_causal, scale, lens)


def sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, kv_lengths=None):
    """SDPA itself; kv_lengths, and is_causal with a mask, become one additive mask."""
    if attn_mask is not None:  # SDPA wants at least 2 dimensions
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if kv_lengths is not None or (is_causal and attn_mask is not None):
        hide = torch.zeros(q.shape[2], k.shape[2], dtype=torch.bool)
        if is_causal:
            hide = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1)
        if kv_lengths is not None:
            pad = torch.arange(k.shape[2]) >= torch.as_tensor(kv_lengths)[:, None]
            hide = hide | pad[:, None, None, :]
        add = torch.zeros(hide.shape, dtype=q.dtype).masked_fill(hide, float("-inf"))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape).masked_fill(~attn_mask, float("-inf"))
        attn_mask = add if attn_mask is None else attn_mask + add
        is_causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale
    )


def check(q, k, v, against_sdpa=True, **kw):
    """attention() against the float64 reference and, where SDPA takes the
    arguments, no worse than float32 SDPA's own error.

    Rounding in a score grows with its size (and the output's error with
    it), so the bound is ATOL at logits up to 4, proportionally more above.
    """
    got = attention(q, k, v, **kw)
    want = reference(q, k, v, **kw).double()
    assert got.shape == want.shape and got.dtype == q.dtype
    scale = kw.get("scale") or 1.0 / math.sqrt(max(q.shape[-1], 1))
    logits = (q.double() @ k.double().transpose(-1, -2) * scale).abs()
    tol = ATOL * max(1.0, logits.nan_to_num(0).max().item() / 4 if logits.numel() else 1.0)
    if against_sdpa:
        s = sdpa(q, k, v, **kw).double()
        assert ((s - want).abs() <= 4 * tol).logical_or(s.isnan() & want.isnan()).all()
        tol = max(tol, 4 * (s - want).abs().nan_to_num(0).max().item())
    err = (got.double() - want).abs()
    assert torch.equal(got.isnan(), want.isnan())
    assert err.nan_to_num(0).max().item() <= tol, (err.nan_to_num(0).max().item(), tol)
    return got


SHAPES = [  # B, H, Sq, Sk, D, Dv
    (1, 1, 1, 1, 32, 32),
    (2, 3, 1, 17, 64, 64),
    (2, 2, 17, 17, 32, 32),
    (1, 2, 37, 53, 80, 80),
    (2, 2, 128, 128, 64, 64),
    (1, 2, 300, 300, 32, 48),  # two key blocks, Dv != D
    (1, 1, 5, 600, 128, 128),  # three key blocks
    (1, 1, 33, 7, 16, 5),  # Dv not a multiple of any vector
]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_isa_matches_reference_and_sdpa(cpu_isa, shape, gen):
    b, h, sq, sk, d, dv = shape
    q, k, v = rand(gen, b, h, sq, d), rand(gen, b, h, sk, d), rand(gen, b, h, sk, dv)
    check(q, k, v)
    check(q, k, v, is_causal=True)
    check(q, k, v, scale=0.3)
    lens = torch.randint(0, sk + 1, (b,), generator=gen)
    check(q, k, v, kv_lengths=lens)
    check(q, k, v, kv_lengths=lens, is_causal=True)
    m = rand(gen, b, 1, sq, sk)
    check(q, k, v, attn_mask=m)
    keep = torch.rand(1, h, 1, sk, generator=gen) > 0.3
    check(q, k, v, attn_mask=keep, is_causal=True)
    check(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("d", [32, 64, 80, 128])
def test_head_dims(backend, d, gen):
    q, k, v = (rand(gen, 2, 3, 45, d) for _ in range(3))
    check(q, k, v)
    check(q, k, v, is_causal=True, kv_lengths=[40, 3])


def test_mask_broadcasts(cpu_isa, gen):
    b, h, sq, sk, d = 2, 3, 20, 24, 32
    q, k, v = rand(gen, b, h, sq, d), rand(gen, b, h, sk, d), rand(gen, b, h, sk, d)
    for shape in [(sk,), (sq, sk), (b, 1, 1, sk), (1, h, sq, 1), (b, h, sq, sk), (sq, 1)]:
        check(q, k, v, attn_mask=rand(gen, *shape))
        check(q, k, v, attn_mask=torch.rand(*shape, generator=gen) > 0.2)


def test_strided_views_of_a_fused_qkv(cpu_isa, gen):
    b, s, h, d = 2, 50, 4, 32
    qkv = rand(gen, b, s, 3, h, d)  # what a fused QKV GEMM gives
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    assert not q.is_contiguous()
    got = check(q, k, v)
    # Laid out as q: [B, S, H, D] transposed, so merging the heads is free.
    assert got.transpose(1, 2).is_contiguous()
    check(q, k, v, is_causal=True, kv_lengths=[50, 20])
    # An offset view, and a last dimension that is not contiguous (copied).
    big = rand(gen, 2, 3, 40, 70)
    check(big[:, :, 3:, 5:37], big[:, :, :30, 1:33], big[:, :, 7:37, 30:62])
    check(q.transpose(2, 3).contiguous().transpose(2, 3), k, v)


def test_fully_masked_rows_give_zeros_as_sdpa(cpu_isa, gen):
    b, h, s, d = 2, 2, 40, 32
    q, k, v = (rand(gen, b, h, s, d) for _ in range(3))
    keep = torch.rand(b, 1, s, s, generator=gen) > 0.5
    keep[0, 0, 3] = False
    keep[1, 0, 39] = False
    got = check(q, k, v, attn_mask=keep)
    assert torch.equal(got[0, :, 3], torch.zeros(h, d))
    add = torch.zeros(b, 1, s, s).masked_fill(~keep, float("-inf"))
    assert torch.equal(check(q, k, v, attn_mask=add), got)
    # Length 0 and no keys at all: zeros too.
    got = check(q, k, v, kv_lengths=[0, 5])
    assert torch.equal(got[0], torch.zeros(h, s, d))
    check(q, k[:, :, :0], v[:, :, :0])
    # Hugging Face's finfo.min is a finite bias: a row of it averages v.
    fmin = torch.zeros(b, 1, s, s)
    fmin[0, 0, 3] = torch.finfo(torch.float32).min
    got = check(q, k, v, attn_mask=fmin)
    assert torch.allclose(got[0, :, 3], v[0].mean(1), atol=1e-6)


def test_nan(cpu_isa, gen):
    b, h, s, d = 1, 2, 30, 32
    q, k, v = (rand(gen, b, h, s, d) for _ in range(3))
    q[0, 0, 4, 7] = float("nan")
    got = check(q, k, v, against_sdpa=False)
    # NaN in a query row: that row only. SDPA's CPU kernel gives zeros there
    # (as for a fully masked row); the definition and this kernel give NaN.
    assert got[0, 0, 4].isnan().all() and not got[0, 0, :4].isnan().any()
    assert not got[0, 1].isnan().any()
    want = sdpa(q, k, v)
    assert torch.allclose(got[0, 0, 5:], want[0, 0, 5:], atol=ATOL)
    q[0, 0, 4, 7] = 0.0
    k[0, 1, 10, 0] = float("nan")  # every row of head 1 sees key 10, except causally
    got = check(q, k, v)
    assert got[0, 1].isnan().all() and not got[0, 0].isnan().any()
    got = check(q, k, v, is_causal=True)
    assert got[0, 1, 10:].isnan().all() and not got[0, 1, :10].isnan().any()
    # Keys past kv_lengths are never read (SDPA, masking key 10 with -inf,
    # gets NaN + -inf = NaN there).
    got = check(q, k, v, kv_lengths=[10], against_sdpa=False)
    assert not got.isnan().any()
    v[0, 0, 3, 1] = float("nan")
    got = check(q, k, v, kv_lengths=[10], against_sdpa=False)
    assert got[0, 0, :, 1].isnan().all() and not got[0, 0, :, 0].isnan().any()


def test_hf_padding_masks(cpu_isa, gen):
    b, h, s, d = 3, 2, 40, 32
    q, k, v = (rand(gen, b, h, s, d) for _ in range(3))
    am = torch.ones(b, s, dtype=torch.int64)
    am[0, 25:] = 0
    am[2, 1:] = 0
    fmin = torch.finfo(torch.float32).min
    four = torch.zeros(b, 1, 1, s).masked_fill(am[:, None, None, :] == 0, fmin)
    want = sdpa(q, k, v, attn_mask=four)
    for mask in [am, am.bool(), four, four.expand(b, 1, s, s), am[:, None, None, :].bool()]:
        lens, through = pk.ops.padding_mask_to_lengths(mask)
        assert through is None and lens.tolist() == [25, 40, 1]
        got = attention(q, k, v, kv_lengths=lens)
        assert torch.allclose(got, want, atol=ATOL)
    # All ones: full lengths.
    lens, through = pk.ops.padding_mask_to_lengths(torch.ones(b, s))
    assert through is None and lens.tolist() == [s] * b
    # Left padding and per-row masks are passed through.
    left = am.flip(1)
    lens, through = pk.ops.padding_mask_to_lengths(left)
    assert lens is None and through.shape == (b, 1, 1, s) and through.dtype == torch.bool
    assert torch.allclose(
        attention(q, k, v, attn_mask=through), sdpa(q, k, v, attn_mask=through), atol=ATOL
    )
    causal = torch.ones(s, s, dtype=torch.bool).tril().expand(b, 1, s, s)
    assert pk.ops.padding_mask_to_lengths(causal)[0] is None
    bias = torch.zeros(b, 1, 1, s)
    bias[0, 0, 0, 3] = -1.0  # a bias, not a padding mask
    assert pk.ops.padding_mask_to_lengths(bias)[0] is None
    # An all-padding sequence under finfo.min: SDPA averages v there, so the mask stays.
    four[1] = fmin
    lens, through = pk.ops.padding_mask_to_lengths(four)
    assert lens is None and through is four
    assert pk.ops.padding_mask_to_lengths(None) == (None, None)


def test_threads_agree(gen):
    q, k, v = (rand(gen, 4, 3, 70, 64) for _ in range(3))
    C = _native.C
    if C is None:
        pytest.skip("native CPU kernels not built")
    before = C.get_num_threads()
    try:
        C.set_num_threads(1)
        one = attention(q, k, v, is_causal=True)
        C.set_num_threads(2)
        two = attention(q, k, v, is_causal=True)
    finally:
        C.set_num_threads(before)
    assert torch.equal(one, two)


def test_other_dtypes_use_sdpa(gen):
    q, k, v = (rand(gen, 2, 2, 9, 16) for _ in range(3))
    for dt in (torch.float64, torch.bfloat16, torch.float16):
        got = attention(q.to(dt), k.to(dt), v.to(dt), is_causal=True)
        assert got.dtype == dt
        want = F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt), is_causal=True)
        assert torch.allclose(got.float(), want.float(), atol=1e-2)


@pytest.mark.parametrize(
    "args, kw, err, match",
    [
        (((2, 3, 4, 8), (2, 3, 4, 8), (2, 3, 4)), {}, ValueError, "v must be 4-D"),
        (((2, 3, 4, 8), (2, 2, 4, 8), (2, 2, 4, 8)), {}, ValueError, "same heads"),
        (((2, 3, 4, 8), (1, 3, 4, 8), (1, 3, 4, 8)), {}, ValueError, "same batch"),
        (((2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 4, 8)), {}, ValueError, "sequence length"),
        (((2, 3, 4, 8), (2, 3, 5, 4), (2, 3, 5, 8)), {}, ValueError, "head dim"),
        (((2, 3, 4, 8),) * 3, {"attn_mask": torch.zeros(5, 4, 4)}, ValueError, "broadcast"),
        (((2, 3, 4, 8),) * 3, {"attn_mask": torch.zeros(2, 4, 5)}, ValueError, "attn_mask"),
        (((2, 3, 4, 8),) * 3, {"attn_mask": torch.zeros(1, 1, 1, 2, 4)}, ValueError, "attn_mask"),
        (
            ((2, 3, 4, 8),) * 3,
            {"attn_mask": torch.zeros(4, 4, dtype=torch.int32)},
            TypeError,
            "attn_mask",
        ),
        (((2, 3, 4, 8),) * 3, {"attn_mask": [[0.0]]}, TypeError, "attn_mask"),
        (((2, 3, 4, 8),) * 3, {"is_causal": 1}, TypeError, "is_causal"),
        (((2, 3, 4, 8),) * 3, {"scale": "x"}, TypeError, "scale"),
        (((2, 3, 4, 8),) * 3, {"scale": float("nan")}, ValueError, "scale"),
        (((2, 3, 4, 8),) * 3, {"kv_lengths": [1, 5]}, ValueError, "kv_lengths"),
        (((2, 3, 4, 8),) * 3, {"kv_lengths": [1]}, ValueError, "kv_lengths"),
        (((2, 3, 4, 8),) * 3, {"kv_lengths": [-1, 2]}, ValueError, "kv_lengths"),
        (((2, 3, 4, 8),) * 3, {"kv_lengths": torch.tensor([1.0, 2.0])}, TypeError, "kv_lengths"),
        (((2, 3, 4, 8),) * 3, {"kv_lengths": "ab"}, TypeError, "kv_lengths"),
    ],
)
def test_bad_arguments(backend, args, kw, err, match):
    q, k, v = (torch.randn(*s) for s in args)
    with pytest.raises(err, match=match):
        attention(q, k, v, **kw)


def test_bad_tensors():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention(q.numpy(), q, q)
    with pytest.raises(TypeError, match="k must be float32"):
        attention(q, q.int(), q)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        attention(q, q, q.double())
    with pytest.raises(ValueError, match="q must be 4-D"):
        attention(q[0], q, q)
    with pytest.raises(ValueError, match="k must be on q's device"):
        attention(q, q.to("meta"), q)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        pk.ops.padding_mask_to_lengths([1, 0])
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        pk.ops.padding_mask_to_lengths(torch.ones(2, 1, 3))


def test_the_binding_checks_again(gen):
    """Arguments that get past Python (a caller of _C) are refused, never a crash."""
    C = _native.C
    if C is None:
        pytest.skip("native CPU kernels not built")
    a = rand(gen, 1, 2, 4, 8).numpy()
    out = a.copy()
    with pytest.raises(ValueError, match="k: size"):
        C.attention_f32(a, a[:, :1], a, out, None, None, None, False, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        wide = np.zeros((1, 2, 4, 16), dtype=np.float32)
        C.attention_f32(a, a, a, wide[..., ::2], None, None, None, False, 1.0)
    with pytest.raises(ValueError, match="float32"):
        C.attention_f32(a.astype("float64"), a, a, out, None, None, None, False, 1.0)
    with pytest.raises(ValueError, match="mask"):
        C.attention_f32(a, a, a, out, None, None, a, False, 1.0)


def test_opcheck_compile_and_grad(gen):
    q, k, v = (rand(gen, 2, 2, 9, 16) for _ in range(3))
    mask = rand(gen, 2, 1, 1, 9)
    lens = torch.tensor([9, 4])
    for args in [(q, k, v, None, False, 0.25, None), (q, k, v, mask, True, 0.25, lens)]:
        torch.library.opcheck(torch.ops.pykernels.attention.default, args)
    fn = torch.compile(
        lambda q, k, v: attention(q, k, v, attn_mask=mask, is_causal=True), fullgraph=True
    )
    want = reference(q, k, v, attn_mask=mask, is_causal=True)
    assert torch.allclose(fn(q, k, v).double(), want.double(), atol=ATOL)
    qg = q.clone().requires_grad_(True)
    attention(qg, k, v, kv_lengths=lens).sum().backward()
    qs = q.clone().requires_grad_(True)
    sdpa(qs, k, v, kv_lengths=lens).sum().backward()
    assert torch.allclose(qg.grad, qs.grad, atol=1e-5)


def test_torch_backend_on_cpu_tensors(monkeypatch, gen):
    monkeypatch.setenv("PYKERNELS_BACKEND", "torch")
    assert backends.chosen("attention", "cpu").name == "torch"
    q, k, v = (rand(gen, 2, 2, 20, 32) for _ in range(3))
    check(q, k, v, is_causal=True, kv_lengths=[20, 7], attn_mask=rand(gen, 20, 20))


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 3),
    sq=st.integers(1, 70),
    sk=st.integers(0, 70),
    d=st.sampled_from([1, 3, 16, 32, 40, 64]),
    dv=st.sampled_from([1, 7, 32, 64]),
    causal=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis(b, h, sq, sk, d, dv, causal, masked, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand(g, b, h, sq, d), rand(g, b, h, sk, d), rand(g, b, h, sk, dv)
    lens = torch.randint(0, sk + 1, (b,), generator=g)
    mask = torch.rand(b, 1, sq, sk, generator=g) > 0.3 if masked else None
    got = attention(q, k, v, attn_mask=mask, is_causal=causal, kv_lengths=lens)
    want = reference(q, k, v, attn_mask=mask, is_causal=causal, kv_lengths=lens)
    assert torch.allclose(got.double(), want.double(), atol=ATOL, rtol=0)


def test_error_against_sdpa_at_model_shapes(cpu_isa, gen):
    """The error the docs state, float32 SDPA's and ours, against float64."""
    for b, h, s, d in [(4, 12, 128, 32), (2, 12, 128, 64)]:
        q, k, v = (rand(gen, b, h, s, d) for _ in range(3))
        got = attention(q, k, v).double()
        exact = ref_attention.attention(
            q.double(), k.double(), v.double(), None, False, d**-0.5, None
        )
        s32 = F.scaled_dot_product_attention(q, k, v).double()
        ours, theirs = (got - exact).abs().max().item(), (s32 - exact).abs().max().item()
        assert ours < 2.5e-6 and (got - s32).abs().max().item() < 3e-6
        assert ours < 3 * theirs
        rel = ((got - exact).norm() / exact.norm()).item()
        assert rel < 5e-7 and rel < 1.5 * ((s32 - exact).norm() / exact.norm()).item()
