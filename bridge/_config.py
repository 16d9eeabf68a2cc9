"""Defaults and environment variables, in one place.

Every knob of the client has a keyword argument and, where it makes sense
to set it for a whole deployment, an environment variable. Precedence:
argument > environment variable > default below.

=============================  =======================================  ==========
environment variable           meaning                                  default
=============================  =======================================  ==========
BRIDGE_WORKER_PYTHON           interpreter of the worker venv           see below
BRIDGE_RUNTIME_DIR             private directory for ipc endpoints      see below
BRIDGE_STARTUP_TIMEOUT         seconds a worker may take to get ready   600
BRIDGE_REQUEST_TIMEOUT         default per-call deadline in seconds     600
                               ("none" disables it)
BRIDGE_HEARTBEAT_INTERVAL      seconds between PINGs                    0.5
BRIDGE_HEARTBEAT_TIMEOUT       silence after which a worker is hung     2.5
BRIDGE_MAX_INFLIGHT_ITEMS      items (sentences, images...) in flight   16384
BRIDGE_OVERLOAD                "block" or "raise" beyond that bound     block
BRIDGE_MAX_RETRIES             retries of a request hit by a crash      1
BRIDGE_MAX_MESSAGE_BYTES       largest message a worker accepts         268435456
BRIDGE_MAX_ITEM_CHARS          longest single text accepted             1000000
=============================  =======================================  ==========

The worker interpreter defaults to ``infinity_env/.venv/bin/python`` next to
the ``bridge`` package (the layout of a source checkout, where `make
infinity-env` builds it).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from bridge._errors import ConfigurationError

__all__ = ["ClientConfig", "default_worker_python"]

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_worker_python() -> Path:
    env = os.environ.get("BRIDGE_WORKER_PYTHON")
    if env:
        return Path(env)
    return REPO_ROOT / "infinity_env" / ".venv" / "bin" / "python"


def _env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    if raw.strip().lower() in ("none", "off", "0") and name == "BRIDGE_REQUEST_TIMEOUT":
        return None
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number") from None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not an integer") from None


def _positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None:
        if not allow_none:
            raise ConfigurationError(f"{name} may not be None")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{name} must be a number > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Resolved client settings (see the module docstring for the knobs)."""

    startup_timeout: float = 600.0
    request_timeout: float | None = 600.0
    heartbeat_interval: float = 0.5
    # Detection takes this plus at most one poll tick (<= 0.25 s): under 3 s.
    heartbeat_timeout: float = 2.5
    max_inflight_items: int = 16384
    overload: Literal["block", "raise"] = "block"
    max_retries: int = 1
    max_message_bytes: int = 256 * 1024 * 1024
    max_item_chars: int = 1_000_000
    # Restart back-off: first delay, growth factor, cap; after this many
    # failed restarts in a row the worker is given up (WorkerStartupError).
    restart_backoff_initial: float = 0.5
    restart_backoff_max: float = 30.0
    max_restart_failures: int = 5

    @classmethod
    def from_env(cls, **overrides: object) -> ClientConfig:
        values: dict[str, object] = {
            "startup_timeout": _env_float("BRIDGE_STARTUP_TIMEOUT", cls.startup_timeout),
            "request_timeout": _env_float("BRIDGE_REQUEST_TIMEOUT", cls.request_timeout),
            "heartbeat_interval": _env_float("BRIDGE_HEARTBEAT_INTERVAL", cls.heartbeat_interval),
            "heartbeat_timeout": _env_float("BRIDGE_HEARTBEAT_TIMEOUT", cls.heartbeat_timeout),
            "max_inflight_items": _env_int("BRIDGE_MAX_INFLIGHT_ITEMS", cls.max_inflight_items),
            "overload": os.environ.get("BRIDGE_OVERLOAD", cls.overload),
            "max_retries": _env_int("BRIDGE_MAX_RETRIES", cls.max_retries),
            "max_message_bytes": _env_int("BRIDGE_MAX_MESSAGE_BYTES", cls.max_message_bytes),
            "max_item_chars": _env_int("BRIDGE_MAX_ITEM_CHARS", cls.max_item_chars),
        }
        for key, value in overrides.items():
            if value is not UNSET:
                values[key] = value
        config = cls(**values)  # type: ignore[arg-type]
        config.validate()
        return config

    def validate(self) -> None:
        _positive("startup_timeout", self.startup_timeout)
        _positive("request_timeout", self.request_timeout, allow_none=True)
        _positive("heartbeat_interval", self.heartbeat_interval)
        _positive("heartbeat_timeout", self.heartbeat_timeout)
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigurationError(
                f"heartbeat_timeout ({self.heartbeat_timeout}) must exceed "
                f"heartbeat_interval ({self.heartbeat_interval})"
            )
        _positive("max_inflight_items", self.max_inflight_items)
        _positive("max_message_bytes", self.max_message_bytes)
        _positive("max_item_chars", self.max_item_chars)
        if self.overload not in ("block", "raise"):
            raise ConfigurationError(f"overload must be 'block' or 'raise', got {self.overload!r}")
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or self.max_retries < 0
        ):
            raise ConfigurationError(f"max_retries must be >= 0, got {self.max_retries}")


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


#: Marks a keyword argument the caller did not pass (None can be meaningful).
UNSET: object = _Unset()
