"""Equality against references: what comes through the bridge is what the library computes.

References are computed in infinity_env, in-process (sentence-transformers'
``encode``, or infinity's own AsyncEngineArray with the worker's settings).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import _support
import numpy as np
import pytest

from bridge import BatchedInference

ATOL = 1e-5


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return _support.mixed_texts(120, seed=11)


def test_minilm_equals_sentence_transformers(
    minilm: BatchedInference, minilm_path: str, texts: list[str]
) -> None:
    # Uneven requests, all in flight at once, so infinity batches them its own way.
    sizes = [1, 7, 32, 3, 50, 27]
    requests, start = [], 0
    for size in sizes:
        requests.append(texts[start : start + size])
        start += size
    assert start == len(texts) >= 100
    futures = [minilm.embed(sentences=chunk) for chunk in requests]
    rows = [row for future in futures for row in future.result(timeout=300)[0]]

    [expected] = _support.reference(
        [{"kind": "sentence_transformers", "model": minilm_path, "texts": texts}]
    )
    want = expected["arrays"][0]
    assert len(rows) == len(texts)
    for row in rows:
        assert isinstance(row, np.ndarray) and row.dtype == np.float32 and row.shape == (384,)
    got = np.stack(rows)
    assert want.shape == got.shape == (120, 384)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # Sanity: the long texts really were longer than the model's 256 tokens,
    # and they still embed (truncated, as sentence-transformers does).
    assert max(len(t) for t in texts) > 600


def test_usage_equals_in_process_infinity(
    minilm: BatchedInference, minilm_path: str, texts: list[str]
) -> None:
    requests = [*_support.chunks(texts[:60], 12), [texts[60]], texts[61:100]]
    results = [f.result(timeout=300) for f in [minilm.embed(sentences=r) for r in requests]]
    [expected] = _support.reference(
        [
            {
                "kind": "infinity",
                "model": minilm_path,
                "op": "embed",
                "requests": [{"texts": r} for r in requests],
            }
        ]
    )
    assert [usage for _, usage in results] == expected["usage"]
    for (rows, _), want in zip(results, expected["arrays"], strict=True):
        np.testing.assert_allclose(np.stack(rows), want, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def conan(tiny_models: dict[str, dict[str, Any]]) -> Any:
    client = BatchedInference(model_id=tiny_models["conan"]["path"], engine="torch")
    yield client
    client.stop()


def test_conan_shaped_model_equals_in_process_infinity(
    conan: BatchedInference, tiny_models: dict[str, dict[str, Any]], texts: list[str]
) -> None:
    assert conan.models[0]["dim"] == 1792
    requests = [texts[:40], texts[40:41], texts[41:120]]
    results = [f.result(timeout=300) for f in [conan.embed(sentences=r) for r in requests]]
    [expected] = _support.reference(
        [
            {
                "kind": "infinity",
                "model": tiny_models["conan"]["path"],
                "op": "embed",
                "requests": [{"texts": r} for r in requests],
            }
        ]
    )
    for (rows, usage), want, want_usage in zip(
        results, expected["arrays"], expected["usage"], strict=True
    ):
        assert usage == want_usage
        assert all(row.dtype == np.float32 and row.shape == (1792,) for row in rows)
        np.testing.assert_allclose(np.stack(rows), want, atol=ATOL, rtol=0)


def test_many_threads_get_their_own_results(minilm: BatchedInference, texts: list[str]) -> None:
    """Thread safety: 8 threads x 25 calls; every answer matches its own input."""
    single = {
        t: row
        for t, row in zip(
            texts[:40], minilm.embed(sentences=texts[:40]).result(timeout=300)[0], strict=True
        )
    }

    def worker(offset: int) -> list[tuple[list[str], list[np.ndarray]]]:
        out = []
        for i in range(25):
            chunk = [texts[(offset * 7 + i + k) % 40] for k in range(1 + (i % 3))]
            out.append((chunk, minilm.embed(sentences=chunk).result(timeout=300)[0]))
        return out

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for batch in pool.map(worker, range(8)):
            for chunk, rows in batch:
                assert len(rows) == len(chunk)
                for text, row in zip(chunk, rows, strict=True):
                    np.testing.assert_allclose(row, single[text], atol=ATOL, rtol=0)
