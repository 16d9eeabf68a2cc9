"""The drop-in client: embed's API shape, model addressing, attaching, start-up errors, isolation."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import _support
import numpy as np
import pytest

from bridge import (
    BatchedInference,
    ClientClosedError,
    ConfigurationError,
    UnknownModelError,
    WorkerStartupError,
)


def test_main_env_is_numpy2_and_has_no_infinity() -> None:
    major, minor = (int(x) for x in np.__version__.split(".")[:2])
    assert (major, minor) >= (2, 2)
    for module in ("infinity_emb", "embed", "optimum"):
        assert importlib.util.find_spec(module) is None, (
            f"{module} must not be importable in main_env"
        )
    assert "infinity_emb" not in sys.modules


def test_embed_returns_a_future_of_float32_rows_and_usage(minilm: BatchedInference) -> None:
    future = minilm.embed(sentences=["Hello, world!", "你好，世界"])
    assert isinstance(future, concurrent.futures.Future)
    embeddings, usage = future.result(timeout=60)
    assert isinstance(embeddings, list) and len(embeddings) == 2
    for row in embeddings:
        assert isinstance(row, np.ndarray)
        assert row.dtype == np.float32 and row.shape == (384,) and row.flags.c_contiguous
        assert row.flags.writeable  # callers may normalise in place, as with embed
    assert isinstance(usage, int) and usage > 0
    assert abs(float(np.linalg.norm(embeddings[0])) - 1.0) < 1e-5


def test_repr_and_address(minilm: BatchedInference, minilm_path: str) -> None:
    assert repr(minilm) == f"BatchedInference([{minilm_path!r}])"
    assert minilm.address.startswith("ipc://")
    directory = Path(minilm.address[len("ipc://") :]).parent
    info = directory.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()


def test_model_id_by_given_string_served_name_or_index(
    minilm: BatchedInference, minilm_path: str
) -> None:
    served = "/".join(minilm_path.split("/")[-2:])
    assert minilm.models[0]["name"] == served
    want = minilm.embed(sentences=["same"]).result(timeout=60)[0][0]
    for model_id in (minilm_path, served, 0, -1):
        got = minilm.embed(sentences=["same"], model_id=model_id).result(timeout=60)[0][0]
        np.testing.assert_array_equal(got, want)
    for bad in ("nope", 1, -2):
        with pytest.raises(UnknownModelError):
            minilm.embed(sentences=["x"], model_id=bad)


def test_second_client_attaches_by_address(minilm: BatchedInference) -> None:
    want = minilm.embed(sentences=["attach me"]).result(timeout=60)[0][0]
    with BatchedInference(address=minilm.address) as other:
        assert other.models == minilm.models
        got = other.embed(sentences=["attach me"]).result(timeout=60)[0][0]
        np.testing.assert_array_equal(got, want)
    # The attached client does not own the worker: it is still serving.
    assert minilm.embed(sentences=["still here"]).result(timeout=60)[1] > 0


def test_stop_is_idempotent_and_leaves_no_process(minilm_path: str) -> None:
    client = BatchedInference(model_id=minilm_path, engine="torch")
    pid = client.status()[0]["pid"]
    assert _support.pid_alive(pid)
    client.stop()
    client.stop()
    assert _support.wait_until(lambda: not _support.pid_alive(pid), timeout=10)
    with pytest.raises(ClientClosedError):
        client.embed(sentences=["after stop"])
    assert not Path(client.address[len("ipc://") :]).exists()


def test_context_manager_stops_the_worker(minilm_path: str) -> None:
    with BatchedInference(model_id=minilm_path, engine="torch") as client:
        pid = client.status()[0]["pid"]
        assert client.embed(sentences=["ctx"]).result(timeout=60)[1] > 0
    assert _support.wait_until(lambda: not _support.pid_alive(pid), timeout=10)


def test_bad_model_path_fails_start_with_the_workers_own_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(WorkerStartupError) as caught:
        BatchedInference(model_id=str(missing), engine="torch")
    text = str(caught.value)
    assert str(missing) in text or "such-model" in text
    assert "worker traceback" in text or "last output" in text


def test_missing_worker_interpreter_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="make infinity-env"):
        BatchedInference(model_id="x", worker_python=tmp_path / "nope" / "python")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model_id": ""},
        {"model_id": []},
        {"model_id": 3},
        {"model_id": "a", "engine": "tensorflow"},
        {"model_id": ["a", "b"], "device": ["cpu", "cpu", "cpu"]},
        {"model_id": ["x/a", "x/a"]},
        {"model_id": "a", "timeout": -1},
        {"model_id": "a", "overload": "drop"},
        {"model_id": "a", "timeout": "5"},
        {"model_id": "a", "max_retries": -1},
        {"model_id": "a", "heartbeat_interval": 3, "heartbeat_timeout": 2},
        {"model_id": "a", "batch_delay": -0.001},
        {"model_id": "a", "batch_delay": 2},
        {"model_id": "a", "batch_delay": "fast"},
        {"model_id": "a", "batch_delay": True},
        {"address": "http://127.0.0.1:1"},
        {"address": "tcp://10.1.2.3:5555"},  # non-loopback without CurveZMQ keys
    ],
)
def test_bad_constructor_arguments_fail_before_spawning(kwargs: dict[str, Any]) -> None:
    before = set(_support.worker_pids_of(os.getpid()))
    with pytest.raises(ConfigurationError):
        BatchedInference(**kwargs)
    assert set(_support.worker_pids_of(os.getpid())) <= before


def test_batch_delay_is_measured_and_read_back_from_infinity(minilm: BatchedInference) -> None:
    # "auto": half the fastest one-item forward pass, within infinity's floor
    # and embed's 2 ms; the value is read back from infinity's own ModelWorker.
    delay = minilm.models[0]["batch_delay"]
    assert 1e-4 <= delay <= 2e-3


def test_explicit_batch_delay_reaches_infinitys_batching_threads() -> None:
    # infinity sleeps batch_delay after every batch (before post-processing),
    # so a 50 ms delay makes every request take at least that long.
    with BatchedInference(
        model_id="debug/null-model", engine="debugengine", batch_delay=0.05
    ) as client:
        assert client.models[0]["batch_delay"] == 0.05
        took = []
        for i in range(3):
            started = time.perf_counter()
            client.embed(sentences=[f"text {i}"]).result(timeout=30)
            took.append(time.perf_counter() - started)
        assert min(took) >= 0.05
