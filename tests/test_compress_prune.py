"""Structured pruning (``prune:R``) that physically shrinks the model.

Each pruned model is compared with a reference built here by hand on fresh
random data: the original model with the removed units' contributions
zeroed (the consumer's input columns, or a head's value rows), which is what
removing them computes. The kept units are read off the pruned weights, so
the reference does not reuse the pruner's choice of indices.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pykernels as pk


def kept_rows(small: torch.Tensor, big: torch.Tensor) -> list[int]:
    """Indices of ``big``'s rows that ``small``'s rows are, in order (rows are unique)."""
    small, big = small.detach().flatten(1), big.detach().flatten(1)
    idx = []
    for row in small:
        hit = (big == row).all(dim=1).nonzero().flatten()
        assert hit.numel() == 1, "a pruned row is not one of the original rows"
        idx.append(int(hit))
    assert idx == sorted(idx)
    return idx


def removed(keep: list[int], size: int) -> list[int]:
    return [i for i in range(size) if i not in set(keep)]


def seeded(gen) -> None:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))


def run(m, x):
    with torch.no_grad():
        return m(**x) if isinstance(x, dict) else m(x)


# --- models --------------------------------------------------------------------


def mlp(d_in=24, hidden=40, d_out=6):
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, d_out),
    ).eval()


class Gated(nn.Module):
    """A SwiGLU feed-forward block: gate and up are coupled by the product."""

    def __init__(self, d=16, hidden=48):
        super().__init__()
        self.gate = nn.Linear(d, hidden)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ResNetish(nn.Module):
    """Conv-BN stem, a residual block (Conv-BN-ReLU-Conv-BN + identity), a conv head
    flattened into a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.proj = nn.Conv2d(16, 12, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(12 * 4, 5)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        h = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(h)))
        h = self.pool(F.relu(self.proj(x)))
        return self.fc(torch.flatten(h, 1))


def randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def tiny_bert(layers=2, heads=4, head_size=8, ffn=64):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=heads * head_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=32,
        hidden_act="gelu",
    )
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def bert_batch(gen, batch=3, seq=11):
    ids = torch.randint(1, 120, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 4 :] = 0  # padding: the mask travels through the pruned attention
    return {"input_ids": ids, "attention_mask": mask}


# --- MLP chains ------------------------------------------------------------------


@pytest.mark.parametrize("ratio, keep", [(0.5, 20), (0.3, 28), (0.9, 4)])
def test_mlp_hidden_neurons_are_removed(gen, ratio, keep):
    seeded(gen)
    m = mlp(hidden=40)
    x = torch.randn(16, 24, generator=gen)
    out, report = pk.compress(m, pk.recipes.PruneStructured(ratio), x, progress=False)
    assert [type(a) for a in out] == [type(a) for a in m]
    assert (out[0].in_features, out[0].out_features) == (24, keep)
    assert (out[2].in_features, out[2].out_features) == (keep, keep)
    assert (out[4].in_features, out[4].out_features) == (keep, 6)
    assert out[0].weight.shape == (keep, 24) and out[4].weight.shape == (6, keep)
    # the reference: the original with the removed neurons' outgoing columns zeroed
    k0, k1 = kept_rows(out[0].weight, m[0].weight), kept_rows(out[4].weight.T, m[4].weight.T)
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref[2].weight[:, removed(k0, 40)] = 0
        ref[4].weight[:, removed(k1, 40)] = 0
    assert torch.allclose(run(out, x), run(ref, x), rtol=1e-5, atol=1e-6)
    want = 24 * keep + keep + keep * keep + keep + keep * 6 + 6
    assert sum(p.numel() for p in out.parameters()) == want
    assert report.total["params_after"] == want


def test_l2_importance_keeps_the_largest_neurons(gen):
    seeded(gen)
    m = mlp(d_in=8, hidden=10, d_out=3)
    with torch.no_grad():
        m[0].weight[[2, 7]] *= 50  # two loud neurons of the first layer
    x = torch.randn(4, 8, generator=gen)
    out, _ = pk.compress(m, "prune:0.8", x, progress=False)
    assert kept_rows(out[0].weight, m[0].weight) == [2, 7]


def test_taylor_importance_drops_a_loud_neuron_nobody_reads(gen):
    seeded(gen)
    m = mlp(d_in=8, hidden=8, d_out=3)
    with torch.no_grad():
        m[0].weight[5] *= 100  # loud by L2, but its output is never read:
        m[2].weight[:, 5] = 0
    x = torch.randn(32, 8, generator=gen)
    by_l2, _ = pk.compress(m, "prune:0.5", x, progress=False)
    by_taylor, _ = pk.compress(m, "prune:0.5:taylor", x, progress=False)
    assert 5 in kept_rows(by_l2[0].weight, m[0].weight)
    assert 5 not in kept_rows(by_taylor[0].weight, m[0].weight)
    assert by_taylor[0].out_features == 4


def test_round_to_keeps_multiples(gen):
    seeded(gen)
    m = mlp(d_in=16, hidden=64)
    x = torch.randn(4, 16, generator=gen)
    out, _ = pk.compress(m, "prune:0.3:round_to=16", x, progress=False)
    assert out[0].out_features == 48 and out[2].out_features == 48  # 45 -> 48
    out, _ = pk.compress(m, pk.recipes.PruneStructured(0.6, round_to=8), x, progress=False)
    assert out[0].out_features == 24  # 64 - 38 = 26 -> 24


def test_gated_feed_forward_prunes_gate_and_up_together(gen):
    seeded(gen)
    m = Gated().eval()
    x = torch.randn(5, 16, generator=gen)
    out, _ = pk.compress(m, "prune:0.25", x, progress=False)
    assert out.gate.out_features == out.up.out_features == out.down.in_features == 36
    keep = kept_rows(out.gate.weight, m.gate.weight)
    assert keep == kept_rows(out.up.weight, m.up.weight)
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.down.weight[:, removed(keep, 48)] = 0
    assert torch.allclose(run(out, x), run(ref, x), rtol=1e-5, atol=1e-6)


# --- convolutions, batch norm, residuals -----------------------------------------


def test_conv_bn_residual_net_prunes_inside_blocks_only(gen):
    seeded(gen)
    m = randomize_bn(ResNetish())
    x = torch.randn(2, 3, 8, 8, generator=gen)
    out, report = pk.compress(m, "prune:0.5", x, progress=False)
    # inside the residual block: conv1 -> bn1 -> relu -> conv2 shrinks
    assert (out.conv1.out_channels, out.bn1.num_features, out.conv2.in_channels) == (12, 12, 12)
    assert out.conv1.weight.shape == (12, 16, 3, 3) and out.bn1.running_mean.shape == (12,)
    # the residual stream (stem, conv2's output) keeps its 16 channels
    assert out.stem.out_channels == 16 and out.stem_bn.num_features == 16
    assert out.conv2.out_channels == 16 and out.bn2.num_features == 16
    # a conv flattened into a Linear: 12 channels x 4 positions -> 6 x 4 columns
    assert out.proj.out_channels == 6 and out.fc.in_features == 24
    left_alone = {s.fqn for s in report.skipped}
    assert {"stem", "conv2"} <= left_alone

    k1 = kept_rows(out.conv1.weight, m.conv1.weight)
    kp = kept_rows(out.proj.weight, m.proj.weight)
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.conv2.weight[:, removed(k1, 24)] = 0
        cols = [c * 4 + j for c in removed(kp, 12) for j in range(4)]
        ref.fc.weight[:, cols] = 0
    assert torch.allclose(run(out, x), run(ref, x), rtol=1e-4, atol=1e-5)
    n = sum(p.numel() for p in out.parameters())
    assert report.total["params_after"] == n < sum(p.numel() for p in m.parameters())


def test_a_module_called_twice_or_excluded_is_left_alone_and_listed(gen):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.up = nn.Linear(8, 32)
            self.down = nn.Linear(32, 8)

        def forward(self, x):
            return self.down(F.relu(self.up(self.a(self.a(x)))))

    seeded(gen)
    m = Twice().eval()
    x = torch.randn(3, 8, generator=gen)
    out, report = pk.compress(m, "prune:0.5", x, progress=False)
    assert out.a.out_features == 8 and out.up.out_features == 16
    assert any(s.fqn == "a" for s in report.skipped)
    out, report = pk.compress(m, "prune:0.5", x, exclude=["down"], progress=False)
    assert out.up.out_features == 32 and out.down.in_features == 32
    assert any(s.fqn == "up" and "excluded" in s.reason for s in report.skipped)
    assert torch.equal(run(out, x), run(m, x))


def test_tied_weights_are_not_sliced(gen):
    seeded(gen)
    m = mlp(d_in=16, hidden=16, d_out=16)
    m[2].weight = m[0].weight  # shared with a layer outside the group
    x = torch.randn(3, 16, generator=gen)
    out, report = pk.compress(m, "prune:0.5", x, progress=False)
    assert out[0].out_features == 16 and out[2].out_features == 16
    assert any("shared" in s.reason for s in report.skipped)
    assert torch.equal(run(out, x), run(m, x))


@pytest.mark.parametrize("which", ["mlp", "cnn", "bert"])
def test_ratio_zero_changes_nothing(gen, which):
    seeded(gen)
    if which == "mlp":
        m, x = mlp(), torch.randn(4, 24, generator=gen)
    elif which == "cnn":
        m, x = randomize_bn(ResNetish()), torch.randn(2, 3, 8, 8, generator=gen)
    else:
        m, x = tiny_bert(), bert_batch(gen)
    out, report = pk.compress(m, "prune:0", x, progress=False)
    assert report.layers == []
    assert [tuple(p.shape) for p in out.parameters()] == [tuple(p.shape) for p in m.parameters()]
    a, b = run(out, x), run(m, x)
    a, b = getattr(a, "last_hidden_state", a), getattr(b, "last_hidden_state", b)
    assert torch.equal(a, b)


# --- BERT-family attention heads and FFN neurons ---------------------------------


def kept_heads(q_small: torch.Tensor, q_big: torch.Tensor, head_size: int) -> list[int]:
    rows = kept_rows(q_small, q_big)
    heads = [r // head_size for r in rows[::head_size]]
    assert rows == [h * head_size + j for h in heads for j in range(head_size)]
    return heads


@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_bert_heads_and_ffn_neurons_are_removed(gen, importance):
    seeded(gen)
    m = tiny_bert(layers=2, heads=4, head_size=8, ffn=64)
    x = bert_batch(gen)
    out, report = pk.compress(m, f"prune:0.5:{importance}", x, progress=False)
    ref = copy.deepcopy(m)
    for new, old, r in zip(out.encoder.layer, m.encoder.layer, ref.encoder.layer, strict=True):
        att = new.attention.self
        assert att.num_attention_heads == 2 and att.all_head_size == 16
        assert att.query.weight.shape == att.key.weight.shape == att.value.weight.shape
        assert att.query.weight.shape == (16, 32)
        assert new.attention.output.dense.weight.shape == (32, 16)
        assert new.intermediate.dense.weight.shape == (32, 32)
        assert new.output.dense.weight.shape == (32, 32)
        heads = kept_heads(att.query.weight, old.attention.self.query.weight, 8)
        assert heads == kept_heads(att.value.weight, old.attention.self.value.weight, 8)
        neurons = kept_rows(new.intermediate.dense.weight, old.intermediate.dense.weight)
        # the reference: removed heads' values and removed neurons' outputs zeroed
        with torch.no_grad():
            for h in removed(heads, 4):
                r.attention.self.value.weight[h * 8 : h * 8 + 8] = 0
                r.attention.self.value.bias[h * 8 : h * 8 + 8] = 0
            r.output.dense.weight[:, removed(neurons, 64)] = 0
    got, want = run(out, x).last_hidden_state, run(ref, x).last_hidden_state
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    # 2 layers x (q, k, v: 16 rows; o: 16 columns; FFN: 32 neurons) fewer
    per_layer_removed = 3 * (16 * 32 + 16) + 32 * 16 + (32 * 32 + 32) + 32 * 32
    want_params = sum(p.numel() for p in m.parameters()) - 2 * per_layer_removed
    assert sum(p.numel() for p in out.parameters()) == want_params
    assert report.total["params_after"] == want_params
    # the residual stream, the embeddings and layer norms keep the hidden size
    assert out.embeddings.word_embeddings.weight.shape == (120, 32)
    assert out.encoder.layer[0].output.dense.out_features == 32


def test_bert_heads_false_prunes_only_the_ffn(gen):
    seeded(gen)
    m = tiny_bert(layers=1)
    x = bert_batch(gen)
    out, _ = pk.compress(m, pk.recipes.PruneStructured(0.5, heads=False), x, progress=False)
    att = out.encoder.layer[0].attention.self
    assert att.num_attention_heads == 4 and att.query.out_features == 32
    assert out.encoder.layer[0].intermediate.dense.out_features == 32


def test_pruning_composes_with_the_other_steps(gen):
    seeded(gen)
    m = tiny_bert(layers=1)
    x = bert_batch(gen)
    pruned, _ = pk.compress(m, "prune:0.5", x, progress=False)
    # fuse=False: the per-Linear int8 path (the fused EncoderBlock over a pruned
    # layer is tests/test_encoder.py's)
    both, report = pk.compress(m, "prune:0.5+int8:fuse=False", x, progress=False)
    layer = both.encoder.layer[0]
    assert isinstance(layer.attention.self.query, pk.nn.Int8Linear)
    assert layer.attention.self.query.out_features == 16
    assert isinstance(both.embeddings.word_embeddings, pk.nn.Int8Embedding)
    # int8 after pruning: the int8 recipe applied to the pruned model
    again, _ = pk.compress(pruned, "int8:fuse=False", x, progress=False)
    assert torch.equal(run(both, x).last_hidden_state, run(again, x).last_hidden_state)
    rows = {r.name: r for r in report.layers}
    assert rows["encoder.layer.0.attention.self.query"].steps == ["prune:0.5", "int8:fuse=False"]


# --- calibration-aware pruning: activation importance and least-squares re-fit ----


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().pow(2).sum() / b.double().pow(2).sum())


def test_reconstruct_linear_is_the_least_squares_fit(gen):
    """With no damping, the closed form equals a direct least-squares regression of
    the layer's output on the kept inputs and a constant."""
    from pykernels.compress.prune import reconstruct_linear

    x = torch.randn(500, 12, generator=gen, dtype=torch.float64)
    x = x @ torch.randn(12, 12, generator=gen, dtype=torch.float64)  # correlated inputs
    x += torch.randn(12, generator=gen, dtype=torch.float64)  # and a mean to absorb
    lin = nn.Linear(12, 5).double()
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu) / x.shape[0]
    w, b = reconstruct_linear(lin.weight, lin.bias, keep, mu, cov, damp=0.0)
    y = lin(x).detach()
    a = torch.cat([x[:, keep], torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(a, y).solution
    assert torch.allclose(w, sol[:-1].T, atol=1e-8)
    assert torch.allclose(b, sol[-1], atol=1e-8)
    # and the fit is strictly better than dropping the columns
    assert rel_err(x[:, keep] @ w.T + b, y) < rel_err(
        x[:, keep] @ lin.weight[:, keep].T.detach() + lin.bias.detach(), y
    )


def test_reconstruct_linear_matches_another_target(gen):
    """With a target output (the unpruned model's, where the inputs drifted), the
    undamped re-fit is the least-squares regression of that target on the kept
    inputs and a constant."""
    from pykernels.compress.prune import reconstruct_linear

    x = torch.randn(400, 10, generator=gen, dtype=torch.float64) + 0.5
    y = torch.randn(400, 4, generator=gen, dtype=torch.float64) + x[:, :4] * 2
    lin = nn.Linear(10, 4).double()
    keep = torch.tensor([1, 2, 5, 6, 9])
    mu, mu_y = x.mean(0), y.mean(0)
    cov = (x - mu).T @ (x - mu) / x.shape[0]
    cyx = (y - mu_y).T @ (x - mu) / x.shape[0]
    w, b = reconstruct_linear(lin.weight, lin.bias, keep, mu, cov, damp=0.0, target=(mu_y, cyx))
    a = torch.cat([x[:, keep], torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(a, y).solution
    assert torch.allclose(w, sol[:-1].T, atol=1e-8)
    assert torch.allclose(b, sol[-1], atol=1e-8)


def calib_mlp(gen, hidden=40, dead=()):
    """A trained-looking chain: correlated hidden units (so a re-fit has something to
    recover); ``dead`` hidden units of the first ReLU are always zero."""
    m = mlp(hidden=hidden)
    with torch.no_grad():
        base = torch.randn(hidden, 6, generator=gen)
        m[0].weight.copy_(base @ torch.randn(6, 24, generator=gen) * 0.3)
        m[0].weight.add_(0.05 * torch.randn(hidden, 24, generator=gen))
        for d in dead:
            m[0].weight[d] = 0
            m[0].bias[d] = -1.0
    return m


def test_reconstruction_is_strictly_closer_than_pruning_alone(gen):
    seeded(gen)
    m = calib_mlp(gen)
    cal = [torch.randn(128, 24, generator=gen) for _ in range(4)]
    test = torch.randn(256, 24, generator=gen)
    kw = {"calibration": cal, "progress": False}
    plain, _ = pk.compress(m, "prune:0.5:l2:reconstruct=False", cal[0], **kw)
    fit, _ = pk.compress(m, "prune:0.5:l2:reconstruct=True", cal[0], **kw)
    # the same units were kept (by weight norm) ...
    assert kept_rows(fit[0].weight, m[0].weight) == kept_rows(plain[0].weight, m[0].weight)
    assert fit[2].weight.shape == plain[2].weight.shape == (20, 20)
    # ... and the re-fit consumers bring every output closer, on calibration and
    # on fresh data from the same distribution
    for x in (torch.cat(cal), test):
        want = run(m, x)
        assert rel_err(run(fit, x), want) < 0.9 * rel_err(run(plain, x), want)
    # the default with calibration (units chosen by OBS on the activations, then
    # re-fitted) beats magnitude pruning without calibration by far
    act, _ = pk.compress(m, "prune:0.5", cal[0], **kw)
    mag, _ = pk.compress(m, "prune:0.5", cal[0], progress=False)
    want = run(m, test)
    assert rel_err(run(act, test), want) < 0.5 * rel_err(run(mag, test), want)


def test_reconstruction_is_exact_when_the_dropped_units_are_zero(gen):
    seeded(gen)
    dead = list(range(0, 40, 4))  # 10 of 40 units never fire
    m = calib_mlp(gen, dead=dead)
    cal = [torch.randn(96, 24, generator=gen) for _ in range(3)]
    step = pk.recipes.PruneStructured(0.25, heads=False)
    step_both = [pk.recipes.Scoped(step, ("0", "2"))]  # the first hidden layer only
    out, _ = pk.compress(m, step_both, cal[0], calibration=cal, progress=False)
    assert out[0].out_features == 30 and out[2].in_features == 30
    keep = kept_rows(out[0].weight, m[0].weight)
    assert sorted(set(range(40)) - set(keep)) == dead  # act importance drops the dead
    # the consumer is the original's kept columns, the bias unchanged (up to the
    # float32 rounding of the paired outputs the re-fit matches)
    assert torch.allclose(out[2].weight, m[2].weight[:, keep], rtol=0, atol=1e-5)
    assert torch.allclose(out[2].bias, m[2].bias, rtol=0, atol=1e-5)
    x = torch.randn(64, 24, generator=gen)
    assert torch.allclose(run(out, x), run(m, x), rtol=1e-5, atol=1e-5)


def test_bert_reconstruction_heads_and_ffn(gen, tmp_path):
    seeded(gen)
    m = tiny_bert(layers=2, heads=4, head_size=8, ffn=64)
    cal = [bert_batch(gen, batch=6, seq=24) for _ in range(4)]
    held = [bert_batch(gen, batch=6, seq=24) for _ in range(2)]
    plain, _ = pk.compress(
        m, "prune:0.5:l2:reconstruct=False", cal[0], calibration=cal, progress=False
    )
    fit, report = pk.compress(
        m, "prune:0.5:l2:reconstruct=True", cal[0], calibration=cal, progress=False
    )
    for a, b in zip(fit.encoder.layer, plain.encoder.layer, strict=True):
        assert a.attention.self.num_attention_heads == 2
        assert torch.equal(a.attention.self.query.weight, b.attention.self.query.weight)
        assert torch.equal(a.intermediate.dense.weight, b.intermediate.dense.weight)
        # the consumers were re-fitted
        assert not torch.equal(a.output.dense.weight, b.output.dense.weight)
        assert not torch.equal(a.attention.output.dense.weight, b.attention.output.dense.weight)
    # each block's residual branch is matched better: the last hidden state too
    want = torch.cat([run(m, x).last_hidden_state for x in held])
    e_fit = rel_err(torch.cat([run(fit, x).last_hidden_state for x in held]), want)
    e_plain = rel_err(torch.cat([run(plain, x).last_hidden_state for x in held]), want)
    assert e_fit < e_plain
    assert {r.steps[0] for r in report.layers if r.steps} == {"prune:0.5:l2:reconstruct=True"}
    # the default with calibration (OBS choice + re-fit) against magnitude pruning
    act, _ = pk.compress(m, "prune:0.5", cal[0], calibration=cal, progress=False)
    mag, _ = pk.compress(m, "prune:0.5", cal[0], progress=False)
    e_act = rel_err(torch.cat([run(act, x).last_hidden_state for x in held]), want)
    e_mag = rel_err(torch.cat([run(mag, x).last_hidden_state for x in held]), want)
    assert e_act < e_mag
    # save / load keeps the re-fitted weights and the head counts
    path = tmp_path / "pruned"
    pk.save(act, path)
    back = pk.load(path, tiny_bert(layers=2, heads=4, head_size=8, ffn=64))
    assert back.encoder.layer[0].attention.self.num_attention_heads == 2
    for x in held:
        assert torch.equal(run(back, x).last_hidden_state, run(act, x).last_hidden_state)


def test_calibration_aware_pruning_refusals(gen):
    seeded(gen)
    m = calib_mlp(gen)
    x = torch.randn(16, 24, generator=gen)
    with pytest.raises(ValueError, match="calibration batch 0"):
        pk.compress(m, "prune:0.5", x, calibration=[torch.randn(16, 7)], progress=False)
    with pytest.raises(ValueError, match="calibration"):
        pk.compress(m, "prune:0.5:act", x, progress=False)
    with pytest.raises(ValueError, match="calibration"):
        pk.compress(m, "prune:0.5:reconstruct=True", x, progress=False)
    with pytest.raises(ValueError, match="reconstruct"):
        pk.recipes.PruneStructured(0.5, reconstruct="yes")
    with pytest.raises(ValueError, match="importance"):
        pk.recipes.PruneStructured(0.5, importance="fisher")
    with pytest.raises(ValueError, match="NaN or inf"):
        bad = torch.full((8, 24), float("nan"))
        pk.compress(m, "prune:0.5", x, calibration=[bad], progress=False)
    (s,) = pk.recipes.parse("prune:0.3:act:reconstruct=False")
    assert s.importance == "act" and s.reconstruct is False
    assert str(s) == "prune:0.3:act:reconstruct=False"
    assert pk.recipes.parse(str(s)) == [s]
