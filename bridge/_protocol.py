"""The wire format: the one place both sides import.

A message is a ZeroMQ multipart message::

    [header, frame_0, frame_1, ...]

``header`` is a msgpack map (a ``msgspec.Struct`` below, told apart by its
``kind`` field) and every ``frame_i`` is a raw byte buffer. Arrays travel as
an :class:`ArrayRef` -- ``(dtype string with explicit byte order, shape,
frame index)`` -- over one raw little-endian frame: never as pickle, never as
lists of floats. Binary inputs (image or audio bytes, raw pixels) travel the
same way, as :class:`MediaRef` over raw frames. On the worker's ROUTER socket
ZeroMQ prepends the peer's routing id; that frame is not part of this format.

Why msgspec: it reads and writes plain msgpack (any msgpack library can
speak to a worker) and validates every header against these schemas while
decoding, so hostile input is rejected by typed checks instead of by
hand-written ``isinstance`` ladders. vLLM uses it for the same job.

This module must import in both venvs, so it only uses numpy's stable
buffer API (``np.frombuffer``, ``dtype.str``), identical in numpy 1 and 2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec
import numpy as np

from bridge._errors import ProtocolError, ProtocolVersionError

__all__ = [
    "ALLOWED_DTYPES",
    "OPS",
    "PROTOCOL_VERSION",
    "RAW_IMAGE_MODES",
    "ArrayRef",
    "Bye",
    "Cancel",
    "ErrorInfo",
    "Failed",
    "Hello",
    "LabelScore",
    "MediaRef",
    "Message",
    "ModelInfo",
    "Ping",
    "Pong",
    "Ready",
    "Request",
    "Result",
    "Status",
    "StatusReport",
    "decode_array",
    "decode_header",
    "encode_array",
    "encode_header",
]

PROTOCOL_VERSION: Final = 1

#: Operations a worker can run, named as embed/infinity name the methods.
OPS: Final = ("embed", "rerank", "classify", "image_embed", "audio_embed")
Op: TypeAlias = Literal["embed", "rerank", "classify", "image_embed", "audio_embed"]

#: dtypes allowed in an ArrayRef: what infinity can return (float32
#: embeddings, int8/uint8 and bit-packed binary/ubinary quantisations).
ALLOWED_DTYPES: Final = frozenset({"<f4", "|i1", "|u1"})

#: PIL modes sent as raw pixels, with bytes per pixel; the receiver rebuilds
#: the image with ``Image.frombytes``. Images of any other mode (palette
#: images, 1-bit, 16-bit...) travel as lossless PNG bytes instead, so nothing
#: that the raw bytes cannot carry (a palette) is lost.
RAW_IMAGE_MODES: Final = {
    "L": 1,
    "LA": 2,
    "RGB": 3,
    "RGBA": 4,
    "RGBX": 4,
    "CMYK": 4,
    "YCbCr": 3,
    "I": 4,
    "F": 4,
}

# Hard caps that make absurd headers fail validation early. Real limits
# (message size, items per call) are configurable and enforced elsewhere.
_MAX_ITEMS: Final = 1 << 20
_MAX_DIM: Final = 1 << 24
_MAX_FRAMES: Final = 1 << 20

RequestId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Dim = Annotated[int, msgspec.Meta(ge=0, le=_MAX_DIM)]
FrameIndex = Annotated[int, msgspec.Meta(ge=0, lt=_MAX_FRAMES)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0)]


# --------------------------------------------------------------------- payloads


class ArrayRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An n-d array stored C-contiguously in frame ``frame``."""

    dtype: str
    shape: Annotated[list[Dim], msgspec.Meta(min_length=1, max_length=4)]
    frame: FrameIndex


class MediaRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One image or audio input.

    Exactly one of: ``url`` (fetched by the worker), or ``frame`` holding the
    file's bytes (PNG, JPEG, WAV, ...), or ``frame`` holding raw pixels of a
    PIL image given by ``mode``/``width``/``height``.
    """

    url: str | None = None
    frame: FrameIndex | None = None
    mode: str | None = None
    width: Annotated[int, msgspec.Meta(ge=1, le=65536)] | None = None
    height: Annotated[int, msgspec.Meta(ge=1, le=65536)] | None = None


class ErrorInfo(msgspec.Struct, frozen=True):
    """An error as it crosses the wire.

    ``category`` picks the client-side exception class: input, unknown_model,
    unsupported, too_large, oom, deadline, overloaded, protocol, startup,
    internal.
    """

    category: str
    type: str
    message: str
    traceback: str = ""


class ModelInfo(msgspec.Struct, frozen=True):
    """What the worker loaded, reported in READY."""

    index: int
    model_id: str  # as given by the user at construction
    name: str  # infinity's served name (last two path parts)
    capabilities: list[str]
    dim: int | None  # width of one embedding row, None for non-embedders
    embedding_dtype: str
    engine: str
    device: str
    dtype: str
    labels: list[str] | None = None  # classifiers: id2label in order
    batch_size: int = 0  # infinity's max batch size (after GPU budget calibration)
    batch_delay: float = 0.0  # seconds infinity waits between batch stages (measured or given)


class LabelScore(msgspec.Struct, frozen=True, array_like=True):
    label: str
    score: float


class StatusReport(msgspec.Struct, frozen=True):
    pid: int
    uptime_s: float
    requests_in_flight: int
    items_in_flight: int
    requests_served: int
    queue_depth: dict[str, int]
    rss_bytes: int
    gpu: dict[str, int] | None = None  # reserved/allocated/free/total/budget bytes
    cuda_visible_devices: str = ""


# --------------------------------------------------------------------- messages


class Message(msgspec.Struct, tag_field="kind", kw_only=True):
    """Base of every header; ``v`` is checked on every message."""

    v: int = PROTOCOL_VERSION


class Hello(Message, tag="HELLO"):
    """First words of each side.

    client -> worker: ``role="client"``, ``token`` proves ownership of a
    spawned worker (only the owner may shut it down with BYE).
    worker -> client: versions of its stack, its state and device.
    """

    role: Literal["client", "worker"]
    pid: int
    versions: dict[str, str] = {}
    state: Literal["loading", "ready", "failed", ""] = ""
    device: str = ""
    host: str = ""
    token: str = ""


class Ready(Message, tag="READY"):
    models: list[ModelInfo]
    load_seconds: float
    device: str = ""
    gpu: dict[str, int] | None = None


class Failed(Message, tag="FAILED"):
    error: ErrorInfo


class Request(Message, tag="REQUEST"):
    id: RequestId
    op: Op
    model: str
    timeout_s: Seconds | None = None
    attempt: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    texts: Annotated[list[str], msgspec.Meta(max_length=_MAX_ITEMS)] = []
    query: str | None = None
    raw_scores: bool = False
    media: Annotated[list[MediaRef], msgspec.Meta(max_length=_MAX_ITEMS)] = []


class Result(Message, tag="RESULT"):
    id: RequestId
    usage: int
    embeddings: ArrayRef | None = None
    scores: list[float] | None = None
    labels: list[list[LabelScore]] | None = None


class Error(Message, tag="ERROR"):
    id: RequestId | None
    error: ErrorInfo


class Cancel(Message, tag="CANCEL"):
    id: RequestId


class Ping(Message, tag="PING"):
    t: float


class Pong(Message, tag="PONG"):
    t: float


class Status(Message, tag="STATUS"):
    """client -> worker: ``report`` is None (a question); worker -> client: the answer."""

    id: RequestId
    report: StatusReport | None = None


class Bye(Message, tag="BYE"):
    """A clean goodbye. From the owner of a spawned worker, ``shutdown`` stops it."""

    reason: str = ""
    shutdown: bool = False


AnyMessage = Hello | Ready | Failed | Request | Result | Error | Cancel | Ping | Pong | Status | Bye


class _Envelope(msgspec.Struct):
    """The least a header must have; used to explain why a full decode failed."""

    kind: str = ""
    v: int = -1


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)
_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)


def encode_header(message: Message) -> bytes:
    return _encoder.encode(message)


def decode_header(buffer: bytes | memoryview) -> Message:
    """Decode and validate a header, or raise ProtocolError saying why.

    A wrong protocol version raises ProtocolVersionError, also when the
    header does not fit this version's schema.
    """
    try:
        message = _decoder.decode(buffer)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        try:
            envelope = _envelope_decoder.decode(buffer)
        except (msgspec.DecodeError, msgspec.ValidationError):
            envelope = None
        if envelope is not None and envelope.v not in (-1, PROTOCOL_VERSION):
            raise ProtocolVersionError(
                f"peer speaks protocol version {envelope.v}, this side speaks {PROTOCOL_VERSION}"
            ) from None
        raise ProtocolError(f"malformed header: {exc}") from None
    if not isinstance(message, Message):  # pragma: no cover - the decoder only makes these
        raise ProtocolError(f"unexpected header type {type(message).__name__}")
    if message.v != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"peer speaks protocol version {message.v}, this side speaks {PROTOCOL_VERSION}"
        )
    return message


# ----------------------------------------------------------------------- arrays


def encode_array(array: np.ndarray[Any, Any], frame: int) -> tuple[ArrayRef, memoryview]:
    """Describe ``array`` and return the buffer to send as frame ``frame``.

    The buffer is the array's own memory when it is already C-contiguous and
    little-endian (no copy); otherwise one copy makes it so.
    """
    dtype = array.dtype
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and not _little_endian_host()):
        array = array.astype(dtype.newbyteorder("<"))
    array = np.ascontiguousarray(array)
    ref = ArrayRef(dtype=array.dtype.str, shape=list(array.shape), frame=frame)
    if ref.dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {ref.dtype} may not cross the wire")
    buffer: memoryview = memoryview(array.data).cast("B") if array.size else memoryview(b"")
    return ref, buffer


def decode_array(ref: ArrayRef, frames: Sequence[Any]) -> np.ndarray[Any, Any]:
    """View frame ``ref.frame`` as the array ``ref`` describes, without copying.

    Every claim of the header is checked against the frame, so a lying or
    truncated message raises ProtocolError instead of reading out of bounds.
    """
    if ref.dtype not in ALLOWED_DTYPES:
        raise ProtocolError(f"array dtype {ref.dtype!r} is not allowed")
    if ref.frame >= len(frames):
        raise ProtocolError(f"array refers to frame {ref.frame}, message has {len(frames)}")
    buffer = memoryview(frames[ref.frame])
    dtype = np.dtype(ref.dtype)
    expected = math.prod(ref.shape) * dtype.itemsize  # Python ints: no overflow
    if buffer.nbytes != expected:
        raise ProtocolError(
            f"array {ref.dtype}{tuple(ref.shape)} needs {expected} bytes, "
            f"frame {ref.frame} has {buffer.nbytes}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(ref.shape)


def _little_endian_host() -> bool:
    import sys

    return sys.byteorder == "little"
