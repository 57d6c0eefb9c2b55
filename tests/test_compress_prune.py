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
