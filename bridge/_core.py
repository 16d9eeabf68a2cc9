"""The client's engine room: one I/O thread that owns every socket.

Callers never touch a socket. They hand a :class:`Call` over through a deque
and wake the I/O thread through a pipe; the I/O thread sends it to a worker,
reads the answer and resolves the call's ``concurrent.futures.Future``.
All mutable state (pending calls, worker slots, timers) lives on that one
thread, so none of it needs a lock.

What the I/O thread polls, in one ``zmq.Poller``:

* one DEALER socket per worker slot (a fresh one per worker incarnation, so
  a late answer from a dead incarnation can never be taken for a new one);
* the wake-up pipe;
* each spawned worker's pidfd: readable the instant the process exits.

And what it keeps an eye on between polls: call deadlines, heartbeats (a
PING every ``heartbeat_interval``; a worker silent for ``heartbeat_timeout``
while a PING is outstanding is hung: SIGKILL, then the crash path), start-up
time-outs and restart back-off.

Crash path: every call in flight on the dead worker is retried on a fresh
(or another) worker, up to ``max_retries`` times; a call caught in more
crashes than that fails with :class:`PoisonRequestError` (or
:class:`WorkerCrashedError` when retries are off), so one poison input cannot
crash-loop the worker. The worker is restarted with exponential back-off.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import zmq

from bridge import _protocol as proto
from bridge._config import ClientConfig
from bridge._endpoints import CurveClientKeys, apply_curve_client, endpoint_needs_curve, ipc_path
from bridge._errors import (
    BridgeError,
    ClientClosedError,
    ConfigurationError,
    InputTooLargeError,
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
from bridge._supervisor import Backoff, WorkerLaunch, WorkerProcess

__all__ = ["BridgeCore", "Call", "CapacityGate", "WorkerTarget", "error_from_info"]

log = logging.getLogger("bridge")

_ids = itertools.count(1)


def error_from_info(info: proto.ErrorInfo) -> BridgeError:
    """Turn an ERROR sent by the worker into the client's exception."""
    kwargs = {"remote_type": info.type, "remote_traceback": info.traceback}
    if info.category == "input":
        return WorkerInputError(info.message, **kwargs)
    if info.category == "oom":
        return WorkerOutOfMemoryError(info.message, **kwargs)
    if info.category == "unknown_model":
        return UnknownModelError(info.message)
    if info.category == "unsupported":
        return UnsupportedOperationError(info.message)
    if info.category == "too_large":
        return InputTooLargeError(info.message)
    if info.category == "deadline":
        return RequestTimeoutError(info.message)
    if info.category == "protocol":
        return ProtocolError(f"the worker rejected a message: {info.message}")
    if info.category == "unavailable":
        return WorkerUnavailableError(info.message)
    if info.category == "startup":
        return WorkerStartupError(_with_traceback(info))
    return WorkerError(info.message, **kwargs)


def _with_traceback(info: proto.ErrorInfo) -> str:
    text = f"{info.type}: {info.message}" if info.type else info.message
    if info.traceback:
        text += "\n--- worker traceback ---\n" + info.traceback.rstrip()
    return text


# ------------------------------------------------------------------ backpressure


class CapacityGate:
    """Bounds the items (sentences, images...) in flight, for threads and coroutines.

    A call is admitted when it fits under the limit, or when nothing else is
    in flight (so one call larger than the limit still runs, alone).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[Any, Any]] = []  # (loop, asyncio.Future)

    @property
    def used(self) -> int:
        return self._used

    def _fits(self, count: int) -> bool:
        return self._used == 0 or self._used + count <= self.limit

    def try_acquire(self, count: int) -> bool:
        with self._cond:
            if self._fits(count):
                self._used += count
                return True
            return False

    def acquire(self, count: int, timeout: float | None) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: self._fits(count), timeout=timeout):
                return False
            self._used += count
            return True

    async def acquire_async(self, count: int, timeout: float | None) -> bool:
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._cond:
                if self._fits(count):
                    self._used += count
                    return True
                waiter = loop.create_future()
                self._async_waiters.append((loop, waiter))
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return False

    def release(self, count: int) -> None:
        with self._cond:
            self._used -= count
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, waiter in waiters:
            with contextlib.suppress(RuntimeError):  # its loop may be closed
                loop.call_soon_threadsafe(_set_if_pending, waiter)


def _set_if_pending(waiter: Any) -> None:
    if not waiter.done():
        waiter.set_result(None)


# ------------------------------------------------------------------------- calls


class Call:
    """One request from submission to resolution. Owned by the I/O thread once submitted."""

    __slots__ = (
        "buffers",
        "crashes",
        "deadline",
        "finished",
        "future",
        "header",
        "id",
        "items",
        "op",
        "request",
        "slot",
        "timeout",
    )

    def __init__(
        self, request: proto.Request, buffers: list[Any], items: int, timeout: float | None
    ) -> None:
        self.id = request.id
        self.op = request.op
        self.request = request
        self.header = proto.encode_header(request)
        self.buffers = buffers
        self.items = items
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.crashes = 0
        self.slot: _Slot | None = None
        self.finished = False

    @staticmethod
    def new_id() -> int:
        return next(_ids)

    def nbytes(self) -> int:
        return len(self.header) + sum(memoryview(b).nbytes for b in self.buffers)

    def retry_header(self) -> bytes:
        self.request = msgspec.structs.replace(self.request, attempt=self.crashes)
        self.header = proto.encode_header(self.request)
        return self.header


@dataclasses.dataclass(frozen=True)
class WorkerTarget:
    """Where one slot's worker comes from: spawned (launch) or already running (address)."""

    endpoint: str
    launch: WorkerLaunch | None = None
    curve: CurveClientKeys | None = None


# ------------------------------------------------------------------------- slots


class _Slot:
    """One worker position: its socket, its process (if spawned), its calls."""

    def __init__(self, index: int, target: WorkerTarget, config: ClientConfig) -> None:
        self.index = index
        self.target = target
        self.sock: zmq.Socket[bytes] | None = None
        self.process: WorkerProcess | None = None
        self.state = "idle"  # idle -> starting -> ready -> (down -> starting ...) | failed
        self.ever_ready = False
        self.hello: proto.Hello | None = None
        self.ready: proto.Ready | None = None
        self.inflight: dict[int, Call] = {}
        self.items = 0
        self.started_at = 0.0
        self.next_ping = 0.0
        self.unanswered_ping_since: float | None = None
        self.last_received = 0.0
        self.restart_at: float | None = None
        self.restart_failures = 0
        self.restarts = 0
        self.backoff = Backoff(config.restart_backoff_initial, config.restart_backoff_max)
        self.last_error: BridgeError | None = None

    @property
    def endpoint(self) -> str:
        return self.target.endpoint

    @property
    def pid(self) -> int | None:
        if self.process is not None:
            return self.process.pid
        return self.hello.pid if self.hello is not None else None


# -------------------------------------------------------------------------- core

_live_cores: weakref.WeakSet[BridgeCore] = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    for core in list(_live_cores):
        with contextlib.suppress(Exception):
            core.stop(timeout=10.0)


atexit.register(_stop_all_at_exit)


class BridgeCore:
    """Owns the I/O thread, the worker slots and every in-flight call."""

    def __init__(self, targets: Sequence[WorkerTarget], config: ClientConfig) -> None:
        if not targets:
            raise ConfigurationError("at least one worker is needed")
        self.config = config
        self.gate = CapacityGate(config.max_inflight_items)
        self.ready_future: concurrent.futures.Future[list[proto.ModelInfo]] = (
            concurrent.futures.Future()
        )
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._slots = [_Slot(i, t, config) for i, t in enumerate(targets)]
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self._poller = zmq.Poller()
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._sentinels: dict[int, _Slot] = {}
        self._backlog: collections.deque[Call] = collections.deque()
        self._deadlines: list[tuple[float, int, Call]] = []
        self._status_waiters: dict[
            int, tuple[concurrent.futures.Future[Any], dict[int, Any], set[int]]
        ] = {}
        self._status_ids = itertools.count(1)
        self._closed = False
        self._running = False
        self._close_lock = threading.Lock()
        self._dead: BridgeError | None = None  # set when no worker can ever serve again
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bridge-io", daemon=True)
        _live_cores.add(self)
        self._thread.start()

    # -- API for the frontends (any thread) -----------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def endpoints(self) -> list[str]:
        return [slot.endpoint for slot in self._slots]

    def check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("the client has been stopped")
        if self._dead is not None:
            raise self._dead

    def submit(self, call: Call) -> None:
        """Hand ``call`` to the I/O thread (its capacity is already acquired)."""
        call.future.add_done_callback(functools.partial(self._on_future_done, call=call))
        self._call_soon(functools.partial(self._accept, call))
        if self._stopped.is_set():
            # The I/O thread ended while we were handing over; it may never
            # see this call, and nobody else touches it any more.
            self._finish(call, error=ClientClosedError("the client has been stopped"))

    def status(self, timeout: float) -> list[dict[str, Any]]:
        self.check_open()
        future: concurrent.futures.Future[list[dict[str, Any]]] = concurrent.futures.Future()
        self._call_soon(lambda: self._ask_status(future))
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise RequestTimeoutError(f"no status within {timeout} s") from None

    def stop(self, timeout: float = 15.0) -> None:
        with self._close_lock:
            first = not self._closed
            self._closed = True
        if first:
            self._call_soon(self._shutdown)
        if threading.current_thread() is not self._thread:
            self._stopped.wait(timeout)

    # -- wake-up --------------------------------------------------------------

    def _call_soon(self, fn: Callable[[], None]) -> None:
        self._inbox.append(fn)
        # One wake-up byte per burst is enough. The flag is only set by
        # writers and only cleared by the I/O thread, *after* it has emptied
        # the pipe and *before* it empties the inbox: so whenever a writer
        # sees the flag set, a byte is in the pipe or about to be, that the
        # I/O thread has not consumed yet. (Clearing before emptying the
        # pipe would lose wake-ups.)
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._wake_w, b"\0")

    def _drain_inbox(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 4096):
                pass
        self._wake_pending = False
        while self._inbox:
            fn = self._inbox.popleft()
            fn()

    # -- the I/O loop -----------------------------------------------------------

    def _run(self) -> None:
        try:
            for slot in self._slots:
                self._start_slot(slot)
            self._loop()
        except BaseException as exc:  # a bug here must not strand any caller
            log.exception("bridge I/O thread crashed")
            self._closed = True
            self._fail_everything(WorkerUnavailableError(f"the bridge I/O thread crashed: {exc!r}"))
        finally:
            self._teardown()
            self._stopped.set()

    def _loop(self) -> None:
        self._running = True
        while self._running:
            events = dict(self._poller.poll(self._poll_timeout_ms()))
            if self._wake_r in events:
                self._drain_inbox()
            for slot in self._slots:
                if slot.sock is not None and slot.sock in events:
                    self._receive(slot)
            for fd in [fd for fd in events if isinstance(fd, int) and fd in self._sentinels]:
                self._on_process_exit(self._sentinels[fd])
            self._on_timers(time.monotonic())
        # Calls handed over while we were stopping are failed in _teardown.

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        wake = now + 0.25
        if self._deadlines:
            wake = min(wake, self._deadlines[0][0])
        for slot in self._slots:
            if slot.sock is not None:
                wake = min(wake, slot.next_ping)
                if slot.unanswered_ping_since is not None:
                    # Wake right when silence would mean "hung", not at the next tick.
                    wake = min(wake, slot.last_received + self.config.heartbeat_timeout + 0.001)
            if slot.restart_at is not None:
                wake = min(wake, slot.restart_at)
        return max(0, int((wake - now) * 1000) + 1)

    # -- slots: start, connect, die -------------------------------------------

    def _start_slot(self, slot: _Slot) -> None:
        slot.restart_at = None
        slot.state = "starting"
        slot.hello = None
        slot.ready = None
        slot.started_at = time.monotonic()
        launch = slot.target.launch
        if launch is not None:
            path = ipc_path(launch.endpoint)
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()
            try:
                notify = functools.partial(
                    self._call_soon, functools.partial(self._on_process_exit, slot)
                )
                slot.process = WorkerProcess(launch, on_exit=notify)
            except BridgeError as exc:
                self._slot_start_failed(slot, exc)
                return
            if slot.process.sentinel is not None:
                self._sentinels[slot.process.sentinel] = slot
                self._poller.register(slot.process.sentinel, zmq.POLLIN)
        self._connect(slot)

    def _connect(self, slot: _Slot) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        # No high-water marks: the capacity gate bounds what is in flight,
        # and zmq must never drop or block on our behalf. Messages queue until
        # the worker has bound (no ZMQ_IMMEDIATE), so HELLO can go out at once.
        sock.sndhwm = 0
        sock.rcvhwm = 0
        if slot.target.curve is not None:
            apply_curve_client(sock, slot.target.curve)
        elif endpoint_needs_curve(slot.endpoint):
            raise ConfigurationError(f"{slot.endpoint} needs CurveZMQ keys")
        sock.connect(slot.endpoint)
        slot.sock = sock
        self._poller.register(sock, zmq.POLLIN)
        now = time.monotonic()
        slot.next_ping = now + self.config.heartbeat_interval
        slot.unanswered_ping_since = None
        slot.last_received = now
        token = slot.target.launch.owner_token if slot.target.launch is not None else ""
        self._send(slot, proto.Hello(role="client", pid=os.getpid(), token=token))

    def _disconnect(self, slot: _Slot) -> None:
        if slot.sock is not None:
            with contextlib.suppress(KeyError):
                self._poller.unregister(slot.sock)
            slot.sock.close(linger=0)
            slot.sock = None

    def _forget_process(self, slot: _Slot) -> None:
        process = slot.process
        if process is None:
            return
        if process.sentinel is not None:
            with contextlib.suppress(KeyError):
                self._poller.unregister(process.sentinel)
            self._sentinels.pop(process.sentinel, None)
        process.kill()
        with contextlib.suppress(Exception):
            process.stop(grace=0.0)
        process.close()
        slot.process = None

    def _on_process_exit(self, slot: _Slot) -> None:
        process = slot.process
        if process is None or process.poll() is None:
            return  # stale notification, or not dead after all
        what = process.describe_exit()
        tail = process.output_tail()
        self._forget_process(slot)
        self._slot_down(slot, f"worker process {process.pid} {what}", tail)

    def _slot_down(self, slot: _Slot, reason: str, output: str = "") -> None:
        """The slot's worker is gone (exited, hung and killed, or disconnected)."""
        self._disconnect(slot)
        if slot.process is not None:
            self._forget_process(slot)
        state = slot.state
        slot.state = "down"
        slot.ready = None
        slot.hello = None
        self._stop_waiting_for_status(slot)
        if state == "starting":
            detail = f"{reason} before it was ready"
            if output:
                detail += f"; its last output:\n{output}"
            self._slot_start_failed(slot, WorkerStartupError(detail, worker_output=output))
            return
        log.warning("worker %d: %s; %d call(s) in flight", slot.index, reason, len(slot.inflight))
        calls = sorted(slot.inflight.values(), key=lambda c: c.id)
        slot.inflight.clear()
        slot.items = 0
        for call in reversed(calls):
            call.slot = None
            call.crashes += 1
            if call.crashes > self.config.max_retries:
                error: BridgeError
                if call.crashes >= 2:
                    error = PoisonRequestError(
                        f"request {call.id} was in flight during {call.crashes} worker crashes "
                        f"(last: {reason}); it is not retried again"
                    )
                else:
                    error = WorkerCrashedError(f"{reason} while request {call.id} was in flight")
                self._finish(call, error=error)
            else:
                self._backlog.appendleft(call)
        self._schedule_restart(slot)
        self._dispatch()

    def _schedule_restart(self, slot: _Slot) -> None:
        if self._closed:
            return
        delay = slot.backoff.next_delay()
        slot.restart_at = time.monotonic() + delay
        log.warning("worker %d: restarting in %.1f s", slot.index, delay)

    def _slot_start_failed(self, slot: _Slot, error: BridgeError) -> None:
        self._disconnect(slot)
        if slot.process is not None:
            self._forget_process(slot)
        slot.last_error = error
        if not slot.ever_ready:
            # A first start that fails would fail again the same way (a bad
            # model path, a missing venv): report it instead of looping.
            slot.state = "failed"
            if not self.ready_future.done():
                self.ready_future.set_exception(error)
            self._check_all_dead()
            return
        slot.restart_failures += 1
        if slot.restart_failures > self.config.max_restart_failures:
            slot.state = "failed"
            log.error(
                "worker %d: giving up after %d failed restarts", slot.index, slot.restart_failures
            )
            self._check_all_dead()
            return
        slot.state = "down"
        self._schedule_restart(slot)

    def _check_all_dead(self) -> None:
        if all(s.state == "failed" for s in self._slots):
            error = next(
                (s.last_error for s in self._slots if s.last_error), None
            ) or WorkerUnavailableError("no worker is available")
            self._dead = error
            for call in list(self._backlog):
                self._finish(call, error=error)
            self._backlog.clear()

    # -- receiving ------------------------------------------------------------

    def _receive(self, slot: _Slot) -> None:
        sock = slot.sock
        for _ in range(1000):  # bounded, so timers and other slots get a turn
            if sock is None or slot.sock is not sock:
                return  # the slot was torn down while handling a message
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("worker %d: receive failed: %s", slot.index, exc)
                return
            slot.unanswered_ping_since = None  # any traffic proves liveness
            slot.last_received = time.monotonic()
            try:
                self._on_message(slot, frames)
            except ProtocolVersionError as exc:
                self._protocol_failure(slot, exc)
            except ProtocolError as exc:
                log.warning("worker %d sent a bad message: %s", slot.index, exc)

    def _on_message(self, slot: _Slot, frames: list[zmq.Frame]) -> None:
        message = proto.decode_header(frames[0].buffer)
        if isinstance(message, proto.Result):
            call = slot.inflight.pop(message.id, None)
            if call is None:
                return  # cancelled or timed out meanwhile: nobody is waiting
            slot.items -= call.items
            try:
                value = _result_value(call, message, frames[1:])
            except (ProtocolError, ValueError) as exc:
                self._finish(call, error=ProtocolError(f"bad result for request {call.id}: {exc}"))
            else:
                self._finish(call, value=value)
            self._dispatch()
        elif isinstance(message, proto.Error):
            self._on_error(slot, message)
        elif isinstance(message, proto.Pong):
            pass
        elif isinstance(message, proto.Hello):
            if message.role != "worker":
                raise ProtocolError("a worker must say HELLO with role=worker")
            slot.hello = message
        elif isinstance(message, proto.Ready):
            self._on_ready(slot, message)
        elif isinstance(message, proto.Failed):
            error = WorkerStartupError(_with_traceback(message.error))
            if slot.process is not None:
                error.worker_output = slot.process.output_tail()
            if slot.state == "starting":
                self._slot_start_failed(slot, error)
        elif isinstance(message, proto.Status):
            self._on_status(slot, message)
        elif isinstance(message, proto.Bye):
            self._slot_down(slot, f"worker said BYE ({message.reason})")
        else:
            raise ProtocolError(
                f"a client does not accept {type(message).__name__.upper()} messages"
            )

    def _on_error(self, slot: _Slot, message: proto.Error) -> None:
        if message.id is None:
            log.warning("worker %d complained: %s", slot.index, message.error.message)
            if message.error.category == "protocol" and slot.state == "starting":
                # The worker names the exception it raised while decoding.
                is_version = message.error.type == ProtocolVersionError.__name__
                error_type = ProtocolVersionError if is_version else ProtocolError
                self._slot_start_failed(slot, error_type(message.error.message))
            return
        call = slot.inflight.pop(message.id, None)
        if call is None:
            return
        slot.items -= call.items
        self._finish(call, error=error_from_info(message.error))
        self._dispatch()

    def _protocol_failure(self, slot: _Slot, exc: ProtocolError) -> None:
        if slot.state == "starting":
            self._slot_start_failed(slot, exc)
        else:
            log.error("worker %d: %s", slot.index, exc)

    def _on_ready(self, slot: _Slot, message: proto.Ready) -> None:
        if slot.state != "starting":
            return
        if slot.hello is None:
            raise ProtocolError("READY before HELLO")
        reference = next(
            (s.ready for s in self._slots if s.ready is not None and s is not slot), None
        )
        if reference is not None and [m.name for m in reference.models] != [
            m.name for m in message.models
        ]:
            self._slot_start_failed(
                slot,
                WorkerStartupError(
                    f"worker {slot.index} serves {[m.name for m in message.models]}, "
                    f"others serve {[m.name for m in reference.models]}"
                ),
            )
            return
        slot.ready = message
        slot.state = "ready"
        if slot.ever_ready:
            slot.restarts += 1
            log.warning("worker %d is back (pid %s)", slot.index, slot.pid)
        slot.ever_ready = True
        slot.restart_failures = 0
        if not self.ready_future.done() and all(s.state == "ready" for s in self._slots):
            self.ready_future.set_result(list(message.models))
        self._dispatch()

    # -- sending --------------------------------------------------------------

    def _send(self, slot: _Slot, message: proto.Message, frames: Sequence[Any] = ()) -> bool:
        if slot.sock is None:
            return False
        try:
            slot.sock.send_multipart(
                [proto.encode_header(message), *frames], flags=zmq.NOBLOCK, copy=False
            )
            return True
        except zmq.ZMQError as exc:
            log.warning("worker %d: send failed: %s", slot.index, exc)
            return False

    def _accept(self, call: Call) -> None:
        if call.future.done():  # cancelled before it got here
            self._finish(call, error=None)
            return
        if self._closed:
            self._finish(call, error=ClientClosedError("the client has been stopped"))
            return
        if self._dead is not None:
            self._finish(call, error=self._dead)
            return
        if call.deadline is not None:
            heapq.heappush(self._deadlines, (call.deadline, call.id, call))
        self._backlog.append(call)
        self._dispatch()

    def _dispatch(self) -> None:
        """Send backlog calls to the least loaded ready worker."""
        while self._backlog:
            ready = [s for s in self._slots if s.state == "ready" and s.sock is not None]
            if not ready:
                return
            slot = min(ready, key=lambda s: s.items)
            call = self._backlog.popleft()
            if call.finished:
                continue
            header = call.retry_header() if call.crashes else call.header
            assert slot.sock is not None
            try:
                slot.sock.send_multipart([header, *call.buffers], flags=zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as exc:
                self._finish(
                    call, error=WorkerUnavailableError(f"cannot send to worker {slot.index}: {exc}")
                )
                continue
            call.slot = slot
            slot.inflight[call.id] = call
            slot.items += call.items

    # -- resolution -----------------------------------------------------------

    def _finish(self, call: Call, *, value: Any = None, error: BaseException | None = None) -> None:
        """Resolve ``call`` once: release its capacity, set its Future."""
        if call.finished:
            return
        call.finished = True
        self.gate.release(call.items)
        future = call.future
        if future.done():
            return
        try:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled by its owner a moment ago

    def _on_future_done(self, future: concurrent.futures.Future[Any], call: Call) -> None:
        if future.cancelled():
            self._call_soon(lambda: self._cancel(call))

    def _cancel(self, call: Call) -> None:
        if not call.finished:
            self._withdraw(call)
            self._finish(call, error=None)

    def _withdraw(self, call: Call) -> None:
        """Take an unfinished call back: tell its worker to drop it, or unqueue it."""
        slot = call.slot
        if slot is not None and slot.inflight.pop(call.id, None) is not None:
            slot.items -= call.items
            self._send(slot, proto.Cancel(id=call.id))
        else:
            with contextlib.suppress(ValueError):
                self._backlog.remove(call)

    # -- timers ---------------------------------------------------------------

    def _on_timers(self, now: float) -> None:
        self._expire_deadlines(now)
        for slot in self._slots:
            if slot.restart_at is not None and now >= slot.restart_at:
                self._start_slot(slot)
                continue
            if slot.sock is None:
                continue
            if slot.state == "starting" and now - slot.started_at > self.config.startup_timeout:
                # _slot_down kills and reaps a spawned worker.
                self._slot_down(
                    slot, f"worker did not get ready within {self.config.startup_timeout:.0f} s"
                )
                continue
            if slot.state == "ready" and self._is_hung(slot, now):
                silence = now - slot.last_received
                if slot.process is not None:
                    # SIGKILL; the pidfd then reports the exit and the crash path runs.
                    slot.process.kill()
                    log.error(
                        "worker %d (pid %s) hung: no answer for %.1f s; killed",
                        slot.index,
                        slot.pid,
                        silence,
                    )
                    slot.unanswered_ping_since = None
                    slot.state = "killed"  # no new work; the exit runs the crash path
                else:
                    self._slot_down(
                        slot, f"worker at {slot.endpoint} stopped answering for {silence:.1f} s"
                    )
                continue
            if now >= slot.next_ping:
                if (
                    self._send(slot, proto.Ping(t=time.time()))
                    and slot.unanswered_ping_since is None
                ):
                    slot.unanswered_ping_since = now
                slot.next_ping = now + self.config.heartbeat_interval

    def _is_hung(self, slot: _Slot, now: float) -> bool:
        """Silent for heartbeat_timeout *and* sitting on a PING for a while.

        The second condition keeps a starved client (its own I/O thread not
        scheduled for seconds, so no PINGs went out) from blaming the worker:
        after such a stall the last PING's answer is read first, and the
        worker gets a fresh PING before it can be called hung.
        """
        if slot.unanswered_ping_since is None:
            return False
        grace = min(2 * self.config.heartbeat_interval, self.config.heartbeat_timeout)
        return (
            now - slot.last_received > self.config.heartbeat_timeout
            and now - slot.unanswered_ping_since > grace
        )

    def _expire_deadlines(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, call = heapq.heappop(self._deadlines)
            if call.finished:
                continue
            self._withdraw(call)
            self._finish(
                call,
                error=RequestTimeoutError(
                    f"request {call.id} ({call.op}) did not finish within {call.timeout:.3g} s"
                ),
            )
        # Also drop finished calls from the top of the heap cheaply.
        while self._deadlines and self._deadlines[0][2].finished:
            heapq.heappop(self._deadlines)

    # -- status ---------------------------------------------------------------

    def _ask_status(self, future: concurrent.futures.Future[list[dict[str, Any]]]) -> None:
        ident = next(self._status_ids)
        replies: dict[int, Any] = {}
        waiting: set[int] = set()
        for slot in self._slots:
            if slot.state == "ready" and self._send(slot, proto.Status(id=ident)):
                waiting.add(slot.index)
        self._status_waiters[ident] = (future, replies, waiting)
        self._maybe_finish_status(ident)

    def _stop_waiting_for_status(self, slot: _Slot) -> None:
        """A worker that went down will never answer the STATUS it was asked.

        Without this, status() asked just as a worker died (before its exit
        was seen) waited for that answer until its own time-out.
        """
        for ident, (_, _, waiting) in list(self._status_waiters.items()):
            if slot.index in waiting:
                waiting.discard(slot.index)
                self._maybe_finish_status(ident)

    def _on_status(self, slot: _Slot, message: proto.Status) -> None:
        entry = self._status_waiters.get(message.id)
        if entry is None or message.report is None:
            return
        entry[1][slot.index] = message.report
        entry[2].discard(slot.index)
        self._maybe_finish_status(message.id)

    def _maybe_finish_status(self, ident: int) -> None:
        future, replies, waiting = self._status_waiters[ident]
        if waiting:
            return
        del self._status_waiters[ident]
        out = []
        for slot in self._slots:
            report = replies.get(slot.index)
            entry: dict[str, Any] = {
                "worker": slot.index,
                "endpoint": slot.endpoint,
                "state": slot.state,
                "pid": slot.pid,
                "restarts": slot.restarts,
                "client_items_in_flight": slot.items,
                "client_requests_in_flight": len(slot.inflight),
                "device": slot.ready.device if slot.ready else "",
                "versions": dict(slot.hello.versions) if slot.hello else {},
            }
            if report is not None:
                entry.update(msgspec.structs.asdict(report))
            out.append(entry)
        if not future.done():
            future.set_result(out)

    # -- shutdown -------------------------------------------------------------

    def _shutdown(self) -> None:
        self._running = False

    def _fail_everything(self, error: BridgeError) -> None:
        for call in list(self._backlog):
            self._finish(call, error=error)
        self._backlog.clear()
        for slot in self._slots:
            for call in list(slot.inflight.values()):
                self._finish(call, error=error)
            slot.inflight.clear()
            slot.items = 0
        # Calls still in the inbox were never accepted; fail them too.
        while self._inbox:
            fn = self._inbox.popleft()
            with contextlib.suppress(Exception):
                fn()
        if not self.ready_future.done():
            self.ready_future.set_exception(error)
        for future, _, _ in self._status_waiters.values():
            if not future.done():
                future.set_exception(error)
        self._status_waiters.clear()

    def _teardown(self) -> None:
        self._closed = True
        self._fail_everything(ClientClosedError("the client was stopped"))
        for slot in self._slots:
            owned = slot.target.launch is not None
            if slot.sock is not None:
                self._send(slot, proto.Bye(reason="client stopping", shutdown=owned))
        # Give the BYEs a moment to leave before the sockets close.
        processes = [s.process for s in self._slots if s.process is not None]
        deadline = time.monotonic() + 3.0
        for slot in self._slots:
            if slot.sock is not None:
                slot.sock.close(
                    linger=max(
                        0, int((deadline - time.monotonic()) * 1000) // max(1, len(self._slots))
                    )
                )
                slot.sock = None
        for process in processes:
            with contextlib.suppress(Exception):
                process.stop(grace=max(0.0, deadline - time.monotonic()))
            process.close()
        for slot in self._slots:
            slot.process = None
            slot.state = "stopped"
            if slot.target.launch is not None:
                path = ipc_path(slot.endpoint)
                if path is not None:
                    with contextlib.suppress(OSError):
                        path.unlink()
        with contextlib.suppress(Exception):
            self._ctx.term()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


# ---------------------------------------------------------------------- results


def _result_value(call: Call, message: proto.Result, frames: Sequence[zmq.Frame]) -> Any:
    op = call.op
    usage = int(message.usage)
    if op in ("embed", "image_embed", "audio_embed"):
        if message.embeddings is None:
            raise ProtocolError("embedding result without an array")
        matrix = proto.decode_array(message.embeddings, [f.buffer for f in frames])
        if matrix.ndim != 2 or matrix.shape[0] != call.items:
            raise ProtocolError(f"expected {call.items} embedding rows, got shape {matrix.shape}")
        # Row views over the one received buffer: no copy.
        return list(matrix), usage
    if op == "rerank":
        if message.scores is None or len(message.scores) != call.items:
            raise ProtocolError("rerank result has the wrong number of scores")
        return list(message.scores), usage
    if op == "classify":
        if message.labels is None or len(message.labels) != call.items:
            raise ProtocolError("classify result has the wrong number of items")
        return [
            [{"label": ls.label, "score": ls.score} for ls in item] for item in message.labels
        ], usage
    raise ProtocolError(f"unexpected op {op!r}")


def overloaded(count: int, gate: CapacityGate, waited: float | None) -> OverloadedError:
    if waited is None:
        return OverloadedError(
            f"{gate.used} items are in flight (limit {gate.limit}); this call of {count} would exceed it"
        )
    return OverloadedError(
        f"no room for {count} items within {waited:.3g} s ({gate.used} in flight, limit {gate.limit})"
    )


def check_message_size(call: Call, limit: int) -> None:
    size = call.nbytes()
    if size > limit:
        raise InputTooLargeError(
            f"the request is {size} bytes, over the {limit}-byte message limit; split it into smaller calls"
        )
