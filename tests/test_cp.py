"""CPConv2d: CP-ALS of a convolution's weight, the four-convolution layer
against the convolution it stands for (stride, padding, dilation), error
against rank, the cp recipe step with save/load, and bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pykernels as pk
from pykernels.nn import CPConv2d
from pykernels.nn.cp import cp_als, cp_reconstruct


def rank_r_conv(gen, o, i, kh, kw, r, **kw_args) -> nn.Conv2d:
    """A convolution whose weight is exactly a rank-r CP tensor."""
    conv = nn.Conv2d(i, o, (kh, kw), **kw_args)
    fs = [torch.randn(d, r, generator=gen, dtype=torch.float64) for d in (o, i, kh, kw)]
    with torch.no_grad():
        conv.weight.copy_(cp_reconstruct(torch.ones(r, dtype=torch.float64), fs))
    return conv


def test_exact_rank_is_recovered_and_output_matches_conv(gen):
    conv = rank_r_conv(gen, 12, 10, 3, 3, 4, padding=1)
    # ALS creeps out of swamps: 100 sweeps left 1.3% of random draws above
    # 1e-4 even from three starts; 400 left none of 150.
    cp = CPConv2d.from_conv(conv, rank=4, iters=400)
    assert cp.rel_error < 1e-4
    x = torch.randn(2, 10, 9, 11, generator=gen)
    with torch.no_grad():
        ref = conv(x)
        assert torch.allclose(cp(x), ref, atol=1e-3 * ref.abs().max())


@pytest.mark.parametrize(
    "args",
    [
        dict(stride=2, padding=1),
        dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
        dict(padding="same"),
        dict(padding="valid", bias=False),
        dict(padding=1, padding_mode="reflect"),
        dict(padding=(1, 2), padding_mode="circular", stride=(2, 1)),
    ],
)
def test_layers_compute_the_decomposed_conv(args, gen):
    """The four convolutions equal one convolution with the CP weight, for any
    stride, padding, dilation and padding mode: the structure is exact."""
    conv = nn.Conv2d(6, 5, (3, 5) if args.get("padding") != "same" else 3, **args)
    cp = CPConv2d.from_conv(conv, rank=7)
    x = torch.randn(2, 6, 13, 12, generator=gen)
    ref_conv = nn.Conv2d(6, 5, conv.kernel_size, **args)
    with torch.no_grad():
        ref_conv.weight.copy_(cp.dense_weight())
        if conv.bias is not None:
            ref_conv.bias.copy_(conv.bias)
        assert torch.allclose(cp(x), ref_conv(x), atol=1e-5)
        got_err = (cp.dense_weight() - conv.weight).norm() / conv.weight.norm()
    assert abs(float(got_err) - cp.rel_error) < 1e-4


def test_error_decreases_with_rank(gen):
    conv = nn.Conv2d(8, 8, 3)
    errs = [CPConv2d.from_conv(conv, rank=r).rel_error for r in (1, 4, 16, 64)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False))
    assert errs[-1] < 0.05  # 64 rank-one terms nearly span an 8 x 8 x 3 x 3 tensor


def test_energy_picks_the_smallest_rank(gen):
    conv = rank_r_conv(gen, 8, 6, 3, 3, 5)
    cp = CPConv2d.from_conv(conv, energy=0.9999)
    assert cp.rel_error <= 0.01 and cp.rank <= 5
    w, fs, err = cp_als(conv.weight.detach(), max(1, cp.rank - 1))
    assert err > 0.01 or cp.rank == 1


@pytest.mark.parametrize("seed", [23, 27, 38, 58, 62, 65, 71, 97])
def test_energy_search_restarts_a_stalled_rank(seed):
    """Seeds whose exact rank-5 tensor stalls ALS at rank 5 from the first start
    (the search then picked rank 6): restarts find rank 5 or below."""
    conv = rank_r_conv(torch.Generator().manual_seed(seed), 8, 6, 3, 3, 5)
    cp = CPConv2d.from_conv(conv, energy=0.9999)
    assert cp.rank <= 5 and cp.rel_error <= 0.01


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.dw(F.relu(self.c1(x))))))
        return self.fc(x.mean((2, 3)))


def test_recipe_and_save_load_round_trip(gen, tmp_path):
    torch.manual_seed(gen.initial_seed() % 2**31)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 12, 12, generator=gen)
    for recipe in ("cp:rank=6", [pk.recipes.CP(energy=0.5)]):
        out, report = pk.compress(model, recipe, x, progress=False)
        assert isinstance(out.c2, CPConv2d) and isinstance(out.dw, nn.Conv2d)
        assert any(s.fqn == "dw" and "groups" in s.reason for s in report.skipped)
        path = tmp_path / "cp.safetensors"
        pk.save(out, path)
        loaded = pk.load(path, ConvNet())
        with torch.no_grad():
            assert torch.equal(loaded(x), out(x))
    assert str(pk.recipes.CP(rank=6)) == "cp:rank=6"
    assert str(pk.recipes.CP(0.9)) == "cp:0.9"


def test_bad_inputs_refused():
    conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(ValueError, match="groups"):
        CPConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), rank=2)
    with pytest.raises(TypeError, match="conv"):
        CPConv2d.from_conv(nn.Linear(4, 4), rank=2)
    with pytest.raises(ValueError, match="exactly one"):
        CPConv2d.from_conv(conv)
    with pytest.raises(ValueError, match="exactly one"):
        CPConv2d.from_conv(conv, rank=2, energy=0.9)
    with pytest.raises(ValueError, match="rank"):
        CPConv2d.from_conv(conv, rank=0)
    with pytest.raises(ValueError, match="energy"):
        CPConv2d.from_conv(conv, energy=1.5)
    bad = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        bad.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        CPConv2d.from_conv(bad, rank=2)
    with pytest.raises(ValueError, match="exactly one"):
        pk.recipes.CP()
    with pytest.raises(ValueError, match="rank"):
        pk.recipes.CP(rank=-1)
    with pytest.raises(ValueError, match="energy"):
        pk.compress(nn.Sequential(conv), "cp:2.0", torch.randn(1, 4, 5, 5), progress=False)
