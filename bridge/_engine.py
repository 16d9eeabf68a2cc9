"""Worker side: infinity's engines, loaded, guarded and driven. Runs in infinity_env.

Nothing here is imported by the client; ``infinity_emb`` and friends are
imported lazily so that this module can at least be type-checked anywhere.

Two things are added to infinity 0.0.58 here:

* **BetterTransformer off.** Each model is built with
  ``EngineArgs(bettertransformer=False)``: with transformers 4.46 its
  BetterTransformer path fails at run time, and ``embed.BatchedInference``
  has no switch for it. Everything else uses embed 0.3.0's settings
  (``lengths_via_tokenize=True``, ``trust_remote_code=True``, batch size 32).
* **Per-request failure.** In infinity, an exception inside a forward pass
  kills the model's thread and leaves every pending future unresolved
  (upstream issues #544, #242). :func:`guard_model` wraps the model's three
  stages so that a failing batch is re-run item by item; items that still
  fail resolve to an :class:`ItemFailure` instead of an embedding, which the
  request handler turns into that request's error. The engine keeps serving.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import traceback
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

import numpy as np

from bridge import _protocol as proto

log = logging.getLogger("bridge.worker")

#: Only these schemes may be fetched by the worker on a client's behalf; a
#: bare path would let a remote client read the worker's files.
ALLOWED_URL_SCHEMES = ("http://", "https://")


class RequestFailed(Exception):
    """An expected, per-request failure with a category for the client."""

    def __init__(self, category: str, message: str, type_name: str = "", tb: str = "") -> None:
        super().__init__(message)
        self.category = category
        self.type_name = type_name or type(self).__name__
        self.tb = tb

    def info(self) -> proto.ErrorInfo:
        return proto.ErrorInfo(
            category=self.category, type=self.type_name, message=str(self), traceback=self.tb
        )


def classify_exception(exc: BaseException) -> str:
    """Map an exception raised inside the worker to an ErrorInfo category."""
    name = type(exc).__name__
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or name == "OutOfMemoryError" or "out of memory" in text:
        return "oom"
    if name in ("ImageCorruption", "AudioCorruption", "UnidentifiedImageError"):
        return "input"
    if name == "ModelNotDeployedError":
        return "unsupported"
    return "internal"


def error_info(exc: BaseException) -> proto.ErrorInfo:
    if isinstance(exc, RequestFailed):
        return exc.info()
    if isinstance(exc, ItemFailedError):
        return proto.ErrorInfo(
            category=classify_exception(exc.original),
            type=type(exc.original).__name__,
            message=str(exc.original),
            traceback=exc.tb,
        )
    return proto.ErrorInfo(
        category=classify_exception(exc),
        type=type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )


# --------------------------------------------------------------- error isolation


class ItemFailure:
    """Stands in for one item's result when its forward pass raised."""

    __slots__ = ("exc", "tb")

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.tb = "".join(traceback.format_exception(exc))


class ItemFailedError(Exception):
    def __init__(self, failure: ItemFailure) -> None:
        super().__init__(str(failure.exc))
        self.original = failure.exc
        self.tb = failure.tb


def raise_first_failure(results: Sequence[Any]) -> None:
    for result in results:
        if isinstance(result, ItemFailure):
            raise ItemFailedError(result)


class _Staged:
    """Travels through infinity's pre -> core -> post queues in place of features."""

    __slots__ = ("features", "items", "results")

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.features: Any = None
        self.results: list[Any] | None = None


def _release_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort only
        pass


def batch_size_of(engine: Any) -> int:
    try:
        return int(engine._batch_handler.model_worker._max_batch_size)
    except AttributeError:
        return int(engine.engine_args.batch_size)


def calibrate_batch_size(engine: Any, configured: int) -> int:
    """Halve infinity's batch size until a full batch of maximum-length inputs fits the budget.

    Runs the model's own (unguarded) stages on synthetic inputs, before the
    engine serves anyone. A batch that still would not fit later (longer
    inputs than assumed) is caught by the guard and re-run item by item.
    """
    import torch

    model = engine._model
    stages = getattr(model, "_bridge_unguarded", None)
    if stages is None or not torch.cuda.is_available():
        return configured
    pre, core, post = cast(
        tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]], stages
    )
    capabilities = engine.capabilities
    tokens = int(getattr(model, "max_seq_length", 0) or 512)
    text = "hello " * tokens
    from infinity_emb.primitives import EmbeddingSingle, PredictSingle, ReRankSingle

    sample: Any
    if "embed" in capabilities:
        sample = EmbeddingSingle(sentence=text).to_input()
    elif "rerank" in capabilities:
        sample = ReRankSingle(query=text, document=text).to_input()
    elif "classify" in capabilities:
        sample = PredictSingle(sentence=text).to_input()
    else:
        return configured
    size = configured
    while size >= 1:
        try:
            torch.cuda.empty_cache()
            post(core(pre([sample] * size)))
            break
        except torch.OutOfMemoryError:
            log.warning("batch size %d does not fit the GPU budget; trying %d", size, size // 2)
            size //= 2
    torch.cuda.empty_cache()
    size = max(size, 1)
    engine._batch_handler.model_worker._max_batch_size = size
    return size


#: infinity's stand-in for a model's fastest forward pass when its warm-up is
#: off (EngineArgs(model_warmup=False), as embed runs it); batch_delay is half.
INFINITY_UNMEASURED_INFERENCE_S = 4e-3
#: So the batch_delay every request pays in embed, and our cap on the measured one.
EMBED_BATCH_DELAY_S = INFINITY_UNMEASURED_INFERENCE_S / 2
#: infinity's own floor for batch_delay ("should not be 0 to not block the GIL").
MIN_BATCH_DELAY_S = 1e-4


def tune_batch_delay(engine: Any, setting: float | None) -> float:
    """Set infinity's ``batch_delay`` for ``engine``: measured (``None``) or as given.

    Why: infinity's post-processing thread sleeps ``batch_delay`` after every
    batch (in 0.0.58 the condition meant to skip that sleep is always true),
    and with its warm-up off -- embed's choice, and ours, since that warm-up
    runs full 512-token batches -- ``batch_delay`` is half a 4 ms guess: 2 ms
    added to every request, however fast the model. infinity's REST server
    measures instead, as half the fastest of ten one-item forward passes; so
    do we, capped at that 2 ms so a slow model never waits longer than it
    would in embed. Measured on the null model: 2.49 ms -> 0.56 ms a request.
    """
    if setting is None:
        try:
            fastest = min(
                float(engine._model.warmup(batch_size=1, n_tokens=1)[1]) for _ in range(10)
            )
            delay = min(fastest / 2, EMBED_BATCH_DELAY_S)
        except Exception as exc:  # a model without infinity's warmup(): keep its guess
            log.warning("could not time the model: %s; batch_delay stays 2 ms", exc)
            delay = EMBED_BATCH_DELAY_S
    else:
        delay = float(setting)
    delay = max(MIN_BATCH_DELAY_S, delay)
    model_worker = getattr(getattr(engine, "_batch_handler", None), "model_worker", None)
    if model_worker is None or not hasattr(model_worker, "_batch_delay"):
        log.warning("this infinity has no ModelWorker._batch_delay; batch_delay left as it is")
        return batch_delay_of(engine)
    model_worker._batch_delay = delay
    return delay


def batch_delay_of(engine: Any) -> float:
    try:
        return float(engine._batch_handler.model_worker._batch_delay)
    except AttributeError:
        return EMBED_BATCH_DELAY_S


def guard_model(model: Any) -> None:
    """Make ``model``'s stages fail per item instead of killing infinity's threads."""
    pre: Callable[..., Any] = model.encode_pre
    core: Callable[..., Any] = model.encode_core
    post: Callable[..., Any] = model.encode_post

    def one_by_one(items: list[Any]) -> list[Any]:
        # The batch failed as a whole; find out which items are to blame.
        # A batch that was merely too large for memory usually succeeds here.
        _release_accelerator_memory()
        results: list[Any] = []
        for item in items:
            try:
                results.append(post(core(pre([item])))[0])
            except Exception as exc:
                log.warning("forward pass failed for one item: %s: %s", type(exc).__name__, exc)
                results.append(ItemFailure(exc))
        return results

    def encode_pre(items: list[Any]) -> _Staged:
        staged = _Staged(items)
        try:
            staged.features = pre(items)
        except Exception:
            staged.results = one_by_one(items)
        return staged

    def encode_core(staged: _Staged) -> _Staged:
        if staged.results is None:
            try:
                staged.features = core(staged.features)
            except Exception:
                staged.features = None
                staged.results = one_by_one(staged.items)
        return staged

    def encode_post(staged: _Staged, **kwargs: Any) -> Any:
        if staged.results is not None:
            return staged.results
        try:
            return post(staged.features, **kwargs)
        except Exception:
            return one_by_one(staged.items)

    model._bridge_unguarded = (pre, core, post)
    model.encode_pre = encode_pre
    model.encode_core = encode_core
    model.encode_post = encode_post


# ------------------------------------------------------------------------ models


@dataclass
class ModelSpec:
    """One model, with embed 0.3.0's parameters (validated by the client)."""

    model_id: str
    engine: str = "optimum"
    device: str = "cpu"
    dtype: str = "auto"
    embedding_dtype: str = "float32"
    batch_size: int = 32
    batch_delay: float | None = None  # seconds; None: measured (see tune_batch_delay)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        # Keys that name no field are ignored, as they always were.
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def infinity_versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version(), "bridge-protocol": str(proto.PROTOCOL_VERSION)}
    for dist in (
        "numpy",
        "torch",
        "transformers",
        "optimum",
        "infinity_emb",
        "embed",
        "sentence-transformers",
        "pyzmq",
        "msgspec",
    ):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = ""
    return versions


def silent_wav(sampling_rate: int, seconds: float = 1.0) -> bytes:
    """A valid mono 16-bit WAV of silence, to warm up audio models."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sampling_rate)
        out.writeframes(b"\x00\x00" * int(sampling_rate * seconds))
    return buffer.getvalue()


# ----------------------------------------------------------------------- the GPU


def apply_memory_budget(budget: float | None) -> int | None:
    """Cap this process's CUDA memory; returns the budget in bytes (None: no cap, or no GPU)."""
    if budget is None:
        return None
    import torch

    from bridge._gpu import budget_fraction

    if not torch.cuda.is_available():
        log.warning("gpu memory budget %s ignored: no CUDA device is visible", budget)
        return None
    total = int(torch.cuda.get_device_properties(0).total_memory)
    fraction = budget_fraction(budget, total)
    assert fraction is not None
    # Allocations past the fraction raise torch.OutOfMemoryError in the
    # allocating thread: the guarded model turns that into the request's error.
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    log.info(
        "GPU memory budget: %.0f MiB (%.3f of %.0f MiB)",
        fraction * total / 2**20,
        fraction,
        total / 2**20,
    )
    return int(fraction * total)


def gpu_memory_report(budget_bytes: int | None) -> dict[str, int] | None:
    """This process's CUDA memory (bytes), or None without a GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        report = {
            "reserved": int(torch.cuda.memory_reserved()),
            "allocated": int(torch.cuda.memory_allocated()),
            "max_allocated": int(torch.cuda.max_memory_allocated()),
            "free": int(free),
            "total": int(total),
        }
        if budget_bytes is not None:
            report["budget"] = int(budget_bytes)
        return report
    except Exception:  # a report must never take the worker down
        return None


def to_bfloat16(engine: Any) -> None:
    """infinity 0.0.58 has no bfloat16 dtype: load in float32, then convert here."""
    import torch

    model = engine._model
    if (
        isinstance(model, torch.nn.Module)
        and "embed" in engine.capabilities
        and "image_embed" not in engine.capabilities
    ):
        model.to(torch.bfloat16)
        return
    raise RuntimeError(
        f"dtype='bfloat16' is supported for sentence-transformers embedding models only; "
        f"{type(model).__name__} is not one (use float16 or float32)"
    )


class EngineHost:
    """Holds infinity's AsyncEngineArray and runs requests against it."""

    def __init__(self, specs: list[ModelSpec], gpu_budget: float | None = None) -> None:
        self.specs = specs
        self.gpu_budget = gpu_budget
        self.budget_bytes: int | None = None
        self.array: Any = None
        self.models: list[proto.ModelInfo] = []
        self._by_name: dict[str, Any] = {}
        self._info_by_name: dict[str, proto.ModelInfo] = {}
        self.load_seconds = 0.0

    # -- loading ------------------------------------------------------------

    async def load(self) -> None:
        start = time.monotonic()
        from infinity_emb import AsyncEngineArray, EngineArgs

        self.budget_bytes = await asyncio.to_thread(apply_memory_budget, self.gpu_budget)
        args = [
            EngineArgs(
                model_name_or_path=spec.model_id,
                engine=spec.engine,
                device=spec.device,
                dtype="float32" if spec.dtype == "bfloat16" else spec.dtype,
                embedding_dtype=spec.embedding_dtype,
                batch_size=spec.batch_size,
                bettertransformer=False,
                # embed 0.3.0's opinionated defaults:
                lengths_via_tokenize=True,
                model_warmup=False,
                trust_remote_code=True,
            )
            for spec in self.specs
        ]
        # Loading weights is slow and blocking; keep the event loop free so
        # the worker answers heartbeats meanwhile.
        self.array = await asyncio.to_thread(AsyncEngineArray.from_args, args)
        await self.array.astart()
        engines = list(self.array)
        for index, (spec, engine) in enumerate(zip(self.specs, engines, strict=True)):
            if spec.dtype == "bfloat16":
                await asyncio.to_thread(to_bfloat16, engine)
            guard_model(engine._model)
            name = engine.engine_args.served_model_name
            self._by_name[name] = engine
            if self.budget_bytes is not None:
                await asyncio.to_thread(calibrate_batch_size, engine, spec.batch_size)
            await asyncio.to_thread(tune_batch_delay, engine, spec.batch_delay)
            info = await self._warm_up(index, spec, name, engine)
            self._info_by_name[name] = info
            self.models.append(info)
        self.load_seconds = time.monotonic() - start

    async def _warm_up(
        self, index: int, spec: ModelSpec, name: str, engine: Any
    ) -> proto.ModelInfo:
        """One real forward pass per capability, so a broken model fails now."""
        capabilities = sorted(engine.capabilities)
        dim: int | None = None
        labels: list[str] | None = None
        if "embed" in capabilities:
            rows, _ = await engine.embed(["warm-up"])
            raise_first_failure(rows)
            dim = int(np.asarray(rows[0]).shape[-1])
        if "image_embed" in capabilities:
            from PIL import Image

            rows, _ = await engine.image_embed(images=[Image.new("RGB", (64, 64), (127, 127, 127))])
            raise_first_failure(rows)
            dim = int(np.asarray(rows[0]).shape[-1])
        if "audio_embed" in capabilities:
            rate = int(getattr(engine._model, "sampling_rate", 16000))
            rows, _ = await engine.audio_embed(audios=[silent_wav(rate)])
            raise_first_failure(rows)
            dim = int(np.asarray(rows[0]).shape[-1])
        if "rerank" in capabilities:
            scores, _ = await engine.rerank(query="warm-up", docs=["warm-up"], raw_scores=True)
            raise_first_failure(scores)
        if "classify" in capabilities:
            classes, _ = await engine.classify(sentences=["warm-up"])
            raise_first_failure(classes)
            labels = self._labels_of(engine)
        args = engine.engine_args
        return proto.ModelInfo(
            index=index,
            model_id=spec.model_id,
            name=name,
            capabilities=capabilities,
            dim=dim,
            embedding_dtype=args.embedding_dtype.value,
            engine=args.engine.value,
            device=str(getattr(engine._model, "device", args.device.value)),
            dtype=spec.dtype if spec.dtype == "bfloat16" else args.dtype.value,
            labels=labels,
            batch_size=batch_size_of(engine),
            batch_delay=batch_delay_of(engine),
        )

    @staticmethod
    def _labels_of(engine: Any) -> list[str] | None:
        try:
            id2label = engine._model._pipe.model.config.id2label
            return [str(id2label[i]) for i in sorted(id2label)]
        except Exception:
            return None

    async def stop(self) -> None:
        if self.array is not None:
            await self.array.astop()

    # -- requests -------------------------------------------------------------

    def resolve(self, name: str) -> tuple[Any, proto.ModelInfo]:
        try:
            return self._by_name[name], self._info_by_name[name]
        except KeyError:
            raise RequestFailed(
                "unknown_model", f"no model named {name!r}; loaded: {sorted(self._by_name)}"
            ) from None

    def queue_depth(self) -> dict[str, int]:
        depth: dict[str, int] = {}
        for name, engine in self._by_name.items():
            try:
                depth[name] = len(engine._batch_handler._queue_prio)
            except Exception:
                depth[name] = -1
        return depth

    async def run(
        self, request: proto.Request, frames: Sequence[Any]
    ) -> tuple[proto.Result, list[memoryview]]:
        engine, info = self.resolve(request.model)
        if request.op not in info.capabilities:
            raise RequestFailed(
                "unsupported",
                f"model {info.name!r} cannot {request.op}; it supports {', '.join(info.capabilities)}",
            )
        op = request.op
        if op == "embed":
            self._need_texts(request)
            rows, usage = await engine.embed(request.texts)
            return self._embedding_result(request, rows, usage)
        if op == "rerank":
            if request.query is None:
                raise RequestFailed("input", "rerank needs a query")
            self._need_texts(request)
            # Always ask for raw scores and apply infinity's own sigmoid here:
            # on a failed item infinity's sigmoid would hide the real error.
            scores, usage = await engine.rerank(
                query=request.query, docs=request.texts, raw_scores=True
            )
            raise_first_failure(scores)
            if not request.raw_scores:
                scores = (1 / (1 + np.exp(-np.array(scores)))).tolist()
            return proto.Result(
                id=request.id, usage=int(usage), scores=[float(s) for s in scores]
            ), []
        if op == "classify":
            self._need_texts(request)
            classes, usage = await engine.classify(
                sentences=request.texts, raw_scores=request.raw_scores
            )
            raise_first_failure(classes)
            labels = [
                [proto.LabelScore(str(c["label"]), float(c["score"])) for c in item]
                for item in classes
            ]
            return proto.Result(id=request.id, usage=int(usage), labels=labels), []
        if op == "image_embed":
            images = await asyncio.to_thread(self._images, request, frames)
            rows, usage = await engine.image_embed(images=images)
            return self._embedding_result(request, rows, usage)
        if op == "audio_embed":
            audios = self._audios(request, frames)
            rows, usage = await engine.audio_embed(audios=audios)
            return self._embedding_result(request, rows, usage)
        raise RequestFailed("input", f"unknown op {op!r}")  # unreachable: the schema checks it

    @staticmethod
    def _need_texts(request: proto.Request) -> None:
        if not request.texts:
            raise RequestFailed("input", f"{request.op} needs at least one text")

    @staticmethod
    def _embedding_result(
        request: proto.Request, rows: list[Any], usage: int
    ) -> tuple[proto.Result, list[memoryview]]:
        raise_first_failure(rows)
        # Rows may come from different batches; this stack is the one copy
        # the worker makes, into the contiguous buffer that goes on the wire.
        matrix = np.stack([np.asarray(row) for row in rows])
        if matrix.dtype.kind == "f" and matrix.dtype != np.float32:
            # float16/float64 outputs (half-precision heads, the debug engine)
            # are delivered as float32, the one float type on the wire.
            matrix = matrix.astype(np.float32)
        ref, buffer = proto.encode_array(matrix, frame=0)
        return proto.Result(id=request.id, usage=int(usage), embeddings=ref), [buffer]

    @staticmethod
    def _media_frame(ref: proto.MediaRef, frames: Sequence[Any]) -> memoryview:
        assert ref.frame is not None
        if ref.frame >= len(frames):
            raise RequestFailed(
                "protocol", f"media refers to frame {ref.frame}, message has {len(frames)}"
            )
        return memoryview(frames[ref.frame])

    def _check_media(self, request: proto.Request) -> None:
        if not request.media:
            raise RequestFailed("input", f"{request.op} needs at least one input")
        for ref in request.media:
            if (ref.url is None) == (ref.frame is None):
                raise RequestFailed("protocol", "a media item needs exactly one of url and frame")
            if ref.url is not None and not ref.url.startswith(ALLOWED_URL_SCHEMES):
                raise RequestFailed(
                    "input",
                    f"the worker only fetches http(s) URLs, not {ref.url[:80]!r}; "
                    "send local files as bytes",
                )

    def _images(self, request: proto.Request, frames: Sequence[Any]) -> list[Any]:
        from PIL import Image, UnidentifiedImageError

        self._check_media(request)
        images: list[Any] = []
        for ref in request.media:
            if ref.url is not None:
                images.append(ref.url)
                continue
            data = self._media_frame(ref, frames)
            if ref.mode is not None:
                if ref.mode not in proto.RAW_IMAGE_MODES or ref.width is None or ref.height is None:
                    raise RequestFailed(
                        "input", f"raw image needs a known mode and a size, got {ref.mode!r}"
                    )
                expected = ref.width * ref.height * proto.RAW_IMAGE_MODES[ref.mode]
                if data.nbytes != expected:
                    raise RequestFailed(
                        "protocol",
                        f"raw {ref.mode} image {ref.width}x{ref.height} needs {expected} bytes, got {data.nbytes}",
                    )
                images.append(Image.frombytes(ref.mode, (ref.width, ref.height), bytes(data)))
                continue
            try:
                image = Image.open(io.BytesIO(bytes(data)))
                image.load()
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise RequestFailed(
                    "input", f"cannot decode image: {exc}", type(exc).__name__
                ) from None
            if image.size[0] < 3 or image.size[1] < 3:
                raise RequestFailed("input", f"image too small for processing: {image.size}")
            images.append(image)
        return images

    def _audios(self, request: proto.Request, frames: Sequence[Any]) -> list[Any]:
        self._check_media(request)
        return [
            ref.url if ref.url is not None else bytes(self._media_frame(ref, frames))
            for ref in request.media
        ]


def describe_device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    except Exception:
        pass
    return "cpu"
