"""Sharing a machine with vLLM, checked without a GPU: budget arithmetic, device
selection, bfloat16, and several CPU workers behind one client."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import _support
import numpy as np
import pytest

from bridge import (
    BatchedInference,
    ConfigurationError,
    WorkerStartupError,
    suggest_gpu_memory_utilization,
)
from bridge._gpu import GIB, budget_fraction, parse_device

# ------------------------------------------------------------------ arithmetic


@pytest.mark.parametrize(
    ("budget", "total", "want"),
    [(0.25, 80 * GIB, 0.25), (1, 80 * GIB, 1.0), (8 * GIB, 80 * GIB, 0.1), (None, 80 * GIB, None)],
)
def test_budget_fraction(budget: Any, total: int, want: float | None) -> None:
    assert budget_fraction(budget, total) == want


@pytest.mark.parametrize("budget", [0, -1, True, "8G", 100 * GIB])
def test_bad_budgets_are_refused(budget: Any) -> None:
    with pytest.raises(ConfigurationError):
        budget_fraction(budget, 80 * GIB)


def test_vllm_utilization_leaves_room_for_the_worker() -> None:
    # 80 GiB card, worker budget 10 GiB, 1 GiB headroom -> 69/80 = 0.8625 -> 0.86
    assert suggest_gpu_memory_utilization(80 * GIB, 10 * GIB) == 0.86
    assert suggest_gpu_memory_utilization(80 * GIB, 10 * GIB, headroom_bytes=0) == 0.87
    with pytest.raises(ConfigurationError, match="nothing is left for vLLM"):
        suggest_gpu_memory_utilization(16 * GIB, 15 * GIB, headroom_bytes=2 * GIB)


def test_cuda_index_becomes_the_workers_visible_device() -> None:
    assert parse_device("cuda:3") == ("cuda", "3")
    assert parse_device("cuda") == ("cuda", None)
    assert parse_device("cpu") == ("cpu", None)
    with pytest.raises(ConfigurationError):
        parse_device("cuda:x")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"device": ["cuda:0", "cuda:1"], "model_id": ["a/x", "b/y"]},  # one worker, two GPUs
        {"devices": [], "model_id": "a"},
        {"devices": [0], "workers": 2, "model_id": "a"},
        {"gpu_memory": -0.5, "model_id": "a"},
        {"gpu_memory": "half", "model_id": "a"},
    ],
)
def test_bad_gpu_arguments_fail_before_spawning(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        BatchedInference(engine="torch", **kwargs)


# ------------------------------------------------------------- on this machine


def test_cuda_without_a_gpu_fails_start_with_a_clear_error(minilm_path: str) -> None:
    with pytest.raises(WorkerStartupError) as caught:
        BatchedInference(model_id=minilm_path, engine="torch", device="cuda:0", startup_timeout=120)
    assert (
        "CUDA" in str(caught.value) or "NVIDIA" in str(caught.value) or "cuda" in str(caught.value)
    )


def test_budget_without_a_gpu_is_ignored_and_reported(minilm_path: str) -> None:
    with BatchedInference(model_id=minilm_path, engine="torch", gpu_memory=0.3) as client:
        assert client.status()[0]["gpu"] is None
        with pytest.raises(ConfigurationError, match="no worker of this client runs on a GPU"):
            client.suggest_vllm_gpu_memory_utilization()
        assert client.embed(sentences=["still works"]).result(timeout=60)[0][0].shape == (384,)


def test_bfloat16_embedder_is_close_to_float32(minilm: BatchedInference, minilm_path: str) -> None:
    texts = ["bfloat16 halves the memory", "半精度", "the cat sat on the mat"]
    want = np.stack(minilm.embed(sentences=texts).result(timeout=60)[0])
    with BatchedInference(model_id=minilm_path, engine="torch", dtype="bfloat16") as client:
        assert client.models[0]["dtype"] == "bfloat16"
        rows, _ = client.embed(sentences=texts).result(timeout=60)
    got = np.stack(rows)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=3e-2)
    assert not np.array_equal(got, want)  # it really ran in bfloat16


def test_bfloat16_is_refused_for_models_it_cannot_convert(
    tiny_models: dict[str, dict[str, Any]],
) -> None:
    with pytest.raises(WorkerStartupError, match="bfloat16"):
        BatchedInference(
            model_id=tiny_models["classifier"]["path"], engine="torch", dtype="bfloat16"
        )


@pytest.mark.slow
def test_two_workers_share_the_load_and_cover_for_each_other(minilm_path: str) -> None:
    texts = [f"balanced request {i}" for i in range(240)]
    with BatchedInference(model_id=minilm_path, engine="torch", devices=["3", "5"]) as client:
        status = client.status()
        assert [w["cuda_visible_devices"] for w in status] == ["3", "5"]
        assert len({w["pid"] for w in status}) == 2
        want = client.embed(sentences=texts).result(timeout=120)[0]

        futures = [client.embed(sentences=[t]) for t in texts]
        time.sleep(0.5)
        victim = status[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        got = [f.result(timeout=300)[0][0] for f in futures]
        np.testing.assert_allclose(np.stack(got), np.stack(want), atol=1e-5, rtol=0)

        assert _support.wait_until(lambda: client.status()[0]["state"] == "ready", timeout=60)
        after = client.status()
        assert after[1]["pid"] == status[1]["pid"]  # the other worker was never touched
        assert after[0]["pid"] != victim and after[0]["restarts"] == 1
        assert after[1]["requests_served"] > 0
