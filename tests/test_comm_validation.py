"""Validation where data enters comm: blobs, payloads built by hand, and state dicts.

Each malformed input raises a TypeError / ValueError naming what is wrong, at
the call that takes it in, and leaves the object it was loaded into as it was.
"""

from __future__ import annotations

import os
import socket
import struct
import zlib
from contextlib import closing

import pytest
import torch
import torch.distributed as dist

from pykernels import comm
from pykernels.comm import wire


def blob_with_shape(shape, body: bytes = b"") -> bytes:
    """A dense fp32 blob with the given header shape and body, correctly checksummed."""
    head = struct.pack("<4sBBBB", wire.MAGIC, wire.VERSION, 0, 0, len(shape))
    data = head + struct.pack(f"<{len(shape)}Q", *shape) + body
    return data + struct.pack("<I", zlib.crc32(data))


# --- Payload.from_bytes --------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        (0, 1 << 63, 1 << 63),  # numel 0, the rest overflows int64
        (1 << 40, 0, 1 << 40),
        (0, (1 << 64) - 1),
        (0, 1 << 32),  # > max_numel (2^31) in its non-zero dimensions
    ],
)
def test_an_empty_shape_whose_other_dimensions_are_huge_is_refused(shape):
    with pytest.raises(ValueError, match="in its non-zero dimensions, more than max_numel"):
        comm.Payload.from_bytes(blob_with_shape(shape))


def test_empty_shapes_within_the_limit_still_parse():
    for shape in [(0,), (0, 5), (3, 0, 7), (0, 1 << 20)]:
        p = comm.Payload.from_bytes(blob_with_shape(shape))
        assert p.shape == shape and p.numel == 0
        assert comm.decode(p).shape == shape
    with pytest.raises(ValueError, match="more than max_numel=4"):
        comm.Payload.from_bytes(blob_with_shape((0, 5)), max_numel=4)


@pytest.mark.parametrize("bad", ["10", 10.0, None, True, [10]])
def test_max_numel_must_be_an_int(bad):
    blob = comm.TopK(0.5).encode(torch.randn(10)).to_bytes()
    with pytest.raises(TypeError, match="max_numel must be an int"):
        comm.Payload.from_bytes(blob, max_numel=bad)
    with pytest.raises(ValueError, match="max_numel must be >= 0"):
        comm.Payload.from_bytes(blob, max_numel=-1)
    import numpy as np

    assert comm.Payload.from_bytes(blob, max_numel=np.int64(10)).numel == 10


# --- Payload built by hand -------------------------------------------------------------


def test_a_payload_without_its_params_or_parts_is_refused_where_it_is_made():
    idx, vals = torch.tensor([1, 3]), torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match=r"topk payload needs params .*missing \['k', "):
        comm.Payload("topk", torch.float32, (5,), {}, {"indices": idx, "values": vals})
    params = {"k": 2, "value_dtype": torch.float32, "approx": False}
    with pytest.raises(ValueError, match=r"missing \['error_feedback'\]"):
        comm.Payload("topk", torch.float32, (5,), params, {"indices": idx, "values": vals})
    params["error_feedback"] = False
    with pytest.raises(ValueError, match=r"topk payload needs parts .*missing \['values'\]"):
        comm.Payload("topk", torch.float32, (5,), params, {"indices": idx})
    with pytest.raises(TypeError, match="part 'values' must be a tensor"):
        comm.Payload("topk", torch.float32, (5,), params, {"indices": idx, "values": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"quantize payload needs params"):
        comm.Payload("quantize", torch.float32, (5,), {"bits": 8}, {})
    with pytest.raises(ValueError, match=r"lowrank payload needs parts .*missing \['q'\]"):
        lr = {"rank": 1, "rows": 2, "cols": 2, "warm_start": True, "error_feedback": True}
        comm.Payload("lowrank", torch.float32, (2, 2), lr, {"p": torch.ones(2, 1)})
    with pytest.raises(ValueError, match=r"dense payload needs parts"):
        comm.Payload("dense", torch.float32, (2,), {}, {})
    with pytest.raises(TypeError, match="params must be a mapping"):
        comm.Payload("dense", torch.float32, (2,), None, {"data": torch.ones(2)})
    with pytest.raises(ValueError, match="non-negative ints"):
        comm.Payload("dense", torch.float32, (2, -1), {}, {"data": torch.ones(2)})
    with pytest.raises(TypeError, match="shape must be a tuple"):
        comm.Payload("dense", torch.float32, "2", {}, {"data": torch.ones(2)})
    # a correct one, built by hand, goes through the wire
    p = comm.Payload("topk", torch.float32, (5,), params, {"indices": idx, "values": vals})
    assert torch.equal(comm.decode(comm.Payload.from_bytes(p.to_bytes())), comm.decode(p))


# --- codecs' load_state_dict -----------------------------------------------------------


CODEC_STATES = {
    "topk": lambda: comm.TopK(0.1),
    "quantize": lambda: comm.Quantize(8, error_feedback=True),
    "lowrank": lambda: comm.LowRank(2),
    "chain": lambda: comm.Chain(comm.TopK(0.1), comm.Quantize(8)),
}


def trained(name: str) -> comm.Codec:
    codec = CODEC_STATES[name]()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        codec.encode(torch.randn(20, 10, generator=g), key="w")
    return codec


def check_refused(codec, sd, exc, match):
    before = {k: v.clone() for k, v in codec.state_dict().items()}
    with pytest.raises(exc, match=match):
        codec.load_state_dict(sd)
    after = codec.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


@pytest.mark.parametrize("name", list(CODEC_STATES))
def test_codec_state_dicts_that_are_not_mappings(name):
    codec = trained(name)
    for bad in ([("w/residual", torch.zeros(3))], "w/residual", None, 3):
        check_refused(codec, bad, TypeError, "state_dict must be a mapping")


def test_malformed_codec_state_entries_name_the_entry():
    topk, quant, lowrank, chain = (trained(n) for n in CODEC_STATES)
    nan = torch.tensor([0.0, float("nan")])
    check_refused(topk, {"w/residual": nan}, ValueError, "w/residual holds NaN or inf")
    check_refused(topk, {"w/residual": "zeros"}, TypeError, "w/residual must be a tensor")
    check_refused(topk, {("w", "residual"): torch.zeros(2)}, ValueError, "is not '<key>/<field>'")
    check_refused(quant, {"w/step": torch.tensor([1, 2])}, ValueError, "w/step must be one")
    check_refused(quant, {"w/step": torch.tensor(-3)}, ValueError, "w/step must be one .* = -3")
    check_refused(quant, {"w/step": torch.tensor(1.0)}, TypeError, "w/step must be torch.int64")
    check_refused(lowrank, {"w/q": torch.zeros(3)}, ValueError, r"w/q must be \[cols, r\]")
    check_refused(lowrank, {"w/q": torch.full((3, 2), float("inf"))}, ValueError, "w/q holds")
    # Chain: all or nothing, and the message says which codec's entries
    check_refused(
        chain,
        {"first.w/residual": torch.zeros(200), "second.w/step": torch.tensor([1, 2])},
        ValueError,
        r"entries under 'second.'.*w/step must be one",
    )
    check_refused(chain, {"w/residual": torch.zeros(2)}, ValueError, "neither 'first.'")
    # a good one still loads, and equals what was saved
    sd = quant.state_dict()
    fresh = CODEC_STATES["quantize"]()
    fresh.load_state_dict(sd)
    assert all(torch.equal(fresh.state_dict()[k], sd[k]) for k in sd)


# --- CompressionState.load_state_dict -----------------------------------------------------


@pytest.fixture
def group():
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def good_state(codec=None, prefix="") -> comm.ddp.CompressionState:
    state = comm.ddp.CompressionState(codec or comm.TopK(0.1), start_iter=2)
    res = {f"{prefix}bucket0/residual": torch.ones(8), f"{prefix}bucket1/residual": torch.ones(4)}
    state.load_state_dict(
        {
            "iter": 5,
            "start_iter": 2,
            "bytes_sent": 10,
            "bytes_dense": 40,
            "codec": res,
            "layouts": {"bucket0": [[0, 5], [1, 3]], "bucket1": [[2, 4]]},
        }
    )
    return state


BAD_STATES = [
    ([1, 2], TypeError, "state_dict must be a mapping"),
    ({"iter": 1}, ValueError, r"missing \['codec'\]"),
    ({"iter": 1, "codec": [1]}, TypeError, "'codec' must be the codec's state_dict"),
    ({"iter": "1", "codec": {}}, TypeError, "iter must be an int"),
    ({"iter": -1, "codec": {}}, ValueError, "iter must be >= 0"),
    ({"iter": 1, "codec": {}, "bytes_sent": "many"}, TypeError, "bytes_sent must be an int"),
    ({"iter": 1, "codec": {}, "bytes_dense": -5}, ValueError, "bytes_dense must be >= 0"),
    ({"iter": 1, "codec": {}, "start_iter": 2.5}, TypeError, "start_iter must be an int"),
    ({"iter": 1, "codec": {}, "layouts": [1]}, TypeError, "'layouts' must map bucket keys"),
    ({"iter": 1, "codec": {}, "layouts": {"b": 5}}, TypeError, r"layouts\['b'\] must be a list"),
    ({"iter": 1, "codec": {}, "layouts": {"b": [[0]]}}, ValueError, r"layouts\['b'\]\[0\] must be"),
    ({"iter": 1, "codec": {}, "layouts": {"b": [[0, "x"]]}}, TypeError, r"\]\[1\] must be an int"),
    ({"iter": 1, "codec": {}, "layouts": {"b": [[-1, 3]]}}, ValueError, r"\[0\]\[0\] must be >= 0"),
    (
        {"iter": 1, "codec": {}, "layouts": {"a": [[0, 3]], "b": [[0, 3]]}},
        ValueError,
        "parameter 0 is in both",
    ),
    (
        {"iter": 1, "codec": {"a/residual": torch.zeros(5)}, "layouts": {"a": [[0, 3]]}},
        ValueError,
        r"layouts\['a'\] covers 3 elements, the codec's a/residual has 5",
    ),
    (
        {"iter": 1, "codec": {"a/residual": torch.tensor([float("nan")])}},
        ValueError,
        "a/residual holds NaN",
    ),
]


@pytest.mark.parametrize("bad, exc, match", BAD_STATES)
def test_malformed_compression_states_leave_the_state_as_it_was(group, bad, exc, match):
    state = good_state()
    before = state.state_dict()
    with pytest.raises(exc, match=match):
        state.load_state_dict(bad)
    after = state.state_dict()
    assert after["iter"] == before["iter"] == 5 and after["layouts"] == before["layouts"]
    assert after["bytes_sent"] == 10 and after["bytes_dense"] == 40
    assert all(torch.equal(after["codec"][k], v) for k, v in before["codec"].items())


def test_chain_layouts_are_checked_against_the_first_codecs_residuals(group):
    state = good_state(comm.Chain(comm.TopK(0.1), comm.Quantize(8)), prefix="first.")
    with pytest.raises(ValueError, match="first.a/residual has 5"):
        state.load_state_dict(
            {"iter": 1, "codec": {"first.a/residual": torch.zeros(5)}, "layouts": {"a": [[0, 3]]}}
        )
    state.load_state_dict(
        {"iter": 1, "codec": {"first.a/residual": torch.zeros(3)}, "layouts": {"a": [[0, 3]]}}
    )
    assert state.state_dict()["layouts"] == {"a": [[0, 3]]}
