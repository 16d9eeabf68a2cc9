"""infinity-bridge: infinity-emb / embed models from a numpy-2 (vLLM) process.

The Infinity code runs in a worker process inside its own numpy<2 venv; this
package's client talks to it over ZeroMQ (msgpack headers + raw buffers) and
hands back float32 numpy arrays of the caller's numpy.

    from bridge import BatchedInference   # instead of: from embed import BatchedInference

Public names are re-exported here; the modules behind them are private.
"""

from bridge._bundled import bundled_model_path
from bridge._client import AsyncBatchedInference, BatchedInference
from bridge._errors import (
    BridgeError,
    ClientClosedError,
    ConfigurationError,
    InputTooLargeError,
    InvalidInputError,
    OverloadedError,
    PoisonRequestError,
    ProtocolError,
    ProtocolVersionError,
    RequestTimeoutError,
    UnknownModelError,
    UnsupportedOperationError,
    WorkerCrashedError,
    WorkerError,
    WorkerInputError,
    WorkerOutOfMemoryError,
    WorkerStartupError,
    WorkerUnavailableError,
)
from bridge._gpu import suggest_gpu_memory_utilization
from bridge._protocol import PROTOCOL_VERSION

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "AsyncBatchedInference",
    "BatchedInference",
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
    "__version__",
    "bundled_model_path",
    "suggest_gpu_memory_utilization",
]
