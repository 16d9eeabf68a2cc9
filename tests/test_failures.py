"""Failures: every call ends, with its result or with a typed error that says what happened.

The worker is always real. Crashes are real SIGKILLs (from the test, or from
a model whose custom code kills its own process on a trigger word), hangs
are real SIGSTOPs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _support
import numpy as np
import pytest
import zmq

import bridge
from bridge import (
    BatchedInference,
    BridgeError,
    ClientClosedError,
    InputTooLargeError,
    InvalidInputError,
    OverloadedError,
    PoisonRequestError,
    RequestTimeoutError,
    UnknownModelError,
    UnsupportedOperationError,
    WorkerCrashedError,
    WorkerError,
    WorkerOutOfMemoryError,
    WorkerStartupError,
)

ATOL = 1e-5


def worker_pid(client: BatchedInference) -> int:
    pid = client.status()[0]["pid"]
    assert isinstance(pid, int)
    return pid


def exit_seen_at(caplog: pytest.LogCaptureFixture, pid: int) -> float:
    for record in caplog.records:
        if f"worker process {pid} " in record.getMessage():
            return record.created
    raise AssertionError(
        f"no log record about pid {pid}: {[r.getMessage() for r in caplog.records]}"
    )


@pytest.fixture()
def poison(tiny_models: dict[str, dict[str, Any]]) -> Any:
    client = BatchedInference(model_id=tiny_models["poison"]["path"], engine="torch")
    yield client
    client.stop()


# --------------------------------------------------------------------------- crash


@pytest.mark.slow
def test_kill_9_under_load_loses_nothing(
    minilm_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """1200 requests from 8 threads in flight; SIGKILL the worker; every Future resolves with its own answer."""
    caplog.set_level(logging.WARNING, logger="bridge")
    texts = [
        f"request {i}: " + " ".join(["alpha", "beta", "gamma", "delta"][: 1 + i % 4])
        for i in range(1200)
    ]
    with BatchedInference(model_id=minilm_path, engine="torch") as client:
        pid = worker_pid(client)
        futures: dict[int, concurrent.futures.Future[Any]] = {}
        lock = threading.Lock()

        def submit(offset: int) -> None:
            for i in range(offset, len(texts), 8):
                future = client.embed(sentences=[texts[i]])
                with lock:
                    futures[i] = future

        threads = [threading.Thread(target=submit, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(futures) == 1200
        in_flight = client.items_in_flight
        assert in_flight >= 1000, f"only {in_flight} in flight when the worker was killed"
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)

        results = {i: f.result(timeout=300) for i, f in futures.items()}  # raises if any failed
        assert exit_seen_at(caplog, pid) - killed_at < 1.0  # the sentinel, not a time-out
        new_pid = worker_pid(client)
        assert new_pid != pid and _support.pid_alive(new_pid)
        assert client.status()[0]["restarts"] == 1

    [expected] = _support.reference(
        [{"kind": "sentence_transformers", "model": minilm_path, "texts": texts}]
    )
    got = np.stack([results[i][0][0] for i in range(len(texts))])
    np.testing.assert_allclose(got, expected["arrays"][0], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_poison_input_fails_alone_after_two_crashes(poison: BatchedInference) -> None:
    first = worker_pid(poison)
    with pytest.raises(PoisonRequestError, match="2 worker crashes"):
        poison.embed(sentences=["the cat crashnow"]).result(timeout=120)
    # The worker is back and serves everything else.
    assert poison.embed(sentences=["the cat sat"]).result(timeout=60)[1] > 0
    assert worker_pid(poison) != first
    assert poison.status()[0]["restarts"] == 2


@pytest.mark.slow
def test_without_retries_a_crash_fails_the_request(tiny_models: dict[str, dict[str, Any]]) -> None:
    with BatchedInference(
        model_id=tiny_models["poison"]["path"], engine="torch", max_retries=0
    ) as client:
        with pytest.raises(WorkerCrashedError, match="SIGKILL") as caught:
            client.embed(sentences=["crashnow"]).result(timeout=120)
        assert not isinstance(caught.value, PoisonRequestError)
        assert client.embed(sentences=["fine"]).result(timeout=60)[1] > 0


# ---------------------------------------------------------------------------- hang


@pytest.mark.slow
def test_sigstop_is_detected_by_heartbeats(
    minilm_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bridge")
    texts = [f"hang test {i}" for i in range(40)]
    with BatchedInference(model_id=minilm_path, engine="torch") as client:
        want = client.embed(sentences=texts).result(timeout=60)[0]
        pid = worker_pid(client)
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.time()
        try:
            futures = [client.embed(sentences=[t]) for t in texts]
            got = [f.result(timeout=120)[0][0] for f in futures]
        finally:
            if _support.pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        hung = [r for r in caplog.records if "hung" in r.getMessage()]
        assert hung, [r.getMessage() for r in caplog.records]
        assert hung[0].created - stopped_at < 3.0
        assert worker_pid(client) != pid
    np.testing.assert_allclose(np.stack(got), np.stack(want), atol=ATOL, rtol=0)


# ------------------------------------------------------------------ worker errors


def test_errors_inside_the_worker_fail_only_their_request(poison: BatchedInference) -> None:
    pid = worker_pid(poison)
    innocent = [f"innocent sentence {i}" for i in range(30)]
    want = poison.embed(sentences=innocent).result(timeout=60)[0]
    # Submitted together, so infinity batches the bad items with good ones.
    futures = [poison.embed(sentences=[t]) for t in innocent[:15]]
    bad = poison.embed(sentences=["this one says failnow"])
    oom = poison.embed(sentences=["and this oomnow"])
    futures += [poison.embed(sentences=[t]) for t in innocent[15:]]

    with pytest.raises(WorkerError, match="cannot embed the word failnow") as caught:
        bad.result(timeout=60)
    assert caught.value.remote_type == "RuntimeError"
    assert "modeling_poison.py" in caught.value.remote_traceback
    with pytest.raises(WorkerOutOfMemoryError, match="out of memory"):
        oom.result(timeout=60)
    got = [f.result(timeout=60)[0][0] for f in futures]
    np.testing.assert_allclose(np.stack(got), np.stack(want), atol=ATOL, rtol=0)
    assert worker_pid(poison) == pid  # the worker lived through it


# ------------------------------------------------------------------------ deadlines


def test_per_call_deadline(poison: BatchedInference) -> None:
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError, match=r"within 0\.5 s"):
        poison.embed(sentences=["slownow"], timeout=0.5).result(timeout=30)
    assert time.monotonic() - started < 1.5
    assert poison.embed(sentences=["quick"], timeout=30).result(timeout=30)[1] > 0


def test_default_deadline_and_worker_drops_expired_work(
    tiny_models: dict[str, dict[str, Any]],
) -> None:
    with BatchedInference(
        model_id=tiny_models["poison"]["path"], engine="torch", timeout=0.4
    ) as client:
        with pytest.raises(RequestTimeoutError):
            client.embed(sentences=["slownow"]).result(timeout=30)
        # Queued behind the slow one, these expire too; the worker cancels them.
        futures = [client.embed(sentences=[f"queued {i}"]) for i in range(50)]
        client.embed(sentences=["slownow"])
        for future in futures:
            with contextlib.suppress(RequestTimeoutError):
                future.result(timeout=30)
        assert _support.wait_until(lambda: client.status()[0]["requests_in_flight"] == 0, timeout=5)
        assert client.items_in_flight == 0


# --------------------------------------------------------------------- backpressure


def test_overload_raise_bounds_items_in_flight(tiny_models: dict[str, dict[str, Any]]) -> None:
    with BatchedInference(
        model_id=tiny_models["poison"]["path"],
        engine="torch",
        max_inflight_items=8,
        overload="raise",
    ) as client:
        held = client.embed(sentences=["slownow"] + ["x"] * 3)  # 4 items, busy for 2 s
        accepted = [held]
        with pytest.raises(OverloadedError, match="limit 8"):
            for i in range(100):
                accepted.append(client.embed(sentences=[f"item {i}"]))
        assert len(accepted) == 5 and client.items_in_flight == 8
        for future in accepted:
            future.result(timeout=60)
        assert client.items_in_flight == 0


def test_overload_block_waits_then_times_out(tiny_models: dict[str, dict[str, Any]]) -> None:
    with BatchedInference(
        model_id=tiny_models["poison"]["path"],
        engine="torch",
        max_inflight_items=4,
        overload="block",
    ) as client:
        held = client.embed(sentences=["slownow", "a", "b", "c"])
        started = time.monotonic()
        with pytest.raises(OverloadedError, match=r"within 0\.3"):
            client.embed(sentences=["waits"], timeout=0.3)
        assert 0.25 < time.monotonic() - started < 1.5
        # Without a short deadline it simply waits for room.
        late = client.embed(sentences=["waits longer"], timeout=30)
        assert held.result(timeout=30)[1] > 0 and late.result(timeout=30)[1] > 0


def test_flood_from_threads_stays_under_the_bound(minilm_path: str) -> None:
    with BatchedInference(model_id=minilm_path, engine="torch", max_inflight_items=32) as client:
        peak = 0
        stop = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, client.items_in_flight)
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(
                    lambda i: client.embed(sentences=[f"flood {i}"] * 3).result(timeout=120), i
                )
                for i in range(200)
            ]
            results = [f.result(timeout=300) for f in futures]
        stop.set()
        watcher.join()
        assert len(results) == 200 and 0 < peak <= 32


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: c.embed(sentences="hello"), InvalidInputError, "not a single str"),
        (lambda c: c.embed(sentences=None), InvalidInputError, "must be a list"),
        (lambda c: c.embed(sentences={"a": 1}), InvalidInputError, "must be a list"),
        (lambda c: c.embed(sentences=[]), InvalidInputError, "empty"),
        (
            lambda c: c.embed(sentences=["ok", None]),
            InvalidInputError,
            r"sentences\[1\] must be a str, got NoneType",
        ),
        (
            lambda c: c.embed(sentences=[b"bytes"]),
            InvalidInputError,
            r"sentences\[0\] must be a str, got bytes",
        ),
        (lambda c: c.embed(sentences=[3]), InvalidInputError, "got int"),
        (lambda c: c.embed(sentences=b"raw"), InvalidInputError, "not a single bytes"),
        (lambda c: c.embed(sentences=["x"], model_id="nope"), UnknownModelError, "no model 'nope'"),
        (lambda c: c.embed(sentences=["x"], model_id=5), UnknownModelError, "out of range"),
        (lambda c: c.embed(sentences=["x"], model_id=True), InvalidInputError, "model_id"),
        (lambda c: c.embed(sentences=["x" * 2001]), InputTooLargeError, "2001 characters"),
        (lambda c: c.embed(sentences=["y" * 1500] * 40), InputTooLargeError, "message limit"),
        (lambda c: c.embed(sentences=["x"], timeout=-1), InvalidInputError, "timeout"),
        (
            lambda c: c.rerank(query="q", docs=["d"]),
            UnsupportedOperationError,
            "it supports: embed",
        ),
        (lambda c: c.classify(sentences=["x"]), UnsupportedOperationError, "cannot classify"),
        (
            lambda c: c.image_embed(images=["a.png"]),
            UnsupportedOperationError,
            "cannot image_embed",
        ),
    ],
)
def test_bad_input_is_refused_before_sending(
    small_limits_client: BatchedInference, call: Any, error: type[BridgeError], match: str
) -> None:
    served = small_limits_client.status()[0]["requests_served"]
    with pytest.raises(error, match=match):
        call(small_limits_client)
    assert small_limits_client.status()[0]["requests_served"] == served
    assert small_limits_client.items_in_flight == 0


@pytest.fixture(scope="module")
def small_limits_client(minilm_path: str) -> Any:
    client = BatchedInference(
        model_id=minilm_path, engine="torch", max_item_chars=2000, max_message_bytes=50_000
    )
    yield client
    client.stop()


def test_every_public_error_is_a_bridge_error() -> None:
    classes = [
        obj for _, obj in inspect.getmembers(bridge, inspect.isclass) if issubclass(obj, Exception)
    ]
    assert len(classes) >= 15
    assert all(issubclass(cls, BridgeError) for cls in classes)


# ------------------------------------------------------------------------ lifecycle


def test_stop_fails_pending_futures_cleanly(minilm_path: str) -> None:
    client = BatchedInference(model_id=minilm_path, engine="torch")
    pid = worker_pid(client)
    futures = [client.embed(sentences=[f"pending {i} " * 20]) for i in range(300)]
    client.stop()
    done, not_done = concurrent.futures.wait(futures, timeout=15)
    assert not not_done
    outcomes = {type(f.exception()).__name__ if f.exception() else "ok" for f in done}
    assert outcomes <= {"ok", "ClientClosedError"} and "ClientClosedError" in outcomes
    assert _support.wait_until(lambda: not _support.pid_alive(pid), timeout=5)
    with pytest.raises(ClientClosedError):
        client.embed(sentences=["late"])


def test_cancelled_future_frees_its_capacity(poison: BatchedInference) -> None:
    slow = poison.embed(sentences=["slownow"])
    queued = poison.embed(sentences=["queued"] * 5)
    assert queued.cancel()
    assert _support.wait_until(lambda: poison.items_in_flight == 1, timeout=5)
    assert slow.result(timeout=30)[1] > 0


def run_client_process(mode: str, model: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(_support.HELPERS / "client_process.py"), mode, model],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(proc.stderr.read() if proc.stderr else "no output")
    return proc, int(json.loads(line)["worker_pid"])


def test_parent_killed_by_sigkill_leaves_no_orphan(minilm_path: str) -> None:
    proc, pid = run_client_process("sleep", minilm_path)
    assert _support.pid_alive(pid)
    proc.kill()
    proc.wait(timeout=10)
    assert _support.wait_until(lambda: not _support.pid_alive(pid), timeout=5), (
        "worker outlived its parent"
    )


def test_interpreter_exit_without_stop_cleans_up(minilm_path: str) -> None:
    proc, pid = run_client_process("exit", minilm_path)
    assert proc.wait(timeout=30) == 0
    assert _support.wait_until(lambda: not _support.pid_alive(pid), timeout=5)


def test_ctrl_c_in_the_app_never_hangs(minilm_path: str) -> None:
    proc, pid = run_client_process("block", minilm_path)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) != 0  # KeyboardInterrupt, promptly
    assert proc.stderr is not None and "KeyboardInterrupt" in proc.stderr.read()
    assert _support.wait_until(lambda: not _support.pid_alive(pid), timeout=5)


# ------------------------------------------------------------------------- security


def run_worker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_support.worker_python()), "-m", "bridge.worker", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_worker_refuses_a_public_tcp_endpoint_without_curve() -> None:
    result = run_worker("--bind", "tcp://0.0.0.0:0", "--model-id", "unused")
    assert result.returncode == 2
    assert "CurveZMQ" in result.stderr


def test_curve_encrypted_tcp_worker(minilm_path: str, tmp_path: Path) -> None:
    from zmq.auth import create_certificates

    public, secret = create_certificates(str(tmp_path), "worker")
    with socket_port() as port:
        endpoint = f"tcp://127.0.0.1:{port}"
    worker = subprocess.Popen(
        [
            str(_support.worker_python()),
            "-m",
            "bridge.worker",
            "--bind",
            endpoint,
            "--model-id",
            minilm_path,
            "--engine",
            "torch",
            "--curve-secret-file",
            secret,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with BatchedInference(
            address=endpoint, curve_server_key=public, startup_timeout=120
        ) as client:
            assert client.embed(sentences=["encrypted"]).result(timeout=60)[0][0].shape == (384,)
        # A plain-text client cannot talk to it: no handshake, no READY.
        with pytest.raises(WorkerStartupError):
            BatchedInference(address=endpoint, startup_timeout=3)
        # Nor can one that trusts another server key.
        other_public, _ = create_certificates(str(tmp_path), "impostor")
        with pytest.raises(WorkerStartupError):
            BatchedInference(address=endpoint, curve_server_key=other_public, startup_timeout=3)
    finally:
        worker.terminate()
        worker.wait(timeout=20)


def test_oversized_message_is_dropped_by_the_worker(small_limits_client: BatchedInference) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(small_limits_client.address)
        sock.send_multipart([b"\x80" * 100, b"\0" * 200_000])  # 4x the worker's limit
        assert sock.poll(500) == 0  # no answer: the connection was dropped
    finally:
        sock.close(linger=0)
        ctx.term()
    rows, _ = small_limits_client.embed(sentences=["still serving"]).result(timeout=60)
    assert rows[0].shape == (384,)


class socket_port:
    """A free loopback TCP port (closed again before use)."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        port: int = self._sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


def test_status_answers_when_a_worker_dies_while_being_asked() -> None:
    # SIGKILL, then status() at once: the question can reach the dying worker
    # before its exit is noticed; the answer must not wait for it.
    with BatchedInference(model_id="debug/null-model", engine="debugengine", workers=2) as client:
        for _ in range(3):
            victim = client.status()[0]["pid"]
            os.kill(victim, signal.SIGKILL)
            started = time.monotonic()
            status = client.status(timeout=10.0)
            assert time.monotonic() - started < 5.0
            assert status[1]["state"] == "ready"
            assert status[0]["pid"] != victim or status[0]["state"] != "ready"
            assert _support.wait_until(lambda: client.status()[0]["state"] == "ready", timeout=60)
