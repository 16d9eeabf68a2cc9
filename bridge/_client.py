"""The public clients: ``BatchedInference`` (drop-in for embed's) and its asyncio twin.

Both check arguments in the caller's thread, build the request there, and
hand it to the shared :class:`~bridge._core.BridgeCore`, whose I/O thread
does all socket work and resolves the Futures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import secrets
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias, cast

import numpy as np

from bridge import _protocol as proto
from bridge._config import UNSET, ClientConfig
from bridge._core import BridgeCore, Call, WorkerTarget, check_message_size, overloaded
from bridge._endpoints import (
    CurveClientKeys,
    check_endpoint,
    endpoint_needs_curve,
    new_ipc_endpoint,
)
from bridge._errors import (
    ConfigurationError,
    InvalidInputError,
    UnknownModelError,
    UnsupportedOperationError,
    WorkerStartupError,
)
from bridge._gpu import GIB, check_budget, parse_device, suggest_gpu_memory_utilization
from bridge._inputs import (
    check_batch_delay,
    check_model_arg,
    check_query,
    check_texts,
    media_payload,
)
from bridge._supervisor import WorkerLaunch, find_worker_python

__all__ = ["AsyncBatchedInference", "BatchedInference"]

ModelIndex: TypeAlias = int | str
EmbedResult: TypeAlias = tuple[list[np.ndarray[Any, Any]], int]
RerankResult: TypeAlias = tuple[list[float], int]
ClassifyResult: TypeAlias = tuple[list[list[dict[str, Any]]], int]

# embed 0.3.0 / infinity 0.0.58 accepted values.
ENGINES = ("optimum", "torch", "ctranslate2", "debugengine")
DEVICES = ("cpu", "cuda", "mps", "tensorrt", "auto")
# bfloat16 is the bridge's addition (infinity 0.0.58 has none): see _engine.to_bfloat16.
DTYPES = ("float32", "float16", "bfloat16", "int8", "fp8", "auto")
EMBEDDING_DTYPES = ("float32", "int8", "uint8", "binary", "ubinary")


def served_name(model_id: str) -> str:
    """infinity 0.0.58's served name: the last two parts of the path or hub id."""
    return "/".join(model_id.split("/")[-2:])


def _default_infinity_home() -> dict[str, str]:
    # infinity creates ./.infinity_cache in the working directory at import
    # unless INFINITY_HOME or HF_HOME is set; keep the user's cwd clean.
    if os.environ.get("INFINITY_HOME") or os.environ.get("HF_HOME"):
        return {}
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return {"INFINITY_HOME": os.path.join(base, "infinity-bridge")}


@dataclasses.dataclass(frozen=True)
class _Wait:
    """How long a call may wait for capacity (None: as long as it takes)."""

    seconds: float | None


class _ClientBase:
    """Construction, model lookup and request building shared by both clients."""

    def __init__(
        self,
        *,
        model_id: str | Sequence[str] | None = None,
        engine: str | Sequence[str] = "optimum",
        device: str | Sequence[str] = "cpu",
        dtype: str | Sequence[str] = "auto",
        embedding_dtype: str | Sequence[str] = "float32",
        batch_size: int = 32,
        batch_delay: float | Literal["auto"] = "auto",
        address: str | Sequence[str] | None = None,
        worker_python: str | os.PathLike[str] | None = None,
        workers: int | Sequence[Mapping[str, str]] | None = None,
        devices: Sequence[int | str] | None = None,
        gpu_memory: float | None = None,
        worker_env: Mapping[str, str] | None = None,
        timeout: float | object | None = UNSET,
        startup_timeout: float | object = UNSET,
        max_inflight_items: int | object = UNSET,
        overload: Literal["block", "raise"] | object = UNSET,
        max_retries: int | object = UNSET,
        heartbeat_interval: float | object = UNSET,
        heartbeat_timeout: float | object = UNSET,
        max_message_bytes: int | object = UNSET,
        max_item_chars: int | object = UNSET,
        curve_server_key: str | None = None,
        curve_client_cert: str | None = None,
    ) -> None:
        self._core: BridgeCore | None = None
        self.config = ClientConfig.from_env(
            request_timeout=timeout,
            startup_timeout=startup_timeout,
            max_inflight_items=max_inflight_items,
            overload=overload,
            max_retries=max_retries,
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
            max_message_bytes=max_message_bytes,
            max_item_chars=max_item_chars,
        )
        self._given_ids = self._check_model_ids(model_id, address)
        self._models: list[proto.ModelInfo] = []
        self._lookup: dict[str, int] = {}
        check_budget(gpu_memory)
        self._gpu_memory = gpu_memory
        if devices is not None:
            if workers is not None:
                raise ConfigurationError("give devices= (one worker per GPU) or workers=, not both")
            if not isinstance(devices, (list, tuple)) or not devices:
                raise ConfigurationError(
                    f"devices must be a non-empty list of GPU indices, got {devices!r}"
                )
            workers = [{"CUDA_VISIBLE_DEVICES": str(d)} for d in devices]
        targets = self._targets(
            engine,
            device,
            dtype,
            embedding_dtype,
            batch_size,
            batch_delay,
            address,
            worker_python,
            workers,
            worker_env,
            curve_server_key,
            curve_client_cert,
        )
        self._core = BridgeCore(targets, self.config)
        # Stop the workers if the client is dropped without stop().
        self._finalizer = weakref.finalize(self, self._core.stop, 0.0)
        self._started()

    def _started(self) -> None:
        """Called once the workers are starting; the sync client waits for them here."""

    # -- construction -----------------------------------------------------------

    @staticmethod
    def _check_model_ids(model_id: Any, address: Any) -> list[str]:
        if model_id is None:
            if address is None:
                raise ConfigurationError(
                    "model_id is required (unless you connect to a running worker with address=...)"
                )
            return []
        ids = [model_id] if isinstance(model_id, str) else model_id
        if (
            not isinstance(ids, (list, tuple))
            or not ids
            or not all(isinstance(m, str) and m for m in ids)
        ):
            raise ConfigurationError(
                f"model_id must be a non-empty str or a list of them, got {model_id!r}"
            )
        names = [served_name(m) for m in ids]
        if len(set(names)) != len(names):
            raise ConfigurationError(
                f"two models would be served under the same name: {names} "
                "(infinity names a model by the last two parts of its path)"
            )
        return list(ids)

    def _targets(
        self,
        engine: Any,
        device: Any,
        dtype: Any,
        embedding_dtype: Any,
        batch_size: Any,
        batch_delay: Any,
        address: Any,
        worker_python: Any,
        workers: Any,
        worker_env: Any,
        curve_server_key: str | None,
        curve_client_cert: str | None,
    ) -> list[WorkerTarget]:
        if address is not None:
            if workers is not None:
                raise ConfigurationError(
                    "give either address= (running workers) or workers= (spawned), not both"
                )
            addresses = [address] if isinstance(address, str) else list(address)
            server_key = curve_server_key or os.environ.get("BRIDGE_CURVE_SERVER_KEY")
            client_cert = curve_client_cert or os.environ.get("BRIDGE_CURVE_CLIENT_CERT")
            targets = []
            for endpoint in addresses:
                check_endpoint(endpoint)
                curve = None
                if server_key:
                    curve = CurveClientKeys.create(server_key, client_cert)
                elif endpoint_needs_curve(endpoint):
                    raise ConfigurationError(
                        f"{endpoint} is not a loopback address: give curve_server_key= "
                        "(or BRIDGE_CURVE_SERVER_KEY) with the worker's public key"
                    )
                targets.append(WorkerTarget(endpoint=endpoint, curve=curve))
            return targets

        count = len(self._given_ids)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be a positive int, got {batch_size!r}")
        delay = check_batch_delay(batch_delay)
        # "cuda:N": infinity knows only "cuda", so N becomes the worker's
        # CUDA_VISIBLE_DEVICES (one per worker, so all models must agree).
        raw_devices = [device] if isinstance(device, str) else device
        if not isinstance(raw_devices, (list, tuple)) or not all(
            isinstance(d, str) for d in raw_devices
        ):
            raise ConfigurationError(f"device must be a str or a list of str, got {device!r}")
        parsed = [parse_device(d) for d in raw_devices]
        indices = {index for _, index in parsed if index is not None}
        if len(indices) > 1:
            raise ConfigurationError(
                f"models of one worker must share one GPU; got cuda indices {sorted(indices)}"
            )
        device = [base for base, _ in parsed]
        pinned_gpu = {"CUDA_VISIBLE_DEVICES": indices.pop()} if indices else {}
        specs: list[dict[str, object]] = [
            {
                "model_id": m,
                "engine": e,
                "device": d,
                "dtype": t,
                "embedding_dtype": q,
                "batch_size": batch_size,
                "batch_delay": delay,
            }
            for m, e, d, t, q in zip(
                self._given_ids,
                check_model_arg("engine", engine, count, ENGINES),
                check_model_arg("device", device, count, DEVICES),
                check_model_arg("dtype", dtype, count, DTYPES),
                check_model_arg("embedding_dtype", embedding_dtype, count, EMBEDDING_DTYPES),
                strict=True,
            )
        ]
        python = find_worker_python(worker_python)
        if workers is None:
            per_worker: list[Mapping[str, str]] = [{}]
        elif isinstance(workers, int) and not isinstance(workers, bool):
            if workers < 1:
                raise ConfigurationError(f"workers must be >= 1, got {workers}")
            per_worker = [{}] * workers
        elif (
            isinstance(workers, (list, tuple))
            and workers
            and all(isinstance(w, Mapping) for w in workers)
        ):
            per_worker = list(workers)
        else:
            raise ConfigurationError(
                "workers must be an int or a list of per-worker environment dicts"
            )
        base_env = {**_default_infinity_home(), **pinned_gpu, **dict(worker_env or {})}
        extra_args = [
            "--max-message-bytes",
            str(self.config.max_message_bytes),
            "--max-item-chars",
            str(self.config.max_item_chars),
        ]
        if self._gpu_memory is not None:
            extra_args += ["--gpu-memory", repr(float(self._gpu_memory))]
        targets = []
        for extra_env in per_worker:
            endpoint = new_ipc_endpoint()
            launch = WorkerLaunch(
                python=python,
                endpoint=endpoint,
                models=specs,
                owner_token=secrets.token_hex(16),
                env={**base_env, **{str(k): str(v) for k, v in extra_env.items()}},
                extra_args=tuple(extra_args),
            )
            targets.append(WorkerTarget(endpoint=endpoint, launch=launch))
        return targets

    def _adopt_models(self, models: list[proto.ModelInfo]) -> None:
        if self._given_ids and [m.name for m in models] != [
            served_name(m) for m in self._given_ids
        ]:
            raise ConfigurationError(
                f"the worker serves {[m.name for m in models]}, "
                f"but this client was given {self._given_ids}"
            )
        lookup: dict[str, int] = {}
        for info in models:
            lookup[info.name] = info.index
            lookup.setdefault(info.model_id, info.index)
        for index, given in enumerate(self._given_ids):
            lookup[given] = index
        self._models = models
        self._lookup = lookup

    # -- public properties ------------------------------------------------------

    @property
    def address(self) -> str:
        """The (first) worker's ZeroMQ endpoint; connect another client to it with address=."""
        return self._require_core().endpoints[0]

    @property
    def addresses(self) -> list[str]:
        return self._require_core().endpoints

    @property
    def models(self) -> list[dict[str, Any]]:
        """What the worker loaded: name, dim, capabilities... (after start-up)."""
        import msgspec

        return [msgspec.structs.asdict(m) for m in self._models]

    @property
    def items_in_flight(self) -> int:
        """Items (sentences, docs, images...) submitted and not yet resolved."""
        return self._require_core().gate.used

    def status(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Per worker: pid, state, restarts, in-flight counts, memory, queue depth.

        ``gpu`` (bytes, None without a GPU): reserved, allocated,
        max_allocated, free and total for the card, and budget when set.
        """
        return self._require_core().status(timeout)

    def suggest_vllm_gpu_memory_utilization(self, headroom_bytes: int = GIB) -> float:
        """The ``gpu_memory_utilization`` for a vLLM on the same card as the (first) worker.

        Counts every worker of this client on that card at its budget (or,
        without one, at what it has reserved, plus 10 %), and keeps
        ``headroom_bytes`` free for CUDA contexts and the like. Start the
        worker first, then vLLM with this value.
        """
        workers = [w for w in self.status() if w.get("gpu")]
        if not workers:
            raise ConfigurationError("no worker of this client runs on a GPU")
        card = workers[0].get("cuda_visible_devices", "")
        total = int(workers[0]["gpu"]["total"])
        taken = 0
        for worker in workers:
            if worker.get("cuda_visible_devices", "") != card:
                continue
            gpu = worker["gpu"]
            taken += int(gpu["budget"]) if "budget" in gpu else int(gpu["reserved"] * 1.1)
        return suggest_gpu_memory_utilization(total, taken, headroom_bytes)

    def __repr__(self) -> str:
        ids = self._given_ids or [m.model_id for m in self._models]
        return f"{type(self).__name__}({ids})"

    def _require_core(self) -> BridgeCore:
        if self._core is None:
            raise ConfigurationError("the client was not constructed")
        return self._core

    # -- request building ---------------------------------------------------------

    def _model(self, model_id: Any, op: str) -> proto.ModelInfo:
        if isinstance(model_id, bool) or not isinstance(model_id, (int, str)):
            raise InvalidInputError(f"model_id must be an int index or a str, got {model_id!r}")
        count = len(self._models)
        if isinstance(model_id, int):
            if not -count <= model_id < count:
                raise UnknownModelError(f"model_id={model_id} is out of range for {count} model(s)")
            info = self._models[model_id]
        else:
            index = self._lookup.get(model_id)
            if index is None:
                known = sorted({*self._given_ids, *(m.name for m in self._models)})
                raise UnknownModelError(f"no model {model_id!r}; this client serves {known}")
            info = self._models[index]
        if op not in info.capabilities:
            raise UnsupportedOperationError(
                f"model {info.name!r} cannot {op}; it supports: {', '.join(info.capabilities)}"
            )
        return info

    def _timeout(self, timeout: Any) -> float | None:
        if timeout is UNSET:
            return self.config.request_timeout
        if timeout is None:
            return None
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidInputError(
                f"timeout must be a positive number of seconds or None, got {timeout!r}"
            )
        return float(timeout)

    def _admit_now(self, call: Call) -> _Wait | None:
        """Take capacity for ``call`` if there is room; else say how long it may wait.

        Raises OverloadedError at once with ``overload="raise"``. Waiting itself
        is the caller's: blocking for the sync client, awaited for asyncio.
        """
        core = self._require_core()
        core.check_open()
        if core.gate.try_acquire(call.items):
            return None
        if self.config.overload == "raise":
            raise overloaded(call.items, core.gate, None)
        remaining = None if call.deadline is None else max(0.0, call.deadline - time.monotonic())
        return _Wait(remaining)

    def _build(self, op: str, model_id: Any, timeout: Any, **payload: Any) -> Call:
        info = self._model(model_id, op)
        limit = self.config.max_item_chars
        frames: list[Any] = []
        fields: dict[str, Any] = {}
        if op in ("embed", "classify"):
            fields["texts"] = check_texts("sentences", payload["sentences"], limit)
            fields["raw_scores"] = bool(payload.get("raw_scores", False))
            items = len(fields["texts"])
        elif op == "rerank":
            fields["query"] = check_query(payload["query"], limit)
            fields["texts"] = check_texts("docs", payload["docs"], limit)
            fields["raw_scores"] = bool(payload.get("raw_scores", False))
            items = len(fields["texts"])
        else:
            name = "images" if op == "image_embed" else "audios"
            fields["media"], frames = media_payload(name, payload[name], images=op == "image_embed")
            items = len(fields["media"])
        seconds = self._timeout(timeout)
        request = proto.Request(
            id=Call.new_id(), op=cast(proto.Op, op), model=info.name, timeout_s=seconds, **fields
        )
        call = Call(request, frames, items, seconds)
        check_message_size(call, self.config.max_message_bytes)
        return call


class BatchedInference(_ClientBase):
    """Drop-in replacement for ``embed.BatchedInference``, backed by a worker process.

    >>> from bridge import BatchedInference
    >>> ei = BatchedInference(model_id="/models/all-MiniLM-L6-v2", engine="torch")
    >>> embeddings, usage = ei.embed(sentences=["Hello, world!"]).result()
    >>> embeddings[0].shape, embeddings[0].dtype
    ((384,), dtype('float32'))
    >>> ei.stop()

    The constructor takes embed 0.3.0's arguments and defaults (``model_id``,
    ``engine="optimum"``, ``device="cpu"``, ``dtype="auto"``,
    ``embedding_dtype="float32"``; each a str or one per model), spawns the
    worker with infinity_env's interpreter and returns once every model is
    loaded and warmed up. Keyword arguments beyond embed's are the bridge's
    knobs (see ``bridge._config``); ``address=`` connects to a running worker
    instead of spawning one. ``batch_delay="auto"`` (seconds, or "auto": half
    the model's fastest one-item forward pass, at most embed's 2 ms) is how
    long infinity's batching threads wait between stages.
    """

    def _started(self) -> None:
        core = self._require_core()
        try:
            models = core.ready_future.result(timeout=self.config.startup_timeout + 5.0)
            self._adopt_models(models)
        except concurrent.futures.TimeoutError:
            self.stop()
            raise WorkerStartupError(
                f"the worker was not ready within {self.config.startup_timeout} s"
            ) from None
        except BaseException:  # including KeyboardInterrupt: never leave a worker behind
            self.stop()
            raise

    # -- lifecycle ----------------------------------------------------------------

    def stop(self) -> None:
        """Stop the worker(s); pending Futures fail with ClientClosedError. Idempotent."""
        if self._core is not None:
            self._core.stop()

    def __enter__(self) -> BatchedInference:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the embed API ------------------------------------------------------------

    def _submit(self, call: Call) -> concurrent.futures.Future[Any]:
        wait = self._admit_now(call)
        if wait is not None and not self._require_core().gate.acquire(call.items, wait.seconds):
            raise overloaded(call.items, self._require_core().gate, wait.seconds)
        self._require_core().submit(call)
        return call.future

    def embed(
        self,
        *,
        sentences: list[str],
        model_id: ModelIndex = 0,
        timeout: float | object | None = UNSET,
    ) -> concurrent.futures.Future[EmbedResult]:
        """Embed sentences; the Future gives ``(list of 1-D arrays, token usage)``."""
        return self._submit(self._build("embed", model_id, timeout, sentences=sentences))

    def rerank(
        self,
        *,
        query: str,
        docs: list[str],
        model_id: ModelIndex = 0,
        raw_scores: bool = False,
        timeout: float | object | None = UNSET,
    ) -> concurrent.futures.Future[RerankResult]:
        """Score each doc against the query; the Future gives ``(scores in doc order, usage)``."""
        return self._submit(
            self._build("rerank", model_id, timeout, query=query, docs=docs, raw_scores=raw_scores)
        )

    def classify(
        self,
        *,
        sentences: list[str],
        model_id: ModelIndex = 0,
        raw_scores: bool = False,
        timeout: float | object | None = UNSET,
    ) -> concurrent.futures.Future[ClassifyResult]:
        """Classify sentences; the Future gives ``([[{label, score}, ...] per sentence], usage)``."""
        return self._submit(
            self._build("classify", model_id, timeout, sentences=sentences, raw_scores=raw_scores)
        )

    def image_embed(
        self, *, images: list[Any], model_id: ModelIndex = 0, timeout: float | object | None = UNSET
    ) -> concurrent.futures.Future[EmbedResult]:
        """Embed images given as URLs, paths, bytes or PIL images."""
        return self._submit(self._build("image_embed", model_id, timeout, images=images))

    def audio_embed(
        self, *, audios: list[Any], model_id: ModelIndex = 0, timeout: float | object | None = UNSET
    ) -> concurrent.futures.Future[EmbedResult]:
        """Embed audio given as URLs, paths or bytes of an audio file."""
        return self._submit(self._build("audio_embed", model_id, timeout, audios=audios))


class AsyncBatchedInference(_ClientBase):
    """The asyncio twin of :class:`BatchedInference`: same arguments, ``async`` methods.

    Construction starts the worker and returns at once; ``await client.ready()``
    (or ``async with``, or simply the first call) waits until it is loaded.
    Nothing here blocks the event loop: results arrive through
    ``asyncio.wrap_future`` from the I/O thread, and backpressure waits with
    ``await``. Cancelling a task cancels its request in the worker too.

    >>> async with AsyncBatchedInference(model_id=path, engine="torch") as client:
    ...     embeddings, usage = await client.embed(sentences=["hi"])
    """

    async def ready(self) -> None:
        if not self._models:
            models = await asyncio.wait_for(
                asyncio.wrap_future(self._require_core().ready_future),
                self.config.startup_timeout + 5.0,
            )
            if not self._models:
                self._adopt_models(models)

    async def __aenter__(self) -> AsyncBatchedInference:
        try:
            await self.ready()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the worker(s) without blocking the event loop."""
        if self._core is not None:
            await asyncio.to_thread(self._core.stop)

    def stop(self) -> None:
        if self._core is not None:
            self._core.stop()

    async def _run(self, op: str, model_id: Any, timeout: Any, **payload: Any) -> Any:
        try:
            await self.ready()
        except TimeoutError:
            raise WorkerStartupError("the worker did not get ready in time") from None
        call = self._build(op, model_id, timeout, **payload)
        gate = self._require_core().gate
        wait = self._admit_now(call)
        if wait is not None and not await gate.acquire_async(call.items, wait.seconds):
            raise overloaded(call.items, gate, wait.seconds)
        self._require_core().submit(call)
        return await asyncio.wrap_future(call.future)

    async def embed(
        self,
        *,
        sentences: list[str],
        model_id: ModelIndex = 0,
        timeout: float | object | None = UNSET,
    ) -> EmbedResult:
        result: EmbedResult = await self._run("embed", model_id, timeout, sentences=sentences)
        return result

    async def rerank(
        self,
        *,
        query: str,
        docs: list[str],
        model_id: ModelIndex = 0,
        raw_scores: bool = False,
        timeout: float | object | None = UNSET,
    ) -> RerankResult:
        result: RerankResult = await self._run(
            "rerank", model_id, timeout, query=query, docs=docs, raw_scores=raw_scores
        )
        return result

    async def classify(
        self,
        *,
        sentences: list[str],
        model_id: ModelIndex = 0,
        raw_scores: bool = False,
        timeout: float | object | None = UNSET,
    ) -> ClassifyResult:
        result: ClassifyResult = await self._run(
            "classify", model_id, timeout, sentences=sentences, raw_scores=raw_scores
        )
        return result

    async def image_embed(
        self, *, images: list[Any], model_id: ModelIndex = 0, timeout: float | object | None = UNSET
    ) -> EmbedResult:
        result: EmbedResult = await self._run("image_embed", model_id, timeout, images=images)
        return result

    async def audio_embed(
        self, *, audios: list[Any], model_id: ModelIndex = 0, timeout: float | object | None = UNSET
    ) -> EmbedResult:
        result: EmbedResult = await self._run("audio_embed", model_id, timeout, audios=audios)
        return result
