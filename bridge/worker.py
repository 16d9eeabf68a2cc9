"""The Infinity worker: ``python -m bridge.worker``, run by infinity_env's interpreter.

It binds one ZeroMQ ROUTER socket and serves every client that connects:

* a client says HELLO; the worker answers HELLO (its versions, state, device)
  and, once its models are loaded and warmed up, READY (or FAILED with the
  load error and its traceback);
* each REQUEST becomes an asyncio task, so many requests are in flight at
  once and infinity's dynamic batcher can group them; its answer is a RESULT
  (arrays as raw frames) or an ERROR, never both, never neither -- unless the
  client CANCELs it or its deadline passes first;
* PING is answered with PONG at once, by the event loop, which never runs a
  model (models run in infinity's threads), so a silent worker is a hung one;
* every frame is validated; a malformed or hostile message gets a protocol
  ERROR (or is dropped when it is not even addressable) and the worker goes on.

Spawned by a client, it also watches its parent and exits when the parent
goes away (even by SIGKILL), and exits on BYE from its owner (the client
whose HELLO carries ``$BRIDGE_OWNER_TOKEN``).

Standalone use (then clients connect with ``BatchedInference(address=...)``)::

    python -m bridge.worker --bind tcp://127.0.0.1:5555 \\
        --model-id /models/Conan-embedding-v1 --engine torch --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from bridge import _protocol as proto
from bridge._endpoints import (
    CurveServerKeys,
    apply_curve_server,
    check_endpoint,
    endpoint_needs_curve,
    ipc_path,
)
from bridge._engine import (
    EngineHost,
    ModelSpec,
    describe_device,
    error_info,
    gpu_memory_report,
    infinity_versions,
)
from bridge._errors import ConfigurationError, ProtocolError
from bridge._inputs import check_batch_delay

log = logging.getLogger("bridge.worker")

#: How often the parent is checked; a dead parent is noticed within this.
PARENT_CHECK_INTERVAL = 0.25


class Worker:
    def __init__(self, options: argparse.Namespace, specs: list[ModelSpec]) -> None:
        self.options = options
        self.host = EngineHost(specs, gpu_budget=options.gpu_memory)
        self.state = "loading"
        self.failure: proto.ErrorInfo | None = None
        self.started = time.monotonic()
        self.peers: set[bytes] = set()  # those that said HELLO, told when loading ends
        self.owners: set[bytes] = set()
        self.tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self.sending: set[asyncio.Task[None]] = set()
        self.items_in_flight = 0
        self.served = 0
        self.owner_token = os.environ.pop("BRIDGE_OWNER_TOKEN", "")
        self.stopping = asyncio.Event()
        self.exit_code = 0
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)

    # -- socket ---------------------------------------------------------------

    def bind(self) -> None:
        opts = self.options
        sock = self.sock
        sock.linger = 0
        # The client bounds what it has in flight; zmq's own high-water marks
        # would only drop or block messages behind our back.
        sock.sndhwm = 0
        sock.rcvhwm = 0
        sock.setsockopt(zmq.MAXMSGSIZE, opts.max_message_bytes)
        if opts.curve_secret_file:
            apply_curve_server(
                sock, CurveServerKeys.from_files(opts.curve_secret_file, opts.curve_clients_dir)
            )
            self._start_authenticator(opts.curve_clients_dir)
        elif endpoint_needs_curve(opts.bind):
            raise ConfigurationError(
                f"refusing to bind {opts.bind} without CurveZMQ: a tcp endpoint on a non-loopback "
                "address needs --curve-secret-file (see README, 'Security')"
            )
        path = ipc_path(opts.bind)
        if path is not None and path.exists():
            path.unlink()  # a stale socket file left by a killed predecessor
        sock.bind(opts.bind)
        if path is not None:
            os.chmod(path, 0o600)

    def _start_authenticator(self, clients_dir: str | None) -> None:
        if not clients_dir:
            return  # any client that knows the server key may connect
        from zmq.auth.asyncio import AsyncioAuthenticator

        self.auth = AsyncioAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve(domain="*", location=clients_dir)

    async def send(self, peer: bytes, message: proto.Message, frames: Sequence[Any] = ()) -> None:
        try:
            await self.sock.send_multipart(
                [peer, proto.encode_header(message), *frames], copy=False
            )
        except zmq.ZMQError as exc:  # e.g. the socket closed under us at shutdown
            log.debug("send to a peer failed: %s", exc)

    def send_soon(self, peer: bytes, message: proto.Message) -> None:
        task = asyncio.get_running_loop().create_task(self.send(peer, message))
        # The loop keeps only weak references to tasks: hold on until sent.
        self.sending.add(task)
        task.add_done_callback(self.sending.discard)

    # -- main loop ------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.request_stop, f"signal {sig.name}")
        loader = loop.create_task(self.load())
        watchers = [loop.create_task(self.receive_loop())]
        if self.options.parent_pid:
            watchers.append(loop.create_task(self.watch_parent(self.options.parent_pid)))
        await self.stopping.wait()
        for task in [loader, *watchers, *self.tasks.values()]:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.host.stop(), timeout=5.0)
        return self.exit_code

    def request_stop(self, reason: str, code: int = 0) -> None:
        if not self.stopping.is_set():
            log.info("stopping: %s", reason)
            self.exit_code = code
            self.stopping.set()

    async def load(self) -> None:
        try:
            await self.host.load()
        except Exception as exc:
            self.state = "failed"
            self.failure = msgspec.structs.replace(error_info(exc), category="startup")
            sys.stderr.write("bridge.worker: loading the models failed:\n" + self.failure.traceback)
            for peer in self.peers:
                await self.send(peer, proto.Failed(error=self.failure))
            # Give the FAILED messages a moment to leave, then exit.
            await asyncio.sleep(0.5)
            self.request_stop("model loading failed", code=3)
            return
        self.state = "ready"
        log.info("ready: %s", ", ".join(m.name for m in self.host.models))
        print(f"bridge.worker: ready on {self.options.bind}", flush=True)
        for peer in self.peers:
            await self.send(peer, self.ready_message())

    def ready_message(self) -> proto.Ready:
        return proto.Ready(
            models=self.host.models,
            load_seconds=self.host.load_seconds,
            device=describe_device(),
            gpu=gpu_memory_report(self.host.budget_bytes),
        )

    async def watch_parent(self, parent_pid: int) -> None:
        while True:
            # Re-parenting (to init or a subreaper) means the parent is gone.
            if os.getppid() != parent_pid:
                self.request_stop(f"parent process {parent_pid} is gone")
                return
            await asyncio.sleep(PARENT_CHECK_INTERVAL)

    async def receive_loop(self) -> None:
        while True:
            try:
                frames = await self.sock.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    return
                log.warning("receive failed: %s", exc)
                continue
            try:
                self.dispatch(frames)
            except Exception:  # never let one message take the worker down
                log.exception("unexpected error while handling a message")

    # -- messages -------------------------------------------------------------

    def dispatch(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return  # nothing to answer to: a ROUTER always gets [peer, ...]
        peer = frames[0].bytes
        try:
            message = proto.decode_header(frames[1].buffer)
        except ProtocolError as exc:
            self.refuse(peer, None, "protocol", type(exc).__name__, str(exc))
            return
        data = frames[2:]
        if isinstance(message, proto.Request):
            self.on_request(peer, message, data)
        elif isinstance(message, proto.Ping):
            self.send_soon(peer, proto.Pong(t=message.t))
        elif isinstance(message, proto.Cancel):
            task = self.tasks.get((peer, message.id))
            if task is not None:
                task.cancel()
        elif isinstance(message, proto.Hello):
            self.on_hello(peer, message)
        elif isinstance(message, proto.Status):
            self.send_soon(peer, proto.Status(id=message.id, report=self.status_report()))
        elif isinstance(message, proto.Bye):
            self.on_bye(peer, message)
        else:
            name = type(message).__name__.upper()
            self.refuse(
                peer,
                getattr(message, "id", None),
                "protocol",
                "ProtocolError",
                f"a worker does not accept {name} messages",
            )

    def on_hello(self, peer: bytes, hello: proto.Hello) -> None:
        self.peers.add(peer)
        if self.owner_token and hello.token == self.owner_token:
            self.owners.add(peer)
        reply = proto.Hello(
            role="worker",
            pid=os.getpid(),
            versions=infinity_versions(),
            state=self.state,  # type: ignore[arg-type]
            device=describe_device() if self.state == "ready" else "",
            host=socket.gethostname(),
        )
        self.send_soon(peer, reply)
        if self.state == "ready":
            self.send_soon(peer, self.ready_message())
        elif self.state == "failed" and self.failure is not None:
            self.send_soon(peer, proto.Failed(error=self.failure))

    def on_bye(self, peer: bytes, bye: proto.Bye) -> None:
        self.peers.discard(peer)
        for (task_peer, _), task in list(self.tasks.items()):
            if task_peer == peer:
                task.cancel()
        if bye.shutdown and peer in self.owners:
            self.request_stop(f"owner said BYE ({bye.reason or 'no reason given'})")

    def on_request(self, peer: bytes, request: proto.Request, data: list[zmq.Frame]) -> None:
        key = (peer, request.id)
        if self.state != "ready":
            self.refuse(peer, request.id, "unavailable", "NotReady", f"the worker is {self.state}")
            return
        if key in self.tasks:
            self.refuse(
                peer,
                request.id,
                "protocol",
                "ProtocolError",
                f"request id {request.id} is already in flight",
            )
            return
        problem = self.oversized(request)
        if problem:
            self.refuse(peer, request.id, "too_large", "InputTooLarge", problem)
            return
        task = asyncio.get_running_loop().create_task(self.serve(peer, request, data))
        self.tasks[key] = task
        task.add_done_callback(lambda _t, key=key: self.tasks.pop(key, None))  # type: ignore[misc]

    def refuse(
        self, peer: bytes, request_id: int | None, category: str, type_name: str, message: str
    ) -> None:
        """Answer a message with an ERROR (and nothing else)."""
        error = proto.ErrorInfo(category=category, type=type_name, message=message)
        self.send_soon(peer, proto.Error(id=request_id, error=error))

    def oversized(self, request: proto.Request) -> str:
        """The worker's own limits: clients are checked, but not trusted."""
        count = len(request.texts) + len(request.media)
        if count > self.options.max_items:
            return (
                f"{count} items in one request, over the worker's limit of {self.options.max_items}"
            )
        limit = self.options.max_item_chars
        for text in (*request.texts, request.query or ""):
            if len(text) > limit:
                return f"a text of {len(text)} characters, over the worker's limit of {limit}"
        return ""

    async def serve(self, peer: bytes, request: proto.Request, data: list[zmq.Frame]) -> None:
        count = max(len(request.texts), len(request.media))
        self.items_in_flight += count
        try:
            try:
                # The deadline counts from arrival: the two clocks need not agree.
                async with asyncio.timeout(request.timeout_s):
                    result, frames = await self.host.run(request, data)
            except TimeoutError:
                error = proto.ErrorInfo(
                    category="deadline",
                    type="DeadlineExceeded",
                    message=f"deadline of {request.timeout_s:.3f} s passed in the worker",
                )
                await self.send(peer, proto.Error(id=request.id, error=error))
                return
            except asyncio.CancelledError:
                raise  # CANCEL, BYE or shutdown: the client has stopped waiting
            except Exception as exc:
                await self.send(peer, proto.Error(id=request.id, error=error_info(exc)))
                return
            self.served += 1
            await self.send(peer, result, frames)
        finally:
            self.items_in_flight -= count

    def status_report(self) -> proto.StatusReport:
        rss_pages = 0
        with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm") as fh:
            rss_pages = int(fh.read().split()[1])
        rss = (
            rss_pages * resource.getpagesize()
            if rss_pages
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        return proto.StatusReport(
            pid=os.getpid(),
            uptime_s=time.monotonic() - self.started,
            requests_in_flight=len(self.tasks),
            items_in_flight=self.items_in_flight,
            requests_served=self.served,
            queue_depth=self.host.queue_depth() if self.state == "ready" else {},
            rss_bytes=rss,
            gpu=gpu_memory_report(self.host.budget_bytes),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sock.close(linger=0)
        auth = getattr(self, "auth", None)
        if auth is not None:
            with contextlib.suppress(Exception):
                auth.stop()
        path = ipc_path(self.options.bind)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(Exception):
            self.ctx.term()


# ---------------------------------------------------------------------------- CLI


def parse_batch_delay(text: str) -> float | None:
    """``--batch-delay``: the client's rule (check_batch_delay), from a string."""
    try:
        return check_batch_delay(text if text == "auto" else float(text))
    except (ValueError, ConfigurationError) as exc:
        raise argparse.ArgumentTypeError(f"'auto' or seconds in [0, 1], not {text!r}") from exc


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[ModelSpec]]:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--bind", required=True, help="endpoint to bind: ipc://PATH or tcp://HOST:PORT"
    )
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    parser.add_argument(
        "--models-json", help="JSON list of model specs (what a spawning client passes)"
    )
    parser.add_argument(
        "--model-id", action="append", default=[], help="model path or hub id (repeatable)"
    )
    parser.add_argument(
        "--engine", action="append", default=[], help="torch or optimum, per model or one for all"
    )
    parser.add_argument(
        "--device", action="append", default=[], help="cpu, cuda, ... per model or one for all"
    )
    parser.add_argument("--dtype", action="append", default=[], help="auto, float32, float16, ...")
    parser.add_argument(
        "--embedding-dtype",
        action="append",
        default=[],
        help="float32, int8, uint8, binary, ubinary",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--batch-delay",
        type=parse_batch_delay,
        default=None,
        help="seconds infinity waits between batch stages, or 'auto' (default): half the "
        "model's fastest one-item forward pass, at most 2 ms",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=256 * 1024 * 1024,
        help="larger incoming messages are dropped by ZeroMQ",
    )
    parser.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        help="CUDA memory budget: a fraction of the card (<= 1) or bytes (> 1)",
    )
    parser.add_argument("--max-items", type=int, default=1 << 20, help="items per request")
    parser.add_argument("--max-item-chars", type=int, default=1_000_000, help="characters per text")
    parser.add_argument(
        "--curve-secret-file", help="CurveZMQ certificate with this worker's secret key"
    )
    parser.add_argument("--curve-clients-dir", help="directory of allowed client public keys")
    parser.add_argument("--log-level", default=os.environ.get("BRIDGE_WORKER_LOG_LEVEL", "INFO"))
    options = parser.parse_args(argv)

    specs: list[ModelSpec] = []
    if options.models_json:
        raw = json.loads(options.models_json)
        specs = [ModelSpec.from_dict(item) for item in raw]
    elif options.model_id:
        count = len(options.model_id)

        def per_model(values: list[str], default: str) -> list[str]:
            if not values:
                return [default] * count
            if len(values) == 1:
                return values * count
            if len(values) != count:
                parser.error(f"give one value or {count} values, got {values}")
            return values

        for model_id, engine, device, dtype, emb in zip(
            options.model_id,
            per_model(options.engine, "optimum"),
            per_model(options.device, "cpu"),
            per_model(options.dtype, "auto"),
            per_model(options.embedding_dtype, "float32"),
            strict=True,
        ):
            specs.append(
                ModelSpec(
                    model_id=model_id,
                    engine=engine,
                    device=device,
                    dtype=dtype,
                    embedding_dtype=emb,
                    batch_size=options.batch_size,
                    batch_delay=options.batch_delay,
                )
            )
    else:
        parser.error("give --model-id (or --models-json)")
    return options, specs


def main(argv: Sequence[str] | None = None) -> int:
    options, specs = parse_args(argv)
    logging.basicConfig(
        level=options.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        check_endpoint(options.bind)
    except ConfigurationError as exc:
        print(f"bridge.worker: {exc}", file=sys.stderr)
        return 2
    worker = Worker(options, specs)
    try:
        worker.bind()
    except (ConfigurationError, zmq.ZMQError) as exc:
        print(f"bridge.worker: cannot serve on {options.bind}: {exc}", file=sys.stderr)
        worker.close()
        return 2
    try:
        # uvloop was tried: PING round trips drop from ~0.17 to ~0.13 ms, but
        # requests through infinity got no faster (docs/benchmarks.md).
        code = asyncio.run(worker.run())
    finally:
        worker.close()
    return code


if __name__ == "__main__":
    exit_code = 1
    try:
        exit_code = main()
    except SystemExit as exc:  # argparse
        exit_code = exc.code if isinstance(exc.code, int) else 2
    except BaseException:
        traceback.print_exc()
    finally:
        # Flushing can fail (a dead parent closed our stdout pipe); nothing
        # may stand between us and the exit below.
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        # infinity's thread pools are not daemonic; a thread stuck in a
        # forward pass would keep a normal exit waiting forever. Leave at once.
        os._exit(exit_code)
