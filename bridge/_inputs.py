"""Argument checks and payload building, done in the caller's thread.

Everything here runs before a request is sent, so bad input fails with a
clear :class:`InvalidInputError` naming the problem, and the worker only
ever sees well-formed payloads (it checks them again all the same).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bridge import _protocol as proto
from bridge._errors import ConfigurationError, InputTooLargeError, InvalidInputError

__all__ = ["check_query", "check_texts", "media_payload"]


_URL_PREFIXES = ("http://", "https://")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_items(name: str, value: Any) -> list[Any]:
    """A non-empty list/tuple: the containers embed and infinity take."""
    if isinstance(value, (str, bytes, bytearray)):
        raise InvalidInputError(
            f"{name} must be a list, not a single {type(value).__name__} "
            f"(wrap it: {name}=[{_describe(value)}])"
        )
    if not isinstance(value, (list, tuple)):
        raise InvalidInputError(f"{name} must be a list, got {type(value).__name__}")
    if not value:
        raise InvalidInputError(f"{name} is empty; give at least one item")
    return list(value)


def check_texts(name: str, value: Any, max_chars: int) -> list[str]:
    texts = check_items(name, value)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(
                f"{name}[{index}] must be a str, got {type(text).__name__} {_describe(text)}"
            )
        if len(text) > max_chars:
            raise InputTooLargeError(
                f"{name}[{index}] has {len(text)} characters, over the limit of {max_chars} "
                "(max_item_chars / BRIDGE_MAX_ITEM_CHARS); the model would truncate it anyway"
            )
    return texts


def check_query(value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(
            f"query must be a str, got {type(value).__name__} {_describe(value)}"
        )
    if len(value) > max_chars:
        raise InputTooLargeError(
            f"query has {len(value)} characters, over the limit of {max_chars}"
        )
    return value


def _read_file(name: str, index: int, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidInputError(f"{name}[{index}]: no such file {str(path)!r}") from None
    except OSError as exc:
        raise InvalidInputError(f"{name}[{index}]: cannot read {str(path)!r}: {exc}") from None


def _is_pil_image(value: Any) -> bool:
    module = type(value).__module__
    return module.startswith("PIL.") and hasattr(value, "tobytes") and hasattr(value, "mode")


def media_payload(name: str, value: Any, *, images: bool) -> tuple[list[proto.MediaRef], list[Any]]:
    """Turn embed-style media inputs into MediaRefs plus raw frames.

    Accepted: http(s) URLs (fetched by the worker), local paths as str or
    ``pathlib.Path`` (read here, so a worker on another host works too),
    ``bytes`` of an encoded file, and for images PIL images (sent as raw
    pixels). Binary data always travels as raw frames, never base64.
    """
    items = check_items(name, value)
    refs: list[proto.MediaRef] = []
    frames: list[Any] = []

    def add_frame(data: Any, **extra: Any) -> None:
        refs.append(proto.MediaRef(frame=len(frames), **extra))
        frames.append(data)

    for index, item in enumerate(items):
        if isinstance(item, str):
            if item.startswith(_URL_PREFIXES):
                refs.append(proto.MediaRef(url=item))
                continue
            path = Path(item[len("file://") :] if item.startswith("file://") else item)
            add_frame(_read_file(name, index, path))
        elif isinstance(item, os.PathLike):
            add_frame(_read_file(name, index, Path(item)))
        elif isinstance(item, (bytes, bytearray, memoryview)):
            if len(item) == 0:
                raise InvalidInputError(f"{name}[{index}] is empty bytes")
            add_frame(item)
        elif images and _is_pil_image(item):
            width, height = item.size
            if item.mode in proto.RAW_IMAGE_MODES:
                add_frame(item.tobytes(), mode=item.mode, width=width, height=height)
            else:
                buffer = io.BytesIO()
                item.save(buffer, format="PNG")
                add_frame(buffer.getvalue())
        else:
            accepted = "URL, path, bytes or PIL image" if images else "URL, path or bytes"
            raise InvalidInputError(
                f"{name}[{index}] must be a {accepted}, got {type(item).__name__} {_describe(item)}"
            )
    return refs, frames


def check_model_arg(name: str, value: Any, count: int, allowed: Sequence[str]) -> list[str]:
    """embed's AutoPadding: one value for all models, or one per model."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigurationError(f"{name} must be a str or a list of str, got {_describe(value)}")
    if len(values) == 1:
        values = list(values) * count
    elif len(values) != count:
        raise ConfigurationError(
            f"{name} has {len(values)} values for {count} models; give 1 or {count}"
        )
    for item in values:
        if item not in allowed:
            raise ConfigurationError(f"{name}={item!r} is not one of {', '.join(allowed)}")
    return list(values)


def check_batch_delay(value: Any) -> float | None:
    """``"auto"`` (None: the worker measures it) or seconds in [0, 1]."""
    if isinstance(value, str) and value == "auto":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return float(value)
    raise ConfigurationError(f"batch_delay must be 'auto' or seconds in [0, 1], got {value!r}")
