"""comm's codec registry: a codec defined outside the library works end to end,
and the names the codecs had before they moved into one module each still import."""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pykernels import comm
from pykernels.comm import wire

SIGN_ID = 200  # an id no built-in codec uses


class SignCodec(comm.Codec):
    """signSGD with one scale: the signs as bits, and the mean magnitude.

    Defined here, as a user would: nothing in the library names it.
    """

    name = "test-sign"
    wire_id = SIGN_ID
    fixed_size = True  # ceil(numel / 8) bytes of signs and one scale

    def encode(self, tensor: Tensor, key: str | None = None) -> comm.Payload:
        t = self._check_tensor(tensor).float()
        signs = np.packbits((t >= 0).reshape(-1).cpu().numpy(), bitorder="little")
        scale = t.abs().mean() if t.numel() else torch.zeros(())
        parts = {"signs": torch.from_numpy(signs), "scale": scale.reshape(())}
        return comm.Payload("test-sign", tensor.dtype, tuple(t.shape), {}, parts)

    @classmethod
    def write_body(cls, payload: comm.Payload, out: list) -> None:
        out.append(struct.pack("<f", float(payload.parts["scale"])))
        out.append(wire.raw_bytes(payload.parts["signs"]))

    @classmethod
    def read_body(
        cls, reader: wire.Reader, dtype: torch.dtype, numel: int
    ) -> tuple[dict[str, Any], dict[str, wire.Part]]:
        (scale,) = reader.unpack("<f")
        signs = reader.array((numel + 7) // 8, "u1", "sign bits")
        if not scale >= 0:
            raise ValueError(f"payload: test-sign scale {scale} is not >= 0")
        parts = {"signs": wire.host_tensor(signs, torch.uint8), "scale": torch.tensor(scale)}
        return {}, parts

    @classmethod
    def decode_payload(cls, payload: comm.Payload, device: torch.device) -> Tensor:
        bits = np.unpackbits(payload.parts["signs"].cpu().numpy(), bitorder="little")
        signs = torch.from_numpy(bits[: payload.numel].astype(np.float32)) * 2 - 1
        out = signs * payload.parts["scale"].float().cpu()
        return out.to(device, payload.dtype).reshape(payload.shape)


def expected(x: Tensor) -> Tensor:
    x32 = x.float()
    return torch.where(x32 >= 0, 1.0, -1.0).mul(x32.abs().mean()).to(x.dtype)


def reseal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_registering_is_defining_the_class():
    assert wire.CODECS["test-sign"] == SIGN_ID and wire.CODEC_NAMES[SIGN_ID] == "test-sign"
    assert wire.codec_class("test-sign") is SignCodec


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_new_codec_goes_through_encode_wire_decode_and_aggregate(dtype, gen):
    codec = SignCodec()
    xs = [torch.randn(37, 5, generator=gen).to(dtype) for _ in range(3)]
    payloads = [codec.encode(x, key="w") for x in xs]
    blobs = [p.to_bytes() for p in payloads]
    assert blobs[0][:6] == b"PKCM\x01" + bytes([SIGN_ID])
    assert all(len(b) == len(blobs[0]) == p.nbytes for b, p in zip(blobs, payloads, strict=True))
    back = [comm.Payload.from_bytes(b) for b in blobs]
    for x, p, q, b in zip(xs, payloads, back, blobs, strict=True):
        assert (q.codec, q.dtype, q.shape) == ("test-sign", dtype, (37, 5))
        assert q.to_bytes() == b
        assert torch.equal(comm.decode(q), expected(x))
        assert torch.equal(codec.decode(p), expected(x))
        assert "Payload(test-sign, shape=[37, 5]" in repr(q)

    # The sum in fp32, payload by payload in order, as for the built-in codecs.
    want = torch.zeros(37, 5)
    for x in xs:
        want += expected(x).float()
    assert torch.equal(comm.aggregate(back), want.to(dtype))
    assert torch.equal(codec.aggregate(back), want.to(dtype))
    out = torch.full((185,), float("nan"))
    comm.codecs.sum_into(back, out, scale=0.5, overwrite=True)
    assert torch.equal(out, torch.zeros(185).add_(want.reshape(-1), alpha=0.5))

    # Mixed with a built-in codec's payloads: each added in its turn.
    tk = comm.Payload.from_bytes(comm.TopK(0.2).encode(xs[0]).to_bytes())
    mixed = torch.zeros(37, 5)
    for d in (expected(xs[0]), comm.decode(tk), expected(xs[1])):
        mixed += d.float()
    assert torch.equal(comm.aggregate([back[0], tk, back[1]]), mixed.to(dtype))


def test_a_new_codec_s_blobs_are_checked_like_the_others(gen):
    blob = SignCodec().encode(torch.randn(100, generator=gen)).to_bytes()
    with pytest.raises(ValueError, match="counts inconsistent"):
        comm.Payload.from_bytes(reseal(blob[:-8]))
    with pytest.raises(ValueError, match="unexpected bytes after the test-sign body"):
        comm.Payload.from_bytes(reseal(blob[:-4] + b"\0"))
    fp64 = blob[:6] + bytes([wire.DTYPES[torch.float64]]) + blob[7:-4]
    with pytest.raises(ValueError, match="test-sign payloads decode to fp32, fp16 or bf16"):
        comm.Payload.from_bytes(reseal(fp64))
    negative = bytearray(blob[:-4])
    negative[16:20] = struct.pack("<f", -1.0)  # after the header and the one u64 dimension
    with pytest.raises(ValueError, match="test-sign scale -1.0"):
        comm.Payload.from_bytes(reseal(bytes(negative)))
    with pytest.raises(TypeError, match="SignCodec encodes float32, float16 or bfloat16"):
        SignCodec().encode(torch.zeros(3, dtype=torch.float64))


@pytest.fixture
def group():
    """A one-process gloo group in this process."""
    import socket
    from contextlib import closing

    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_a_new_codec_runs_in_the_ddp_hook(group, gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    ref = [p.detach().clone() for p in model.parameters()]
    ddp = DDP(model)
    state = comm.ddp.CompressionState(SignCodec(), start_iter=0)
    ddp.register_comm_hook(state, comm.ddp.compress_hook)
    x = torch.randn(5, 8, generator=gen)
    ddp(x).square().sum().backward()

    plain = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        for p, r in zip(plain.parameters(), ref, strict=True):
            p.copy_(r)
    plain(x).square().sum().backward()
    dense = torch.cat([p.grad.reshape(-1) for p in plain.parameters()])
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    # One bucket, one process: the mean is this process's payload, decoded.
    assert torch.allclose(got.abs(), dense.abs().mean().expand_as(got))
    assert torch.equal(got >= 0, dense >= 0)
    assert state.stats()["compressed_steps"] == 1


def test_the_registry_refuses_clashes_and_bad_ids():
    before = dict(wire.CODECS)
    with pytest.raises(ValueError, match="wire id 1 is taken by pykernels.comm.topk.TopK"):

        class SameId(comm.Codec):
            name = "test-same-id"
            wire_id = 1

    with pytest.raises(ValueError, match="codec 'topk' / wire id 201 is taken"):

        class SameName(comm.Codec):
            name = "topk"
            wire_id = 201

    with pytest.raises(ValueError, match=r"wire_id must be an int in \[0, 255\]"):

        class TooBig(comm.Codec):
            name = "test-too-big"
            wire_id = 256

    with pytest.raises(TypeError, match="needs its own name"):

        class Nameless(SignCodec):
            wire_id = 202

    assert wire.CODECS == before

    class LoudTopK(comm.TopK):
        """Tweaks TopK; without a wire_id of its own its payloads stay TopK's."""

    assert wire.CODECS == before and wire.codec_class("topk") is comm.TopK
    p = LoudTopK(1.0).encode(torch.ones(4))
    assert p.codec == "topk" and torch.equal(comm.decode(p), torch.ones(4))


def test_redefining_a_codec_class_replaces_it(monkeypatch):
    """A reloaded module or a notebook cell run again defines the class anew."""
    for table in ("CODECS", "CODEC_NAMES", "_CLASSES"):
        monkeypatch.setattr(wire, table, dict(getattr(wire, table)))

    def define(wid: int) -> type[comm.Codec]:
        class Again(SignCodec):
            name = "test-again"
            wire_id = wid

        return Again

    first = define(210)
    second = define(211)
    assert wire.codec_class("test-again") is second is not first
    assert wire.CODECS["test-again"] == 211 and 210 not in wire.CODEC_NAMES


def test_what_the_ddp_hook_reads_from_each_built_in_codec():
    """The class attributes that replaced the hook's isinstance checks."""
    topk, quant, lowrank = comm.TopK(0.1), comm.Quantize(8, seed=5), comm.LowRank(4)
    chain = comm.Chain(comm.TopK(0.1), comm.Quantize(4, seed=7))
    assert [c.exchange for c in (topk, quant, lowrank, chain)] == [
        "gather",
        "gather",
        "powersgd",
        "gather",
    ]
    assert [c.fixed_size for c in (topk, quant, lowrank, chain)] == [False, True, False, False]
    assert [c.noise_seed for c in (topk, quant, lowrank, chain)] == [None, 5, None, 7]
    assert topk.keeps_tensor_state and chain.keeps_tensor_state and lowrank.keeps_tensor_state
    assert not quant.keeps_tensor_state
    assert comm.Quantize(8, error_feedback=True).keeps_tensor_state
    assert not comm.TopK(0.1, error_feedback=False).keeps_tensor_state
    assert not comm.LowRank(4, warm_start=False, error_feedback=False).keeps_tensor_state
    assert topk.residual_codec() is topk and chain.residual_codec() is chain.first
    assert quant.residual_codec() is None
    chain.noise_seed = 11
    assert chain.second.seed == 11
    with pytest.raises(ValueError, match="seed must be in"):
        quant.noise_seed = -1
    with pytest.raises(AttributeError, match="draws no rounding noise"):
        topk.noise_seed = 3


def test_old_import_paths_still_work():
    from pykernels.comm.codecs import (
        _TOPK_DTYPES,
        Chain,
        Codec,
        Payload,
        Quantize,
        TopK,
        _check_bool,
        _check_int,
        _key,
        _mix,
        aggregate,
        decode,
        key_hash,
        sum_into,
    )
    from pykernels.comm.lowrank import LowRank, orthonormalize
    from pykernels.comm.wire import (
        CODEC_NAMES,
        CODECS,
        DEFAULT_MAX_NUMEL,
        DTYPE_OF,
        DTYPES,
        LOWRANK_EF,
        LOWRANK_WARM,
        MAGIC,
        MAX_NDIM,
        QUANT_EF,
        QUANT_STOCHASTIC,
        TOPK_APPROX,
        TOPK_EF,
        VERSION,
        Part,
        index_plan,
        pack_bits,
        unpack_bits,
    )
    from pykernels.comm.wire import Payload as WirePayload

    assert (Chain, Codec, Quantize, TopK, LowRank) == (
        comm.Chain,
        comm.Codec,
        comm.Quantize,
        comm.TopK,
        comm.LowRank,
    )
    assert Payload is WirePayload is comm.Payload and Part is not None
    assert (aggregate, decode) == (comm.aggregate, comm.decode)
    assert callable(sum_into) and callable(orthonormalize) and callable(index_plan)
    assert _TOPK_DTYPES == (torch.float32, torch.float16, torch.bfloat16)
    assert _check_bool("f", "x", True) is True and _check_int("f", "x", 3, 1) == 3
    assert _key(None) == "" and key_hash("w") == zlib.crc32(b"w")
    assert _mix(1, 2) == comm.base._mix(1, 2)
    assert {k: CODECS[k] for k in ("dense", "topk", "quantize", "lowrank")} == {
        "dense": 0,
        "topk": 1,
        "quantize": 2,
        "lowrank": 3,
    }
    assert all(CODEC_NAMES[v] == k for k, v in CODECS.items())
    assert DTYPES == {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
    assert all(DTYPES[v] == k for k, v in DTYPE_OF.items())
    assert (TOPK_APPROX, TOPK_EF, QUANT_STOCHASTIC, QUANT_EF, LOWRANK_WARM, LOWRANK_EF) == (
        1,
        2,
        1,
        2,
        1,
        2,
    )
    assert (MAGIC, VERSION, MAX_NDIM, DEFAULT_MAX_NUMEL) == (b"PKCM", 1, 32, 1 << 31)
    assert np.array_equal(unpack_bits(pack_bits(np.arange(9), 4), 9, 4), np.arange(9))
    with pytest.raises(AttributeError):
        wire.no_such_name  # noqa: B018
