"""Protocol round-trips and validation: the wire format alone, no worker."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from bridge import ProtocolError, ProtocolVersionError
from bridge import _protocol as proto

MESSAGES: list[proto.Message] = [
    proto.Hello(role="client", pid=1, token="t"),
    proto.Hello(
        role="worker", pid=2, versions={"numpy": "1.26.4"}, state="ready", device="cpu", host="h"
    ),
    proto.Ready(
        models=[
            proto.ModelInfo(
                index=0,
                model_id="/m/x",
                name="m/x",
                capabilities=["embed"],
                dim=384,
                embedding_dtype="float32",
                engine="torch",
                device="cpu",
                dtype="auto",
            )
        ],
        load_seconds=1.5,
    ),
    proto.Failed(
        error=proto.ErrorInfo(category="startup", type="OSError", message="no", traceback="tb")
    ),
    proto.Request(id=7, op="embed", model="m/x", timeout_s=2.5, texts=["a", "你好"]),
    proto.Request(id=8, op="rerank", model="m/x", query="q", texts=["d"], raw_scores=True),
    proto.Request(
        id=9,
        op="image_embed",
        model="m/x",
        media=[
            proto.MediaRef(url="https://x/y.png"),
            proto.MediaRef(frame=0, mode="RGB", width=2, height=3),
        ],
    ),
    proto.Result(id=7, usage=3, embeddings=proto.ArrayRef(dtype="<f4", shape=[2, 384], frame=0)),
    proto.Result(id=8, usage=3, scores=[0.25]),
    proto.Result(id=10, usage=1, labels=[[proto.LabelScore("pos", 0.75)]]),
    proto.Error(
        id=7, error=proto.ErrorInfo(category="input", type="ImageCorruption", message="bad")
    ),
    proto.Error(
        id=None, error=proto.ErrorInfo(category="protocol", type="ProtocolError", message="?")
    ),
    proto.Cancel(id=7),
    proto.Ping(t=1.0),
    proto.Pong(t=1.0),
    proto.Status(id=1),
    proto.Status(
        id=1,
        report=proto.StatusReport(
            pid=1,
            uptime_s=1.0,
            requests_in_flight=0,
            items_in_flight=0,
            requests_served=3,
            queue_depth={"m/x": 0},
            rss_bytes=10,
        ),
    ),
    proto.Bye(reason="done", shutdown=True),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: proto.Message) -> None:
    assert proto.decode_header(proto.encode_header(message)) == message


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_headers_are_plain_msgpack_maps_with_version(message: proto.Message) -> None:
    raw = msgpack.unpackb(proto.encode_header(message))
    assert isinstance(raw, dict)
    assert raw["v"] == proto.PROTOCOL_VERSION
    assert raw["kind"] == type(message).__name__.upper()


@pytest.mark.parametrize("dtype", ["<f4", "|i1", "|u1"])
@pytest.mark.parametrize("shape", [(3, 384), (1, 1792), (0, 16), (5,)])
def test_array_round_trip_is_exact_and_zero_copy(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    ref, buffer = proto.encode_array(array, frame=0)
    assert ref.dtype == dtype and ref.shape == list(shape)
    frame = bytearray(buffer)  # what arrives: a writable buffer
    decoded = proto.decode_array(ref, [frame])
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == shape
    assert np.array_equal(decoded, array)
    if array.size:
        assert np.shares_memory(decoded, np.frombuffer(frame, dtype=np.uint8))


def test_encode_sends_contiguous_array_without_copy() -> None:
    array = np.arange(12, dtype="<f4").reshape(3, 4)
    _, buffer = proto.encode_array(array, frame=0)
    assert np.shares_memory(np.frombuffer(buffer, dtype="<f4"), array)


def test_big_endian_and_strided_input_are_normalised() -> None:
    array = np.arange(20, dtype=">f4").reshape(4, 5)[:, ::2]
    ref, buffer = proto.encode_array(array, frame=0)
    assert ref.dtype == "<f4"
    assert np.array_equal(proto.decode_array(ref, [bytes(buffer)]), array.astype("<f4"))


@pytest.mark.parametrize("dtype", ["<f8", "|O", "<U4", ">f4", "float32", "<c8"])
def test_disallowed_dtypes_are_refused(dtype: str) -> None:
    ref = proto.ArrayRef(dtype=dtype, shape=[1], frame=0)
    with pytest.raises(ProtocolError, match="not allowed"):
        proto.decode_array(ref, [b"\0" * 16])


@pytest.mark.parametrize(
    ("shape", "frame", "frames", "match"),
    [
        ([2, 4], 0, [b"\0" * 31], "needs 32 bytes"),  # truncated
        ([2, 4], 0, [b"\0" * 33], "needs 32 bytes"),  # trailing garbage
        ([2, 4], 1, [b"\0" * 32], "frame 1"),  # no such frame
        ([10**6, 10**6], 0, [b"\0" * 32], "needs"),  # absurd declared shape
    ],
)
def test_array_claims_are_checked_against_the_frame(
    shape: list[int], frame: int, frames: list[bytes], match: str
) -> None:
    with pytest.raises(ProtocolError, match=match):
        proto.decode_array(proto.ArrayRef(dtype="<f4", shape=shape, frame=frame), frames)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"garbage bytes that are not msgpack at all",
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"kind": "NOPE", "v": 1}),
        msgpack.packb({"kind": "REQUEST", "v": 1}),  # missing fields
        msgpack.packb(
            {"kind": "REQUEST", "v": 1, "id": "7", "op": "embed", "model": "m"}
        ),  # wrong type
        msgpack.packb(
            {"kind": "REQUEST", "v": 1, "id": -1, "op": "embed", "model": "m"}
        ),  # negative id
        msgpack.packb(
            {"kind": "REQUEST", "v": 1, "id": 1, "op": "explode", "model": "m"}
        ),  # unknown op
        msgpack.packb(
            {
                "kind": "RESULT",
                "v": 1,
                "id": 1,
                "usage": 1,
                "embeddings": {"dtype": "<f4", "shape": [-1, 3], "frame": 0},
            }
        ),  # negative dim
        msgpack.packb(
            {
                "kind": "RESULT",
                "v": 1,
                "id": 1,
                "usage": 1,
                "embeddings": {"dtype": "<f4", "shape": [1, 1, 1, 1, 1], "frame": 0},
            }
        ),  # too many dims
    ],
)
def test_malformed_headers_raise_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        proto.decode_header(raw)


def test_wrong_protocol_version_is_named_as_such() -> None:
    with pytest.raises(ProtocolVersionError, match="version 99"):
        proto.decode_header(msgpack.packb({"kind": "PING", "v": 99, "t": 0.0}))
    # ... even when the header does not fit this version's schema at all
    with pytest.raises(ProtocolVersionError, match="version 2"):
        proto.decode_header(msgpack.packb({"kind": "REQUEST", "v": 2, "what": "new"}))


def test_no_pickle_anywhere_in_the_package() -> None:
    """pyzmq's send_pyobj/recv_pyobj (and send_serialized) pickle; none of it may appear."""
    from pathlib import Path

    package = Path(proto.__file__).parent
    forbidden = (
        "import pickle",
        "cloudpickle",
        "send_pyobj",
        "recv_pyobj",
        "send_serialized",
        "recv_serialized",
        "import marshal",
        "import dill",
    )
    for source in package.glob("*.py"):
        text = source.read_text(encoding="utf-8")
        for word in forbidden:
            assert word not in text, f"{source.name} uses {word}"
