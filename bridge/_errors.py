"""The exceptions of infinity-bridge.

Every error the client raises, or puts into a Future, is a ``BridgeError``::

    BridgeError
    ├── ConfigurationError        bad constructor argument, missing worker venv,
    │                             insecure endpoint            (also ValueError)
    ├── InvalidInputError         bad call argument, caught before sending
    │   │                                                      (also ValueError)
    │   ├── UnknownModelError     model_id matches no loaded model
    │   │                                                      (also LookupError)
    │   ├── UnsupportedOperationError   the model cannot serve this method
    │   └── InputTooLargeError    an item or the whole request is over a limit
    ├── ClientClosedError         the client was stopped (before or during the call)
    ├── OverloadedError           too many items in flight (backpressure)
    ├── RequestTimeoutError       the call's deadline passed   (also TimeoutError)
    ├── ProtocolError             a malformed or unexpected message
    │   └── ProtocolVersionError  the two sides speak different protocol versions
    ├── WorkerError               the worker ran the request and it raised there;
    │   │                         carries the remote type, message and traceback
    │   ├── WorkerInputError      ... because of the input (e.g. a corrupt image)
    │   └── WorkerOutOfMemoryError ... out of (budgeted) GPU/host memory
    └── WorkerUnavailableError    no live worker can run the request ("engine dead")
        ├── WorkerStartupError    the worker failed to start; carries its own message
        └── WorkerCrashedError    the worker died or hung with the request in flight
            └── PoisonRequestError  the request was in flight during repeated crashes,
                                    so it is not retried again

Low-level errors (zmq, msgspec, OSError) are translated into these at the
transport boundary; callers never need to import zmq to handle failures.
"""

from __future__ import annotations

__all__ = [
    "BridgeError",
    "ClientClosedError",
    "ConfigurationError",
    "InputTooLargeError",
    "InvalidInputError",
    "OverloadedError",
    "PoisonRequestError",
    "ProtocolError",
    "ProtocolVersionError",
    "RequestTimeoutError",
    "UnknownModelError",
    "UnsupportedOperationError",
    "WorkerCrashedError",
    "WorkerError",
    "WorkerInputError",
    "WorkerOutOfMemoryError",
    "WorkerStartupError",
    "WorkerUnavailableError",
]


class BridgeError(Exception):
    """Base class of every error raised by infinity-bridge."""


class ConfigurationError(BridgeError, ValueError):
    """The client or worker was configured in a way that cannot work."""


class InvalidInputError(BridgeError, ValueError):
    """A call's arguments are invalid; raised before anything is sent."""


class UnknownModelError(InvalidInputError, LookupError):
    """``model_id`` names no model of this client."""

    # LookupError.__str__ would repr() the message; keep it readable.
    __str__ = Exception.__str__


class UnsupportedOperationError(InvalidInputError):
    """The model cannot serve the requested method (e.g. rerank on an embedder)."""


class InputTooLargeError(InvalidInputError):
    """An item, or the request as a whole, is larger than the configured limit."""


class ClientClosedError(BridgeError):
    """The client was stopped; the call was refused or abandoned."""


class OverloadedError(BridgeError):
    """Too many items are in flight and the call could not be admitted."""


class RequestTimeoutError(BridgeError, TimeoutError):
    """The call did not finish before its deadline."""


class ProtocolError(BridgeError):
    """A message broke the wire protocol (malformed, unexpected or hostile)."""


class ProtocolVersionError(ProtocolError):
    """The client and the worker speak different protocol versions."""


class WorkerError(BridgeError):
    """The worker ran the request and it failed there.

    ``remote_type`` is the exception's class name inside the worker and
    ``remote_traceback`` its formatted traceback (both may be empty).
    """

    def __init__(self, message: str, *, remote_type: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        base = super().__str__()
        return f"{self.remote_type}: {base}" if self.remote_type else base


class WorkerInputError(WorkerError, InvalidInputError):
    """The worker rejected the input (a corrupt image, a wrong sampling rate...)."""


class WorkerOutOfMemoryError(WorkerError):
    """The request ran out of (budgeted) memory in the worker; the worker lives on."""


class WorkerUnavailableError(BridgeError):
    """No live worker can run the request."""


class WorkerStartupError(WorkerUnavailableError):
    """The worker process failed to start; the message carries its own error.

    ``worker_output`` holds the last lines the worker printed, when known.
    """

    def __init__(self, message: str, *, worker_output: str = "") -> None:
        super().__init__(message)
        self.worker_output = worker_output


class WorkerCrashedError(WorkerUnavailableError):
    """The worker died (or hung and was killed) while the request was in flight."""


class PoisonRequestError(WorkerCrashedError):
    """The request was in flight during repeated worker crashes and is not retried."""
