"""Endpoints and transport security, shared by the client and the worker.

* ipc endpoints live in a per-user private directory (mode 0700, owned by
  this user) under unguessable names, so other users can neither connect
  nor guess where to.
* tcp endpoints on loopback need nothing more (only this host reaches them).
* tcp endpoints on any other address must use CurveZMQ: the worker refuses
  to bind without its secret key, the client refuses to connect without the
  worker's public key.

Keys are the files ``zmq.auth.create_certificates`` writes (``name.key`` for
the public half, ``name.key_secret`` for both halves), or z85 strings.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.auth

from bridge._errors import ConfigurationError

__all__ = [
    "CurveClientKeys",
    "CurveServerKeys",
    "apply_curve_client",
    "apply_curve_server",
    "check_endpoint",
    "endpoint_needs_curve",
    "ipc_path",
    "new_ipc_endpoint",
    "private_runtime_dir",
]

# AF_UNIX paths are limited to 108 bytes including the terminating NUL.
_MAX_IPC_PATH = 107


def private_runtime_dir() -> Path:
    """Return (creating it if needed) this user's private endpoint directory.

    ``$BRIDGE_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/infinity-bridge``, else
    ``<tmp>/infinity-bridge-<uid>``. An existing directory is accepted only
    if this user owns it and nobody else can read or enter it.
    """
    override = os.environ.get("BRIDGE_RUNTIME_DIR")
    if override:
        base = Path(override)
    elif os.environ.get("XDG_RUNTIME_DIR") and Path(os.environ["XDG_RUNTIME_DIR"]).is_dir():
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "infinity-bridge"
    else:
        base = Path(tempfile.gettempdir()) / f"infinity-bridge-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = base.lstat()
    except OSError as exc:
        raise ConfigurationError(f"cannot create the endpoint directory {base}: {exc}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ConfigurationError(f"endpoint directory {base} is not a plain directory")
    if info.st_uid != os.getuid():
        raise ConfigurationError(
            f"endpoint directory {base} belongs to uid {info.st_uid}, not to this user"
        )
    if info.st_mode & 0o077:
        raise ConfigurationError(
            f"endpoint directory {base} has mode {oct(info.st_mode & 0o777)}; "
            "it must be 0700 (chmod 700 it or set BRIDGE_RUNTIME_DIR)"
        )
    return base


def new_ipc_endpoint(prefix: str = "w") -> str:
    """An ipc endpoint with a random name inside the private directory."""
    path = private_runtime_dir() / f"{prefix}-{secrets.token_hex(12)}.sock"
    if len(str(path).encode()) > _MAX_IPC_PATH:
        raise ConfigurationError(
            f"ipc path {path} is longer than {_MAX_IPC_PATH} bytes; "
            "set BRIDGE_RUNTIME_DIR to a shorter directory"
        )
    return f"ipc://{path}"


def ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://") :]) if endpoint.startswith("ipc://") else None


def _tcp_host(endpoint: str) -> str:
    host = urlsplit(endpoint).hostname
    if host is None:
        raise ConfigurationError(f"cannot read a host from endpoint {endpoint!r}")
    return host


def endpoint_needs_curve(endpoint: str) -> bool:
    """True for tcp endpoints that other hosts could reach."""
    if not endpoint.startswith("tcp://"):
        return False
    host = _tcp_host(endpoint)
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, or "*": reachable from elsewhere
        return True


def check_endpoint(endpoint: str) -> None:
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise ConfigurationError(
            f"{endpoint!r} is not a ZeroMQ endpoint like ipc://... or tcp://..."
        )
    scheme = endpoint.split("://", 1)[0]
    if scheme not in ("ipc", "tcp"):
        raise ConfigurationError(f"endpoint scheme {scheme!r} is not supported (use ipc or tcp)")
    if scheme == "tcp":
        _tcp_host(endpoint)


# ------------------------------------------------------------------------ curve


def _read_key(value: str, *, secret: bool) -> bytes:
    """A z85 key given directly, or read from a zmq.auth certificate file."""
    if len(value) == 40 and not os.path.exists(value):
        return value.encode("ascii")
    try:
        public, secret_key = zmq.auth.load_certificate(value)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot load CurveZMQ certificate {value!r}: {exc}") from None
    if secret:
        if secret_key is None:
            raise ConfigurationError(f"{value!r} holds no secret key (use the .key_secret file)")
        return secret_key
    return public


@dataclasses.dataclass(frozen=True)
class CurveServerKeys:
    """The worker's keypair, and optionally the directory of allowed client keys."""

    public: bytes
    secret: bytes
    authorized_clients_dir: Path | None = None

    @classmethod
    def from_files(cls, secret_file: str, clients_dir: str | None = None) -> CurveServerKeys:
        try:
            public, secret = zmq.auth.load_certificate(secret_file)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"cannot load CurveZMQ certificate {secret_file!r}: {exc}"
            ) from None
        if secret is None:
            raise ConfigurationError(f"{secret_file!r} holds no secret key")
        directory = Path(clients_dir) if clients_dir else None
        if directory is not None and not directory.is_dir():
            raise ConfigurationError(f"authorized clients directory {directory} does not exist")
        return cls(public=public, secret=secret, authorized_clients_dir=directory)


@dataclasses.dataclass(frozen=True)
class CurveClientKeys:
    """The worker's public key plus this client's keypair (ephemeral if not given)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def create(cls, server_key: str, client_cert: str | None = None) -> CurveClientKeys:
        server_public = _read_key(server_key, secret=False)
        if client_cert:
            public, secret = zmq.auth.load_certificate(client_cert)
            if secret is None:
                raise ConfigurationError(f"{client_cert!r} holds no secret key")
        else:
            public, secret = zmq.curve_keypair()
        return cls(server_public=server_public, public=public, secret=secret)


def apply_curve_server(sock: zmq.Socket[Any], keys: CurveServerKeys) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def apply_curve_client(sock: zmq.Socket[Any], keys: CurveClientKeys) -> None:
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
